"""What the stage loop, the trainer and the basic strategies need from a model (`train_adapter` and
`TrainJob.backbone` are typed by it).

`LoraLM` (an LLM with LoRA adapters) and `ConventionalBackbone` (an ID-based recommender) both provide it, so
`frozen`, `finetune` and `retrain` run on either through the same loop. An "adapter" of a conventional model
is the whole model: it has one, `default`, and resetting it re-initialises every weight from the seed.
Strategies that need LoRA internals (PESO, LSAT, the cumulative family, RecLoRA) need an `LoraLM`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


class Backbone(Protocol):
    model: nn.Module
    device: torch.device

    @property
    def adapters(self) -> list[str]: ...

    def reset_adapter(self, name: str = "default", seed: int = 0, tokens: bool = True) -> None: ...

    def activate(self, name: str = "default", trainable: bool = True) -> None: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def save_adapter(self, path: str | Path, name: str = "default") -> None: ...

    def load_adapter(self, path: str | Path, name: str = "default") -> None: ...

    def reset_to(self, keep: list[str]) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...
