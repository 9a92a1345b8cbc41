"""A two-tower retrieval model: user tower and item tower meet in a dot product.

* Item tower: item ID embedding + hashed bag-of-words text features (title, genre, category), then a
  residual MLP. A cold item (never trained on) uses the mean trained ID vector plus its own text, so it is
  scored by its words: the model's route to items that arrive after training.
* User tower: user ID embedding + the mean of the history items' tower outputs (with like/dislike
  embeddings in CTR), then a residual MLP. A cold user gets the mean trained user vector plus their
  history.

Next-item training is a full softmax over the items known at the training stage (in-batch negatives would
be the large-catalogue alternative).
"""

from __future__ import annotations

import torch
from torch import nn

from evolora.config import ConventionalConfig
from evolora.models.conventional.common import Batch, ConventionalModel, IdTable, ItemText, masked_mean


def _tower(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))


class TwoTower(ConventionalModel):
    name = "two_tower"
    default_text = True

    def __init__(self, cfg: ConventionalConfig, text: ItemText | None) -> None:
        super().__init__(cfg, text)
        self.users = IdTable("user", cfg.dim)
        self.user_tower = _tower(cfg.dim, cfg.dropout)
        self.item_tower = _tower(cfg.dim, cfg.dropout)

    def item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        v = self.items(idx)
        return v + self.item_tower(v)

    def query(self, batch: Batch) -> torch.Tensor:
        hist = batch.hist[:, -self.cfg.max_len :]
        fb = batch.feedback[:, -self.cfg.max_len :] if batch.feedback is not None else None
        sub = Batch(batch.users, hist, batch.target, fb)
        u = self.users(batch.users) + masked_mean(self.history_vectors(sub), sub.mask)
        return u + self.user_tower(u)
