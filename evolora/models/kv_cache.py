"""Running a decoder on a KV cache across transformers versions.

transformers 5.x renamed the cache argument and output field from `past_key_values` to `cache` (the old name
warns, and goes in 5.40); the versions before only know `past_key_values`. Every forward pass that passes or
reads a cache goes through here, so the rest of evolora names neither.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

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
