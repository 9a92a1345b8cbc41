"""Every metric evolora reports, and each task's set of them.

* CTR: AUC and LogLoss of P(like) against 0/1 labels.
* Next-item: Hit@K and NDCG@K of a ranked list against the one true item, `nll` = -log p(true item) over
  the whole vocabulary (teacher forced: mass on token paths that are no item counts against it),
  `nll_valid` = the same with each step renormalised over the trie's valid continuations (the model's
  distribution over items), and `log_items` = log |items|, the `nll_valid` of a uniform guess over a
  balanced trie (a reference, not a model's figure).

A `MetricSet` says which metrics a task records, which one selects epochs and ensemble weights, which are
better lower, and how to compute each from the arrays a run stores with its predictions (`predictions.npz`:
the task's arrays plus `truth`), so reports and bootstraps need nothing but those files. Tasks register
theirs in `METRIC_SETS` under the task's name (`evolora.tasks.registry.register_task` does it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evolora.errors import EvoloraError

_EPS = 1e-7


class NonFiniteScores(EvoloraError):
    """Scores hold NaN or infinite values: the model diverged; no metric is computed from them."""


def diverged(history: list[dict[str, Any]]) -> bool:
    """Whether every epoch of a training job's history (its records' `train_loss`) ended non-finite (null in
    results.json, NaN in evolora's own records)."""
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    return bool(losses) and not any(x is not None and np.isfinite(x) for x in losses)


def _checked(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"{what}: labels {y.shape} and scores {s.shape} must be 1-D of one length")
    bad = ~np.isfinite(s)
    if bad.any():
        raise NonFiniteScores(
            f"{what}: {int(bad.sum())} of {len(s)} scores are NaN or infinite (did training diverge? try a "
            "lower train.lr); no metric is computed from them"
        )
    if not ((y == 0) | (y == 1)).all():  # cheaper than np.isin, which runs on every bootstrap draw
        raise ValueError(f"{what}: labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()))[:5]}")
    return y.astype(bool), s


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted as one half.

    NaN when only one class is present: there is nothing to rank. Labels must be 0/1 (ValueError) and
    scores finite (`NonFiniteScores`): a diverged model must not get a plausible AUC.
    """
    y, s = _checked(labels, scores, "auc")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average rank for each group of tied scores (a group starts where the sorted score changes).
    first = np.flatnonzero(np.concatenate(([True], sorted_s[1:] != sorted_s[:-1])))
    counts = np.diff(np.append(first, len(s)))
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [1e-7, 1 - 1e-7] (checked as `auc` checks)."""
    y, p = _checked(labels, probs, "logloss")
    y = y.astype(np.float64)
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# ------------------------------------------------------------------------------------------ ranking
KS = (5, 10)


def ranking_metrics(
    ranked_items: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = KS
) -> dict[str, float]:
    """Hit@K and NDCG@K averaged over queries: the target's rank among the returned items, if present (one
    relevant item, so IDCG = 1)."""
    hits = ranked_items == targets[:, None]
    found = hits.any(axis=1)
    rank = np.where(found, hits.argmax(axis=1) + 1, np.iinfo(np.int64).max)  # 1-based
    out = {}
    for k in ks:
        within = rank <= k
        out[f"hit@{k}"] = float(within.mean()) if len(targets) else float("nan")
        gain = np.where(within, 1.0 / np.log2(np.minimum(rank, k) + 1.0), 0.0)
        out[f"ndcg@{k}"] = float(gain.mean()) if len(targets) else float("nan")
    return out


# ------------------------------------------------------------------------------------------ per task
#: a metric computed from a run's stored prediction arrays, restricted to the rows `index` selects
ArrayMetric = Callable[[dict[str, np.ndarray], Any, str], float]


@dataclass(frozen=True)
class MetricSet:
    """What a task measures. `names`: every metric it records; `primary`: the one that picks epochs and
    ensemble weights (higher is better); `lower_is_better`; `shown`: the columns of `evolora run`'s table;
    `on_arrays(arrays, index, name)`: one metric from stored predictions (reports, bootstraps); `references`:
    figures of the evaluation set rather than of the model (a uniform guess), shown beside the metrics but
    never compared or summarised."""

    names: tuple[str, ...]
    primary: str
    lower_is_better: frozenset[str]
    shown: tuple[str, ...]
    on_arrays: ArrayMetric
    references: frozenset[str] = frozenset()


def _ctr_on_arrays(arrays: dict[str, np.ndarray], index: Any, name: str) -> float:
    fn = {"auc": auc, "logloss": logloss}[name]
    return fn(arrays["truth"][index], arrays["scores"][index])


#: the stored prediction array a ranking metric needs beyond the items and truth (runs without it, such as
#: LSAT's ensemble for `nll_valid`, leave that metric undefined)
RANKING_ARRAY_OF = {"nll": "target_logp", "nll_valid": "target_logp_valid"}


def _ranking_on_arrays(arrays: dict[str, np.ndarray], index: Any, name: str) -> float:
    if name in RANKING_ARRAY_OF:
        if RANKING_ARRAY_OF[name] not in arrays:
            return float("nan")
        return float(-np.mean(arrays[RANKING_ARRAY_OF[name]][index]))
    if name == "log_items":
        return float(np.mean(arrays["log_candidates"][index]))
    k = int(name.split("@")[1])
    return ranking_metrics(arrays["items"][index], arrays["truth"][index], ks=(k,))[name]


CTR_METRICS = MetricSet(("auc", "logloss"), "auc", frozenset({"logloss"}), ("auc", "logloss"), _ctr_on_arrays)
RANKING_METRICS = MetricSet(
    ("hit@5", "hit@10", "ndcg@5", "ndcg@10", "nll", "nll_valid", "log_items"),
    "ndcg@10",
    frozenset({"nll", "nll_valid", "log_items"}),
    ("hit@10", "ndcg@10", "nll", "nll_valid"),
    _ranking_on_arrays,
    frozenset({"log_items"}),
)

#: task name -> its metrics (filled by `evolora.tasks.registry.register_task`; the built-ins are here so
#: reading finished runs needs no task code)
METRIC_SETS: dict[str, MetricSet] = {"ctr": CTR_METRICS, "next_item": RANKING_METRICS}


def metric_set(task: str) -> MetricSet:
    if task not in METRIC_SETS:
        raise EvoloraError(
            f"no metrics registered for task {task!r} (known: {', '.join(sorted(METRIC_SETS))})"
        )
    return METRIC_SETS[task]


def is_reference(metric: str) -> bool:
    """Whether `metric` describes the evaluation set (compared and summarised by no report)."""
    return any(metric in m.references for m in METRIC_SETS.values())


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` are better, for any registered task."""
    return any(metric in m.lower_is_better for m in METRIC_SETS.values())
