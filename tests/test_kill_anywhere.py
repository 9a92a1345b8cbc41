"""A run killed between any two writes of a stage resumes to exactly the uninterrupted result.

Every file lands through `os.replace` (atomic writes and folders), so the test kills the run just before
each of those in turn: attempt k lets one write land and dies before the next. The resumed run must give
the same metrics and every trained tensor (adapters and strategy state, per stage) bit for bit, for the
strategies that train state beyond the PEFT adapter, and count the training it kept once in the stage's cost.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from evolora.experiment import run_dir_of, run_experiment
from evolora.io import load_state, load_tensors
from tests.helpers import Killed, kill_after_stage, tiny_config

CRM = "{dim: 8, mlp: [16], max_len: 10, dropout: 0.0}"
CASES = {
    "sdlora": ("[sdlora]", {}),
    "inflora": ("[inflora]", {}),  # its statistics before a job and after a stage
    "lsat": ("[{name: lsat, long_stages: 1, grid: [0.0, 0.5, 1.0]}]", {}),
    "matrix": ("[finetune]", {"eval.stages": "all"}),  # each matrix entry's predictions land on their own
    "reclora": (
        f"[{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 2}}]",
        {"task.history_len": 4, "task.retrieve_from": 8, "task.sample_history": 10},
    ),
}


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every adapter weight and strategy-state tensor saved after each stage."""
    out: dict[str, torch.Tensor] = {}
    for stage in sorted(run.glob("stage-*")):
        for file in sorted(stage.glob("trained/adapters/*/*.safetensors")):
            for k, v in load_tensors(file).items():
                out[f"{file.relative_to(run)}:{k}"] = v

        def walk(prefix: str, obj: object) -> None:
            if isinstance(obj, torch.Tensor):
                out[prefix] = obj
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}", v)
            elif isinstance(obj, list | tuple):
                for i, v in enumerate(obj):
                    walk(f"{prefix}.{i}", v)

        walk(f"{stage.name}/state", load_state(stage / "trained" / "state.safetensors"))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_kill_between_any_two_writes_of_a_stage_loses_nothing(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    strategies, extra = CASES[case]
    over = {"strategies": strategies, "train.epochs": 2, "train.samples_per_stage": 24, **extra}
    real_replace = os.replace
    # kill: whether to die before writes not seen yet; log: ("kill" | "land", (name, how many landed before))
    watch: dict = {"run": Path("/nonexistent"), "kill": False, "log": []}

    def replace(src: object, dst: object) -> None:
        run = watch["run"]
        # A write inside a folder still being built (a hidden `.*.tmp` sibling) is not visible yet: killing
        # there is the same as killing before that folder lands, so those do not count.
        target = Path(str(dst))
        building = any(part.startswith(".") and part.endswith(".tmp") for part in target.parts[:-1])
        # Stage 2 is the first that inherits state: every write from stage 1's record to stage 2's.
        stage1, stage2 = (run / f"stage-{t}" / "record.json" for t in (1, 2))
        if target.is_relative_to(run) and not building and stage1.is_file() and not stage2.is_file():
            name = str(target.relative_to(run))
            key = (name, sum(1 for what, (n, _) in watch["log"] if what == "land" and n == name))
            if watch["kill"] and ("kill", key) not in watch["log"]:
                watch["log"].append(("kill", key))
                raise Killed
            watch["log"].append(("land", key))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    ref_cfg = tiny_config(sunny_dir, tmp_path / "ref", **over)
    watch["run"] = run_dir_of(ref_cfg, ref_cfg.strategies[0].display, 0)
    (reference,) = run_experiment(ref_cfg)
    writes = [key for _, key in watch["log"]]  # of an uninterrupted stage 2
    watch["log"] = []

    cfg = tiny_config(sunny_dir, tmp_path / "run", **over)
    watch["run"] = run = run_dir_of(cfg, reference["method"], 0)
    watch["kill"] = True  # each attempt dies before the first write no attempt has died before
    attempts = 0
    while True:
        attempts += 1
        try:
            resumed = run_experiment(cfg)[0]
            break
        except Killed:
            assert attempts <= len(writes) + 1, "the run makes no progress between kills"
    monkeypatch.setattr(os, "replace", real_replace)
    # Killed before each of the stage's writes in turn; nothing was written twice (a rerun redoes only what
    # did not land, and the results.json of stage 1 is rebuilt after stage 2 instead).
    assert len(writes) >= 6
    assert [key for what, key in watch["log"] if what == "kill"] == writes
    landed = [key for what, key in watch["log"] if what == "land"]
    assert landed == [w for w in writes if w[0] != "results.json"]
    for got, want in zip(resumed["stages"], reference["stages"], strict=True):
        assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-9), case
        assert got.get("matrix") == want.get("matrix"), case
        timeless = [{k: v for k, v in s["strategy_info"].items() if "seconds" not in k} for s in (got, want)]
        assert timeless[0] == timeless[1], case
        # The kept work is counted once, whichever sitting did it: epochs a checkpoint kept and jobs finished
        # before the stage was recorded join the resumed stage's cost (tokens: the measure without a clock).
        for part in ("training", "validation", "evaluation", "lsat_search", "inflora_statistics"):
            counted = [s["cost"]["parts"].get(part, {}) for s in (got, want)]
            assert [(c.get("tokens"), c.get("backward_tokens")) for c in counted] == [
                (counted[1].get("tokens"), counted[1].get("backward_tokens"))
            ] * 2, (case, part, got["train_stage"])
    expected = trained_tensors(run_dir_of(ref_cfg, reference["method"], 0))
    restored = trained_tensors(run)
    assert restored.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(restored[key], tensor), key


