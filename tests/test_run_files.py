"""What evolora reads back from a run folder: never code, never silently wrong.

Covers reruns that would mix settings (strategy options under one label, a failed first attempt, two
processes at once) and files a user receives from someone else or a disk damages (pickles that run code,
truncated checkpoints, adapters, records and shared results).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evolora.cli import app
from evolora.errors import ConfigError, DamagedFileError
from evolora.experiment import run_dir_of, run_experiment
from evolora.locks import LockedError, exclusive
from evolora.tasks.ctr import CtrTask
from tests.helpers import tiny_config

runner = CliRunner()
SMALL = {"train.epochs": 1, "strategies": "[finetune]"}


class _RunsCode:
    """A pickle payload that creates a file when unpickled: if the file appears, code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"strategy": _RunsCode(marker), "adapter_keys": {}}))


def write_config(path: Path, data_dir: Path, out: Path, **extra) -> Path:
    cfg = {
        "name": "files",
        "output_dir": str(out),
        "data": {"source": str(data_dir)},
        "staging": {"n_stages": 3},
        "task": {"history_len": 5, "template": "compact"},
        "model": {"name": "tiny", "precision": "fp32"},
        "train": {"samples_per_stage": 24, "valid_samples": 16, "epochs": 1, "lr": 0.01},
        "eval": {"max_samples": 24},
        "strategies": ["finetune"],
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------ reruns
def test_changed_strategy_options_under_one_label_are_refused(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, **{**SMALL, "strategies": "[{name: peso, lam: 2.0}]"})
    run_experiment(cfg)
    changed = tiny_config(sunny_dir, tmp_path, **{**SMALL, "strategies": "[{name: peso, lam: 50.0}]"})
    with pytest.raises(ConfigError, match=r"lam: 2\.0 -> 50\.0"):
        run_experiment(changed)
    # Defaults written out or left implicit are the same options.
    same = tiny_config(
        sunny_dir, tmp_path, **{**SMALL, "strategies": "[{name: peso, lam: 2, reduction: sum}]"}
    )
    assert run_experiment(same)[0]["complete"]
    # Another label is another run.
    labelled = "[{name: peso, lam: 2.0}, {name: peso, label: peso50, lam: 50.0}]"
    assert run_experiment(tiny_config(sunny_dir, tmp_path, **{**SMALL, "strategies": labelled}))[1][
        "complete"
    ]


def test_set_addresses_one_strategy_option(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs", strategies=["finetune", "peso"])
    args = ["run", str(config), "--set", "strategies.peso.lam=7.5"]
    assert runner.invoke(app, args).exit_code == 0
    results = json.loads((tmp_path / "runs" / "files" / "peso" / "seed0" / "results.json").read_text())
    assert results["options"]["lam"] == 7.5
    result = runner.invoke(app, ["run", str(config), "--set", "strategies.peso.lam=9"])
    assert result.exit_code == 2 and "lam: 7.5 -> 9.0" in result.output
    result = runner.invoke(app, ["run", str(config), "--set", "strategies.nope.lam=9"])
    assert result.exit_code == 2 and "no strategy labelled 'nope'" in result.output


def test_a_failed_first_attempt_does_not_block_the_corrected_rerun(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    failed = runner.invoke(app, ["run", str(config), "--set", "model.name=no-such-model-anywhere"])
    assert failed.exit_code == 2 and "no-such-model-anywhere" in failed.output
    fixed = runner.invoke(app, ["run", str(config)])
    assert fixed.exit_code == 0, fixed.output


def _hold_lock(path: Path, ready: Path, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from evolora.locks import exclusive
        with exclusive(Path({str(path)!r}), "test"):
            Path({str(ready)!r}).touch()
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    return proc


def test_a_second_process_on_the_same_experiment_is_refused(sunny_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, **SMALL)
    holder = _hold_lock(tmp_path / f".{cfg.name}.lock", tmp_path / "ready", 30)
    try:
        with pytest.raises(LockedError, match=rf"in use by process {holder.pid} on "):
            run_experiment(cfg)
        assert not (tmp_path / cfg.name).exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    assert run_experiment(cfg)[0]["complete"]  # a killed holder leaves no lock behind


def test_a_shared_job_lock_is_waited_for(tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path / "job.lock", tmp_path / "ready", 1.5)
    t0 = time.monotonic()
    with exclusive(tmp_path / "job.lock", "shared job", wait=True):
        waited = time.monotonic() - t0
    holder.wait()
    assert waited > 0.5


# ------------------------------------------------------------------------------------------ files
def test_a_planted_pickle_never_runs(sunny_dir: Path, tmp_path: Path) -> None:
    """A state.pt whose pickle runs a command: resuming and exporting refuse it; the command never runs."""
    cfg = tiny_config(sunny_dir, tmp_path, **SMALL)
    run_experiment(cfg)
    run = run_dir_of(cfg, "finetune", 0)
    marker = tmp_path / "pwned"
    # Stage 1 as an older evolora laid it out (state.pt beside trained.json), with a planted pickle.
    unit = run / "stage-1" / "trained"
    for item in list(unit.iterdir()):
        shutil.move(str(item), str(run / "stage-1" / item.name))
    unit.rmdir()
    (run / "stage-1" / "state.safetensors").unlink()
    plant_pickle(run / "stage-1" / "state.pt", marker)
    shutil.rmtree(run / "stage-2")  # stage 2 must resume from stage 1's state
    with pytest.raises(DamagedFileError, match=r"state\.pt cannot be read safely") as err:
        run_experiment(cfg)
    assert "Delete" in str(err.value) and "stage-1" in str(err.value)
    result = runner.invoke(app, ["export", str(run), "--stage", "1", "--out", str(tmp_path / "export")])
    assert result.exit_code == 2 and "state.pt" in result.output and not marker.exists()
    # A checkpoint in the old pickle format is set aside unread; the job trains from its start.
    for stage in ("stage-1", "stage-2"):
        shutil.rmtree(run / stage, ignore_errors=True)
    plant_pickle(run / "stage-2" / "checkpoints" / "default.pt", marker)
    assert run_experiment(cfg)[0]["complete"]
    assert not (run / "stage-2" / "checkpoints" / "default.pt").exists()
    assert not marker.exists()


def test_a_damaged_checkpoint_is_set_aside_and_the_job_redone(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"train.epochs": 2, "strategies": "[finetune]"}
    reference = run_experiment(tiny_config(sunny_dir, tmp_path / "ref", **over))[0]
    cfg = tiny_config(sunny_dir, tmp_path / "run", **over)
    run = run_dir_of(cfg, "finetune", 0)
    real, calls = CtrTask.loss, {"n": 0}

    def dying(self, lm, rows):
        if (run / "stage-1" / "record.json").is_file():
            calls["n"] += 1
            if calls["n"] == 8:  # stage 2, epoch 2
                raise KeyboardInterrupt
        return real(self, lm, rows)

    monkeypatch.setattr(CtrTask, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    checkpoint = run / "stage-2" / "checkpoints" / "default.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])  # truncated by a full disk
    monkeypatch.setattr(CtrTask, "loss", real)
    resumed = run_experiment(cfg)[0]
    for got, want in zip(resumed["stages"], reference["stages"], strict=True):
        assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-9)
    assert list(checkpoint.parent.glob(".default.safetensors.damaged-*"))


def test_a_damaged_shared_result_is_set_aside_and_retrained(sunny_dir: Path, tmp_path: Path) -> None:
    first = run_experiment(tiny_config(sunny_dir, tmp_path, **SMALL))[0]
    key = first["stages"][0]["jobs"][0]["shared_key"]
    shared = tmp_path / "_shared" / "jobs" / key
    (shared / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    again = run_experiment(tiny_config(sunny_dir, tmp_path, **{**SMALL, "name": "other"}))[0]
    assert again["stages"][0]["jobs"][0]["reused_shared_result"] is False
    assert again["stages"][0]["metrics"] == first["stages"][0]["metrics"]
    assert list(shared.parent.glob(f".{key}.damaged-*"))
    assert run_experiment(tiny_config(sunny_dir, tmp_path, **{**SMALL, "name": "third"}))[0]["stages"][0][
        "jobs"
    ][0]["reused_shared_result"]


@pytest.mark.parametrize(
    "damaged",
    [
        "stage-2/record.json",
        "stage-1/trained/state.safetensors",
        "stage-1/trained/adapters/default/adapter_model.safetensors",
        "stage-2/jobs/default/info.json",
    ],
)
def test_a_damaged_run_file_is_an_error_naming_it(sunny_dir: Path, tmp_path: Path, damaged: str) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    run = tmp_path / "runs" / "files" / "finetune" / "seed0"
    if damaged.startswith("stage-1") or "jobs" in damaged:  # read when stage 2 trains again
        (run / "stage-2" / "record.json").unlink()
        shutil.rmtree(run / "stage-2" / "trained")
    target = run / damaged
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    flat = " ".join(result.output.split())
    stage = damaged.split("/")[0]
    assert str(target) in flat and f"Delete {run / stage}" in flat


def test_report_errors_are_one_line_messages(sunny_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", sunny_dir, tmp_path / "runs")
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    root = tmp_path / "runs" / "files"
    result = runner.invoke(app, ["report", str(root), "--metric", "nosuch"])
    assert result.exit_code == 2 and "--metric nosuch: not recorded" in result.output
    results = root / "finetune" / "seed0" / "results.json"
    results.write_text(results.read_text()[:50])
    result = runner.invoke(app, ["report", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # One line, even off a terminal where rich would wrap at 80 columns.
    line = next(x for x in result.output.splitlines() if "error:" in x)
    assert str(results) in line and "damaged or truncated" in line


def test_auto_precision_is_recorded_as_what_it_ran_in(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder made where `auto` meant fp32 is never resumed where it means bf16-mixed."""
    monkeypatch.setenv("EVOLORA_CPU_BF16", "0")
    cfg = tiny_config(sunny_dir, tmp_path, **{**SMALL, "model.precision": "auto"})
    assert run_experiment(cfg)[0]["precision"] == "fp32"
    monkeypatch.setenv("EVOLORA_CPU_BF16", "1")
    with pytest.raises(ConfigError, match=r"model\.precision: 'fp32' -> 'bf16-mixed'"):
        run_experiment(cfg)


# ------------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
    ids=["umask-022", "umask-077"],
)
def test_run_files_follow_the_umask(
    sunny_dir: Path, tmp_path: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    # Atomic writes go through temporary files and folders, which are created private whatever the umask; a
    # run read by teammates or by a server running as another user needs the modes a plain write gives.
    previous = os.umask(umask)
    try:
        run_experiment(tiny_config(sunny_dir, tmp_path, **SMALL))
    finally:
        os.umask(previous)
    run = tmp_path / "t"
    paths = [run, *(p for p in run.rglob("*") if not p.is_symlink())]
    assert any(p.suffix == ".json" for p in paths) and any(p.suffix == ".safetensors" for p in paths)
    wrong = {
        str(p.relative_to(run)): oct(p.stat().st_mode & 0o777)
        for p in paths
        if p.stat().st_mode & 0o777 != (dir_mode if p.is_dir() else file_mode)
    }
    assert not wrong


def test_a_file_another_process_set_aside_first_is_no_error(tmp_path: Path) -> None:
    """Two runs found one damaged shared file at once: the second's rename raised FileNotFoundError (a
    traceback) after the first had moved it."""
    from evolora.io import set_aside

    damaged = tmp_path / "p.npz"
    damaged.write_bytes(b"garbage")
    first = set_aside(damaged)
    assert first.is_file() and not damaged.exists()
    set_aside(damaged)  # already gone: nothing to do, no error
    assert first.read_bytes() == b"garbage"


def test_plots_are_written_through_temporaries_of_their_own(tmp_path: Path) -> None:
    """Two report writers at once shared the fixed temporary `.auc.png.tmp.png`; one crashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evolora.io import atomic_write_png

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    (tmp_path / ".auc.png.tmp.png").mkdir()  # where the fixed temporary went: in the way now
    atomic_write_png(fig, tmp_path / "auc.png")
    plt.close(fig)
    assert (tmp_path / "auc.png").read_bytes()[:4] == b"\x89PNG"


def test_log_txt_says_why_a_run_stopped(sunny_dir: Path, tmp_path: Path) -> None:
    """The error that stopped a run was shown on the terminal only; log.txt ended without a word. A user's
    mistake is one line there, anything else comes with its traceback."""
    cfg = tiny_config(sunny_dir, tmp_path, strategies="[finetune]")

    def refuse(results: dict) -> None:
        raise ConfigError("the settings say no")

    with pytest.raises(ConfigError):
        run_experiment(cfg, on_stage=refuse)
    log = (tmp_path / cfg.name / "log.txt").read_text()
    assert log.rstrip().endswith("ERROR evolora: stopped: ConfigError: the settings say no"), log[-300:]

    def broken(results: dict) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_experiment(cfg, on_stage=broken)
    log = (tmp_path / cfg.name / "log.txt").read_text()
    assert "stopped: RuntimeError: a bug\nTraceback" in log and 'raise RuntimeError("a bug")' in log


def test_a_log_txt_that_cannot_be_written_is_said_once(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """A full disk or a file-size limit on log.txt printed logging's 45-line error for every message."""
    import errno
    import logging

    def full(self: logging.StreamHandler) -> None:
        if getattr(self, "baseFilename", "").endswith("log.txt"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logging.StreamHandler, "flush", full)
    cfg = tiny_config(sunny_dir, tmp_path, strategies="[finetune]")
    assert len(run_experiment(cfg)[0]["stages"]) == 2
    err = capfd.readouterr().err
    assert err.count("log.txt cannot be written ([Errno 28] No space left on device)") == 1, err
    assert "Logging error" not in err


def test_a_model_folder_moved_with_the_same_weights_continues_the_experiment(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """`model.name` a local folder, copied elsewhere with the run: continuing was refused as a changed
    setting. The weights are compared instead (their fingerprint): the same continue, others are refused."""
    import torch

    import evolora
    from evolora.models.tiny import build_tiny_llama

    model, tok = build_tiny_llama()
    for name in ("base_a", "base_b"):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    over = {"strategies": "[finetune]", "model.name": str(tmp_path / "base_a")}
    run_experiment(tiny_config(sunny_dir, tmp_path / "runs", **over))
    results = run_experiment(
        tiny_config(sunny_dir, tmp_path / "runs", **{**over, "model.name": str(tmp_path / "base_b")})
    )
    assert [len(r["stages"]) for r in results] == [2]
    shutil.rmtree(tmp_path / "base_a")  # config.yaml names the new folder: a query loads it from there
    assert evolora.Recommender.load(tmp_path / "runs" / "t", method="finetune").score([], items=["2"])
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "base_c")
    tok.save_pretrained(tmp_path / "base_c")
    with pytest.raises(
        ConfigError, match=r"the weights of model\.name=.*base_c changed since this experiment"
    ):
        run_experiment(
            tiny_config(sunny_dir, tmp_path / "runs", **{**over, "model.name": str(tmp_path / "base_c")})
        )


def test_a_folder_replacement_killed_between_its_renames_leaves_the_old_folder(tmp_path: Path) -> None:
    """A replacement killed after setting the earlier folder aside and before renaming the new one in left
    neither at the path, and the next write to it deleted the one complete copy before writing: a failed
    write then left nothing. The earlier folder is put back first (either the old folder or the new one)."""
    from evolora.io import atomic_directory

    target = tmp_path / "trained"
    target.mkdir()
    (target / "state.json").write_text("old")
    target.rename(tmp_path / ".trained.old")  # the kill: the first rename done, not the second
    with pytest.raises(RuntimeError), atomic_directory(target) as out:
        (out / "state.json").write_text("new, unfinished")
        raise RuntimeError("the write fails")
    assert (target / "state.json").read_text() == "old" and not (tmp_path / ".trained.old").exists()
    with atomic_directory(target) as out:
        (out / "state.json").write_text("new")
    assert (target / "state.json").read_text() == "new"


def test_what_is_renamed_into_place_is_on_the_disk_first_and_its_rename_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut can lose what only the page cache holds: files written inside a folder replacement
    (safetensors, polars) were never flushed, and no rename's folder was, so a deployed version could come
    back as empty files or as the version before. Every file and folder is flushed before its rename, and
    the folder holding the rename after it."""
    from evolora.io import atomic_directory, atomic_write_json

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    target = tmp_path / "version-2"
    for _ in range(2):  # a new folder, then one replacing it
        events.clear()
        with atomic_directory(target) as out:
            (out / "adapter").mkdir()
            (out / "adapter" / "weights.bin").write_bytes(b"w")  # a plain write: closed, not flushed
            tmp = str(out)
        renames = [i for i, (kind, path) in enumerate(events) if kind == "rename" and path == str(target)]
        assert len(renames) == 1
        before, after = events[: renames[0]], events[renames[0] + 1 :]
        for flushed in (f"{tmp}/adapter/weights.bin", f"{tmp}/adapter", tmp):
            assert ("sync", flushed) in before
        assert ("sync", str(tmp_path)) in after
    assert (target / "adapter" / "weights.bin").read_bytes() == b"w"

    events.clear()
    atomic_write_json(tmp_path / "versions.json", {"promoted": 2})
    (rename,) = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert events[rename - 1][0] == "sync" and events[rename - 1][1].startswith(f"{tmp_path}/.versions.json.")
    assert events[rename + 1 :] == [("sync", str(tmp_path))]

    events.clear()  # folders made on the way are flushed into their parents, before anything lands in them
    atomic_write_json(tmp_path / "deploy" / "finetune-seed0" / "versions.json", {"promoted": 0})
    assert events[:2] == [("sync", str(tmp_path)), ("sync", str(tmp_path / "deploy"))]
