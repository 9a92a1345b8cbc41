"""The stage loop end to end on the tiny model: learning, sharing, resuming, run records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from evolora.errors import ConfigError
from evolora.experiment import run_dir_of, run_experiment
from evolora.tasks.ctr import CtrTask
from tests.helpers import tiny_config

LEARN = {"train.lr": 0.03, "train.schedule": "constant", "train.epochs": 6, "train.samples_per_stage": 96}


@pytest.fixture(scope="module")
def finished(sunny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(sunny_dir, out, **LEARN)
    return cfg, run_experiment(cfg)


def test_results_json_schema_and_learning(finished) -> None:
    cfg, results = finished
    assert [r["method"] for r in results] == ["frozen", "finetune"]
    for r in results:
        on_disk = json.loads((run_dir_of(cfg, r["method"], 0) / "results.json").read_text())
        assert on_disk == json.loads(json.dumps(r))
        assert on_disk["task"] == "ctr" and on_disk["model"] == "tiny" and on_disk["complete"]
        assert [s["train_stage"] for s in on_disk["stages"]] == [1, 2]
        assert [s["eval_stage"] for s in on_disk["stages"]] == [2, 3]
        for s in on_disk["stages"]:
            assert s["n_eval"] == 40 and s["n_eval_total"] > 40 and s["eval_subsampled"]
            assert set(s["metrics"]) == {"auc", "logloss"}
            assert isinstance(s["train_seconds"], float)
        mean_auc = np.mean([s["metrics"]["auc"] for s in on_disk["stages"]])
        assert on_disk["summary"]["mean"]["auc"] == pytest.approx(mean_auc)
    frozen, finetune = results
    # The title decides the label in this data: a trained model must find it.
    assert frozen["stages"][0]["metrics"]["auc"] > 0.8
    # frozen trains once; finetune reuses that first stage and trains again on stage 2.
    assert frozen["stages"][1]["trained"] is False and finetune["stages"][1]["trained"] is True
    logged = (Path(cfg.output_dir) / cfg.name / "log.txt").read_text()  # said so, not "trained on stage 2"
    assert "frozen: stage 2 kept the weights (nothing trained), evaluated on stage 3" in logged
    assert "finetune: trained on stage 2, evaluated on stage 3" in logged
    assert finetune["stages"][0]["jobs"][0]["reused_shared_result"] is True
    assert finetune["stages"][0]["metrics"] == frozen["stages"][0]["metrics"]


def test_adapters_saved_per_stage_in_peft_format(finished) -> None:
    cfg, _ = finished
    for t in (1, 2):
        d = run_dir_of(cfg, "finetune", 0) / f"stage-{t}" / "trained" / "adapters" / "default"
        assert (d / "adapter_model.safetensors").is_file() and (d / "adapter_config.json").is_file()
    assert (Path(cfg.output_dir) / cfg.name / "config.yaml").is_file()


def test_rerun_does_nothing_again(
    finished, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, results = finished

    def boom(*a, **k):
        raise AssertionError("a finished stage was recomputed")

    monkeypatch.setattr(CtrTask, "loss", boom)
    monkeypatch.setattr(CtrTask, "predict", boom)
    with caplog.at_level(logging.INFO, logger="evolora"):
        again = run_experiment(cfg)
    assert [r["stages"] for r in again] == [r["stages"] for r in results]
    # said per run, not "running finetune (seed 0)" alone, as if it trained again
    told = [r.getMessage() for r in caplog.records]
    assert told.count("every stage already finished (1, 2): nothing to run") == len(results), told


def test_changed_config_is_refused(finished) -> None:
    cfg, _ = finished
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.03 -> 0\.5"):
        run_experiment(changed)


class Interrupt(Exception):
    pass


def test_killed_mid_stage_resumes_without_redoing_work(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = {**LEARN, "strategies": "[finetune]", "staging.n_stages": 4}
    reference = run_experiment(tiny_config(sunny_dir, tmp_path / "ref", **overrides))[0]

    cfg = tiny_config(sunny_dir, tmp_path / "run", **overrides)
    run = run_dir_of(cfg, "finetune", 0)
    real_loss = CtrTask.loss
    batches = -(-reference["stages"][2]["n_train"] // 8)  # per epoch of stage 3
    calls = {"n": 0}

    def dying_loss(self, lm, rows):
        if (run / "stage-2" / "record.json").is_file():
            calls["n"] += 1
            if calls["n"] == 2 * batches + 3:  # stage 3, epoch 3, batch 3
                raise Interrupt
        return real_loss(self, lm, rows)

    monkeypatch.setattr(CtrTask, "loss", dying_loss)
    with pytest.raises(Interrupt):
        run_experiment(cfg)
    assert (run / "stage-2" / "record.json").is_file()
    assert not (run / "stage-3" / "record.json").exists()
    assert (run / "stage-3" / "checkpoints" / "default.safetensors").is_file()
    partial = json.loads((run / "results.json").read_text())
    assert not partial["complete"] and len(partial["stages"]) == 2
    stage1 = (run / "stage-1" / "record.json").read_text()

    calls["n"] = 0

    def counting_loss(self, lm, rows):
        calls["n"] += 1
        return real_loss(self, lm, rows)

    monkeypatch.setattr(CtrTask, "loss", counting_loss)
    resumed = run_experiment(cfg)[0]
    # Only stage 3's epochs 3..6 were trained: nothing finished was redone.
    assert calls["n"] == batches * 4
    assert (run / "stage-1" / "record.json").read_text() == stage1
    assert resumed["complete"]
    for a, b in zip(resumed["stages"], reference["stages"], strict=True):
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-9)


def test_undefined_metrics_are_null_in_results_json(sunny_dir: Path, tmp_path: Path) -> None:
    """One evaluated row has one class: its AUC is undefined. results.json is standard JSON (null, not the
    bare NaN that jq and JavaScript refuse), and the report reads it back, matrix included."""
    from evolora.eval.report import compose_report

    cfg = tiny_config(sunny_dir, tmp_path, **{"eval.max_samples": 1, "eval.stages": "all"})
    results = run_experiment(cfg)
    assert results[0]["stages"][0]["metrics"]["auc"] is None  # as the file holds it, as with --jobs N

    def refuse(name: str) -> None:
        raise AssertionError(f"results.json holds {name}: not standard JSON")

    for r in results:
        text = (run_dir_of(cfg, r["method"], 0) / "results.json").read_text()
        on_disk = json.loads(text, parse_constant=refuse)
        assert all(s["metrics"]["auc"] is None for s in on_disk["stages"]), on_disk["stages"]
        assert on_disk["summary"]["mean"]["auc"] is None
        assert on_disk["summary"]["matrix"]["metrics"]["auc"]["average"] is None
        assert on_disk["stages"][0]["matrix"]["2"]["auc"] is None
    report = compose_report([tmp_path / cfg.name])
    assert "| finetune | 1 | – | – | – |" in report.text
    # AUC is undefined everywhere: the bootstrap (and the plot) take LogLoss, defined on every stage
    assert report.lead == "logloss" and "### Paired bootstrap: LOGLOSS" in report.text
    only_auc = compose_report([tmp_path / cfg.name], ["auc"])
    assert "| frozen | – | (undefined on every stage) | – | – |" in only_auc.text
    assert "nan" not in only_auc.text
