"""Pieces every conventional recommender shares: the ID space, growing ID tables, item text features, the
batch a model reads, and the base class that turns user and item vectors into CTR and ranking scores.

Index spaces. Users and items get integer indices in order of first appearance in time over the whole
staged table (stage 0, history only, included), so the ids seen by stage t are a prefix of the indices.
Index 0 means "none" in both spaces (history padding, no target) and is never a ranking candidate.

Cold ids. Tables grow before every stage to cover all ids seen up to that stage, but a row is only trusted
once the model has trained on a sample that uses it (as the user, the target, or, for models that read
histories, a history item): the table's `seen` mask. At evaluation, an id whose row was never trained (or
lies beyond the table: it first appears in a later stage) is *cold* and is looked up as the mean of the
trained rows of its table, the same vector for every cold id. Models with item text features (two-tower,
or any model with `item_text: true`) add the item's text vector on top, so cold items still differ by their
words; without text, cold items tie and ties go to the lower (older) index.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from evolora.config import ConventionalConfig
from evolora.data.ids import IdSpace
from evolora.data.schema import item_fields

INIT_STD = 0.05  # ID and text embeddings start small, so dot products start near zero
_TOKEN = re.compile(r"\w+")
MAX_TEXT_TOKENS = 32  # per item; titles, genres and categories are well under this


# --------------------------------------------------------------------------------------------- ID space


def item_text_tokens(
    space: IdSpace, items: pl.DataFrame, fields: tuple[str, ...], buckets: int
) -> torch.Tensor:
    """[n_items + 1, T] hash buckets of each item's lower-cased word tokens; padding = `buckets`.

    Tokens of fields other than the title are prefixed with the field name (`genre:comedy`), so a word in
    a title and the same word as a genre are different features. Titles that only repeat the item id (the
    PESO release's `item <id>`) carry no text and are skipped. Buckets come from CRC32, stable across runs.
    """
    cols = item_fields(items, fields, "model.conventional.text_fields")
    table = items.select("item_id", *cols)
    by_id = {r[0]: r[1:] for r in table.iter_rows()}
    rows: list[list[int]] = [[]]
    for item in space.item_ids[1:]:
        values = by_id.get(item, (None,) * len(cols))
        toks: dict[str, None] = {}
        for field, value in zip(cols, values, strict=True):
            if value is None:
                continue
            text = str(value)
            if field == "title" and text == f"item {item}":
                continue
            prefix = "" if field == "title" else f"{field}:"
            for w in _TOKEN.findall(text.lower()):
                toks.setdefault(prefix + w, None)
        rows.append([zlib.crc32(t.encode("utf-8")) % buckets for t in list(toks)[:MAX_TEXT_TOKENS]])
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), buckets, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """What a conventional model reads for a batch of samples (all tensors on the model's device).

    `hist` is left-padded with 0: the latest item is in the last column. `feedback` (CTR only) marks each
    history item 1 = disliked, 2 = liked, 0 = padding. `target` is the item to score (0: none).
    """

    users: torch.Tensor  # [B] long
    hist: torch.Tensor  # [B, L] long
    target: torch.Tensor  # [B] long
    feedback: torch.Tensor | None = None  # [B, L] long

    @property
    def mask(self) -> torch.Tensor:
        return self.hist > 0

    def to(self, device: torch.device) -> Batch:
        fb = self.feedback.to(device) if self.feedback is not None else None
        return Batch(self.users.to(device), self.hist.to(device), self.target.to(device), fb)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x [B, L, d] where mask [B, L]; zeros for an empty row."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def right_padded(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, L] -> (right-padded [B, L], lengths [B]): for recurrent models that read in order."""
    lengths = (hist > 0).sum(1)
    width = hist.shape[1]
    pos = torch.arange(width, device=hist.device)
    src = (pos[None, :] + (width - lengths)[:, None]).clamp(max=width - 1)
    out = torch.gather(hist, 1, src) * (pos[None, :] < lengths[:, None])
    return out, lengths


# --------------------------------------------------------------------------------------------- tables


class IdTable(nn.Module):
    """An embedding table over a growing ID space, with a mask of the rows trained so far.

    `seen` is stored as a parameter that never receives a gradient (not a buffer) so that the trainer's
    best-epoch snapshots and epoch checkpoints carry it along with the weights it describes.
    """

    def __init__(self, kind: str, dim: int, std: float = INIT_STD) -> None:
        super().__init__()
        if kind not in ("user", "item"):
            raise ValueError(f"kind must be user or item, not {kind!r}")
        self.kind, self.dim, self.std = kind, dim, std
        self.weight = nn.Parameter(torch.zeros(1, dim))
        self.seen = nn.Parameter(torch.zeros(1))

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.std > 0:
                self.weight.normal_(0.0, self.std)
            else:
                self.weight.zero_()
            self.seen.zero_()

    def resize(self, n: int, generator: torch.Generator) -> None:
        """Exactly `n` rows: new rows drawn from `generator`, kept rows left exactly as they are."""
        old = self.size
        if n == old:
            return
        with torch.no_grad():
            if n < old:
                self.weight.data = self.weight.data[:n].clone()
                self.seen.data = self.seen.data[:n].clone()
                return
            new = torch.zeros(n - old, self.dim)
            if self.std > 0:
                new.normal_(0.0, self.std, generator=generator)
            dev = self.weight.device
            self.weight.data = torch.cat([self.weight.data, new.to(dev)])
            self.seen.data = torch.cat([self.seen.data, torch.zeros(n - old, device=dev)])

    def observe(self, idx: torch.Tensor) -> None:
        """Mark rows as trained on (index 0 and out-of-range indices are ignored)."""
        idx = idx.reshape(-1)
        idx = idx[(idx > 0) & (idx < self.size)]
        with torch.no_grad():
            self.seen[idx] = 1.0

    def fallback(self) -> torch.Tensor:
        """The row every cold id gets: the mean of the trained rows (zeros before any training)."""
        seen = self.seen.detach()
        count = seen.sum()
        if count == 0:
            return torch.zeros(self.dim, device=self.weight.device)
        return (self.weight * seen[:, None]).sum(0) / count

    def known(self, idx: torch.Tensor) -> torch.Tensor:
        """Whether each index has a trained row (in training mode every in-range row counts)."""
        inside = idx < self.size
        if self.training:
            return inside
        return inside & (self.seen.detach()[idx.clamp(max=self.size - 1)] > 0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx.clamp(max=self.size - 1), self.weight)
        known = self.known(idx)
        if bool(known.all()):
            return rows
        return torch.where(known.unsqueeze(-1), rows, self.fallback())


class ItemText(nn.Module):
    """Hashed bag-of-words of item text: mean of the token buckets' embeddings (zeros for no text)."""

    def __init__(self, tokens: torch.Tensor, buckets: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("tokens", tokens, persistent=False)  # derived from data, never saved
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets + 1, dim, mode="mean", padding_idx=buckets)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bag.weight.normal_(0.0, INIT_STD)
            self.bag.weight[self.buckets].zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.bag(self.tokens[idx.reshape(-1)]).view(*idx.shape, -1)


class ItemEncoder(nn.Module):
    """Item vectors (ID embedding, plus text features when given) and per-item biases."""

    def __init__(self, dim: int, text: ItemText | None) -> None:
        super().__init__()
        self.ids = IdTable("item", dim)
        self.text = text
        self.bias = IdTable("item", 1, std=0.0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        v = self.ids(idx)
        return v + self.text(idx) if self.text is not None else v

    def biases(self, idx: torch.Tensor) -> torch.Tensor:
        return self.bias(idx).squeeze(-1)

    def cold(self, n: int) -> torch.Tensor:
        """[n] bool: items 0..n-1 that would be looked up cold."""
        return ~self.ids.known(torch.arange(n, device=self.ids.weight.device))


# --------------------------------------------------------------------------------------------- models


class ConventionalModel(nn.Module):
    """Base of the conventional recommenders: a query vector per sample, a vector and bias per item.

    The CTR logit of (user, history, target) is `query . item(target) + bias(target) + user_bias + b0`;
    ranking scores the same function for every candidate item at once. Subclasses define `query` (and may
    override `item_vectors`); DIN overrides `logits` and cannot rank.
    """

    name: ClassVar[str]
    #: whether the model ranks all items (next-item task); DIN scores given targets only
    ranking: ClassVar[bool] = True
    #: whether history items' rows are trained (and so marked as seen) by this model
    reads_history: ClassVar[bool] = True
    #: next-item loss: full softmax over the known items, or BPR with sampled negatives
    next_item_loss: ClassVar[str] = "softmax"
    #: text features on by default
    default_text: ClassVar[bool] = False

    @classmethod
    def check(cls, cfg: ConventionalConfig) -> None:
        """Refuse settings this model cannot be built with (`ConfigError`), before any work starts."""

    def __init__(self, cfg: ConventionalConfig, text: ItemText | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.items = ItemEncoder(cfg.dim, text)
        self.global_bias = nn.Parameter(torch.zeros(()))
        self.feedback = nn.Embedding(3, cfg.dim, padding_idx=0)  # CTR histories: disliked / liked
        self.drop = nn.Dropout(cfg.dropout)

    # ------------------------------------------------------------------ tables
    def id_tables(self) -> Iterator[tuple[str, IdTable]]:
        for name, m in self.named_modules():
            if isinstance(m, IdTable):
                yield name, m

    def observe(self, batch: Batch) -> None:
        """Mark the rows this training batch trains as seen."""
        for _, t in self.id_tables():
            if t.kind == "user":
                t.observe(batch.users)
            else:
                t.observe(batch.target)
                if self.reads_history:
                    t.observe(batch.hist)

    def reset_parameters(self) -> None:
        """Re-initialise every weight from the global RNG (the caller seeds it), in module order."""
        for m in self.modules():
            if m is self:
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                with torch.no_grad():
                    m.weight.normal_(0.0, INIT_STD)
                    if m.padding_idx is not None:
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, IdTable | ItemText | nn.LayerNorm | nn.GRU | nn.PReLU):
                m.reset_parameters()
        for p in self._extra_parameters():
            with torch.no_grad():
                p.normal_(0.0, INIT_STD)
        with torch.no_grad():
            self.global_bias.zero_()

    def _extra_parameters(self) -> list[nn.Parameter]:
        """Bare parameters a subclass owns outside modules (positions); drawn from N(0, INIT_STD)."""
        return []

    # ------------------------------------------------------------------ scoring
    def history_vectors(self, batch: Batch) -> torch.Tensor:
        """[B, L, d] history item vectors (+ CTR feedback), zero at padding."""
        x = self.item_vectors(batch.hist)
        if batch.feedback is not None:
            x = x + self.feedback(batch.feedback)
        return x * batch.mask.unsqueeze(-1)

    def item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        return self.items(idx)

    def all_item_vectors(self, n: int) -> torch.Tensor:
        return self.item_vectors(torch.arange(n, device=self.global_bias.device))

    def query(self, batch: Batch) -> torch.Tensor:
        """[B, d] the user side of the dot product."""
        raise NotImplementedError

    def user_bias(self, batch: Batch) -> torch.Tensor:
        return torch.zeros(len(batch.users), device=batch.users.device)

    def score_items(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """[B, K] logits of the items [B, K] for each sample's user and history."""
        q = self.drop(self.query(batch))
        v = self.item_vectors(items)
        out = (q.unsqueeze(1) * v).sum(-1) + self.items.biases(items)
        return out + (self.user_bias(batch) + self.global_bias).unsqueeze(1)

    def logits(self, batch: Batch) -> torch.Tensor:
        """[B] CTR logits of each sample's target."""
        return self.score_items(batch, batch.target.unsqueeze(1)).squeeze(1)

    def rank_logits(self, batch: Batch, n: int) -> torch.Tensor:
        """[B, n] the logits of every item index 0..n-1 (index 0 is no item: the caller masks it)."""
        q = self.drop(self.query(batch))
        scores = q @ self.all_item_vectors(n).T + self.items.biases(torch.arange(n, device=q.device))
        scores = scores + (self.user_bias(batch) + self.global_bias).unsqueeze(1)
        if not self.training and self.items.text is None:
            # Cold items share one vector; give them one score exactly, so ties are exact and go by index.
            cold = self.items.cold(n)
            cold[0] = False
            if cold.any():
                first = int(torch.nonzero(cold)[0])
                # a copy: CUDA refuses a write whose source is a view of the written tensor
                scores[:, cold] = scores[:, first : first + 1].clone()
        return scores


def mlp(sizes: list[int], dropout: float, act: type[nn.Module] = nn.PReLU) -> nn.Sequential:
    """Linear -> activation -> dropout for each consecutive pair of sizes."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), act(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)
