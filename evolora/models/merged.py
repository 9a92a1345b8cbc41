"""The LoRA update merged into the base weights for passes without gradients (`model.merge_lora`).

An adapted projection computes W x + s B (A x): three matrix products and two element-wise passes where
one product, (W + s B A) x, gives the same values up to fp32 rounding. What that saves is small on a CPU:
next-item beam search, whose decoding steps multiply a few dozen rows at a time, 1.03-1.06x users/s
(SmolLM2-135M, all seven projections adapted, one thread, fp32; `benchmarks/bench_next_item.py`), nothing
measurable on CTR scoring, whose passes are long prompts where the LoRA products are ~2% of the work.
Scores move by fp32 rounding (up to ~1.4e-4 in an item's summed log-probability in that benchmark, the
order by which batch composition already moves them), which is why it is an option, off by default: a
table's figures stay reproducible to the last printed digit by the same code.

The base weights are never changed in place: a merged copy stands in for each weight while the block runs and
the original tensor is put back after (W + dW - dW does not give W back bit for bit, and later stages train
on top of W). Where an adapter's update is exactly zero (B = 0: a fresh adapter before training, RecLoRA's
shared adapter) its products are skipped without a copy, bit for bit the same. Forward hooks on the layers
(the cumulative strategies' banks, RecLoRA's personalized adapters) still add their terms; a layer whose LoRA
products themselves carry a hook (SD-LoRA scales the current adapter's output by a learnt magnitude) is left
unmerged. Memory: one copy of every adapted weight while the block runs (~0.4 GB for SmolLM2-135M).

Weights stored in bf16 or fp16, or quantized, are not merged (the update would be rounded into 8 or 11 bits
of mantissa), nor weights a bf16/fp16-mixed model computes with (autocast would round W + dW to 16 bits as
it passes: scores moved by ~1e-2 where fp32 moves them by ~1e-6), nor sharded ones (FSDP): the block then
runs as without the option, and says so once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from evolora.models.llm import LoraLM

log = logging.getLogger("evolora.models")
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def _active(layer: Any) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _mergeable(layer: Any, adapters: list[str]) -> str | None:
    """Why the layer's update cannot be merged exactly enough (None when it can)."""
    base = layer.get_base_layer()
    if type(base) is not nn.Linear:
        return f"{type(base).__name__} layers are not merged"
    if hasattr(base.weight, "to_local"):  # a DTensor: under FSDP each process holds a shard
        return "sharded (FSDP) weights are not merged"
    if base.weight.dtype != torch.float32:
        return f"the base weights are {str(base.weight.dtype).removeprefix('torch.')}, not fp32"
    variants = getattr(layer, "lora_variant", {})
    if any(a in variants for a in adapters):
        return "LoRA variants (DoRA, ...) are not merged"
    parts = [part[a] for part in (layer.lora_A, layer.lora_B, layer.lora_dropout) for a in adapters]
    if any(m._forward_hooks or m._forward_pre_hooks for m in parts):
        # e.g. SD-LoRA's learnt magnitude on B's output: B A alone would not be the update
        return "a hook changes what an adapter's products give (SD-LoRA's magnitudes)"
    return None


@contextlib.contextmanager
def merged_lora(lm: LoraLM) -> Iterator[None]:
    """Inside the block, the active adapters' updates are merged into the base weights (see the module's
    docstring); only when `lm.merge_lora` is set, the model is in eval mode and gradients are off."""
    if not lm.merge_lora or lm.model.training or torch.is_grad_enabled():
        yield
        return
    if lm.autocast_dtype is not None:
        _say_once(
            f"model.merge_lora: under {lm.precision} autocast would round the merged weights to "
            f"{str(lm.autocast_dtype).removeprefix('torch.')}, which the LoRA products unmerged are not; "
            "evaluation runs them unmerged"
        )
        yield
        return
    swapped: list[tuple[Any, nn.Parameter, torch.Tensor]] = []
    try:
        for _, layer in lm.lora_layers():
            adapters = _active(layer)
            if layer.merged or layer.disable_adapters or not adapters:
                continue
            why = _mergeable(layer, adapters)
            if why is not None:
                _say_once(f"model.merge_lora: {why}; evaluation runs the LoRA products unmerged")
                continue
            weight = layer.get_base_layer().weight
            original = weight.data
            # an adapter with B = 0 adds exactly nothing: no copy, bit for bit the same
            deltas = [
                layer.get_delta_weight(a) for a in adapters if torch.count_nonzero(layer.lora_B[a].weight)
            ]
            if deltas:
                weight.data = original + sum(deltas)
            layer.merged_adapters = list(adapters)  # PEFT's forward then runs the base layer alone
            swapped.append((layer, weight, original))
        yield
    finally:
        for layer, weight, original in swapped:
            weight.data = original
            layer.merged_adapters = []
