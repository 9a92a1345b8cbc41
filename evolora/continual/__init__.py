"""Continual strategies, one file each, all behind `continual.base.Strategy`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from evolora.config import RunConfig, StrategySpec, config_changes, nearest_key, section_at
from evolora.continual.base import Env, Strategy, StrategyOptions, options_with_defaults
from evolora.continual.finetune import Finetune
from evolora.continual.frozen import Frozen
from evolora.continual.inflora import InfLora
from evolora.continual.lsat import Lsat
from evolora.continual.olora import OLora
from evolora.continual.peso import Peso
from evolora.continual.reclora import RecLora
from evolora.continual.retrain import Retrain
from evolora.continual.sdlora import SdLora
from evolora.continual.sumlora import SumLora
from evolora.errors import ConfigError
from evolora.io import read_json
from evolora.models.conventional import is_conventional

log = logging.getLogger("evolora.continual")

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Frozen, Finetune, Retrain, Peso, Lsat, SumLora, SdLora, InfLora, OLora, RecLora)
}


def _resolve(spec: StrategySpec) -> tuple[type[Strategy], StrategyOptions]:
    cls = STRATEGIES.get(spec.name)
    if cls is None:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"strategies: unknown strategy {spec.name!r}; available: {known}")
    try:
        return cls, cls.Options.model_validate(spec.options)
    except ValidationError as e:
        problems = "; ".join(_problem(x, cls) for x in e.errors())
        raise ConfigError(f"strategy {spec.display!r}: {problems}") from None


def _problem(error: ErrorDetails, cls: type[Strategy]) -> str:
    where = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        # A misspelt option would otherwise read "Extra inputs are not permitted": say which ones exist,
        # those of the nested group it is in (RecLoRA's crm) where it is in one.
        group = error["loc"][:-1]
        model = section_at(cls.Options, group) or cls.Options
        near, keys = nearest_key(model, str(error["loc"][-1]))
        keys = [k for k in keys if k not in ("name", "label")]
        whose = f"{cls.name}'s {'.'.join(map(str, group))}" if model is not cls.Options else f"{cls.name}'s"
        return (
            f"{where}: unknown option{f' (did you mean {near!r}?)' if near else ' (check the spelling)'}; "
            f"{whose} options: {', '.join(keys) or 'none'}"
        )
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def build_strategy(spec: StrategySpec, env: Env, seed: int) -> Strategy:
    cls, options = _resolve(spec)
    return cls(options, env, seed)


def resolved_options(spec: StrategySpec) -> dict[str, Any]:
    """A strategy's options as its run records them (every default filled in)."""
    return _resolve(spec)[1].model_dump(mode="json")


def check_strategy_specs(specs: list[StrategySpec], cfg: RunConfig | None = None) -> None:
    """Validate every strategy's options, and with `cfg` the settings they need of it, before any work
    starts."""
    for spec in specs:
        cls, options = _resolve(spec)
        if cfg is not None:
            if cls.needs_lora and is_conventional(cfg.model.name):
                plain = ", ".join(name for name, c in STRATEGIES.items() if not c.needs_lora)
                raise ConfigError(
                    f"strategy {spec.display!r} ({spec.name}) needs LoRA adapters and cannot run with the "
                    f"conventional model {cfg.model.name!r}; conventional models run {plain}"
                )
            cls.check_config(options, cfg)
        for option, reader in cls.unread(spec.options).items():
            log.warning("strategy %r: %s is read only with %s; ignored", spec.display, option, reader)


__all__ = ["STRATEGIES", "Env", "Strategy", "build_strategy", "check_strategy_specs"]


def recorded_options(record: dict[str, Any]) -> dict[str, Any]:
    """The options a run folder's record (its run.json, or a results.json from before run.json) says its
    strategy ran with. A run records every option it had; one it lacks did not exist yet, and takes the value
    that gives the behaviour of then (`Strategy.as_recorded_before`: SD-LoRA's `normalize` was `factors`
    before it was an option), else today's default."""
    cls = STRATEGIES.get(record.get("strategy"))  # type: ignore[arg-type]
    options = record.get("options", {})
    if cls is None:
        return dict(options)
    return options_with_defaults(cls, cls.as_recorded_before(options))


def comparable_options(strategy: Any, options: dict[str, Any]) -> dict[str, Any]:
    """`options` as two runs of `strategy` are compared: those that did not apply left out
    (`Strategy.applicable`: LSAT's `fusion` in an ensemble)."""
    cls = STRATEGIES.get(strategy) if isinstance(strategy, str) else None
    return dict(options) if cls is None else cls.applicable(options)


def run_options(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """`recorded_options` of a run folder whose results.json says `results`: what rebuilding its strategy
    (to serve, export or update it) must pass, or a changed default would silently change the model."""
    marker = run_dir / "run.json"
    record = read_json(marker, "Delete it to accept the current options.") if marker.is_file() else results
    return recorded_options(record)


@dataclass
class OptionChanges:
    """How a run folder's recorded options differ from the ones it is run with now."""

    run_dir: Path
    was: Any  # the strategy it was run as
    changes: str  # `key.sub: old -> new; ...`
    pin: str  # the options the folder ran with where they differ (YAML flow); "" when the strategy changed

    def message(self) -> str:
        said = f"{self.run_dir} was run as {self.was!r} with other options ({self.changes}). "
        if self.pin:
            said += f"Where a default changed since, pin what it ran with ({self.pin}); or give "
        else:
            said += "Give "
        return said + "this strategy another `label`, or delete that folder to rerun it."


def option_changes(run_dir: Path, strategy: Any, options: dict[str, Any]) -> OptionChanges | None:
    """None when `run_dir` is new or was made by `strategy` with `options` (defaults filled in, as they were
    when it ran: `recorded_options`); else what differs, nested options by the keys that changed."""
    marker = run_dir / "run.json"
    if marker.is_file():
        old = read_json(marker, "Delete it to accept the current options for this run folder.")
    elif (run_dir / "results.json").is_file():  # a run folder from before run.json existed
        old = read_json(run_dir / "results.json", "Delete it: it is rebuilt from the stage records.")
    else:
        return None
    cls = STRATEGIES.get(strategy)
    now = comparable_options(strategy, options if cls is None else options_with_defaults(cls, options))
    same_strategy = old.get("strategy") == strategy
    recorded = recorded_options(old) if same_strategy else dict(old.get("options", {}))
    before = comparable_options(old.get("strategy"), recorded)
    if same_strategy and before == now:
        return None
    changes = config_changes(before, now)
    if not same_strategy:  # first: the options follow from it; nothing to pin
        changes = "; ".join(filter(None, [f"strategy: {old.get('strategy')!r} -> {strategy!r}", changes]))
        return OptionChanges(run_dir, old.get("strategy"), changes, "")
    # What to pin: the differing options as recorded, those that still exist (a removed one cannot be set)
    pin: dict[str, Any] = {"name": strategy}
    if run_dir.parent.name != strategy:  # runs/<name>/<label>/seed<k>: the pinned entry keeps its folder
        pin["label"] = run_dir.parent.name
    for key in sorted(set(before) & set(cls.Options.model_fields if cls is not None else now)):
        a, b = before[key], now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            pin[key] = {k: a.get(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
        elif a != b:
            pin[key] = a
    flow = yaml.safe_dump(pin, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return OptionChanges(run_dir, old.get("strategy"), changes, flow)
