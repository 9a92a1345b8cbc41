"""Rows of added tokens (semantic IDs) at inference without rebuilding the vocabulary matrix on every pass.

PEFT keeps an adapter's rows of added tokens apart from the frozen embedding (`TrainableTokensLayer`) and,
on every forward pass, copies the whole [vocabulary x hidden] matrix to write them in (`get_merged_weights`):
113 MB for SmolLM2, once for the input embedding and once for the tied output layer of each decoder call.
Beam search calls the decoder once per ID token, so in next-item evaluation the copies took 13% of the time
(profiled on ML-100K, 24 users, one thread).

Without gradients (evaluation, scoring, serving) the layers here compute the same numbers, bit for bit:

* input embedding: the frozen rows are looked up as usual and the added tokens' positions take the
  adapter's rows (a gather of the same values PEFT's merged matrix holds);
* output layer (tied to the embedding, or an untied one with its own rows): the merged matrix is built once
  and kept while neither the frozen weight nor the adapter's rows change (checked by their version
  counters), then one `F.linear` as PEFT's.

With gradients (training) PEFT's own path runs unchanged, so training is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _signature(tensors: list[torch.Tensor]) -> tuple:
    """What identifies these tensors' current values: an in-place write bumps `_version`, a new tensor
    has another storage."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def _embedding(layer: Any, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    base = layer.base_layer
    out = F.embedding(
        x, base.weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )
    lookups = layer.__dict__.setdefault("_evolora_lookup", {})
    for name in adapters:  # in order: a later adapter's row wins, as with PEFT's successive index_copy
        indices = layer.token_indices[name]
        key = (name, tuple(indices), x.device, base.weight.shape[0])
        position = lookups.get(key)
        if position is None:
            position = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=x.device)
            position[torch.tensor(indices, device=x.device)] = torch.arange(len(indices), device=x.device)
            lookups.clear()
            lookups[key] = position
        at = position[x]
        hit = at >= 0
        if bool(hit.any()):
            rows = layer.trainable_tokens_delta[name].to(out)[at[hit]]
            out = out.clone()
            out[hit] = rows
    scale = layer._get_embed_scale()
    if scale is not None:
        out = out * scale.to(out.dtype)
    return out


def _merged_weight(layer: Any, adapters: list[str]) -> torch.Tensor:
    tensors = [layer.base_layer.weight] + [layer.trainable_tokens_delta[a] for a in adapters]
    key = (tuple(adapters), _signature(tensors))
    cached = layer.__dict__.get("_evolora_merged")
    if cached is None or cached[0] != key:
        cached = (key, layer.get_merged_weights(adapters))
        layer.__dict__["_evolora_merged"] = cached
    return cached[1]


def _forward_adapters(self: Any, x: torch.Tensor, active_adapters: Any, *args: Any, **kwargs: Any) -> Any:
    peft_path = super(type(self), self).forward_adapters
    fast = (
        not torch.is_grad_enabled()
        and not self.disable_adapters
        and bool(active_adapters)
        and not self.merged
        and not args
        and not kwargs
    )
    if not fast:
        return peft_path(x, active_adapters, *args, **kwargs)
    adapters = list(active_adapters)
    self._check_overlapping_tokens(adapters)
    if isinstance(self.base_layer, nn.Embedding):
        return _embedding(self, x, adapters)
    if isinstance(self.base_layer, nn.Linear):
        return F.linear(x, _merged_weight(self, adapters))
    return peft_path(x, active_adapters, *args, **kwargs)


_FAST_CLASSES: dict[type, type] = {}


def install(model: nn.Module) -> int:
    """Give every PEFT trainable-token layer of `model` the inference path above (idempotent: the layer's
    class becomes a subclass overriding `forward_adapters` only); returns how many layers have it."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    count = 0
    for m in model.modules():
        if not isinstance(m, TrainableTokensLayer):
            continue
        cls = type(m)
        if cls not in _FAST_CLASSES.values():
            if cls not in _FAST_CLASSES:
                _FAST_CLASSES[cls] = type(cls.__name__, (cls,), {"forward_adapters": _forward_adapters})
            m.__class__ = _FAST_CLASSES[cls]
        count += 1
    return count
