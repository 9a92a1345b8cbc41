"""TALLRec-style yes/no preference prediction (Bao et al., RecSys'23; the setting LSAT builds on).

A sample's prompt lists the titles the user liked and disliked among their latest rated items (both lists in
time order) and asks whether they will like the target item. The answer is "Yes." or "No.".

* Training: cross-entropy on the answer tokens ("Yes"/"No", ".", end of sequence) by default; `loss: prompt`
  trains on the whole sequence as TALLRec's and LSAT's code do (`train_on_inputs=True`).
* Scoring: one forward pass over the prompt; only the hidden state at the answer position goes through the
  output layer, and only for the two answer tokens. P(like) = softmax([logit_Yes, logit_No])[0]. (LSAT's code
  applies a second softmax to vocabulary probabilities instead; that is monotone in the same difference but
  not a calibrated probability, so LogLoss would be meaningless.)
* Prompt and answer are tokenized separately and concatenated, so the answer token at training time is
  exactly the token scored at evaluation time, whatever the tokenizer does at the boundary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from evolora.config import CtrTaskConfig, RunConfig
from evolora.data.prepare import Prepared
from evolora.data.samples import SampleTable
from evolora.errors import EvoloraError
from evolora.eval.metrics import CTR_METRICS
from evolora.models.llm import LoraLM
from evolora.models.merged import merged_lora
from evolora.models.tokens import pad_token_lists
from evolora.parallel import split_rows
from evolora.progress import task as progress_task
from evolora.tasks.base import TOKENIZE_RULE, Task, prefix_splits_cleanly, token_loss
from evolora.tasks.base import load_template as base_load_template

log = logging.getLogger("evolora.tasks")

_UNSPLIT = (
    "this tokenizer reads the text after the prompt's shared prefix otherwise when it stands alone (a "
    "word-start mark): every prompt runs whole (task.share_prefix has no effect)"
)

TEMPLATES = {
    # LSAT's version of the TALLRec prompt (TALLRec's own first line ends in a stray lint comment).
    "tallrec": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        "### Instruction:\n"
        "Given the user's preference and unpreference, identify whether the user will like the target "
        '{item_kind} by answering "Yes." or "No.".\n\n'
        "### Input:\n"
        "User Preference: {preference}\n"
        "User Unpreference: {unpreference}\n"
        'Whether the user will like the target {item_kind} "{target}"?\n\n'
        "### Response:\n"
    ),
    # The same fields without the Alpaca preamble: about a third fewer tokens per sample.
    "compact": (
        "User Preference: {preference}\n"
        "User Unpreference: {unpreference}\n"
        'Will the user like the {item_kind} "{target}"? Answer "Yes." or "No.".\n'
        "Answer:\n"
    ),
}
ANSWERS = ("Yes.", "No.")
_FIELDS = ("{preference}", "{unpreference}", "{target}")


def load_template(spec: str) -> str:
    return base_load_template(spec, TEMPLATES, _FIELDS)


@dataclass(frozen=True)
class Encoded:
    body: list[int]  # the prompt after the shared prefix (the whole prompt when nothing is shared)
    answer: list[int]  # answer tokens + EOS
    label: int


class CtrTask(Task):
    name = "ctr"
    metric_set = CTR_METRICS

    def __init__(
        self,
        cfg: CtrTaskConfig,
        table: SampleTable,
        titles: dict[str, str],
        tokenizer: object,
        item_kind: str = "item",
        item_vectors: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(table)
        self.cfg = cfg
        self.titles = titles
        if cfg.retrieve_from is not None and item_vectors is None:
            raise EvoloraError("task.retrieve_from needs item embeddings (built by the experiment)")
        self.item_vectors = item_vectors
        self.tok = tokenizer
        self.item_kind = cfg.item_kind or item_kind
        self.template = load_template(cfg.template).replace("{item_kind}", self.item_kind)
        self.prefix_text = self._shared_prefix(self.template) if cfg.share_prefix else ""
        if self.prefix_text and not prefix_splits_cleanly(
            self.tok, self.prefix_text, self.template[len(self.prefix_text) :]
        ):
            log.info(_UNSPLIT)
            self.prefix_text = ""
        self.prefix = self._ids(self.prefix_text, special=True) if self.prefix_text else []
        self.answer_ids = [self._ids(a, special=False) for a in ANSWERS]
        self.yes_id, self.no_id = self.answer_ids[0][0], self.answer_ids[1][0]
        if self.yes_id == self.no_id:
            raise EvoloraError('this tokenizer starts "Yes." and "No." with the same token; cannot score')
        self.eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self._cache: dict[int, Encoded] = {}
        self.shortened = 0  # prompts that lost history items to fit max_length
        self._df = table.df

    @property
    def items(self) -> frozenset[str]:
        return frozenset(self.titles)

    def for_table(self, table: SampleTable, **settings: Any) -> CtrTask:
        cfg = self.cfg.model_copy(update=settings)
        return CtrTask(cfg, table, self.titles, self.tok, self.item_kind, item_vectors=self.item_vectors)

    # ------------------------------------------------------------------ encoding
    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    @staticmethod
    def _shared_prefix(template: str) -> str:
        """The template text before the line holding the first per-sample field.

        Cutting at a line break keeps the token boundary where the tokenizer would put one anyway.
        """
        first = min(template.index(f) for f in _FIELDS)
        return template[: template.rfind("\n", 0, first) + 1]

    def history(self, items: list[str], ratings: list[float], target: str) -> tuple[list[str], list[float]]:
        """The prompt's history: the latest `history_len` items, or with `retrieve_from` the `history_len`
        most similar to the target among the latest `retrieve_from` (ties to the more recent), in time
        order."""
        k = self.cfg.history_len
        if self.cfg.retrieve_from is None or len(items) <= k:
            return items[-k:], ratings[-k:]
        items, ratings = items[-self.cfg.retrieve_from :], ratings[-self.cfg.retrieve_from :]
        vecs = cast(dict[str, np.ndarray], self.item_vectors)  # set whenever retrieve_from is
        t = vecs[target]
        sims = np.array([float(vecs[i] @ t) for i in items])
        # Stable sort on (-similarity, -position): equal similarity prefers the more recent item.
        order = sorted(range(len(items)), key=lambda j: (-sims[j], -j))[:k]
        keep = sorted(order)
        return [items[j] for j in keep], [ratings[j] for j in keep]

    def render(self, hist_items: list[str], hist_ratings: list[float], target: str) -> str:
        """The prompt text of one sample (history oldest first)."""
        like = self.table.like_threshold
        liked = [self.titles[i] for i, r in zip(hist_items, hist_ratings, strict=True) if r > like]
        disliked = [self.titles[i] for i, r in zip(hist_items, hist_ratings, strict=True) if r <= like]
        return (
            self.template.replace("{preference}", ", ".join(f'"{t}"' for t in liked))
            .replace("{unpreference}", ", ".join(f'"{t}"' for t in disliked))
            .replace("{target}", self.titles[target])
        )

    def export_item_vectors(self) -> dict[str, Any] | None:
        return None if self.cfg.retrieve_from is None else self.item_vectors

    def prompt_recipe(self) -> dict[str, Any]:
        retrieve = self.cfg.retrieve_from
        return {
            "template": self.template,
            "fields": {
                "{preference}": "the titles (items.json) of the history's items rated above like_threshold, "
                'each in double quotes, joined by ", ", oldest first',
                "{unpreference}": "the same for the history's items rated at or below like_threshold",
                "{target}": "the candidate's title (items.json), as it is",
            },
            "history": f"the user's latest {self.cfg.history_len} rated items"
            if retrieve is None
            else f"the {self.cfg.history_len} items among the user's latest {retrieve} whose vectors "
            "(item_vectors.safetensors) have the largest dot product with the candidate's (ties: the more "
            "recent), in time order",
            "history_len": self.cfg.history_len,
            "retrieve_from": retrieve,
            "like_threshold": self.table.like_threshold,
            "max_length": self.cfg.max_length,
            "too_long": "while the prompt's ids and the answer's (its tokens and end of sequence) exceed "
            "max_length, the oldest history item is left out",
            "shared_prefix": self.prefix_text,
            "tokenize": TOKENIZE_RULE,
            "answer": "P(like) = softmax(logits[yes_id], logits[no_id])[0] at the last prompt token",
            "yes_id": self.yes_id,
            "no_id": self.no_id,
        }

    def encode(self, row: int) -> Encoded:
        enc = self._cache.get(row)
        if enc is not None:
            return enc
        r = self._df.row(row, named=True)
        items, ratings = self.history(list(r["hist_items"]), list(r["hist_ratings"]), r["item_id"])
        full = len(items)
        label = int(r["label"])
        answer = self.answer_ids[0 if label else 1] + self.eos
        while True:
            text = self.render(items, ratings, r["item_id"])
            if self.prefix_text:
                body = self._ids(text[len(self.prefix_text) :], special=False)
            else:
                body = self._ids(text, special=True)
            if len(self.prefix) + len(body) + len(answer) <= self.cfg.max_length or not items:
                break
            # Too long: drop the oldest history item rather than cutting the instruction.
            items, ratings = items[1:], ratings[1:]
        needed = len(self.prefix) + len(body) + len(answer)
        if needed > self.cfg.max_length:
            raise EvoloraError(
                f"task.max_length={self.cfg.max_length} is too small: the prompt of sample {row} needs "
                f"{needed} tokens even without history"
            )
        if len(items) < full:
            self.shortened += 1
            if self.shortened == 1:
                log.warning(
                    "prompts longer than task.max_length=%d lose their oldest history items "
                    "(first: sample %d); the run log counts them",
                    self.cfg.max_length,
                    row,
                )
        enc = Encoded(body, answer, label)
        self._cache[row] = enc
        return enc

    def sample_length(self, row: int) -> int:
        enc = self.encode(row)
        return len(enc.body) + len(enc.answer)

    def _batch(
        self, rows: np.ndarray, with_answer: bool, shared: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[Encoded], list[list[int]]]:
        """Right-padded ids and mask; `shared=False` puts the prefix back in front of every sequence."""
        encs = [self.encode(int(r)) for r in rows]
        head = [] if shared else self.prefix
        seqs = [head + e.body + (e.answer if with_answer else []) for e in encs]
        ids, mask = pad_token_lists(seqs, self.pad_id)
        return ids, mask, encs, seqs

    def _hidden(self, lm: LoraLM, ids: torch.Tensor, mask: torch.Tensor, shared: bool) -> torch.Tensor:
        prefix = torch.tensor(self.prefix) if shared and self.prefix else None
        with lm.autocast():
            return lm.hidden_states(ids.to(lm.device), mask.to(lm.device), prefix=prefix)

    # ------------------------------------------------------------------ training
    def loss(self, lm: LoraLM, rows: np.ndarray) -> torch.Tensor:
        # The whole-sequence loss needs the prefix's own states, so it never shares the prefix.
        shared = self.cfg.loss == "answer" and bool(self.prefix)
        lm.begin_batch(rows)
        ids, mask, encs, seqs = self._batch(rows, with_answer=True, shared=shared)
        hidden = self._hidden(lm, ids, mask, shared)
        picks = []  # the state at position p predicts token p + 1
        for b, (e, seq) in enumerate(zip(encs, seqs, strict=True)):
            first = 1 if self.cfg.loss == "prompt" else len(seq) - len(e.answer)
            picks += [(b, p - 1, seq[p]) for p in range(first, len(seq))]
        return token_loss(lm, hidden, picks)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def answer_logits(self, lm: LoraLM, rows: np.ndarray) -> torch.Tensor:
        """[n, 2] logits of ("Yes", "No") at the answer position."""
        shared = bool(self.prefix)
        lm.begin_batch(rows)
        ids, mask, _, seqs = self._batch(rows, with_answer=False, shared=shared)
        hidden = self._hidden(lm, ids, mask, shared)
        last = torch.tensor([len(s) - 1 for s in seqs], device=lm.device)
        h = hidden[torch.arange(len(seqs), device=lm.device), last]
        with lm.autocast():
            logits = lm.logits_from_hidden(h, token_ids=[self.yes_id, self.no_id])
        return logits.float()

    @split_rows
    @torch.no_grad()
    def predict(self, lm: LoraLM, rows: np.ndarray, batch_size: int, desc: str = "scoring") -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        # Similar lengths in a batch waste less compute on padding; results go back in row order.
        lengths = np.array([len(self.encode(int(r)).body) for r in rows])
        order = np.argsort(lengths, kind="stable")
        scores = np.empty(len(rows), dtype=np.float64)
        was_training = lm.model.training
        lm.model.eval()
        with progress_task(desc, total=len(rows)) as bar, merged_lora(lm):
            for start in range(0, len(rows), batch_size):
                sel = order[start : start + batch_size]
                logits = self.answer_logits(lm, rows[sel])
                # In float64: in float32 every gap past ~17 logits rounds P(like) to 1.0, tying the rows.
                scores[sel] = torch.softmax(logits.double(), dim=-1)[:, 0].cpu().numpy()
                bar.advance(len(sel))
        lm.model.train(was_training)
        return scores


def item_kind_of(dataset: str) -> str:
    """The word the prompt uses for an item, from the dataset's name."""
    name = dataset.lower()
    if name.startswith("ml-") or "movie" in name:
        return "movie"
    if "book" in name:
        return "book"
    return "item"


def ctr_task_for(
    cfg: RunConfig, prepared: Prepared, tokenizer: Any, item_vectors: dict[str, np.ndarray] | None = None
) -> CtrTask:
    """The CTR task of a run, on a backbone's tokenizer."""
    items = prepared.data.items
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))
    kind = item_kind_of(prepared.data.name)
    task_cfg = cast(CtrTaskConfig, cfg.task)
    return CtrTask(task_cfg, prepared.table, titles, tokenizer, kind, item_vectors=item_vectors)


def build_ctr(cfg: RunConfig, prepared: Prepared, pretrained: tuple[Any, Any]) -> tuple[LoraLM, CtrTask]:
    """The registry's builder: the LoRA backbone, item embeddings when the prompt retrieves history by
    similarity (`retrieve_from`), and the task."""
    from evolora.tasks.semantic import item_vectors_for

    vectors = None
    if cast(CtrTaskConfig, cfg.task).retrieve_from is not None:
        vectors = item_vectors_for(cfg, prepared, pretrained)
    lm = LoraLM.from_config(cfg.model, pretrained=pretrained)
    return lm, ctr_task_for(cfg, prepared, lm.tokenizer, vectors)
