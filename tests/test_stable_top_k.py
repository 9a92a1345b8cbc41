"""The conventional ranking's top-k equals the first k columns of a full stable descending sort."""

import pytest
import torch

from evolora.tasks.conventional import stable_top_k


def _full(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def _scores(kind: str, rows: int = 64, n: int = 500, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        return torch.randn(rows, n, generator=g)
    if kind == "few values":  # ties everywhere, including across the margin
        return torch.randint(0, 4, (rows, n), generator=g).float()
    if kind == "masked":  # -inf outside each row's candidates, some rows with fewer than k left
        s = torch.randn(rows, n, generator=g)
        limits = torch.randint(1, n, (rows,), generator=g)
        limits[:8] = torch.arange(1, 9)
        return s.masked_fill(torch.arange(n)[None, :] >= limits[:, None], -torch.inf)
    if kind == "cold ties":  # a block of equal scores (cold items) in the middle of distinct ones
        s = torch.randn(rows, n, generator=g)
        s[:, 100:300] = s[:, :1]
        return s
    if kind == "nan":
        s = torch.randn(rows, n, generator=g)
        s[::5, 7] = torch.nan
        return s
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["distinct", "few values", "masked", "cold ties", "nan"])
@pytest.mark.parametrize("k", [1, 10, 20])
def test_equals_a_full_stable_sort(kind: str, k: int) -> None:
    scores = _scores(kind)
    vals, idx = stable_top_k(scores, k)
    want_vals, want_idx = _full(scores, k)
    assert torch.equal(idx, want_idx)
    assert torch.equal(vals.nan_to_num(), want_vals.nan_to_num())


def test_short_rows_and_k_past_the_width() -> None:
    scores = torch.tensor([[0.5, 0.5, 1.0], [2.0, -torch.inf, 2.0]])
    vals, idx = stable_top_k(scores, 10)
    assert idx.tolist() == [[2, 0, 1], [0, 2, 1]]
    assert vals.shape == (2, 3)
