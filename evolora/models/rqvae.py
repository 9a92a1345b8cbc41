"""Semantic IDs: item embeddings -> short unique token sequences such as `<a_51><b_218><c_33><d_0>`.

Generative recommenders (TIGER, LC-Rec, PESO) name each item by a few discrete codes, so an LLM can generate
the next item token by token. The codes come from an RQ-VAE (residual-quantised autoencoder): an MLP encodes
the item's text embedding into a small vector, `levels` codebooks quantise it coarse to fine (level l codes
the residual left by levels < l), and an MLP decoder reconstructs the embedding from the sum of the codes.
Items with similar text then share code prefixes.

The pipeline: `embed_texts` (mean-pooled LLM hidden states) -> `train_rqvae` -> `assign_codes` ->
`make_unique` (one extra level numbering items that share all codes) -> `SemanticIds` (rendering, saving,
and `extend` for items that arrive in later stages, encoded with the quantizer trained on D1).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evolora.io import atomic_write_bytes, atomic_write_text, read_json
from evolora.models.precision import without_autocast
from evolora.progress import Bar
from evolora.progress import task as progress_task

log = logging.getLogger("evolora.models")

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TOKEN = re.compile(r"<([a-z])_(\d+)>")


# -------------------------------------------------------------------------------------------------- k-means


def kmeans(
    x: torch.Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], labels [n]) by Lloyd's algorithm from a k-means++ start.

    The labels are each point's nearest returned centroid. With fewer distinct points than `k`, the extra
    centroids repeat existing points (an RQ-VAE re-seeds such unused codes during training). Clusters that
    empty out take the point farthest from its centroid, so no centroid is wasted.
    """
    x = x.detach().float()
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    nearest = _sq_dist(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):  # k-means++: next centroid drawn with probability ~ squared distance
        weights = nearest.clamp_min(0)
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        i = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(x[i])
        nearest = torch.minimum(nearest, _sq_dist(x, x[i : i + 1]).squeeze(1))
    c = torch.stack(centroids)
    for _ in range(iters):
        dist = _sq_dist(x, c)
        labels = dist.argmin(1)
        counts = torch.bincount(labels, minlength=k)
        new = torch.zeros_like(c).index_add_(0, labels, x) / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = dist.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
            new[empty] = x[far[torch.arange(len(empty)) % n]]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c, _sq_dist(x, c).argmin(1)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances [n, k]."""
    return (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]


# ---------------------------------------------------------------------------------------------------- RQ-VAE


@dataclass
class RQVAEOutput:
    recon: torch.Tensor  # [n, in_dim], in the input's own scale
    codes: torch.Tensor  # [n, levels]
    loss: torch.Tensor  # recon_loss + quant_loss
    recon_loss: torch.Tensor
    quant_loss: torch.Tensor


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """MLP encoder -> `levels` residual codebooks of `codebook_size` x `code_dim` -> mirrored MLP decoder.

    Loss: reconstruction MSE + the sum over levels of codebook loss ||sg[r] - e||² + `beta` x commitment
    ||r - sg[e]||², with r the level's residual and e its nearest code (VQ-VAE's losses, per level as in
    RQ-VAE). The decoder sees z + sg[z_q - z] (straight-through), so the encoder gets the reconstruction
    gradient although the code choice is discrete.

    Inputs are standardised per dimension (`shift`, `scale` buffers, set by `train_rqvae`): LLM hidden states
    have a few dimensions hundreds of times larger than the rest, which would otherwise dominate the MSE.

    Codebooks start from k-means on the first training batch's residuals (random codes would leave most of
    them unused). Codes no batch has used for `dead_after` steps are "dead"; `revive_dead_codes` re-seeds
    them from random residuals of the last batch, so the codebook keeps its full capacity.
    """

    def __init__(
        self,
        in_dim: int,
        code_dim: int = 32,
        hidden: Sequence[int] = (512, 256, 128),
        levels: int = 4,
        codebook_size: int = 256,
        beta: float = 0.25,
        dead_after: int = 10,
    ) -> None:
        super().__init__()
        if not 1 <= levels <= len(LEVEL_LETTERS):
            raise ValueError(f"levels must be 1..{len(LEVEL_LETTERS)}, got {levels}")
        self.config = {
            "in_dim": in_dim,
            "code_dim": code_dim,
            "hidden": list(hidden),
            "levels": levels,
            "codebook_size": codebook_size,
            "beta": beta,
            "dead_after": dead_after,
        }
        self.levels, self.codebook_size, self.beta, self.dead_after = levels, codebook_size, beta, dead_after
        self.encoder = _mlp([in_dim, *hidden, code_dim])
        self.decoder = _mlp([code_dim, *reversed(hidden), in_dim])
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, code_dim) * 0.01)
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("idle", torch.zeros(levels, codebook_size, dtype=torch.long))
        self._residuals: list[torch.Tensor] = []

    def set_normalisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        self.shift.copy_(shift)
        self.scale.copy_(scale.clamp_min(1e-6))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.shift) / self.scale)

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of the chosen codes [n, code_dim], codes [n, levels], quantisation loss)."""
        if self.training and not bool(self.initialised):
            self.init_codebooks(z)
        residual, total = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        self._residuals = []
        for level in range(self.levels):
            book = self.codebooks[level]
            with torch.no_grad():
                idx = _sq_dist(residual.float(), book.float()).argmin(1)
            e = book[idx]
            loss = loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            if self.training:
                self._residuals.append(residual.detach())
                with torch.no_grad():
                    used = torch.bincount(idx, minlength=self.codebook_size) > 0
                    self.idle[level] = torch.where(used, 0, self.idle[level] + 1)
            total = total + e
            residual = residual - e.detach()
            codes.append(idx)
        return total, torch.stack(codes, 1), loss

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        z = self.encode(x)
        zq, codes, quant_loss = self.quantise(z)
        recon = self.decoder(z + (zq - z).detach())  # straight-through estimator
        recon_loss = F.mse_loss(recon, (x - self.shift) / self.scale)
        return RQVAEOutput(
            recon * self.scale + self.shift, codes, recon_loss + quant_loss, recon_loss, quant_loss
        )

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor) -> None:
        """K-means per level on the residuals of `z` (encoded first batch) left by the levels above."""
        residual = z.detach().float().cpu()  # CPU: seeded the same way on any device
        for level in range(self.levels):
            centroids, labels = kmeans(residual, self.codebook_size)
            self.codebooks[level].copy_(centroids)
            residual = residual - centroids[labels]
        self.initialised.fill_(True)

    @torch.no_grad()
    def revive_dead_codes(self) -> int:
        """Re-seed codes idle for `dead_after` steps from random residuals of the last training batch.

        Returns how many were re-seeded. Call after the optimiser step."""
        revived = 0
        for level, residual in enumerate(self._residuals):
            dead = torch.nonzero(self.idle[level] >= self.dead_after).flatten()
            if len(dead) == 0:
                continue
            pick = torch.randint(len(residual), (len(dead),)).to(residual.device)
            self.codebooks[level, dead] = residual[pick].to(self.codebooks.dtype)
            self.idle[level, dead] = 0
            revived += len(dead)
        return revived

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        torch.save({"config": self.config, "state": self.state_dict()}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> RQVAE:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**blob["config"])
        model.load_state_dict(blob["state"])
        return model.eval()


