"""Running a decoder on a KV cache across transformers versions.

transformers 5.x renamed the cache argument and output field from `past_key_values` to `cache` (the old name
warns, and goes in 5.40); the versions before only know `past_key_values`. Every forward pass that passes or
reads a cache goes through here, so the rest of evolora names neither.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn


@functools.cache
def _cache_argument(decoder_class: type) -> str:
    parameters = inspect.signature(decoder_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def run_decoder(decoder: nn.Module, cache: Any = None, **inputs: Any) -> Any:
    """`decoder(**inputs)`, continuing `cache` when one is given."""
    if cache is not None:
        inputs[_cache_argument(type(decoder))] = cache
    return decoder(**inputs)


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass with `use_cache=True` returned."""
    fields = getattr(type(output), "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


def repeat_rows(cache: Any, repeats: int) -> None:
    """Repeat each sequence of `cache` `repeats` times in place (row i becomes rows i*repeats ...), as
    `cache.batch_repeat_interleave` does, with the same values.

    Without gradients, the dynamic layers of transformers 5.x get a broadcast copy: `repeat_interleave`
    was 11% of next-item evaluation (a prompt's keys and values repeated for 10 beams), and a batch of one
    (a shared prompt prefix) needs no copy at all, as the next pass's concatenation reads the view. With
    gradients, or another cache, the cache's own method runs.
    """
    layers = getattr(cache, "layers", None)
    if torch.is_grad_enabled() or layers is None or not all(type(lay) in _dynamic_layers() for lay in layers):
        cache.batch_repeat_interleave(repeats)
        return
    for layer in layers:
        if layer.get_seq_length() > 0:
            layer.keys = _repeat(layer.keys, repeats)
            layer.values = _repeat(layer.values, repeats)


def _repeat(t: torch.Tensor, repeats: int) -> torch.Tensor:
    b = t.shape[0]
    return t[:, None].expand(b, repeats, *t.shape[1:]).reshape(b * repeats, *t.shape[1:])


@functools.cache
def _dynamic_layers() -> tuple[type, ...]:
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # transformers 4.x: no cache layers
        return ()
    return (DynamicLayer, DynamicSlidingWindowLayer)
