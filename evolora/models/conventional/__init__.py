"""Conventional ID-based recommenders run through the same continual protocol as the LLM strategies.

One file per model (`pop`, `mf`, `gru4rec`, `sasrec`, `two_tower`, `din`), shared pieces in `common.py`, and
`ConventionalBackbone` (backbone.py), which gives the stage loop the `Backbone` interface: the whole model
is one adapter, `default`.
"""

from __future__ import annotations

from evolora.config import CONVENTIONAL_MODELS, ConventionalConfig, RunConfig
from evolora.errors import ConfigError
from evolora.models.conventional.common import ConventionalModel, IdSpace, ItemText
from evolora.models.conventional.din import DIN
from evolora.models.conventional.gru4rec import GRU4Rec
from evolora.models.conventional.mf import MF
from evolora.models.conventional.pop import Pop
from evolora.models.conventional.sasrec import SASRec
from evolora.models.conventional.two_tower import TwoTower

MODELS: dict[str, type[ConventionalModel]] = {
    cls.name: cls for cls in (Pop, MF, GRU4Rec, SASRec, TwoTower, DIN)
}
assert tuple(MODELS) == CONVENTIONAL_MODELS


def is_conventional(name: str) -> bool:
    return name in MODELS


def build_model(name: str, cfg: ConventionalConfig, text: ItemText | None) -> ConventionalModel:
    return MODELS[name](cfg, text)


def uses_text(name: str, cfg: ConventionalConfig) -> bool:
    return MODELS[name].default_text if cfg.item_text is None else cfg.item_text


def check_conventional(cfg: RunConfig) -> None:
    """Refuse, before any work starts, what a conventional model cannot do."""
    name = cfg.model.name
    if not is_conventional(name):
        return
    MODELS[name].check(cfg.model.conventional)
    if cfg.task.name == "next_item" and not MODELS[name].ranking:
        ranking = ", ".join(n for n, cls in MODELS.items() if cls.ranking)
        raise ConfigError(
            f"model.name={name!r} is a CTR model: it scores (user, history, target) triples and cannot rank "
            f"all items for task.name=next_item; use one of {ranking}"
        )


__all__ = [
    "DIN",
    "MF",
    "MODELS",
    "STRATEGIES",
    "ConventionalModel",
    "GRU4Rec",
    "IdSpace",
    "Pop",
    "SASRec",
    "TwoTower",
    "build_model",
    "check_conventional",
    "is_conventional",
    "uses_text",
]
