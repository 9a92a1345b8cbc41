"""The cost profile: every stage says where its time and tokens went, and reports show it."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest

from evolora import cost
from evolora.eval.report import build_report, machine_line
from evolora.experiment import run_experiment
from evolora.models.precision import machine
from tests.helpers import Killed, kill_after_stage, tiny_config


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_parts_count_their_own_time_and_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, cpu = FakeClock(), FakeClock()  # the CPU clock runs at half the wall clock's pace, as under load
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    monkeypatch.setattr(cost.time, "process_time", cpu)

    def tick(seconds: float) -> None:
        clock.now += seconds
        cpu.now += seconds / 2

    cost.take()
    started = cost.clock()
    with cost.part("training"):
        tick(2.0)
        cost.count_tokens(100, backward=True)
        with cost.part("validation"):
            tick(0.5)
            cost.count_tokens(30, backward=False)
        tick(1.0)
    cost.count_tokens(7, backward=False)  # outside any part
    tick(0.5)
    cost.saved(4.0, 3.5)
    record = cost.stage_cost(cost.take(), since=started)
    parts = record["parts"]
    assert parts["training"] == {"seconds": 3.0, "cpu_seconds": 1.5, "tokens": 100, "backward_tokens": 100}
    assert parts["validation"] == {"seconds": 0.5, "cpu_seconds": 0.25, "tokens": 30, "backward_tokens": 0}
    assert parts["other"] == {"seconds": 0.5, "cpu_seconds": 0.25, "tokens": 7, "backward_tokens": 0}
    assert record["saved_seconds"] == 4.0 and record["saved_cpu_seconds"] == 3.5
    assert record["total_seconds"] == 4.0
    assert record["total_cpu_seconds"] == 2.0
    assert cost.take()["parts"] == {}  # taken: the next stage starts from nothing
    both = cost.add([record, record])
    assert both["parts"]["training"]["seconds"] == 6.0 and both["total_seconds"] == 8.0
    assert both["total_cpu_seconds"] == 4.0 and both["saved_cpu_seconds"] == 7.0
    # A record from before CPU time was kept has no CPU total, so a sum with it has none either.
    old = {k: v for k, v in record.items() if k not in ("total_cpu_seconds", "saved_cpu_seconds")}
    assert not {"total_cpu_seconds", "saved_cpu_seconds"} & set(cost.add([record, old]))


def test_carried_parts_join_the_stage_and_its_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed job adds what its earlier sitting kept (`since` a `mark`, stored with its checkpoint)."""
    clock, cpu = FakeClock(), FakeClock()
    monkeypatch.setattr(cost.time, "perf_counter", clock)
    monkeypatch.setattr(cost.time, "process_time", cpu)
    cost.take()
    before = cost.mark()
    with cost.part("training"):  # an earlier sitting: one epoch, checkpointed
        clock.now, cpu.now = clock.now + 3.0, cpu.now + 2.0
        cost.count_tokens(50, backward=True)
    kept = cost.since(before)
    assert kept == {"training": {"seconds": 3.0, "cpu_seconds": 2.0, "tokens": 50, "backward_tokens": 50}}
    cost.take()  # that sitting was killed; the rerun's stage starts from nothing

    started = cost.clock()
    cost.carry(kept)
    with cost.part("training"):  # the rerun trains the second epoch
        clock.now, cpu.now = clock.now + 1.0, cpu.now + 1.0
        cost.count_tokens(50, backward=True)
    clock.now += 0.5
    record = cost.stage_cost(cost.take(), since=started)
    training = {"seconds": 4.0, "cpu_seconds": 3.0, "tokens": 100, "backward_tokens": 100}
    assert record["parts"]["training"] == training
    assert record["parts"]["other"]["seconds"] == 0.5
    assert record["total_seconds"] == 4.5 and record["total_cpu_seconds"] == 3.0
    assert record["earlier_sittings"] == {"seconds": 3.0, "cpu_seconds": 2.0}
    assert cost.add([record, record])["earlier_sittings"] == {"seconds": 6.0, "cpu_seconds": 4.0}
    assert "earlier_sittings" not in cost.stage_cost(cost.take(), since=cost.clock())


