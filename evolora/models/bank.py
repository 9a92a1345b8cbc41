"""Frozen past LoRA updates kept inside the model: the layer behind the cumulative-LoRA strategies.

For every adapted projection the bank holds the low-rank updates of earlier stages and adds

    sum_i m_i * s * B_i (A_i x)

to the layer's output, where s is the adapter's alpha / r scaling and m_i a magnitude (fixed at 1, or a
learnable scalar per module and past stage, as SD-LoRA learns them). With `normalize`, the bank keeps
*directions* and the magnitudes set their size: `factors` stores A_i and B_i each divided by its Frobenius
norm (SumLoRA and SD-LoRA as PESO's code and SD-LoRA's code define them), `product` divides both by
sqrt(||B_i A_i||_F), so the update B_i A_i itself has norm 1 (the SD-LoRA paper). All past updates of a
module are applied with one pair of matrix products over their concatenation, so the cost does not grow
with a Python loop over stages.

The stored A_i and B_i are buffers, never parameters: nothing in the bank can be trained except the
magnitudes, and only when asked.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from evolora.models.llm import LoraLM
from evolora.models.precision import without_autocast


class _ModuleBank:
    def __init__(self, scaling: float, rank: int) -> None:
        self.scaling = scaling
        self.rank = rank
        self.a: torch.Tensor | None = None  # [k * r, d_in]
        self.b: torch.Tensor | None = None  # [d_out, k * r]
        self.magnitudes: nn.Parameter | None = None  # [k]

    def add(self, a: torch.Tensor, b: torch.Tensor, learnable: bool) -> None:
        mags = torch.ones(1, device=a.device)
        if self.a is None:
            self.a, self.b = a, b
        else:
            self.a = torch.cat([self.a, a], dim=0)
            self.b = torch.cat([self.b, b], dim=1)
            mags = torch.cat([self.magnitudes.detach(), mags])  # type: ignore[union-attr]
        self.magnitudes = nn.Parameter(mags, requires_grad=learnable)

    def keep_last(self) -> None:
        if self.a is None or self.a.shape[0] == self.rank:
            return
        self.a = self.a[-self.rank :]
        self.b = self.b[:, -self.rank :]  # type: ignore[index]
        self.magnitudes = nn.Parameter(
            self.magnitudes.detach()[-1:], requires_grad=self.magnitudes.requires_grad
        )  # type: ignore[union-attr]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.magnitudes * self.scaling).repeat_interleave(self.rank)  # type: ignore[operator]
        h = F.linear(x.to(self.a.dtype), self.a) * scale  # type: ignore[union-attr]
        return F.linear(h, self.b)  # type: ignore[arg-type]


class AdapterBank:
    """Past stages' LoRA updates of one adapter, frozen into forward hooks on its layers."""

    def __init__(
        self,
        lm: LoraLM,
        adapter: str = "default",
        normalize: Literal["factors", "product"] | None = "factors",
        learnable: bool = False,
    ):
        self.lm = lm
        self.adapter = adapter
        self.normalize = normalize
        self.learnable = learnable
        self.size = 0
        self.banks: dict[str, _ModuleBank] = {}
        self._handles: list[RemovableHandle] = []
        for name, module in lm.lora_layers():
            if adapter not in module.lora_A:
                continue
            bank = _ModuleBank(float(module.scaling[adapter]), module.r[adapter])
            self.banks[name] = bank
            self._handles.append(module.register_forward_hook(self._hook(bank)))

    @staticmethod
    def _hook(bank: _ModuleBank):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if bank.a is None:
                return None
            return output + bank.delta(args[0]).to(output.dtype)

        return hook

    def push(self) -> None:
        """Freeze the adapter's current weights into the bank as one more past update."""
        with without_autocast():
            for name, a, b in self.lm.lora_pairs(self.adapter):
                a, b = a.detach().float().clone(), b.detach().float().clone()
                if self.normalize == "factors":
                    a = a / a.norm().clamp_min(1e-12)
                    b = b / b.norm().clamp_min(1e-12)
                elif self.normalize == "product":
                    # ||B A||_F^2 = sum((B^T B) * (A A^T)): r x r products, never the d_out x d_in update
                    root = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt().sqrt()
                    # a zero update has no direction: it stays zero (dividing would blow A up, inf in fp16)
                    a, b = (a / root, b / root) if root > 1e-6 else (a * 0, b * 0)
                self.banks[name].add(a, b, self.learnable)
        self.size += 1

    def keep_latest(self) -> None:
        """Forget all but the most recent past update."""
        for bank in self.banks.values():
            bank.keep_last()
        self.size = min(self.size, 1)

    def past_factors(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored (A_i, B_i) of one module, oldest first."""
        bank = self.banks[name]
        if bank.a is None:
            return []
        r = bank.rank
        return [
            (bank.a[i * r : (i + 1) * r], bank.b[:, i * r : (i + 1) * r]) for i in range(bank.a.shape[0] // r)
        ]  # type: ignore[index]

    def magnitude_parameters(self) -> list[nn.Parameter]:
        return [
            b.magnitudes
            for b in self.banks.values()
            if b.magnitudes is not None and b.magnitudes.requires_grad
        ]

    def state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "banks": {
                n: None if b.a is None else {"a": b.a.cpu(), "b": b.b.cpu(), "m": b.magnitudes.detach().cpu()}  # type: ignore[union-attr]
                for n, b in self.banks.items()
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.size = state["size"]
        device = self.lm.device
        for n, s in state["banks"].items():
            bank = self.banks[n]
            if s is None:
                bank.a = bank.b = bank.magnitudes = None
            else:
                bank.a, bank.b = s["a"].to(device), s["b"].to(device)
                bank.magnitudes = nn.Parameter(s["m"].to(device), requires_grad=self.learnable)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
