"""CTR and next-item tasks for conventional recommenders, on the very samples the LLM tasks use.

Both tasks read the `SampleTable` rows the LLM tasks read (same pools, same evaluation rows) and turn them
into index tensors once: user, target, the latest `model.conventional.max_len` history items (of those a
sample keeps), like/dislike flags of the history (CTR), and the sample's stage.

* `ConventionalCtrTask`: BCE on the label; P(like) = sigmoid(logit); AUC and LogLoss exactly as `CtrTask`.
* `ConventionalNextItemTask`: full ranking over every item that appeared in any stage <= the sample's
  stage (items first rated later within that stage count too, as for a system that knows the stage's
  catalogue; no sampled negatives in evaluation). Training is a full softmax
  over the items known at the training stage, except MF, which trains with BPR and sampled negatives. The
  ranked list (`Ranked`, item indices of the model's `IdSpace`, scores = log-softmax over the candidates)
  is scored by `ranking_metrics` against the target's index in the same space, so Hit@K and NDCG@K mean
  exactly what they mean for `NextItemTask`. Ties go to the lower index (`task.ties: random`: a fixed
  random order).

`before_stage` grows the model's ID tables to the ids of stages <= t.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, cast

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from evolora.config import CtrTaskConfig, NextItemTaskConfig, RunConfig
from evolora.data.ids import IdSpace
from evolora.data.prepare import Prepared
from evolora.data.samples import SampleTable
from evolora.errors import ConfigError
from evolora.eval.metrics import CTR_METRICS, KS, RANKING_METRICS, ranking_metrics
from evolora.models.conventional.backbone import ConventionalBackbone
from evolora.models.conventional.common import Batch
from evolora.parallel import split_rows
from evolora.progress import task as progress_task
from evolora.tasks.base import Task
from evolora.tasks.decoding import Ranked, mix_rankings, union_candidates


def _index_column(df: pl.DataFrame, col: str, mapping: dict[str, int]) -> np.ndarray:
    return df[col].replace_strict(mapping, return_dtype=pl.Int64).to_numpy().copy()


def history_matrix(lists: pl.Series, width: int, mapping: dict[str, int] | None = None) -> np.ndarray:
    """[n, width] int64 of the latest `width` elements of each list (mapped to indices by `mapping`),
    left-padded with 0, the latest element in the last column."""
    lengths = np.minimum(lists.list.len().to_numpy().astype(np.int64), width)
    flat = lists.list.tail(width).explode().drop_nulls()
    if mapping is not None:
        flat = flat.replace_strict(mapping, return_dtype=pl.Int64)
    values = flat.to_numpy()
    out = np.zeros((len(lists), width), dtype=np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(values)) - np.repeat(starts, lengths) + np.repeat(width - lengths, lengths)
    out[rows, cols] = values
    return out


class _ConventionalTask(Task):
    """Shared by both tasks: sample tensors, batches, table growth."""

    def __init__(self, table: SampleTable, space: IdSpace, max_len: int, feedback: bool) -> None:
        super().__init__(table)
        self.space = space
        self.max_len = max_len
        df = table.df
        items = space.item_index()
        self.targets = _index_column(df, "item_id", items)  # item index of each sample's target
        self.stages = df["stage"].to_numpy().astype(np.int64)
        width = max(1, min(max_len, int(df["hist_items"].list.len().max() or 0)))
        # "" is no user (a history given at inference): index 0, never trained, so scored as a cold user.
        self._users = torch.from_numpy(_index_column(df, "user_id", {**space.user_index(), "": 0}))
        self._targets = torch.from_numpy(self.targets)
        self._hist = torch.from_numpy(history_matrix(df["hist_items"], width, items))
        self.lengths = (self._hist > 0).sum(1).numpy()  # history items a model reads, per sample
        self._feedback: torch.Tensor | None = None
        if feedback:
            liked = df["hist_ratings"].list.eval(pl.element() > table.like_threshold)
            flags = history_matrix(liked.list.eval(pl.element().cast(pl.Int64) + 1), width)
            self._feedback = torch.from_numpy(flags)

    def batch(self, rows: np.ndarray, device: torch.device | None = None) -> Batch:
        """The model input of sample rows; history columns that are padding for every row are dropped."""
        rows = np.asarray(rows, dtype=np.int64)
        idx = torch.from_numpy(rows)
        longest = max(1, int(self.lengths[rows].max(initial=0)))
        fb = self._feedback[idx, -longest:] if self._feedback is not None else None
        b = Batch(self._users[idx], self._hist[idx, -longest:], self._targets[idx], fb)
        return b.to(device) if device is not None else b

    def before_stage(self, lm: ConventionalBackbone, stage: int) -> None:
        lm.resize(self.space.users_known(stage), self.space.items_known(stage))

    @property
    def items(self) -> frozenset[str]:
        return frozenset(self.space.item_ids[1:])

    @property
    def item_ids(self) -> list[str]:
        """Item id of each index (what a ranking's item indices point to; index 0 is no item)."""
        return self.space.item_ids

    def for_table(self, table: SampleTable, **settings: Any) -> _ConventionalTask:
        cfg = self.cfg.model_copy(update=settings)
        return type(self)(cfg, table, self.space, self.max_len)  # type: ignore[call-arg]

    def sample_length(self, row: int) -> int:
        return int(self.lengths[row])


class ConventionalCtrTask(_ConventionalTask):
    name = "ctr"
    metric_set = CTR_METRICS
    default_select_by = "metric"

    def __init__(self, cfg: CtrTaskConfig, table: SampleTable, space: IdSpace, max_len: int) -> None:
        super().__init__(table, space, max_len, feedback=True)
        self.cfg = cfg
        self._labels = table.df["label"].to_numpy()

    def loss(self, lm: ConventionalBackbone, rows: np.ndarray) -> torch.Tensor:
        model = lm.model
        batch = self.batch(rows, lm.device)
        if model.training:
            model.observe(batch)
        labels = torch.as_tensor(self._labels[np.asarray(rows, dtype=np.int64)], dtype=torch.float32)
        return F.binary_cross_entropy_with_logits(model.logits(batch), labels.to(lm.device))

    @split_rows
    @torch.no_grad()
    def predict(
        self, lm: ConventionalBackbone, rows: np.ndarray, batch_size: int, desc: str = "scoring"
    ) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        model = lm.model
        was_training = model.training
        model.eval()
        out = np.empty(len(rows), dtype=np.float64)
        with progress_task(desc, total=len(rows)) as bar:
            for start in range(0, len(rows), batch_size):
                sel = rows[start : start + batch_size]
                logits = model.logits(self.batch(sel, lm.device))
                out[start : start + len(sel)] = torch.sigmoid(logits.double()).cpu().numpy()
                bar.advance(len(sel))
        model.train(was_training)
        return out


class ConventionalNextItemTask(_ConventionalTask):
    name = "next_item"
    # A full ranking of known items, without the true item's likelihood (no `nll`).
    metric_set = replace(RANKING_METRICS, names=RANKING_METRICS.names[:4], shown=("hit@10", "ndcg@10"))
    default_select_by = "metric"  # a full ranking of a validation pool takes well under a second

    def __init__(self, cfg: NextItemTaskConfig, table: SampleTable, space: IdSpace, max_len: int) -> None:
        super().__init__(table, space, max_len, feedback=False)
        if cfg.beams < max(KS):
            raise ConfigError(f"task.beams={cfg.beams}: need at least {max(KS)} to report Hit@{max(KS)}")
        if cfg.candidates == "catalogue":
            raise ConfigError(
                "task.candidates: catalogue is not built for conventional models (their item tables grow "
                "with the stages); rank the LLM among the items seen so far instead (candidates: seen)"
            )
        self.candidate_set = "seen"
        self.cfg = cfg
        self.k = cfg.beams  # the length of the ranked list, as for the LLM task
        self.known = np.array([space.items_known(int(s)) for s in range(table.n_stages + 1)])

    # ------------------------------------------------------------------ training
    def loss(self, lm: ConventionalBackbone, rows: np.ndarray) -> torch.Tensor:
        model = lm.model
        batch = self.batch(rows, lm.device)
        if model.training:
            model.observe(batch)
        n = model.items.ids.size  # the items known at the training stage
        if model.next_item_loss == "bpr":
            neg = torch.randint(1, max(2, n), (len(rows), model.cfg.negatives), device=lm.device)
            if model.cfg.negatives_from == "unrated":
                neg = self._redraw_rated(neg, np.asarray(rows, dtype=np.int64), n)
            scores = model.score_items(batch, torch.cat([batch.target.unsqueeze(1), neg], dim=1))
            return -F.logsigmoid(scores[:, :1] - scores[:, 1:]).mean()
        logits = model.rank_logits(batch, n)
        logits = logits.index_fill(1, logits.new_zeros(1, dtype=torch.long), -torch.inf)  # index 0: no item
        return F.cross_entropy(logits, batch.target)

    def _redraw_rated(self, neg: torch.Tensor, rows: np.ndarray, n: int, rounds: int = 50) -> torch.Tensor:
        """`neg` with each draw that is an item the row's user rated by the row (earlier, or its target)
        drawn again, uniformly over the other known items (`negatives_from: unrated`). A user who rated
        nearly every known item may keep a rated draw after `rounds` redraws (none when every item is)."""
        table = np.concatenate([self.targets[rows, None], _padded(self._rated_indices(rows))], axis=1)
        taken = torch.from_numpy(table).to(neg.device)
        for _ in range(rounds):
            hit = (neg.unsqueeze(2) == taken.unsqueeze(1)).any(2)
            if not bool(hit.any()):
                break
            neg = torch.where(hit, torch.randint_like(neg, 1, max(2, n)), neg)
        return neg

    # ------------------------------------------------------------------ ranking
    def candidate_scores(self, lm: ConventionalBackbone, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), n] log-softmax over each row's candidates (-inf elsewhere), n = the largest set.

        A row's candidates are the items of stages <= its own stage, minus those the LLM's ranking leaves
        out under `exclude_history` (`true`: the latest `task.history_len` items of its history, those the
        prompt holds, however many the model reads; `rated`: every item the user rated before the row);
        index 0 is never one.
        """
        model = lm.model
        limits = torch.as_tensor(self.known[self.stages[np.asarray(rows, dtype=np.int64)]], device=lm.device)
        n = int(limits.max())
        batch = self.batch(rows, lm.device)
        scores = model.rank_logits(batch, n).float()
        cols = torch.arange(n, device=lm.device)
        outside = (cols[None, :] >= limits[:, None]) | (cols[None, :] == 0)
        if self.cfg.exclude_history:
            excluded = self._excluded_of(np.asarray(rows, dtype=np.int64)).to(lm.device)
            # An item past the candidates (a query at an earlier stage may hold a later item) excludes
            # nothing: it goes to column 0, never a candidate, not onto the last candidate.
            excluded = excluded.masked_fill(excluded >= n, 0)
            outside = outside | torch.zeros_like(outside).scatter_(1, excluded, True)
            outside[:, 0] = True
        scores = scores.masked_fill(outside, -torch.inf)
        return torch.log_softmax(scores, dim=1)

    def _excluded_of(self, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), width] item indices `exclude_history` leaves out of each row's ranking (0: none)."""
        if self.cfg.exclude_history != "rated":
            return self._excluded[torch.from_numpy(rows)]
        return torch.from_numpy(_padded(self._rated_indices(rows)))

    def _rated_indices(self, rows: np.ndarray) -> list[np.ndarray]:
        """Item indices of `SampleTable.rated_before` (0 for an item without one), per row."""
        if self._rated is None:  # a table of queries: their histories
            return [np.array([self._item_index.get(i, 0) for i in h], dtype=np.int64)
                    for h in self.table.rated_before(rows)]  # fmt: skip
        flat, start, count = self._rated
        return [flat[start[r] : start[r] + count[r]] for r in rows]

    @functools.cached_property
    def _rated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        return self.table.rated_before_index(self._item_index)

    @functools.cached_property
    def _item_index(self) -> dict[str, int]:
        return self.space.item_index()

    @functools.cached_property
    def _excluded(self) -> torch.Tensor:
        """[samples, task.history_len] item indices `exclude_history` leaves out (0: none)."""
        width = max(1, self.cfg.history_len)
        return torch.from_numpy(history_matrix(self.table.df["hist_items"], width, self._item_index))

    def _top(self, scores: torch.Tensor) -> Ranked:
        if self.cfg.ties == "random":
            order = self._tie_order(scores.shape[1]).to(scores.device)
            vals, at = stable_top_k(scores[:, order], self.k)
            idx = order[at]
        else:
            vals, idx = stable_top_k(scores, self.k)
        items = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
        out_items = np.full((len(scores), self.k), -1, dtype=np.int64)
        out_scores = np.full((len(scores), self.k), -np.inf)
        width = items.shape[1]
        out_items[:, :width] = items.cpu().numpy()
        out_scores[:, :width] = vals.double().cpu().numpy()
        return Ranked(out_items, out_scores)

    @functools.cache  # noqa: B019 - one order per column count, for the task's life
    def _tie_order(self, n: int) -> torch.Tensor:
        """`task.ties: random`: the order equal scores rank in, the `n` columns sorted by a random key each,
        drawn from one seeded stream (column i's key is the stream's i-th number whatever `n` is). So any two
        items tie-break alike in every batch (a batch of rows of several stages has more columns), every
        version with more items and every rerun."""
        keys = np.random.default_rng(0).random(n)
        return torch.from_numpy(np.argsort(keys, kind="stable"))

    @split_rows
    @torch.no_grad()
    def predict(
        self, lm: ConventionalBackbone, rows: np.ndarray, batch_size: int, desc: str = "ranking"
    ) -> Ranked:
        rows = np.asarray(rows, dtype=np.int64)
        model = lm.model
        was_training = model.training
        model.eval()
        parts = []
        with progress_task(desc, total=len(rows)) as bar:
            for start in range(0, len(rows), batch_size):
                sel = rows[start : start + batch_size]
                parts.append(self._top(self.candidate_scores(lm, sel)))
                bar.advance(len(sel))
        model.train(was_training)
        if not parts:
            return Ranked(np.empty((0, self.k), dtype=np.int64), np.empty((0, self.k)))
        return Ranked(np.concatenate([p.items for p in parts]), np.concatenate([p.scores for p in parts]))

    def metrics(self, predictions: Ranked, rows: np.ndarray) -> dict[str, float]:
        return ranking_metrics(predictions.items, self.targets[np.asarray(rows, dtype=np.int64)])

    def truth(self, rows: np.ndarray) -> np.ndarray:
        return self.targets[np.asarray(rows, dtype=np.int64)]

    # ------------------------------------------------------------------ ensembles
    def candidates(self, predictions: list[Ranked]) -> list[list[int]]:
        return union_candidates(predictions)

    @torch.no_grad()
    def rescore(
        self, lm: ConventionalBackbone, rows: np.ndarray, candidates: list[list[int]], batch_size: int
    ) -> Ranked:
        """The active model's log-softmax scores of the given candidates of each row."""
        rows = np.asarray(rows, dtype=np.int64)
        width = max((len(c) for c in candidates), default=0)
        items = np.full((len(rows), width), -1, dtype=np.int64)
        for q, cand in enumerate(candidates):
            items[q, : len(cand)] = cand
        scores = np.full((len(rows), width), -np.inf)
        model = lm.model
        was_training = model.training
        model.eval()
        for start in range(0, len(rows), batch_size):
            full = self.candidate_scores(lm, rows[start : start + batch_size]).double().cpu().numpy()
            sel = items[start : start + batch_size]
            picked = np.take_along_axis(full, np.clip(sel, 0, full.shape[1] - 1), axis=1)
            scores[start : start + len(sel)] = np.where(sel >= 0, picked, -np.inf)
        model.train(was_training)
        return Ranked(items, scores)

    def mix(self, predictions: list[Ranked], weights: list[float]) -> Ranked:
        return mix_rankings(predictions, weights, self.k)

    def save_predictions(self, predictions: Ranked) -> dict[str, np.ndarray]:
        return {"items": predictions.items, "scores": predictions.scores}

    def load_predictions(self, arrays: Any) -> Ranked:
        return Ranked(arrays["items"], arrays["scores"])


