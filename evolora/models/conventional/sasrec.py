"""SASRec (Kang & McAuley, ICDM'18): causal self-attention over the history; the last position is the query.

Item embeddings are scaled by sqrt(dim) and added to learned positions counted from the end of the history
(the latest item always has the last position), as in SASRec's left-padded sequences. Pre-norm blocks:
x + MHA(LN(x)) with a causal, padding-aware mask, then x + FFN(LN(x)); padding is re-zeroed after each
block and a final LayerNorm gives the output. The item embedding is shared with the output layer (plus a
per-item bias); next-item training is a full softmax over the items known at the training stage. A sample
without history gets the output of an all-padding sequence: one learned vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evolora.config import ConventionalConfig
from evolora.errors import ConfigError
from evolora.models.conventional.common import Batch, ConventionalModel, ItemText


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(ConventionalModel):
    name = "sasrec"

    @classmethod
    def check(cls, cfg: ConventionalConfig) -> None:
        if cfg.dim % cfg.heads:
            raise ConfigError(
                f"model.conventional.heads={cfg.heads} must divide model.conventional.dim={cfg.dim}"
            )

    def __init__(self, cfg: ConventionalConfig, text: ItemText | None) -> None:
        super().__init__(cfg, text)
        self.check(cfg)
        self.positions = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.layers or 2))
        self.ln = nn.LayerNorm(cfg.dim)

    def _extra_parameters(self) -> list[nn.Parameter]:
        return [self.positions]

    def query(self, batch: Batch) -> torch.Tensor:
        hist = batch.hist[:, -self.cfg.max_len :]
        fb = batch.feedback[:, -self.cfg.max_len :] if batch.feedback is not None else None
        sub = Batch(batch.users, hist, batch.target, fb)
        mask = sub.mask
        n = hist.shape[1]
        x = self.history_vectors(sub) * math.sqrt(self.dim) + self.positions[-n:]
        x = self.drop(x) * mask.unsqueeze(-1)
        # Position q attends to earlier real items and always to itself (an all-padding row stays finite).
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        allowed = (causal & mask[:, None, :]) | eye
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1)) * mask.unsqueeze(-1)
        return self.ln(x[:, -1])
