"""A third task needs only its own code and one registry entry: the loop, the run table and the report read
everything else from the registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from evolora.cli import app
from evolora.config import TaskSection
from evolora.eval.metrics import MetricSet
from evolora.eval.report import build_report
from evolora.experiment import run_experiment
from evolora.models.llm import LoraLM
from evolora.tasks.base import Task
from evolora.tasks.registry import TaskSpec, register_task
from tests.helpers import tiny_config


class ParityConfig(TaskSection):
    """Toy task: does the user like the target? Read from the item id's digits by the LLM."""

    name: Literal["parity"] = "parity"
    history_len: int = 2
    template: str = "unused"  # the shared test config sets one


def _accuracy(truth: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean((scores > 0.5) == truth.astype(bool)))


def _brier(truth: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean((scores - truth) ** 2))


def _on_arrays(arrays: dict[str, np.ndarray], index: Any, name: str) -> float:
    fn = {"acc": _accuracy, "brier": _brier}[name]
    return fn(arrays["truth"][index], arrays["scores"][index])


PARITY_METRICS = MetricSet(("acc", "brier"), "acc", frozenset({"brier"}), ("acc", "brier"), _on_arrays)


class ParityTask(Task):
    name = "parity"
    metric_set = PARITY_METRICS

    def __init__(self, table: Any, tokenizer: Any) -> None:
        super().__init__(table)
        self.tok = tokenizer
        self.targets = table.df["item_id"].to_list()

    def _logits(self, lm: LoraLM, rows: np.ndarray) -> torch.Tensor:
        ids = [self.tok(f"item {self.targets[int(r)]}")["input_ids"] for r in rows]
        width = max(len(x) for x in ids)
        batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        last = torch.tensor([len(x) - 1 for x in ids])
        logits = lm.model(input_ids=batch).logits[torch.arange(len(ids)), last]
        return logits[:, 3] - logits[:, 4]

    def loss(self, lm: LoraLM, rows: np.ndarray) -> torch.Tensor:
        labels = torch.tensor(self.table.labels(rows), dtype=torch.float32)
        return F.binary_cross_entropy_with_logits(self._logits(lm, rows), labels)

    @torch.no_grad()
    def predict(self, lm: LoraLM, rows: np.ndarray, batch_size: int, desc: str = "scoring") -> np.ndarray:
        lm.model.eval()
        return torch.sigmoid(self._logits(lm, np.asarray(rows))).numpy().astype(np.float64)

    def metrics(self, predictions: np.ndarray, rows: np.ndarray) -> dict[str, float]:
        arrays = {"truth": self.truth(rows), "scores": predictions}
        return {m: _on_arrays(arrays, slice(None), m) for m in PARITY_METRICS.names}

    def mix(self, predictions: list[np.ndarray], weights: list[float]) -> np.ndarray:
        return sum(w * p for w, p in zip(weights, predictions, strict=True))  # type: ignore[return-value]


def build_parity(cfg: Any, prepared: Any, pretrained: tuple[Any, Any]) -> tuple[LoraLM, ParityTask]:
    lm = LoraLM.from_config(cfg.model, pretrained=pretrained)
    return lm, ParityTask(prepared.table, lm.tokenizer)


@pytest.fixture
def parity_task() -> Iterator[None]:
    from evolora.config import TASK_CONFIGS
    from evolora.eval.metrics import METRIC_SETS
    from evolora.tasks.registry import TASKS

    register_task(TaskSpec("parity", ParityConfig, PARITY_METRICS, build_parity))
    yield
    for registry in (TASKS, TASK_CONFIGS, METRIC_SETS):
        registry.pop("parity")


def test_a_registered_toy_task_runs_reports_and_prints(
    parity_task: None, sunny_dir: Path, tmp_path: Path
) -> None:
    over = {
        "task.name": "parity",
        "task.history_len": 2,
        "train.epochs": 1,
        "strategies": "[frozen, finetune]",
    }
    cfg = tiny_config(sunny_dir, tmp_path, **over)
    assert isinstance(cfg.task, ParityConfig)
    frozen, finetune = run_experiment(cfg)
    for r in (frozen, finetune):
        assert r["task"] == "parity" and r["complete"]
        assert all(set(s["metrics"]) == {"acc", "brier"} for s in r["stages"])
    text, _ = build_report([tmp_path / cfg.name])
    assert "### ACC per evaluated stage (higher is better)" in text
    assert "### BRIER per evaluated stage (lower is better)" in text
    assert "Paired bootstrap: ACC difference to finetune" in text
    # the command line reads the registry too: its table shows the task's metrics
    config = tmp_path / "c.yaml"
    settings = cfg.model_dump(mode="json", include={"data", "staging", "task", "model", "train", "eval"})
    config.write_text(yaml.safe_dump({"name": cfg.name, "output_dir": str(tmp_path), **settings}))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert "acc" in result.output and "brier" in result.output


def test_an_unknown_task_is_a_config_error(sunny_dir: Path, tmp_path: Path) -> None:
    from evolora.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown task 'parity'; available: ctr, next_item"):
        tiny_config(sunny_dir, tmp_path, **{"task.name": "parity"})
