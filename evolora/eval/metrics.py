"""Metrics of the CTR task: AUC and LogLoss (next-item's Hit@K and NDCG@K live in `tasks/next_item.py`)."""

from __future__ import annotations

import numpy as np

from evolora.errors import EvoloraError

_EPS = 1e-7


class NonFiniteScores(EvoloraError):
    """Scores hold NaN or infinite values: the model diverged; no metric is computed from them."""


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
    if not np.isin(y, (0, 1)).all():
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
    # Average rank for each group of tied scores.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [1e-7, 1 - 1e-7] (checked as `auc` checks)."""
    y, p = _checked(labels, probs, "logloss")
    y = y.astype(np.float64)
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
