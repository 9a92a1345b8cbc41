"""The RQ-VAE that turns item embeddings into discrete codes (the first half of semantic IDs).

Generative recommenders (TIGER, LC-Rec, PESO) name each item by a few discrete codes, so an LLM can generate
the next item token by token. The codes come from an RQ-VAE (residual-quantised autoencoder): an MLP encodes
the item's text embedding into a small vector, `levels` codebooks quantise it coarse to fine (level l codes
the residual left by levels < l), and an MLP decoder reconstructs the embedding from the sum of the codes.
Items with similar text then share code prefixes.

The pipeline: `semantic_ids.embed_texts` (mean-pooled LLM hidden states) -> `train_rqvae` -> `assign_codes`
-> `semantic_ids.make_unique` (one extra level numbering items that share all codes) ->
`semantic_ids.SemanticIds` (rendering, saving, and `extend` for items of later stages).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evolora.io import load_state, save_state
from evolora.models.precision import without_autocast
from evolora.models.semantic_ids import LEVEL_LETTERS, collision_stats
from evolora.progress import Bar
from evolora.progress import task as progress_task

log = logging.getLogger("evolora.models")


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

    def quantise(
        self, z: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of the chosen codes [n, code_dim], codes [n, levels], quantisation loss). `masks` [levels,
        codebook_size]: the codes each level may take (`assign_codes(allowed=...)`); all when None."""
        if self.training and not bool(self.initialised):
            self.init_codebooks(z)
        residual, total = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        self._residuals = []
        for level in range(self.levels):
            book = self.codebooks[level]
            with torch.no_grad():
                dist = _sq_dist(residual.float(), book.float())
                idx = (dist if masks is None else dist.masked_fill(~masks[level], float("inf"))).argmin(1)
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
        """Settings and weights as one safetensors file (no pickle)."""
        save_state(path, {"config": self.config, "state": self.state_dict()})

    @classmethod
    def load(cls, path: str | Path) -> RQVAE:
        blob = load_state(path, "Delete it and build the semantic IDs again.")
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
def assign_codes(
    model: RQVAE,
    embeddings: np.ndarray,
    batch_size: int = 4096,
    allowed: Sequence[Collection[int]] | None = None,
) -> np.ndarray:
    """Codes [n, levels] (int64): the nearest code at each level, as the trained model quantises.

    `allowed[level]`: the codes that level may take; the nearest allowed one is chosen and the next level
    quantises what it leaves. A deployed model knows tokens only for the codes its items used, so the items
    an update brings are encoded within those.
    """
    was_training = model.training
    model.eval()
    device = model.codebooks.device
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    masks = None
    if allowed is not None:
        if len(allowed) != model.levels:
            raise ValueError(f"allowed codes for {len(allowed)} levels; the quantizer has {model.levels}")
        masks = torch.zeros(model.levels, model.codebook_size, dtype=torch.bool, device=device)
        for level, codes in enumerate(allowed):
            masks[level, [c for c in codes if 0 <= c < model.codebook_size]] = True
        if not masks.any(1).all():
            raise ValueError("every level needs at least one allowed code")
    with without_autocast():
        out = [
            model.quantise(model.encode(x[i : i + batch_size].to(device)), masks)[1].cpu()
            for i in range(0, len(x), batch_size)
        ]
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros((0, model.levels), dtype=np.int64)


def last_level_ranking(
    model: RQVAE, embeddings: np.ndarray, codes: np.ndarray, allowed: Collection[int] | None = None
) -> np.ndarray:
    """For each embedding quantised as `codes` (`assign_codes`), the last level's codes nearest first [n,
    k]: those in `allowed` only (k of them), or all. The first is the item's own last code; the others are
    where it goes when that group of identical codes has no free number (`SemanticIds.extend`)."""
    was_training = model.training
    model.eval()
    device = model.codebooks.device
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32, device=device)
    chosen = torch.as_tensor(np.asarray(codes), dtype=torch.long, device=device)
    with without_autocast(), torch.no_grad():
        residual = model.encode(x)
        for level in range(model.levels - 1):  # what the last level quantises, subtracted as `quantise` does
            residual = residual - model.codebooks[level][chosen[:, level]]
        dist = _sq_dist(residual.float(), model.codebooks[-1].float())
        if allowed is not None:
            keep = torch.zeros(model.codebook_size, dtype=torch.bool, device=device)
            keep[[c for c in allowed if 0 <= c < model.codebook_size]] = True
            dist = dist.masked_fill(~keep, float("inf"))
        order = torch.sort(dist, dim=1, stable=True).indices[
            :, : int(keep.sum()) if allowed is not None else None
        ]
    model.train(was_training)
    return order.cpu().numpy().astype(np.int64)