def train_rqvae(
    embeddings: np.ndarray,
    levels: int = 4,
    codebook_size: int = 256,
    epochs: int = 150,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    *,
    hidden: Sequence[int] = (512, 256, 128),
    code_dim: int = 32,
    beta: float = 0.25,
    weight_decay: float = 1e-4,
    dead_after: int = 10,
    device: str | torch.device = "cpu",
) -> RQVAE:
    """Train an RQ-VAE on item embeddings [n, d] with AdamW; the same seed gives the same model.

    Dead codes are re-seeded (see `RQVAE`) during the first 80% of the epochs only, so the codebooks settle
    before training ends. PESO trains 20,000 epochs; the default here is a CPU-friendly budget that already
    reaches a low reconstruction loss on a few thousand items; raise `epochs` for more.
    """
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=device)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [n, d] array, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n, total = len(x), 0.0
    # fp32 whatever precision the caller runs in: codes are nearest-neighbour decisions.
    with torch.random.fork_rng(devices=[]), without_autocast():
        torch.manual_seed(seed)
        model = RQVAE(x.shape[1], code_dim, hidden, levels, codebook_size, beta, dead_after).to(device)
        model.set_normalisation(x.mean(0), x.std(0) if n > 1 else torch.ones(x.shape[1], device=device))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        revive_until = int(0.8 * epochs)
        model.train()
        with _bar("training RQ-VAE", epochs, progress) as bar:
            for epoch in range(epochs):
                order = torch.randperm(n).to(device)  # CPU RNG: the same order on any device
                total = 0.0
                for start in range(0, n, batch_size):
                    batch = x[order[start : start + batch_size]]
                    out = model(batch)
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    if epoch < revive_until:
                        model.revive_dead_codes()
                    total += float(out.loss.detach()) * len(batch)
                bar.advance()
                bar.info(f"loss {total / n:.4f}")
    model.eval()
    codes = assign_codes(model, embeddings)
    stats = collision_stats(codes)
    used = [len(np.unique(codes[:, level])) for level in range(levels)]
    log.info(
        "RQ-VAE: %d items, loss %.4f, codes used per level %s of %d, %d items share their codes with another "
        "(%d groups)",
        *(n, total / n, used, codebook_size, stats.colliding_items, stats.collision_groups),
    )
    return model


