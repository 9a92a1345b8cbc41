"""Generative next-item recommendation with semantic IDs (PESO's task; TIGER / LC-Rec style).

Each item is a short sequence of ID tokens (its semantic ID, e.g. `<a_51><b_218><c_33><d_0><e_0>`), added to
the LLM's vocabulary. A prompt lists the user's latest items (at most `history_len`, oldest first) as IDs;
the model is trained to write the next item's ID (cross-entropy on the ID tokens and the end of sequence)
and, at evaluation, constrained beam search over a trie of real items returns the top-k items
(`decoding.py`). Hit@K and NDCG@K (one relevant item, so IDCG = 1) compare them with the true next item.

The template is PESO's (`Fine-tuning/prompt.py` of the release). Its logit temperature (PESO's code divides
logits by 0.8 in the loss, a LETTER inheritance the paper does not mention) is `logit_temperature`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from evolora.config import NextItemTaskConfig, RunConfig
from evolora.data.prepare import Prepared
from evolora.data.samples import SampleTable
from evolora.errors import ConfigError, DataError
from evolora.eval.metrics import KS, RANKING_METRICS, ranking_metrics
from evolora.models.llm import LoraLM
from evolora.models.merged import merged_lora
from evolora.models.tokens import pad_token_lists
from evolora.parallel import split_rows
from evolora.progress import task as progress_task
from evolora.tasks.base import TOKENIZE_RULE, Task, prefix_splits_cleanly, token_loss
from evolora.tasks.base import load_template as base_load_template
from evolora.tasks.decoding import (
    ItemTrie,
    Ranked,
    beam_search,
    mix_rankings,
    sequence_logprob,
    union_candidates,
)

TEMPLATES = {
    "peso": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nThe user has interacted with items {history} in chronological order. "
        "Can you predict the next possible item that the user may expect?\n\n### Response:"
    ),
}


def load_template(spec: str) -> str:
    return base_load_template(spec, TEMPLATES, ("{history}",))


@dataclass(frozen=True)
class Encoded:
    body: list[int]  # prompt after the shared prefix
    answer: list[int]  # target ID tokens + EOS


class NextItemTask(Task):
    name = "next_item"
    metric_set = RANKING_METRICS
    default_select_by = "loss"  # beam search on validation every epoch is costly; PESO selects by loss

    def __init__(
        self,
        cfg: NextItemTaskConfig,
        table: SampleTable,
        item_tokens: dict[str, list[str]],
        tokenizer: Any,
        item_first_stage: dict[str, int] | None = None,
    ) -> None:
        super().__init__(table)
        self.cfg = cfg
        # `task.candidates`: the whole catalogue (the trie of every item), or the items seen by a row's stage
        self.candidate_set = "seen" if cfg.candidates == "seen" else "catalogue"
        if self.candidate_set == "seen" and item_first_stage is None:
            raise ConfigError("task.candidates: seen needs the stage each item first appears in")
        self.item_first_stage = item_first_stage or {}
        self._tries: dict[int, ItemTrie] = {}
        self.tok = tokenizer
        if cfg.beams < max(KS):
            raise ConfigError(f"task.beams={cfg.beams}: need at least {max(KS)} to report Hit@{max(KS)}")
        self.item_tokens = item_tokens
        self.item_ids = list(item_tokens)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.item_text = {item: "".join(toks) for item, toks in item_tokens.items()}
        seqs = [self.tok.convert_tokens_to_ids(toks) for toks in item_tokens.values()]
        vocab = self.tok.get_vocab()
        unknown = [t for toks in item_tokens.values() for t in toks if t not in vocab]
        if unknown:
            raise ConfigError(f"semantic-ID tokens missing from the tokenizer: {unknown[:5]}")
        self.trie = ItemTrie(seqs)
        self.item_seqs = seqs
        self.template = load_template(cfg.template)
        cut = self.template.rfind("\n", 0, self.template.index("{history}")) + 1
        # the prompt runs whole where the tokenizer reads the rest otherwise alone (`prefix_splits_cleanly`)
        cleanly = prefix_splits_cleanly(self.tok, self.template[:cut], self.template[cut:])
        self.prefix_text = self.template[:cut] if cleanly else ""
        self.prefix = self._ids(self.prefix_text, special=True) if self.prefix_text else []
        self.eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        df = table.df
        missing = set(df["item_id"].unique().to_list()) - set(self.index)
        if missing:
            raise DataError(f"{len(missing)} target items have no semantic ID (e.g. {sorted(missing)[:3]})")
        self.targets = np.array([self.index[i] for i in df["item_id"].to_list()], dtype=np.int64)
        self.stages = df["stage"].to_numpy()
        self._hist = df["hist_items"]  # read a row at a time: as Python lists, ~0.7 GB per 1M samples
        self._cache: dict[int, Encoded] = {}

    @property
    def items(self) -> frozenset[str]:
        return frozenset(self.index)

    def for_table(self, table: SampleTable, **settings: Any) -> NextItemTask:
        cfg = self.cfg.model_copy(update=settings)
        return NextItemTask(cfg, table, self.item_tokens, self.tok, self.item_first_stage)

    def trie_for(self, stage: int) -> ItemTrie:
        """The candidates of a row of `stage`: every item, or (`candidates: seen`) those first seen at
        `stage` or before, as the conventional models rank them."""
        if self.candidate_set == "catalogue":
            return self.trie
        if stage not in self._tries:
            known = [
                i
                for i, item in enumerate(self.item_ids)
                if self.item_first_stage.get(item, stage + 1) <= stage
            ]
            self._tries[stage] = ItemTrie([self.item_seqs[i] for i in known], known)
        return self._tries[stage]

    # ------------------------------------------------------------------ encoding
    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def render(self, history: list[str]) -> str:
        return self.template.replace("{history}", ", ".join(self.item_text[h] for h in history))

    def export_item_map(self, titles: dict[str, str]) -> dict[str, Any]:
        """Each item's semantic ID, the text of its tokens (what prompts hold and answers are)."""
        return {item: "".join(tokens) for item, tokens in self.item_tokens.items()}

    def export_item_stages(self) -> dict[str, int] | None:
        if self.candidate_set != "seen":
            return None
        first = self.item_first_stage
        return {item: int(first[item]) for item in self.item_ids if item in first}

    def prompt_recipe(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "fields": {
                "{history}": f"the semantic IDs (items.json) of the user's latest {self.cfg.history_len} "
                'items, joined by ", ", oldest first',
            },
            "history_len": self.cfg.history_len,
            "shared_prefix": self.prefix_text,
            "tokenize": TOKENIZE_RULE,
            "answer": "the next item's semantic ID (items.json), one token per ID level, ranked by the sum "
            "of its tokens' log-probabilities (the end-of-sequence token the model learnt after it is not "
            f"scored): a beam search ({self.cfg.beams} beams) over {_SEARCHED[self.cfg.constraint]}"
            + _LEFT_OUT[self.cfg.exclude_history]
            + (
                ", among the items that appeared up to the row's stage (item_stages.json: each item's first)"
                if self.candidate_set == "seen"
                else ""
            ),
            "search": {
                "beams": self.cfg.beams,
                "constraint": self.cfg.constraint,
                "exclude_history": self.cfg.exclude_history,
                "candidates": self.candidate_set,
            },
        }

    def _prompt_items(self, row: int) -> list[str]:
        """The items a row's prompt lists: the latest `history_len` of its history, oldest first."""
        return self._hist[int(row)].to_list()[-self.cfg.history_len :]

    def encode(self, row: int) -> Encoded:
        enc = self._cache.get(row)
        if enc is None:
            text = self.render(self._prompt_items(row))
            body = self._ids(text[len(self.prefix_text) :], special=not self.prefix)
            enc = Encoded(body, self.item_seqs[self.targets[row]] + self.eos)
            self._cache[row] = enc
        return enc

    def sample_length(self, row: int) -> int:
        e = self.encode(row)
        return len(e.body) + len(e.answer)

    # ------------------------------------------------------------------ training
    def loss(self, lm: LoraLM, rows: np.ndarray) -> torch.Tensor:
        encs = [self.encode(int(r)) for r in rows]
        ids, mask = pad_token_lists([e.body + e.answer for e in encs], self.pad_id)
        with lm.autocast():
            hidden = lm.hidden_states(ids.to(lm.device), mask.to(lm.device), prefix=self._prefix_tensor())
        # The ID tokens and EOS follow the body; the state before each token predicts it.
        picks = [(b, len(e.body) - 1 + j, tok) for b, e in enumerate(encs) for j, tok in enumerate(e.answer)]
        return token_loss(lm, hidden, picks, self.cfg.logit_temperature)

    def _prefix_tensor(self) -> torch.Tensor | None:
        return torch.tensor(self.prefix) if self.prefix else None

    # ------------------------------------------------------------------ ranking
    def _prompts(self, rows: np.ndarray) -> list[list[int]]:
        return [self.encode(int(r)).body for r in rows]

    @split_rows
    @torch.no_grad()
    def predict(self, lm: LoraLM, rows: np.ndarray, batch_size: int, desc: str = "ranking") -> Ranked:
        rows = np.asarray(rows, dtype=np.int64)
        items = np.full((len(rows), self.cfg.beams), -1, dtype=np.int64)
        scores = np.full((len(rows), self.cfg.beams), -np.inf)
        target_logp, target_valid, n_candidates = (np.empty(len(rows)) for _ in range(3))
        # Prompts of similar lengths share a batch (less left padding); results go back in row order.
        order = np.argsort([len(self.encode(int(r)).body) for r in rows], kind="stable")
        was_training = lm.model.training
        lm.model.eval()
        with progress_task(desc, total=len(rows)) as bar, merged_lora(lm):
            for start in range(0, len(rows), batch_size):
                chunk = order[start : start + batch_size]
                # One trie per call: under `candidates: seen` rows of different stages go in separate calls.
                keys = (
                    self.stages[rows[chunk]]
                    if self.candidate_set == "seen"
                    else np.zeros(len(chunk), np.int64)
                )
                for key in np.unique(keys):
                    at = chunk[keys == key]
                    batch, trie = rows[at], self.trie_for(int(key))
                    exclude = self._left_out(batch)
                    ranked = beam_search(
                        lm,
                        self._prompts(batch),
                        trie,
                        beams=self.cfg.beams,
                        prefix=self.prefix or None,
                        levelwise=self.cfg.constraint == "levelwise",
                        exclude=exclude,
                        targets=self._target_seqs(batch),
                    )
                    items[at], scores[at] = ranked.items, ranked.scores
                    target_logp[at], target_valid[at] = ranked.target_logp, ranked.target_logp_valid
                    n_candidates[at] = len(trie)
                bar.advance(len(chunk))
        lm.model.train(was_training)
        return Ranked(items, scores, target_logp, target_valid, np.log(n_candidates))

    def _left_out(self, rows: np.ndarray) -> list[set[int]] | None:
        """Per row, the item indices `exclude_history` keeps out of its search (None: it keeps none)."""
        if not self.cfg.exclude_history:
            return None
        if self.cfg.exclude_history == "rated":
            lists = self.table.rated_before(rows)
        else:
            lists = [self._prompt_items(int(r)) for r in rows]
        return [{self.index[h] for h in items if h in self.index} for items in lists]

    def _target_seqs(self, rows: np.ndarray) -> list[list[int]]:
        """The true next items' ID tokens. Their log-probability under the model gives `nll`: Hit@K is zero
        whenever the true item falls outside the top K, its likelihood still tells how far off a model is
        (small budgets over tens of thousands of items). `predict` scores them on the beam search's prompt
        cache, `rescore` (ensembles) with the candidates."""
        return [self.item_seqs[self.targets[int(r)]] for r in rows]

    def metrics(self, predictions: Ranked, rows: np.ndarray) -> dict[str, float]:
        out = ranking_metrics(predictions.items, self.targets[np.asarray(rows, dtype=np.int64)])
        if predictions.target_logp is not None:
            # nats per item; lower is better
            out["nll"] = float(-np.mean(predictions.target_logp)) if len(rows) else float("nan")
        if predictions.target_logp_valid is not None:
            out["nll_valid"] = float(-np.mean(predictions.target_logp_valid)) if len(rows) else float("nan")
        if predictions.log_candidates is not None:  # a uniform guess among the candidates
            out["log_items"] = float(np.mean(predictions.log_candidates)) if len(rows) else float("nan")
        return out

    # ------------------------------------------------------------------ ensembles
    def candidates(self, predictions: list[Ranked]) -> list[list[int]]:
        return union_candidates(predictions)

    @torch.no_grad()
    def rescore(self, lm: LoraLM, rows: np.ndarray, candidates: list[list[int]], batch_size: int) -> Ranked:
        """log p(item | prompt) under the active adapter for every candidate of every row, and for the row's
        true item (the `nll` metric; j = -1 below marks it)."""
        width = max((len(c) for c in candidates), default=0)
        items = np.full((len(rows), width), -1, dtype=np.int64)
        scores = np.full((len(rows), width), -np.inf)
        target_logp = np.empty(len(rows))
        pairs = [(q, j, item) for q, cand in enumerate(candidates) for j, item in enumerate(cand)]
        pairs += [(q, -1, int(self.targets[int(r)])) for q, r in enumerate(rows)]
        # Prompts of similar lengths share a batch (less padding); each value goes to its own cell.
        lengths = [len(self.encode(int(r)).body) for r in rows]
        pairs.sort(key=lambda pair: lengths[pair[0]])
        with merged_lora(lm):
            for start in range(0, len(pairs), batch_size * 4):
                chunk = pairs[start : start + batch_size * 4]
                prompts = [self.encode(int(rows[q])).body for q, _, _ in chunk]
                targets = [self.item_seqs[item] for _, _, item in chunk]
                logp = sequence_logprob(lm, prompts, targets, prefix=self.prefix or None)
                for (q, j, item), v in zip(chunk, logp, strict=True):
                    if j < 0:
                        target_logp[q] = v
                    else:
                        items[q, j], scores[q, j] = item, v
        return Ranked(items, scores, target_logp)

    def mix(self, predictions: list[Ranked], weights: list[float]) -> Ranked:
        return mix_rankings(predictions, weights, self.cfg.beams)

    def truth(self, rows: np.ndarray) -> np.ndarray:
        return self.targets[np.asarray(rows, dtype=np.int64)]

    def save_predictions(self, predictions: Ranked) -> dict[str, np.ndarray]:
        out = {"items": predictions.items, "scores": predictions.scores}
        optional = {
            "target_logp": predictions.target_logp,
            "target_logp_valid": predictions.target_logp_valid,
            "log_candidates": predictions.log_candidates,
        }
        return {**out, **{k: v for k, v in optional.items() if v is not None}}

    def load_predictions(self, arrays: Any) -> Ranked:
        return Ranked(
            arrays["items"],
            arrays["scores"],
            arrays.get("target_logp"),
            arrays.get("target_logp_valid"),
            arrays.get("log_candidates"),
        )


