"""Pop: the most popular items, for everyone. The floor every recommender should clear.

logit(u, i) = b_i + b_0: one learned bias per item and nothing about the user, the history or the text. For
next-item, the full softmax over the known items (the loss of every ranking model here) drives b_i towards
the log of how often item i was the next item in training, so the ranking is the items by training
frequency, the same list for every user (RecBole's `Pop` counts instead; a learned bias behaves the same
under `finetune`: it follows the newest stages, and with weight decay 0 it keeps what it had for items that
no longer occur). For CTR, b_i is the item's log-odds of being liked. A cold item (never a training target)
gets the mean trained bias, so cold items tie and ties go to the older item. So the ranking follows training
frequency among the items that were targets; an item known but never a target ranks at the mean, above the
rarest targets, where RecBole's counts put it last (its bias, pushed down as a softmax negative, is not used).
"""

from __future__ import annotations

import torch

from evolora.models.conventional.common import Batch, ConventionalModel


class Pop(ConventionalModel):
    name = "pop"
    reads_history = False

    def query(self, batch: Batch) -> torch.Tensor:
        # A zero user vector: the dot product with every item vector is 0, only the biases score.
        return torch.zeros(len(batch.users), self.dim, device=batch.users.device)
