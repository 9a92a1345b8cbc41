"""`evolora run --jobs N`: the (strategy, seed) pairs in worker processes, a shared job trained once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evolora.errors import EvoloraError
from evolora.experiment import run_experiment
from evolora.workers import WorkerError, run_workers, take, work_queue
from tests.helpers import tiny_config

OVER = {"threads": 1, "seeds": "[0]", "strategies": "[frozen, finetune, peso]"}


def _adapters(run_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    folder = run_dir / f"stage-{stage}" / "trained" / "adapters"
    return {
        f"{f.parent.name}/{k}": v
        for f in sorted(folder.glob("*/adapter_model.safetensors"))
        for k, v in load_file(f).items()
    }


def test_two_workers_train_the_shared_job_once_and_match_one_process(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parallel = run_experiment(tiny_config(sunny_dir, tmp_path / "two", **OVER), jobs=2)
    serial = run_experiment(tiny_config(sunny_dir, tmp_path / "one", **OVER), jobs=1)
    assert [r["method"] for r in parallel] == [r["method"] for r in serial] == ["frozen", "finetune", "peso"]

    # every pair ran once, in one of the workers (whichever was free: test_a_busy_worker_...)
    assert {r["worker"] for r in parallel} <= {"worker 1/2", "worker 2/2"}
    first = {r["method"]: r["stages"][0]["jobs"][0] for r in parallel}
    assert len({j["shared_key"] for j in first.values()}) == 1  # one shared stage-1 job
    trained = [m for m, j in first.items() if not j["reused_shared_result"]]
    assert len(trained) == 1  # trained once, by one worker; the others waited and reused it
    trainer = first[trained[0]]["trained_by"]
    assert trainer in ("worker 1/2", "worker 2/2")
    assert all(j["trained_by"] == trainer for j in first.values())

    for p, s in zip(parallel, serial, strict=True):
        assert [st["metrics"] for st in p["stages"]] == [st["metrics"] for st in s["stages"]]
        for stage in (1, 2):
            a = _adapters(tmp_path / "two" / "t" / p["method"] / "seed0", stage)
            b = _adapters(tmp_path / "one" / "t" / s["method"] / "seed0", stage)
            assert a.keys() == b.keys() and a
            for k in a:
                assert torch.equal(a[k], b[k]), (p["method"], stage, k)

    # A rerun with workers redoes nothing, and starts no worker to find that out (each would set up: load
    # the data and the model); one pair left is one process's work, two are two workers'.
    from evolora import experiment

    started, real = [], experiment._run_in_workers
    monkeypatch.setattr(experiment, "_run_in_workers", lambda *a: started.append(a[4]) or real(*a))
    again = run_experiment(tiny_config(sunny_dir, tmp_path / "two", **OVER), jobs=3)
    assert [r["stages"] for r in again] == [r["stages"] for r in parallel] and started == []
    shutil.rmtree(tmp_path / "two" / "t" / "peso")
    again = run_experiment(tiny_config(sunny_dir, tmp_path / "two", **OVER), jobs=3)
    assert started == [] and [r["metrics"] for r in again[2]["stages"]] == [
        r["metrics"] for r in parallel[2]["stages"]
    ]
    shutil.rmtree(tmp_path / "two" / "t" / "peso")
    shutil.rmtree(tmp_path / "two" / "t" / "finetune")
    again = run_experiment(tiny_config(sunny_dir, tmp_path / "two", **OVER), jobs=3)
    assert started == [2] and [r["stages"][1]["metrics"] for r in again] == [
        r["stages"][1]["metrics"] for r in parallel
    ]


def test_jobs_settings_that_cannot_work_are_refused(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, **OVER)
    with pytest.raises(EvoloraError, match="--jobs 0"):
        run_experiment(cfg, jobs=0)


def test_workers_log_their_runs_under_the_experiments_mlflow_run(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tracking: mlflow` with --jobs 2: the experiment's MLflow run is made before the workers start, and
    each worker nests its (strategy, seed) runs under it (the stand-in records every process's calls)."""
    calls = tmp_path / "mlflow-calls.jsonl"
    monkeypatch.setitem(sys.modules, "mlflow", None)  # so that the stand-in leaves with the test
    monkeypatch.delitem(sys.modules, "mlflow")
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_mlflow"))  # spawned workers get sys.path
    monkeypatch.setenv("FAKE_MLFLOW_LOG", str(calls))
    over = {**OVER, "seeds": "[0, 1]", "strategies": "[frozen, finetune]", "tracking": "mlflow"}
    run_experiment(tiny_config(sunny_dir, tmp_path, **over), jobs=2)
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    made = {r[3]: (r[0], r[2], r[4]) for r in records if r[1] == "made"}  # name -> pid, id, parent id
    runs = {f"{m} seed {s}" for m in ("frozen", "finetune") for s in (0, 1)}
    assert made.keys() == {"t", *runs}
    main_pid, experiment_id, _ = made["t"]
    assert main_pid == os.getpid()
    for name in runs:
        pid, run_id, parent = made[name]
        assert pid != main_pid and parent == experiment_id
        steps = {r[4] for r in records if r[1:4] == ["metric", run_id, "auc"]}
        assert steps == {1, 2}, name


