"""Token lists to model inputs: the one place sequences of different lengths are padded into a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch


def pad_token_lists(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    side: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, width], attention mask [n, width]) of `seqs`, padded with `pad_id` to the longest.

    Right padding (the default) keeps every real token at its natural position, and with causal attention
    no real token reads padding, so a sequence's states do not depend on its batch. Left padding ends every
    sequence at the last column, so generation extends all of them in step (beam search).
    """
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
