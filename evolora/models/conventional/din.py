"""DIN, the Deep Interest Network (Zhou et al., KDD'18), for CTR.

Each history item e_j is weighted by an attention unit that sees the candidate e_t:
w_j = MLP([e_j, e_t, e_j - e_t, e_j * e_t]) (unnormalised, as in the paper, so the weights keep the
intensity of interest), and the interest vector sum_j w_j e_j, the user ID embedding and the candidate's
embedding go through an MLP (`model.conventional.mlp` hidden sizes; PReLU as in the paper, or ReLU with
`activation: relu`, as RecLoRA's CRM has it) to a logit, plus the candidate's bias. History items carry
like/dislike embeddings. Cold users and items are looked up as the mean trained user and item vectors (plus
text features with `item_text: true`).

`user_representation(batch)` returns the MLP's last hidden layer, shape [batch, mlp[-1]] (64 by default):
the target-aware summary of user, history and candidate that RecLoRA's gate reads.

DIN scores given (user, history, target) triples only; it is not a next-item ranker (that would run the
MLP for every candidate item), so `task.name: next_item` with `model.name: din` is a configuration error.
"""

from __future__ import annotations

import torch
from torch import nn

from evolora.config import ConventionalConfig
from evolora.models.conventional.common import Batch, ConventionalModel, IdTable, ItemText, mlp

ACTIVATIONS: dict[str, type[nn.Module]] = {"prelu": nn.PReLU, "relu": nn.ReLU}


class DIN(ConventionalModel):
    name = "din"
    ranking = False

    def __init__(self, cfg: ConventionalConfig, text: ItemText | None) -> None:
        super().__init__(cfg, text)
        d = cfg.dim
        self.users = IdTable("user", d)
        self.attention = nn.Sequential(nn.Linear(4 * d, d), nn.PReLU(), nn.Linear(d, 1))
        self.mlp = mlp([3 * d, *cfg.mlp], cfg.dropout, ACTIVATIONS[cfg.activation])
        self.out = nn.Linear(cfg.mlp[-1], 1)

    def interest(self, batch: Batch, target: torch.Tensor) -> torch.Tensor:
        """[B, d] the attention-weighted sum of history vectors for the target vectors [B, d]."""
        hist = batch.hist[:, -self.cfg.max_len :]
        fb = batch.feedback[:, -self.cfg.max_len :] if batch.feedback is not None else None
        sub = Batch(batch.users, hist, batch.target, fb)
        h = self.history_vectors(sub)
        t = target.unsqueeze(1).expand_as(h)
        w = self.attention(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1) * sub.mask
        return (w.unsqueeze(-1) * h).sum(1)

    def user_representation(self, batch: Batch) -> torch.Tensor:
        """[B, mlp[-1]] the last hidden layer of the MLP for each sample's (user, history, target)."""
        t = self.drop(self.item_vectors(batch.target))
        x = torch.cat([self.drop(self.users(batch.users)), self.interest(batch, t), t], dim=-1)
        return self.mlp(x)

    def logits(self, batch: Batch) -> torch.Tensor:
        h = self.user_representation(batch)
        return self.out(h).squeeze(-1) + self.items.biases(batch.target) + self.global_bias

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """[B, K]: the logit of every (sample, item) pair, running the network once per pair."""
        b, k = items.shape
        rep = Batch(
            batch.users.repeat_interleave(k),
            batch.hist.repeat_interleave(k, dim=0),
            items.reshape(-1),
            batch.feedback.repeat_interleave(k, dim=0) if batch.feedback is not None else None,
        )
        return self.logits(rep).view(b, k)

    def rank_logits(self, batch: Batch, n: int) -> torch.Tensor:
        raise NotImplementedError("DIN scores (user, history, target) triples only; it does not rank")
