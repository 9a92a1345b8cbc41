import itertools

import numpy as np
import pytest

from evolora.eval.metrics import auc, logloss


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The definition: P(score of a random positive > score of a random negative), ties count 1/2."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    # Rounded scores make many ties, the case a rank formula most easily gets wrong.
    scores = np.round(rng.random(60) + 0.3 * labels, 1)
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_extremes_and_single_class() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(y, np.full(4, 0.5)) == 0.5
    assert np.isnan(auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_logloss_matches_formula_and_clips() -> None:
    y = np.array([1, 0, 1])
    p = np.array([0.9, 0.2, 0.6])
    expected = -(np.log(0.9) + np.log(0.8) + np.log(0.6)) / 3
    assert logloss(y, p) == pytest.approx(expected)
    assert np.isfinite(logloss(np.array([1, 0]), np.array([0.0, 1.0])))


def test_scores_with_nan_or_labels_that_are_not_binary_are_errors() -> None:
    from evolora.eval.metrics import NonFiniteScores

    labels = np.array([0, 1, 0, 1])
    with pytest.raises(NonFiniteScores, match="NaN or infinite"):
        auc(labels, np.array([0.1, np.nan, 0.3, 0.9]))
    with pytest.raises(NonFiniteScores):
        logloss(labels, np.array([0.1, np.inf, 0.3, 0.9]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc(np.array([0, 1, 2, 1]), np.array([0.1, 0.2, 0.3, 0.9]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        logloss(np.array([0.0, 0.5]), np.array([0.1, 0.2]))