def _padded(lists: list[np.ndarray]) -> np.ndarray:
    """[len(lists), longest (at least 1)] int64, each list from the left and 0 (no item) after it."""
    out = np.zeros((len(lists), max(1, max(map(len, lists), default=0))), dtype=np.int64)
    for q, items in enumerate(lists):
        out[q, : len(items)] = items
    return out


def stable_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `k` columns of a stable descending sort of each row (ties go to the lower index).

    Equal to `torch.sort(scores, dim=1, descending=True, stable=True)` cut to `k` columns, without sorting
    whole rows (a full sort of 39k items per user was most of a ranking's time): `topk` keeps a margin of
    candidates, which are put in (score descending, index ascending) order. That is exact whenever the k-th
    score is above the last kept one, since every item tied with the k-th is then among the kept; rows where
    it is not (a tie running past the margin, fewer finite scores than the margin, NaN) are sorted in full.
    """
    n = scores.shape[1]
    k = min(k, n)
    keep = min(n, 2 * k + 32)
    if keep == n or k == 0:
        vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
        return vals[:, :k], idx[:, :k]
    vals, idx = torch.topk(scores, keep, dim=1)
    idx, by_index = torch.sort(idx, dim=1)
    vals, by_score = torch.sort(vals.gather(1, by_index), dim=1, descending=True, stable=True)
    idx = idx.gather(1, by_score)
    # NaN compares False, so a row holding one is sorted in full too.
    redo = ~(vals[:, k - 1] > vals[:, -1]) | torch.isnan(vals).any(dim=1)
    vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        full_vals, full_idx = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = full_vals[:, :k], full_idx[:, :k]
    return vals, idx


def build_conventional_ctr(cfg: RunConfig, prepared: Prepared, space: IdSpace) -> ConventionalCtrTask:
    task_cfg = cast(CtrTaskConfig, cfg.task)
    return ConventionalCtrTask(task_cfg, prepared.table, space, cfg.model.conventional.max_len)


def build_conventional_next_item(
    cfg: RunConfig, prepared: Prepared, space: IdSpace
) -> ConventionalNextItemTask:
    task_cfg = cast(NextItemTaskConfig, cfg.task)
    return ConventionalNextItemTask(task_cfg, prepared.table, space, cfg.model.conventional.max_len)