def test_a_stage_recorded_in_a_later_sitting_keeps_its_reuse_bookkeeping(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """Killed after a stage's predictions landed but before its record: the record written on the rerun says
    what an uninterrupted run's says, reused shared predictions and what they saved included."""
    import json

    over = {"strategies": "[finetune, peso]", "train.samples_per_stage": 24, "eval.stages": "all"}
    cfg = tiny_config(sunny_dir, tmp_path / "run", **over)
    run_experiment(cfg)
    record = run_dir_of(cfg, "peso", 0) / "stage-1" / "record.json"
    before = json.loads(record.read_text())
    assert before["reused_shared_predictions"] and before["matrix_reused"] > 0  # finetune scored them first
    record.unlink()  # as if the run died just before writing it
    run_experiment(cfg)
    after = json.loads(record.read_text())
    for key in ("reused_shared_predictions", "matrix_reused"):
        assert after[key] == before[key], key
    for key in ("saved_seconds", "saved_cpu_seconds"):
        assert after["cost"][key] == pytest.approx(before["cost"][key], abs=2e-3) and before["cost"][key] > 0


def test_a_rerun_clears_what_killed_writes_left(sunny_dir: Path, tmp_path: Path) -> None:
    """Atomic writes go through hidden `.<name>.<random>.tmp` siblings; a kill leaves them behind (an adapter
    or a bundle each), and the rerun, holding the experiment's lock, deletes them. An update's folder is
    guarded by the update's lock, not the experiment's: left alone."""
    cfg = tiny_config(sunny_dir, tmp_path / "run", **{"strategies": "[finetune]"})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    stale = [root / "finetune" / "seed0" / "stage-1" / ".record.json.k2j4.tmp", root / ".inference.x81q.tmp"]
    stale[0].write_text("{")
    (stale[1] / "items").mkdir(parents=True)
    updating = root / "deploy" / "finetune-seed0" / ".versions.json.p0v1.tmp"
    updating.parent.mkdir(parents=True)
    updating.write_text("{")
    # in _shared, which other experiments write without this one's lock: a temporary nothing has written to
    # for a minute is a killed write's, a fresh one may be a live write's
    shared = Path(cfg.output_dir) / "_shared"
    dead, live = shared / "predictions" / ".a1.npz.x1.tmp", shared / "item_vectors" / ".b2.npz.y2.tmp"
    for tmp in (dead, live):
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"PK")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    run_experiment(cfg)
    assert not any(p.exists() for p in stale) and updating.is_file()
    assert not dead.exists() and live.is_file()


def test_shared_predictions_written_again_clear_their_killed_copy(sunny_dir: Path, tmp_path: Path) -> None:
    """A kill while shared predictions were written left their temporary copy, which the rerun (at once, so
    under the age rule for `_shared`) kept for good; the run that writes them again, holding their lock,
    deletes it."""
    cfg = tiny_config(sunny_dir, tmp_path / "run", **{"strategies": "[finetune]"})
    run_experiment(cfg)
    stored = sorted((Path(cfg.output_dir) / "_shared" / "predictions").glob("*.npz"))
    assert stored
    killed = stored[0].with_name(f".{stored[0].name}.k1ll3d00.tmp")
    stored[0].rename(killed)  # as if killed while writing it
    os.utime(killed)  # just now: the age rule for `_shared` keeps it
    run_experiment(cfg.model_copy(update={"name": "again"}))  # the same adapters: scored again here
    assert stored[0].is_file() and not killed.exists()


def test_an_interrupted_overwrite_rerun_as_is_redoes_nothing_it_finished(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """`run --overwrite` killed after a stage, then the same command again: the rerun deleted that attempt's
    finished work (the experiment it replaces was aside) and trained it again. A rerun with other settings
    (strategies too, which an experiment's key leaves out) still replaces the attempt."""
    first = tiny_config(sunny_dir, tmp_path, strategies="[frozen]", **{"train.epochs": 1})
    run_experiment(first)
    again = tiny_config(sunny_dir, tmp_path, strategies="[finetune]", **{"train.epochs": 1})
    with pytest.raises(Killed):
        run_experiment(again, overwrite=True, on_stage=kill_after_stage)
    root = tmp_path / again.name
    trained = run_dir_of(again, "finetune", 0) / "stage-1" / "trained" / "trained.json"
    stamp = trained.stat().st_mtime_ns
    assert (tmp_path / f".{again.name}.replaced" / "frozen").is_dir()  # the experiment it replaces, aside
    (finished,) = run_experiment(again, overwrite=True)
    assert finished["complete"] and trained.stat().st_mtime_ns == stamp  # stage 1 kept, not trained again
    assert not (tmp_path / f".{again.name}.replaced").exists() and not (root / "frozen").exists()
    # other settings: the interrupted attempt is replaced
    with pytest.raises(Killed):
        run_experiment(first, overwrite=True, on_stage=kill_after_stage)
    other = tiny_config(sunny_dir, tmp_path, strategies="[finetune]", **{"train.epochs": 1})
    run_experiment(other, overwrite=True)
    assert not (root / "frozen").exists() and not (tmp_path / f".{again.name}.replaced").exists()
    assert trained.stat().st_mtime_ns != stamp
