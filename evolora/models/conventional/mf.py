"""Matrix factorisation: a user vector and an item vector per ID, scored by their dot product.

logit(u, i) = p_u . q_i + b_i + b_u + b_0. Trained pointwise with BCE on the label for CTR, and with BPR
(Rendle et al., UAI'09: -log sigmoid(s(u, i+) - s(u, i-)) over `negatives` uniformly sampled known items)
for next-item. The paper draws i- from the items the user has not interacted with (RecBole resamples until
it is); here a draw may be one of the user's positives, or the target itself (11.7% and 0.08% of draws on
ML-100K's D1 training pool): it pushes down an item the user liked, so MF's next-item figures may fall
below what the paper's sampling gives. MF reads no history: the user is their ID. A cold user (never
trained on, e.g. new in the evaluated stage) gets the mean of the trained user vectors and biases, so
their ranking is the model's "average user" ranking; cold items get the mean trained item vector and bias
(plus text features with `item_text: true`).
"""

from __future__ import annotations

import torch

from evolora.config import ConventionalConfig
from evolora.models.conventional.common import Batch, ConventionalModel, IdTable, ItemText


class MF(ConventionalModel):
    name = "mf"
    reads_history = False
    next_item_loss = "bpr"

    def __init__(self, cfg: ConventionalConfig, text: ItemText | None) -> None:
        super().__init__(cfg, text)
        self.users = IdTable("user", cfg.dim)
        self.user_b = IdTable("user", 1, std=0.0)

    def query(self, batch: Batch) -> torch.Tensor:
        return self.users(batch.users)

    def user_bias(self, batch: Batch) -> torch.Tensor:
        return self.user_b(batch.users).squeeze(-1)