#: what the prompt recipe says `exclude_history` leaves out of the search, by its value
_LEFT_OUT: dict[bool | str, str] = {
    False: "",
    True: ", items of the prompt's history left out",
    "rated": ", every item the user rated before the row left out (its whole history, not only the prompt's)",
}

#: what the beam search may generate, by `task.constraint` (for an export's manifest)
_SEARCHED = {
    "trie": "the IDs of items.json (a prefix tree of them: only real items)",
    "levelwise": "any token seen at each ID level in items.json (PESO's constraint; not only real items)",
}


def build_next_item(
    cfg: RunConfig, prepared: Prepared, pretrained: tuple[Any, Any]
) -> tuple[LoraLM, NextItemTask]:
    """The registry's builder: semantic IDs (the dataset's or built by RQ-VAE) become new tokens of the
    backbone, then the task over them."""
    from evolora.tasks.semantic import semantic_ids_for

    sids = semantic_ids_for(cfg, prepared, pretrained)
    lm = LoraLM.from_config(cfg.model, new_tokens=sids.all_tokens(), pretrained=pretrained)
    item_tokens = {item: sids.tokens(item) for item in sids.item_ids}
    space = prepared.id_space()
    first = dict(zip(space.item_ids[1:], space.item_first_stage[1:].tolist(), strict=True))
    task = NextItemTask(cast(NextItemTaskConfig, cfg.task), prepared.table, item_tokens, lm.tokenizer, first)
    return lm, task