@contextmanager
def _bar(description: str, total: int, show: bool) -> Iterator[Bar]:
    if not show:
        yield Bar(None, None)
        return
    with progress_task(description, total) as bar:
        yield bar


@torch.no_grad()
def assign_codes(model: RQVAE, embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Codes [n, levels] (int64): the nearest code at each level, as the trained model quantises."""
    was_training = model.training
    model.eval()
    device = model.codebooks.device
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    with without_autocast():
        out = [
            model.quantise(model.encode(x[i : i + batch_size].to(device)))[1].cpu()
            for i in range(0, len(x), batch_size)
        ]
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, model.levels), dtype=np.int64)


# ------------------------------------------------------------------------------------------------ uniqueness


@dataclass(frozen=True)
class CollisionStats:
    """How many items share their full code with another item."""

    items: int
    unique_codes: int  # distinct code rows
    collision_groups: int  # code rows held by more than one item
    colliding_items: int  # items in such groups
    max_group: int  # largest number of items sharing one code row (1: all unique)


def collision_stats(codes: np.ndarray) -> CollisionStats:
    codes = np.asarray(codes)
    if len(codes) == 0:
        return CollisionStats(0, 0, 0, 0, 0)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    shared = counts[counts > 1]
    return CollisionStats(len(codes), len(counts), len(shared), int(shared.sum()), int(counts.max()))


def make_unique(codes: np.ndarray) -> tuple[np.ndarray, CollisionStats]:
    """Append one level so every row is unique: the item's index within its group of identical codes.

    Unique codes get 0; a group of k items sharing a code gets 0..k-1 in item order. The statistics are of the
    codes before the extra level. PESO's released index leaves such collisions unresolved (two items with one
    ID count as the same prediction); LC-Rec and TIGER append a level like this one.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n, levels], got shape {codes.shape}")
    stats = collision_stats(codes)
    suffix = np.zeros(len(codes), dtype=np.int64)
    if len(codes):
        _, group = np.unique(codes, axis=0, return_inverse=True)
        group = group.reshape(-1)
        order = np.argsort(group, kind="stable")  # items grouped, each group in item order
        sorted_groups = group[order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        suffix[order] = np.arange(len(order)) - run_start
    return np.column_stack([codes, suffix]), stats


# ----------------------------------------------------------------------------------------------- SemanticIds


@dataclass
class SemanticIds:
    """Semantic IDs of items: `codes[i]` (one int per level) names `item_ids[i]`.

    Level l renders as `<x_c>` with x the l-th letter (a, b, c, ...): codes (51, 218, 33, 0) are
    `<a_51><b_218><c_33><d_0>`, PESO's format. Saved files use PESO's index layout
    (`{item_id: ["<a_51>", ...]}`), so PESO's released index loads with `SemanticIds.load` too.
    """

    item_ids: list[str]
    codes: np.ndarray
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_ids = [str(i) for i in self.item_ids]
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or len(self.codes) != len(self.item_ids):
            raise ValueError(f"codes must be [{len(self.item_ids)}, levels], got shape {self.codes.shape}")
        if not 1 <= self.levels <= len(LEVEL_LETTERS):
            raise ValueError(f"semantic IDs need 1..{len(LEVEL_LETTERS)} levels, got {self.levels}")
        if (self.codes < 0).any():
            raise ValueError("semantic ID codes must be >= 0")
        self._row = {item: i for i, item in enumerate(self.item_ids)}
        if len(self._row) != len(self.item_ids):
            dup = next(i for i in self.item_ids if self.item_ids.count(i) > 1)
            raise ValueError(f"item {dup!r} appears more than once")

    @classmethod
    def from_codes(cls, item_ids: Sequence[str], codes: np.ndarray, unique: bool = True) -> SemanticIds:
        """From quantizer codes; `unique` appends `make_unique`'s extra level."""
        return cls(list(item_ids), make_unique(codes)[0] if unique else np.asarray(codes))

    @classmethod
    def from_strings(cls, item_ids: Sequence[str], sids: Sequence[str]) -> SemanticIds:
        """Parse strings such as "<a_51><b_218><c_33><d_0>" (PESO's index, joined)."""
        if len(item_ids) != len(sids):
            raise ValueError(f"{len(item_ids)} item ids but {len(sids)} semantic IDs")
        rows = [_parse_sid(s, item) for item, s in zip(item_ids, sids, strict=True)]
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise ValueError(f"semantic IDs have different numbers of levels: {sorted(widths)}")
        width = widths.pop() if widths else 1
        return cls(list(item_ids), np.array(rows, dtype=np.int64).reshape(len(rows), width))

    @property
    def levels(self) -> int:
        return self.codes.shape[1]

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    def tokens(self, item_id: str) -> list[str]:
        return [f"<{LEVEL_LETTERS[level]}_{c}>" for level, c in enumerate(self.codes[self._row[item_id]])]

    def sid(self, item_id: str) -> str:
        return "".join(self.tokens(item_id))

    def all_tokens(self) -> list[str]:
        """Every token some item uses, ordered by level, then code (the new vocabulary for the LLM)."""
        return [
            f"<{LEVEL_LETTERS[level]}_{c}>"
            for level in range(self.levels)
            for c in np.unique(self.codes[:, level])
        ]

    def collisions(self) -> CollisionStats:
        return collision_stats(self.codes)

    def extend(self, new_item_ids: Sequence[str], new_codes: np.ndarray) -> SemanticIds:
        """A copy with items that arrived later, encoded with the fixed quantizer (`assign_codes`).

        `new_codes` with one level fewer than these IDs (these carry `make_unique`'s level): each new item
        takes the next free number in its group, counting the existing items with the same codes, so IDs stay
        unique and existing IDs never change. With as many levels as these IDs, they are taken as they are.
        """
        new_item_ids = [str(i) for i in new_item_ids]
        new_codes = np.asarray(new_codes, dtype=np.int64)
        if new_codes.ndim != 2 or len(new_codes) != len(new_item_ids):
            raise ValueError(f"new codes must be [{len(new_item_ids)}, levels], got shape {new_codes.shape}")
        known = [i for i in new_item_ids if i in self._row]
        if known:
            raise ValueError(f"{len(known)} items already have semantic IDs (first: {known[0]!r})")
        if new_codes.shape[1] == self.levels:
            return SemanticIds(self.item_ids + new_item_ids, np.vstack([self.codes, new_codes]))
        if new_codes.shape[1] != self.levels - 1:
            raise ValueError(
                f"new codes have {new_codes.shape[1]} levels; expected {self.levels - 1} or {self.levels}"
            )
        next_free: dict[tuple[int, ...], int] = {}
        for row in self.codes:
            key = tuple(row[:-1].tolist())
            next_free[key] = max(next_free.get(key, 0), int(row[-1]) + 1)
        suffix = []
        for row in new_codes:
            key = tuple(row.tolist())
            suffix.append(next_free.get(key, 0))
            next_free[key] = suffix[-1] + 1
        extended = np.column_stack([new_codes, np.array(suffix, dtype=np.int64)])
        return SemanticIds(self.item_ids + new_item_ids, np.vstack([self.codes, extended]))

    def save(self, path: str | Path) -> None:
        """PESO's index layout, one JSON object on one line, written atomically."""
        atomic_write_text(path, json.dumps({item: self.tokens(item) for item in self.item_ids}) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SemanticIds:
        raw: Any = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object {{item_id: [tokens]}}")
        sids = []
        for item, tokens in raw.items():
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError(
                    f"{path}: item {item!r}: expected a list of token strings, got {tokens!r}"[:300]
                )
            sids.append("".join(tokens))
        return cls.from_strings(list(raw), sids)


def _parse_sid(text: str, item: str) -> list[int]:
    codes = []
    pos = 0
    for level, m in enumerate(_TOKEN.finditer(text)):
        if m.start() != pos or m.group(1) != LEVEL_LETTERS[level]:
            break
        codes.append(int(m.group(2)))
        pos = m.end()
    if pos != len(text) or not codes:
        raise ValueError(f"item {item!r}: {text!r} is not a semantic ID like '<a_51><b_218><c_33><d_0>'")
    return codes


# ------------------------------------------------------------------------------------------------ embeddings


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 128,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Mean of the last-layer hidden states over each text's tokens [n, hidden], fp32 (PESO's item embedding).

    Texts are padded on the right by hand, whatever the tokenizer's padding side: with a causal model the
    states of real tokens then do not depend on padding, so a text gets the same vector in any batch. Texts
    are batched by length to waste little compute on padding. A `LoraLM.base` includes its active LoRA
    adapter; embed before training it (LoRA starts as the identity) or under `disable_adapter()`.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)[
        "input_ids"
    ]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"text {i} ({texts[i]!r:.60}) has no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = np.zeros((len(encoded), 0), dtype=np.float32)
    with _bar("embedding texts", len(encoded), True) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = None
            if decoder is not None:
                hidden = getattr(
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False), "last_hidden_state", None
                )
            if hidden is None:
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[
                    -1
                ]
            m = mask.unsqueeze(-1).float()
            pooled = ((hidden.float() * m).sum(1) / m.sum(1)).cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(encoded), pooled.shape[1]), dtype=np.float32)
            out[rows] = pooled
            bar.advance(len(rows))
    model.train(was_training)
    return out