def test_cpu_time_leaves_out_waiting() -> None:
    """Wall-clock time counts a pause (here a sleep; a SIGSTOP or a busy machine alike), CPU time does not."""
    cost.take()
    started = cost.clock()
    with cost.part("evaluation"):
        time.sleep(0.3)
    record = cost.stage_cost(cost.take(), since=started)
    assert record["parts"]["evaluation"]["seconds"] >= 0.3
    assert record["parts"]["evaluation"]["cpu_seconds"] < 0.1
    assert record["total_cpu_seconds"] < 0.1 <= 0.3 <= record["total_seconds"]


OVER = {"train.epochs": 4, "strategies": "[finetune, peso, {name: inflora, first_stage: plain}]"}


def test_every_stage_records_where_its_time_went(sunny_dir: Path, tmp_path: Path) -> None:
    # Once, late in a long suite (AVX2 lane), a 0.33 s pause landed in `other` of a 0.9 s stage and did not
    # come back in isolation: most likely a garbage collection. Collections are kept out of the run so the
    # coverage bound below measures the code, not the interpreter's housekeeping.
    gc.collect()
    gc.disable()
    try:
        results = run_experiment(tiny_config(sunny_dir, tmp_path, **OVER))
    finally:
        gc.enable()
    by = {r["method"]: r for r in results}
    for r in results:
        for stage in r["stages"]:
            c = stage["cost"]
            assert sum(p["seconds"] for p in c["parts"].values()) == pytest.approx(
                c["total_seconds"], abs=0.01
            )
            assert c["parts"]["evaluation"]["backward_tokens"] == 0
            if stage["trained"] and not all(j["reused_shared_result"] for j in stage["jobs"]):
                train = c["parts"]["training"]
                assert train["tokens"] == train["backward_tokens"] > 0
                assert (
                    c["parts"]["validation"]["tokens"] > 0
                    and c["parts"]["validation"]["backward_tokens"] == 0
                )
                # The named parts cover the stage: what is left (files, metrics) is small. Its fixed ~0.02 s
                # passed 5% of a 0.48 s stage on a fast CPU (AVX512), hence the allowance beside the ratio.
                assert c["parts"]["other"]["seconds"] <= 0.05 * c["total_seconds"] + 0.03, c
        summary = r["summary"]["cost"]
        assert summary["total_seconds"] == pytest.approx(sum(s["cost"]["total_seconds"] for s in r["stages"]))
        assert (
            0
            < summary["total_cpu_seconds"]
            == pytest.approx(sum(s["cost"]["total_cpu_seconds"] for s in r["stages"]))
        )
    assert by["inflora"]["stages"][1]["cost"]["parts"]["inflora_statistics"]["tokens"] > 0
    # Validation per epoch: the epochs' own figures add up to the stage's part (finetune: one job a stage)
    for stage in by["finetune"]["stages"]:
        (job,) = stage["jobs"]
        validation = stage["cost"]["parts"]["validation"]
        epochs = [h for h in job["history"] if "valid_tokens" in h]
        assert len(epochs) == len(job["history"]) == 4
        assert sum(h["valid_tokens"] for h in epochs) == validation["tokens"] > 0
        assert sum(h["valid_seconds"] for h in epochs) == pytest.approx(validation["seconds"], abs=0.01)
    # PESO and InfLoRA reuse finetune's stage-1 job and its predictions: what they took is saved.
    first = by["finetune"]["stages"][0]
    trained, evaluated = first["jobs"][0]["train_seconds"], first["cost"]["parts"]["evaluation"]["seconds"]
    spent = cost.cpu_of(first["jobs"][0]["cost"])
    evaluated_cpu = first["cost"]["parts"]["evaluation"]["cpu_seconds"]
    for method in ("peso", "inflora"):
        assert trained < by[method]["stages"][0]["cost"]["saved_seconds"] <= trained + evaluated + 0.01
        # on the CPU clock too: what finetune's job and its evaluation cost it
        saved_cpu = by[method]["stages"][0]["cost"]["saved_cpu_seconds"]
        assert 0 < spent < saved_cpu <= spent + evaluated_cpu + 0.01
        assert "training" not in by[method]["stages"][0]["cost"]["parts"]
    setup = results[0]["setup_cost"]["parts"]
    assert setup["model_loading"]["seconds"] > 0 and setup["data"]["seconds"] > 0

    # The machine is recorded with the run and with every stage (a resumed run may change machine).
    assert results[0]["machine"] == machine() and machine()
    assert all(stage["machine"] == machine() for r in results for stage in r["stages"])

    report, _ = build_report([tmp_path / "t"])
    assert f"Machine: {machine()} (every recorded stage)." in report
    assert "### Where the time went" in report and "| inflora | 1 |" in report
    assert "CPU time these runs took:" in report and "| CPU s |" in report


