"""`ConventionalBackbone`: a conventional recommender behind the `Backbone` interface of the stage loop.

The whole model is one adapter, `default`. Resetting it re-initialises every weight from the seed (on the
CPU, so the same seed gives the same weights on any device); saving writes `model.safetensors` (the state
dict, including each ID table's `seen` mask) and `model.json` (model name, seed, table sizes, shapes,
settings), atomically.

ID tables grow with the data (`resize`, called by the task before each stage): new rows are drawn from a
generator keyed by (adapter seed, table, old size), so the same history of stages always gives the same
weights, and existing rows are left exactly as they are. `load_adapter` accepts a saved model whose tables
are smaller or larger than the current ones: it takes the saved tables as they are and then grows them
back to the current size the same way.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import polars as pl
import torch
from torch import nn

from evolora.config import ModelConfig
from evolora.errors import DamagedFileError, EvoloraError
from evolora.io import atomic_directory, load_tensors, read_json, stable_hash
from evolora.models.conventional import build_model, uses_text
from evolora.models.conventional.common import ConventionalModel, IdSpace, ItemText, item_text_tokens
from evolora.models.precision import resolve_device

FORMAT = "evolora-conventional"


class ConventionalBackbone:
    """A conventional model on one device, with the adapter interface the loop and trainer use."""

    def __init__(self, model: ConventionalModel, device: torch.device, seed: int = 0) -> None:
        self.model = model.to(device)
        self.device = device
        self.name = model.name
        self.seed = seed
        self.reset_adapter("default", seed)
        self.activate("default", trainable=False)
        self.model.eval()

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, space: IdSpace, items: pl.DataFrame | None = None, seed: int = 0
    ) -> ConventionalBackbone:
        """Build `cfg.name`; its tables hold only index 0 until the first `resize`. `items`: for text."""
        conv = cfg.conventional
        text = None
        if uses_text(cfg.name, conv):
            if items is None:
                raise EvoloraError(f"{cfg.name} with item text features needs the item table")
            tokens = item_text_tokens(space, items, conv.text_fields, conv.text_buckets)
            text = ItemText(tokens, conv.text_buckets, conv.dim)
        return cls(build_model(cfg.name, conv, text), resolve_device(cfg.device), seed)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        return ["default"]

    @staticmethod
    def _check(name: str) -> None:
        if name != "default":
            raise EvoloraError(
                f"a conventional model has one adapter, 'default' (the whole model); asked for {name!r}"
            )

    def reset_adapter(self, name: str = "default", seed: int = 0, tokens: bool = True) -> None:
        """Every weight afresh from `seed`; every row of every ID table becomes untrained (cold). (`tokens`
        is the LLM's option for its added token rows; an ID model has none.)"""
        self._check(name)
        self.model.to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model.reset_parameters()
        self.model.to(self.device)
        self.seed = seed

    def activate(self, name: str = "default", trainable: bool = True) -> None:
        self._check(name)
        for p in self.model.parameters():
            p.requires_grad_(trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reset_to(self, keep: list[str]) -> None:
        """A new strategy run starts: there is only `default`, and it stops training."""
        for name in keep:
            self._check(name)
        self.activate("default", trainable=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ growing ID tables
    def table_sizes(self) -> dict[str, int]:
        return {name: t.size for name, t in self.model.id_tables()}

    def _generator(self, table: str, old_size: int) -> torch.Generator:
        key = int(stable_hash([self.seed, table, old_size], 15), 16)
        return torch.Generator().manual_seed(key)

    def resize(self, n_users: int, n_items: int) -> None:
        """User tables to `n_users` rows and item tables to `n_items` (index 0 included)."""
        for name, t in self.model.id_tables():
            t.resize(n_users if t.kind == "user" else n_items, self._generator(name, t.size))

    # ------------------------------------------------------------------ saving
    def state(self) -> dict:
        """Weights and table sizes in memory (a strategy that keeps a conventional model in its state)."""
        return {
            "tables": self.table_sizes(),
            "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
        }

    def load_state(self, state: dict) -> None:
        tables = dict(self.model.id_tables())
        for table, size in state["tables"].items():
            tables[table].resize(size, self._generator(table, tables[table].size))
        self.model.load_state_dict(state["weights"], strict=True)

    def save_adapter(self, path: str | Path, name: str = "default") -> None:
        from safetensors.torch import save_file

        self._check(name)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        meta = {
            "format": FORMAT,
            "model": self.name,
            "seed": self.seed,
            "tables": self.table_sizes(),
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "config": self.model.cfg.model_dump(mode="json"),
        }
        with atomic_directory(path) as out:
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
            (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

    def load_adapter(self, path: str | Path, name: str = "default") -> None:
        self._check(name)
        path = Path(path)
        if not (path / "model.safetensors").is_file() or not (path / "model.json").is_file():
            raise DamagedFileError(path, f"no conventional model at {path} (model.safetensors + model.json)")
        meta = read_json(path / "model.json")
        if meta.get("model") != self.name:
            raise EvoloraError(f"{path} holds a {meta.get('model')!r} model, not {self.name!r}")
        current = self.table_sizes()
        if set(meta["tables"]) != set(current):
            raise EvoloraError(f"{path}: ID tables {sorted(meta['tables'])} do not match {sorted(current)}")
        self.seed = int(meta["seed"])
        tables = dict(self.model.id_tables())
        for table, size in meta["tables"].items():
            tables[table].resize(size, self._generator(table, tables[table].size))
        try:
            self.model.load_state_dict(load_tensors(path / "model.safetensors"), strict=True)
        except RuntimeError as e:
            raise EvoloraError(f"{path}: the saved weights do not fit this {self.name} model: {e}") from None
        for table, size in current.items():
            t = tables[table]
            if size > t.size:
                t.resize(size, self._generator(table, t.size))
