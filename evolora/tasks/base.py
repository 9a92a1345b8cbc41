"""What the stage loop and the strategies need from a task.

A task turns sample rows (indices into a `SampleTable`) into a training loss and into predictions, and
predictions into metrics. The loop never looks inside: the same loop trains and evaluates the yes/no CTR
task and the generative next-item task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from evolora.data.samples import SampleTable
from evolora.errors import ConfigError
from evolora.eval.metrics import MetricSet
from evolora.models.llm import LoraLM


def load_template(spec: str, builtin: dict[str, str], fields: tuple[str, ...]) -> str:
    """A built-in prompt template by name, or the text of a template file that has every field."""
    if spec in builtin:
        return builtin[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"task.template: {spec!r} is neither a built-in template {sorted(builtin)} nor a file"
        )
    text = path.read_text(encoding="utf-8")
    missing = [f for f in fields if f not in text]
    if missing:
        raise ConfigError(f"task.template: {path} lacks the fields {missing}")
    return text


#: How the LLM tasks tokenize a prompt's text (the part before the first per-sample line is cached apart).
TOKENIZE_RULE = (
    "ids = tok(shared_prefix).input_ids + tok(text[len(shared_prefix):], add_special_tokens=False).input_ids;"
    " with an empty shared_prefix, ids = tok(text).input_ids"
)


def prefix_splits_cleanly(tokenizer: Any, prefix_text: str, rest: str) -> bool:
    """Whether `tokenizer` reads `prefix_text + rest` as the prefix's tokens followed by `rest`'s own, so a
    prompt can run its shared prefix apart (`TOKENIZE_RULE`) with the same tokens as whole. Byte-level BPE
    (GPT-2's, SmolLM2's) does at a line break; a SentencePiece-style tokenizer that marks a word start at
    the beginning of every text it is given ("▁": Llama-2's, Mistral's) adds a token there."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return ids(prefix_text + rest) == ids(prefix_text) + ids(rest)


class Task(ABC):
    name: str
    #: what the task measures (`eval/metrics.py`)
    metric_set: ClassVar[MetricSet]
    #: what `train.select_by: auto` means for this task
    default_select_by: str = "metric"
    #: a ranking task's candidate set (`task.candidates`: "catalogue" or "seen"); None for scoring tasks
    candidate_set: str | None = None

    def __init__(self, table: SampleTable) -> None:
        self.table = table

    @property
    def primary_metric(self) -> str:
        """The metric that picks the best epoch and tunes ensemble weights; higher is better."""
        return self.metric_set.primary

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.metric_set.names

    @abstractmethod
    def loss(self, lm: LoraLM, rows: np.ndarray) -> torch.Tensor:
        """Mean training loss of a batch of sample rows, on the active adapter."""

    @abstractmethod
    def predict(self, lm: LoraLM, rows: np.ndarray, batch_size: int, desc: str = "scoring") -> Any:
        """Predictions for the rows, in row order, on the active adapter (no gradients)."""

    def metrics(self, predictions: Any, rows: np.ndarray) -> dict[str, float]:
        """Metrics of predictions made for `rows`: every metric of the task's set, computed as reports
        compute them from the stored arrays."""
        arrays = {**self.save_predictions(predictions), "truth": self.truth(rows)}
        return {m: self.metric_set.on_arrays(arrays, slice(None), m) for m in self.metric_names}

    def mix(self, predictions: list[Any], weights: list[float]) -> Any:
        """The weighted ensemble of several models' predictions for the same rows (default: of scores)."""
        total = np.zeros_like(np.asarray(predictions[0], dtype=np.float64))
        for w, p in zip(weights, predictions, strict=True):
            total = total + w * np.asarray(p, dtype=np.float64)
        return total

    @property
    def items(self) -> frozenset[str]:
        """The item ids this task can read (in histories and as targets)."""
        raise NotImplementedError

    def for_table(self, table: SampleTable, **settings: Any) -> Task:
        """The same task (settings, tokenizer, item data) over other samples: what a trained model is asked
        at inference. `settings` override task settings that only shape predictions (`beams`,
        `exclude_history`)."""
        raise NotImplementedError(f"the {self.name} task cannot score new samples")

    def prompt_recipe(self) -> dict[str, Any]:
        """How a sample's prompt is built, for readers without evolora (an export's manifest)."""
        raise NotImplementedError(f"the {self.name} task has no prompt")

    # What an export writes beside the model (`evolora.export`), where the task reads or answers in it.
    def export_item_map(self, titles: dict[str, str]) -> dict[str, Any]:
        """items.json: what stands for each item in this task's prompts and answers (here its title)."""
        return dict(titles)

    def export_item_stages(self) -> dict[str, int] | None:
        """item_stages.json, where the task ranks only the items seen by a row's stage: each one's first."""
        return None

    def export_item_vectors(self) -> dict[str, Any] | None:
        """The item vectors a prompt's history is picked by, where the task picks it so (an export writes
        them as item_vectors.safetensors)."""
        return None

    def before_stage(self, lm: Any, stage: int) -> None:  # noqa: B027 - a hook; most tasks need nothing
        """Called before stage `stage` trains or is restored (conventional models grow their ID tables)."""

    def sample_length(self, row: int) -> int:
        """Tokens of a training sample, to batch samples of similar length together."""
        return 1

    def candidates(self, predictions: list[Any]) -> Any:
        """What several models' predictions must be rescored on before `mix` (None: they already align)."""
        return None

    def rescore(self, lm: LoraLM, rows: np.ndarray, candidates: Any, batch_size: int) -> Any:
        """Predictions of the active adapter restricted to `candidates` (from `candidates`)."""
        raise NotImplementedError

    def truth(self, rows: np.ndarray) -> np.ndarray:
        """What predictions are judged against (labels, target items), saved with them for reports."""
        return self.table.labels(np.asarray(rows, dtype=np.int64))

    def save_predictions(self, predictions: Any) -> dict[str, np.ndarray]:
        """Arrays to store with a run so reports can recompute metrics on subsets."""
        return {"scores": np.asarray(predictions)}

    def load_predictions(self, arrays: Any) -> Any:
        """The inverse of `save_predictions` (arrays: an open `.npz`)."""
        return arrays["scores"]


def token_loss(
    lm: LoraLM,
    hidden: torch.Tensor,
    picks: list[tuple[int, int, int]],
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean cross-entropy of the tokens `picks` names: (sequence, position whose state predicts it, token).

    Only the picked states go through the output layer (a prompt's other positions need no logits)."""
    b_idx, t_idx, targets = (torch.tensor(col, device=lm.device) for col in zip(*picks, strict=True))
    with lm.autocast():
        logits = lm.logits_from_hidden(hidden[b_idx, t_idx])
    return F.cross_entropy(logits.float() / temperature, targets)