def test_a_busy_worker_leaves_the_rest_to_the_free_one(tmp_path: Path) -> None:
    """Pairs are taken as workers free up, not split before the start: while the worker that took item 0
    holds it (until item 5, the last, is done), the other takes every other item; a split fixed in advance
    would have left items 2 and 4 waiting behind item 0."""
    work = work_queue(range(6), 2)
    run_workers(_take_items, [(work, str(tmp_path))] * 2)
    taken: dict[str, list[int]] = {}
    for f in sorted(tmp_path.glob("item-*"), key=lambda f: int(f.name[5:])):
        taken.setdefault(f.read_text(), []).append(int(f.name[5:]))
    assert sorted(taken.values()) == [[0], [1, 2, 3, 4, 5]]
    assert sorted(taken) == ["worker 1/2", "worker 2/2"]


def test_a_work_queue_ends_each_worker_once() -> None:
    work = work_queue([(0, 1), (1, 0)], 3)
    assert list(take(work)) == [(0, 1), (1, 0)]  # then the first end mark
    assert list(take(work)) == [] and list(take(work)) == []


# Worker targets: module level, so spawned processes can import them.
def _user_mistake(_: int) -> None:
    raise EvoloraError("no such item 'x'")


def _bug(_: int) -> None:
    raise ValueError("an unexpected state")


def _warns_and_logs(out_file: str) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("deprecated in v6", FutureWarning, stacklevel=1)
    bars = hf_logging.is_progress_bar_enabled()
    Path(out_file).write_text(f"{len(seen)} {hf_logging.get_verbosity()} {bars}")


def _take_items(work: object, folder: str) -> None:
    out = Path(folder)
    for item in take(work):
        (out / f"item-{item}").write_text(os.environ["EVOLORA_WORKER"])
        deadline = time.monotonic() + 120
        while item == 0 and not (out / "item-5").exists():
            assert time.monotonic() < deadline, "the other worker took nothing"
            time.sleep(0.05)


def _sleep_forever(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def _killed(_: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_failing_worker_is_reported_in_the_parent() -> None:
    with pytest.raises(EvoloraError, match=r"worker \d/2: no such item 'x'"):
        run_workers(_user_mistake, [(0,), (1,)])
    with pytest.raises(WorkerError, match=r"(?s)ValueError: an unexpected state"):
        run_workers(_bug, [(0,)])
    # killed (kill -9, the OOM killer): no traceback to show, one line that says what happened
    with pytest.raises(EvoloraError, match=r"^worker 1/1 was killed by signal 9, SIGKILL .*rerun the same"):
        run_workers(_killed, [(0,)])


def test_workers_keep_the_parents_warning_filters_and_library_logging(tmp_path: Path) -> None:
    """What `evolora run` silenced (FutureWarnings, transformers' progress bars) stays silent in workers."""
    import warnings

    from transformers.utils import logging as hf_logging

    out = tmp_path / "seen.txt"
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        for action, level, bars, expected in [
            ("ignore", hf_logging.ERROR, False, f"0 {hf_logging.ERROR} False"),
            ("always", hf_logging.WARNING, True, f"1 {hf_logging.WARNING} True"),  # a parent that shows them
        ]:
            with warnings.catch_warnings():
                warnings.simplefilter(action, category=FutureWarning)
                hf_logging.set_verbosity(level)
                (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
                run_workers(_warns_and_logs, [(str(out),)])
            assert out.read_text() == expected
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()


def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    code = (
        "from tests.test_jobs import _sleep_forever\n"
        "from evolora.workers import run_workers\n"
        f"run_workers(_sleep_forever, [({str(pid_file)!r},)])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the worker never started"
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_worker_whose_parent_died_while_it_started_exits_at_once() -> None:
    """A parent killed while its spawned workers still import leaves them to another parent before they can
    look: the pid they check is the one the parent passed, so they exit instead of running on unlocked."""
    code = (
        "import os, sys, time\n"
        "from evolora.parallel import stop_with_parent\n"
        "stop_with_parent(os.getppid() + 1)  # not the parent it has now: the one that started it is gone\n"
        "time.sleep(3)\n"
        "print('still running')\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "still running" not in done.stdout, done.stdout + done.stderr
    assert time.monotonic() - started < 30