def test_a_job_shared_within_a_run_is_counted_once(sunny_dir: Path, tmp_path: Path) -> None:
    """LSAT's long and default adapters are one job at stage 1: the second found the first in the shared store
    marked as this run's, took it for an earlier sitting's and counted its cost again (twice the tokens, an
    earlier sitting that never was)."""
    over = {"train.epochs": 2, "strategies": "[{name: lsat, long_stages: 1, grid: [0.0, 0.5, 1.0]}]"}
    (run,) = run_experiment(tiny_config(sunny_dir, tmp_path, **over))
    first = run["stages"][0]
    trained, reused = first["jobs"]
    assert trained["shared_key"] == reused["shared_key"] and reused["reused_shared_result"]
    assert first["cost"]["parts"]["training"]["tokens"] == trained["cost"]["training"]["tokens"] > 0
    assert "earlier_sittings" not in first["cost"] and first["cost"]["saved_seconds"] > 0
    # producing the stage's model took the one training (it was summed per adapter: twice)
    assert first["train_seconds"] == trained["train_seconds"] > 0


def test_serialising_a_file_counts_as_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save_state encoded (copied) every tensor before its `writing` part began: a conventional model's
    per-epoch checkpoint put 13-19% of a small stage in `other`."""
    import numpy as np

    from evolora import io

    cost.take()

    def slow(encode):
        def inner(*args, **kwargs):
            time.sleep(0.05)
            return encode(*args, **kwargs)

        return inner

    monkeypatch.setattr(io, "_encode", slow(io._encode))
    monkeypatch.setattr(np, "savez", slow(np.savez))
    with cost.part("training"):
        io.save_state(tmp_path / "s.safetensors", {"w": np.zeros(3)})
        io.save_npz(tmp_path / "p.npz", {"scores": np.zeros(3)})
    parts = cost.take()["parts"]
    assert parts["writing"]["seconds"] >= 0.1 and parts["training"]["seconds"] < 0.05


def test_the_data_part_imports_no_library(sunny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's environment (inside the `data` part) imported transformers and PEFT for their versions:
    seconds of imports billed as reading the data. The installed packages' metadata says the same."""
    import sys

    from evolora.data.loaders import load_dataset
    from evolora.experiment import run_environment

    data = load_dataset(tiny_config(sunny_dir, sunny_dir / "runs").data)
    for name in ("peft", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of either fails
    versions = run_environment(data)["versions"]
    monkeypatch.undo()
    import peft
    import transformers

    assert (versions["peft"], versions["transformers"]) == (peft.__version__, transformers.__version__)


def test_a_report_names_every_machine_its_stages_ran_on() -> None:
    """A run resumed on another CPU rounds differently from there on: the report says where stages ran."""
    resumed = {
        "stages": [
            {"machine": "CPU A (avx2)"},
            {"machine": "CPU A (avx2)"},
            {"machine": "CPU B (avx2, avx512f)"},
        ]
    }
    line = machine_line([resumed, {"stages": [{"machine": "CPU A (avx2)"}]}])
    assert line is not None
    assert line.startswith("Machines: CPU A (avx2): 3 stages; CPU B (avx2, avx512f): 1 stage.")
    assert machine_line([{"stages": [{"metrics": {}}]}]) is None  # runs from before machines were recorded


def test_a_rerun_with_nothing_left_keeps_the_set_up_the_run_took(sunny_dir: Path, tmp_path: Path) -> None:
    """Rerunning a finished experiment (to see its table again) set it up anew, and its cheaper set-up (the
    caches made) replaced the first one in results.json and in the report's CPU time."""
    cfg = tiny_config(sunny_dir, tmp_path, strategies="[finetune]", **{"train.epochs": 1})
    (first,) = run_experiment(cfg)
    path = tmp_path / "t" / "finetune" / "seed0" / "results.json"
    # as a worker of --jobs 2 records it: a report counts one set-up per process, so the process stays too
    path.write_text(json.dumps({**json.loads(path.read_text()), "worker": "worker 2/2"}))
    (again,) = run_experiment(cfg)
    assert again["setup_cost"] == first["setup_cost"] and first["setup_cost"]["total_seconds"] > 0
    recorded = json.loads(path.read_text())
    assert recorded["setup_cost"] == first["setup_cost"] and recorded["worker"] == "worker 2/2"


def test_a_resumed_run_counts_the_set_up_of_every_sitting(sunny_dir: Path, tmp_path: Path) -> None:
    """Killed after its first stage and rerun, a run was set up twice: both set-ups are its cost, in
    results.json and in the report's CPU time; two runs of one sitting share one set-up."""
    from evolora.eval.costs import cpu_time

    cfg = tiny_config(sunny_dir, tmp_path, strategies="[frozen, finetune]", **{"train.epochs": 1})
    with pytest.raises(Killed):
        run_experiment(cfg, on_stage=kill_after_stage)  # frozen's stage 1 finished, then the process died
    path = tmp_path / "t" / "frozen" / "seed0" / "results.json"
    first = json.loads(path.read_text())["setup_cost"]
    frozen, finetune = run_experiment(cfg)
    assert list(frozen["setups"].values()) == [first, frozen["setup_cost"]]
    assert list(finetune["setups"]) == [finetune["setup_id"]] == [frozen["setup_id"]]
    _, groups = build_report([tmp_path / "t"])
    _, setup, on_cpu = cpu_time(groups)
    key = "total_cpu_seconds" if on_cpu else "total_seconds"
    assert setup == pytest.approx(first[key] + frozen["setup_cost"][key])
    run_experiment(cfg)  # nothing left: the recorded set-ups stay
    assert json.loads(path.read_text())["setups"] == frozen["setups"]


def test_a_conventional_set_up_pays_what_its_first_optimiser_imports(sunny_dir: Path, tmp_path: Path) -> None:
    """An ID model loads no library at set-up, so the first optimiser of a process imported torch._dynamo
    (~3 CPU s) inside stage 1 of the first run: a frozen model's stage cost more than finetune's."""
    cfg = tiny_config(
        sunny_dir, tmp_path, strategies="[frozen]", **{"model.name": "sasrec", "train.epochs": 1}
    )
    (frozen,) = run_experiment(cfg)
    assert "model_loading" in frozen["setup_cost"]["parts"]


def test_a_stage_recorded_in_a_later_sitting_counts_the_evaluation_of_the_first(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """Killed after its predictions were written and before its record, a stage's rerun read them back:
    their cost was carried into the stage's parts, but `eval_seconds` was the rerun's reading of the file."""
    over = {"train.epochs": 1, "eval.max_samples": 40}
    cfg = tiny_config(sunny_dir, tmp_path, strategies="[finetune]", **over)
    (first,) = run_experiment(cfg)
    stage_dir = tmp_path / "t" / "finetune" / "seed0" / "stage-1"
    (stage_dir / "record.json").unlink()  # the state a kill leaves between the two writes
    (tmp_path / "t" / "finetune" / "seed0" / "results.json").unlink()
    with np.load(stage_dir / "predictions.npz") as z:
        spent = cost.from_arrays(dict(z))
    (again,) = run_experiment(cfg)
    record = again["stages"][0]
    assert spent["evaluation"]["seconds"] > 0
    assert record["eval_seconds"] >= spent["evaluation"]["seconds"]
    assert record["cost"]["parts"]["evaluation"]["seconds"] == pytest.approx(
        first["stages"][0]["cost"]["parts"]["evaluation"]["seconds"], rel=0.5
    )


def test_an_older_sitting_is_counted_once_whichever_run_records_it() -> None:
    """An evolora before 2026-12-05 kept one set-up per run, its last sitting's. Two runs of such a process,
    one finished then and one resumed now (which names that sitting among its own), count it once; another
    experiment's process with the same worker label is another set-up."""
    from types import SimpleNamespace

    from evolora.eval.costs import cpu_time

    spent = {"total_seconds": 4.0, "total_cpu_seconds": 3.0}
    old = {"experiment": "x", "context_key": "k", "worker": "worker 1/2", "setup_cost": spent}
    now = {"total_seconds": 2.0, "total_cpu_seconds": 2.0}
    resumed = {**old, "setup_id": "abc", "setup_cost": now, "setups": {**cost.setups_of(old), "abc": now}}
    assert cpu_time([SimpleNamespace(runs=[old, resumed])])[1:] == (3.0 + 2.0, True)
    other = {**old, "experiment": "y"}
    assert cpu_time([SimpleNamespace(runs=[old, other])])[1:] == (6.0, True)


def test_a_launchs_processes_add_up_to_one_record() -> None:
    """CPU seconds and tokens are every process's work added; wall-clock seconds the main process's."""
    from evolora.cost import of_processes

    def record(cpu: float, tokens: int, extra: dict) -> dict:
        part = {"seconds": 10.0, "cpu_seconds": cpu, "tokens": tokens, "backward_tokens": tokens // 2}
        earlier = {"seconds": 5.0, "cpu_seconds": cpu}
        totals = {"total_seconds": 12.0, "total_cpu_seconds": cpu + 1, "saved_seconds": 3.0}
        return {**totals, "parts": {"training": part, **extra}, "earlier_sittings": earlier}

    main = record(8.0, 100, {})
    other = record(
        6.0, 80, {"evaluation": {"seconds": 1.0, "cpu_seconds": 1.0, "tokens": 7, "backward_tokens": 0}}
    )
    both = of_processes([main, other])
    assert both["processes"] == 2 and both["total_seconds"] == 12.0 and both["saved_seconds"] == 3.0
    assert both["total_cpu_seconds"] == 16.0 and both["earlier_sittings"] == {
        "seconds": 5.0,
        "cpu_seconds": 14.0,
    }
    assert both["parts"]["training"] == {
        "seconds": 10.0,
        "cpu_seconds": 14.0,
        "tokens": 180,
        "backward_tokens": 90,
    }
    assert both["parts"]["evaluation"]["tokens"] == 7 and both["parts"]["evaluation"]["seconds"] == 0.0
    assert of_processes([main]) is main


def test_waiting_for_a_shared_job_is_a_part_of_its_own(sunny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A run waiting on the lock of a job another process trains had that wait in `other`."""
    import contextlib

    from evolora.continual import loop

    real = loop.exclusive

    taken = []

    @contextlib.contextmanager
    def slow_lock(path, *args, **kwargs):
        taken.append(Path(path).parent.name)
        time.sleep(0.3)  # another process held it this long
        with real(path, *args, **kwargs):
            yield

    monkeypatch.setattr(loop, "exclusive", slow_lock)
    over = {"train.epochs": 1, "strategies": "[finetune]"}
    (run,) = run_experiment(tiny_config(sunny_dir, tmp_path, **over))
    parts = run["stages"][0]["cost"]["parts"]
    assert parts["waiting"]["seconds"] >= 0.3 and parts["other"]["seconds"] < 0.3
    # the shared adapter's predictions too: runs scoring it at once scored it once each
    assert taken[:2] == ["jobs", "predictions"]
