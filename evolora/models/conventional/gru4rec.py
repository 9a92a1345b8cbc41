"""GRU4Rec (Hidasi et al., ICLR'16): a GRU reads the history in time order; its last state is the query.

The item embedding is shared between the input and the output layer (plus a per-item bias), and next-item
training is a full softmax over every item known at the training stage (the GRU4Rec paper samples the
output layer; with a few thousand items the full softmax is cheap and exact). A sample without history gets
the GRU's output for an empty input: one learned vector. Cold history items are read as the mean trained
item vector.
"""

from __future__ import annotations

import torch
from torch import nn

from evolora.config import ConventionalConfig
from evolora.models.conventional.common import Batch, ConventionalModel, ItemText, right_padded


class GRU4Rec(ConventionalModel):
    name = "gru4rec"

    def __init__(self, cfg: ConventionalConfig, text: ItemText | None) -> None:
        super().__init__(cfg, text)
        layers = cfg.layers or 1
        self.gru = nn.GRU(
            cfg.dim, cfg.dim, num_layers=layers, batch_first=True, dropout=cfg.dropout * (layers > 1)
        )

    def query(self, batch: Batch) -> torch.Tensor:
        hist = batch.hist[:, -self.cfg.max_len :]
        fb = batch.feedback[:, -self.cfg.max_len :] if batch.feedback is not None else None
        ordered, lengths = right_padded(hist)
        if fb is not None:
            fb, _ = right_padded(fb)
        x = self.drop(self.history_vectors(Batch(batch.users, ordered, batch.target, fb)))
        out, _ = self.gru(x)
        last = (lengths - 1).clamp(min=0)
        return out[torch.arange(len(out), device=out.device), last]
