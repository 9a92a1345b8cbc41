"""Continual-learning summaries of the stage-by-stage matrix (`eval.stages: seen | all`).

R[t][j] is a metric of the model after training stage t on the fixed test rows of stage j, the same rows for
every strategy. With K the last trained stage and h = +1 for a metric where higher is better (-1 where lower
is, LogLoss), the differences `bwt` and `fwt` are oriented so that a larger value is better and `forgetting`
so that a larger value is worse; `average` and `plasticity` are the metric itself (lower is better for
LogLoss):

    average     mean_{j=1..K} R[K][j]                   the final model on every stage it learned
    bwt         mean_{j=1..K-1} h (R[K][j] - R[j][j])   backward transfer (Lopez-Paz & Ranzato, NeurIPS'17):
                                                        < 0 means later stages undid earlier ones
    forgetting  mean_{j=1..K-1} max_{l=j..K-1} h (R[l][j] - R[K][j])
                                                        (Chaudhry et al., ECCV'18): the drop from the best a
                                                        stage ever scored; >= 0 unless it improved
    fwt         mean_{j=3..J} h (R[j-1][j] - R[1][j])   forward transfer against the stage-1 model (shared by
                                                        every strategy: the frozen one) on a stage not trained
                                                        yet; J the last stage with both entries (needs
                                                        `all`); j = 2 is 0 by definition
    plasticity  mean_{j=2..K} R[j][j]                   each stage right after learning it (stage 1 is shared
                                                        by all strategies, so it is left out)

A summary whose entries are missing (K = 1, or `seen` for FWT) is None. Entries that are NaN (AUC on rows of
one class) are left out of the means.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evolora.eval.metrics import is_reference, lower_is_better

SUMMARIES = ("average", "bwt", "forgetting", "fwt", "plasticity")
SIGNED = ("bwt", "forgetting", "fwt")  # differences; average and plasticity are the metric itself


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summaries(matrix: dict[int, dict[int, float]], higher_is_better: bool = True) -> dict[str, float | None]:
    """The five summaries of one metric's matrix {t: {j: R[t][j]}} (see the module docstring)."""
    if not matrix:
        return dict.fromkeys(SUMMARIES)
    h = 1.0 if higher_is_better else -1.0
    k = max(matrix)

    def r(t: int, j: int) -> float | None:
        return matrix.get(t, {}).get(j)

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else h * (a - b)

    past = range(1, k)
    forgot = []
    for j in past:
        earlier = [r(lv, j) for lv in range(j, k) if r(lv, j) is not None and np.isfinite(r(lv, j))]
        last = r(k, j)
        forgot.append(max(h * (e - last) for e in earlier) if earlier and last is not None else None)
    stages = sorted({j for row in matrix.values() for j in row})
    return {
        "average": _mean([r(k, j) for j in range(1, k + 1)]),
        "bwt": _mean([diff(r(k, j), r(j, j)) for j in past]),
        "forgetting": _mean(forgot),
        "fwt": _mean([diff(r(j - 1, j), r(1, j)) for j in stages if j >= 3]),
        "plasticity": _mean([r(j, j) for j in range(2, k + 1)]),
    }


def matrix_of(records: dict[int, dict[str, dict[str, float]]], metric: str) -> dict[int, dict[int, float]]:
    """One metric's matrix from the stage records' `matrix` entries ({t: {"j": {metric: value}}}); an
    undefined entry (null in results.json, NaN in a stage record) is NaN."""
    return {
        t: {int(j): np.nan if m[metric] is None else float(m[metric]) for j, m in row.items() if metric in m}
        for t, row in records.items()
    }


def matrix_summary(
    records: dict[int, dict[str, dict[str, float]]], protocol: str, metrics: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """results.json's `summary.matrix`: the summaries of every metric (R itself is in the stage records)."""
    compared = [m for m in metrics if not is_reference(m)]
    return {
        "definitions": "evolora/eval/forgetting.py",
        "protocol": protocol,
        "last_stage": max(records) if records else None,
        "metrics": {m: summaries(matrix_of(records, m), not lower_is_better(m)) for m in compared},
    }
