"""Regularisers that strategies compose: the proximal term to an anchor copy of an adapter (PESO, and
RecLoRA's `proximal` option) and the orthogonality term to frozen past adapters (O-LoRA).

Both run outside autocast whatever the run's precision: the proximal KL in fp64 (see `continual/peso.py`
for why), the others in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from evolora.models.precision import without_autocast

#: (module name, A weight [r, d_in], B weight [d_out, r]) of every adapted module, as `LoraLM.lora_pairs`
Pairs = list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]


class ProximalRegularizer:
    """The proximal term against a frozen anchor copy of an adapter's LoRA weights."""

    def __init__(self, penalty: str = "kl", reduction: str = "sum") -> None:
        self.penalty = penalty
        self.reduction = reduction
        self.anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_anchor(self, pairs: Pairs) -> None:
        # The KL of two nearly equal softmaxes over thousands of entries is ~1e-9: fp32 rounding (~1e-7)
        # swamps its value and skews its gradient, so the KL runs in fp64 (cheap: it is a few vectors).
        dtype = torch.float64 if self.penalty == "kl" else torch.float32
        self.anchor = [(a.detach().to(dtype).clone(), b.detach().to(dtype).clone()) for _, a, b in pairs]

    def group_term(self, current: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        v = current.to(anchor.dtype).flatten()
        a = anchor.flatten()
        if self.penalty == "kl":
            log_p = F.log_softmax(v, dim=0)
            log_q = F.log_softmax(a, dim=0)
            return torch.sum(log_p.exp() * (log_p - log_q))
        if self.penalty == "l2":
            return 0.5 * torch.sum((v - a) ** 2)
        return torch.linalg.vector_norm(v - a)

    def __call__(self, pairs: Pairs) -> torch.Tensor:
        if len(pairs) != len(self.anchor):
            raise RuntimeError("the anchor does not match the adapter (set_anchor first)")
        with without_autocast():
            total = sum(
                self.group_term(a, a0) + self.group_term(b, b0)
                for (_, a, b), (a0, b0) in zip(pairs, self.anchor, strict=True)
            )
        if self.reduction == "mean":
            total = total / len(pairs)
        assert isinstance(total, torch.Tensor)
        return total.float()


def orthogonality_loss(
    past: list[tuple[torch.Tensor, torch.Tensor]],
    a: torch.Tensor,
    b: torch.Tensor,
    include_b: bool,
    form: Literal["squared", "abs"] = "squared",
) -> torch.Tensor:
    """sum_i ||A_i A^T||_F^2 (+ ||B_i^T B||_F^2) for one module; `form="abs"`: the entries' absolute values
    summed instead of their squares."""
    size = {"squared": lambda m: m.pow(2).sum(), "abs": lambda m: m.abs().sum()}[form]
    total = a.new_zeros((), dtype=torch.float32)
    with without_autocast():
        for a_i, b_i in past:
            total = total + size(a_i.float() @ a.float().T)
            if include_b:
                total = total + size(b_i.float().T @ b.float())
    return total
