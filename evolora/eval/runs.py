"""The runs a report reads (every `results.json` under the folders given), and what may stand side by side
in one: the same data and task, every method scored on the same rows stage by stage, a method's runs of one
setting (they are averaged as its seeds), and one run per method and seed."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from evolora.config import config_changes, definite_candidates
from evolora.continual import comparable_options, run_options
from evolora.errors import DamagedFileError, EvoloraError
from evolora.eval.stored import stored_predictions
from evolora.io import read_json

NOT_A_RECORD = (
    "not an evolora results.json (no method, seed or stages, or a stage without its train_stage, "
    "eval_stage or metrics)"
)


def is_results_record(results: Any) -> bool:
    """Whether parsed JSON has what every reader of a run's results.json takes from it."""
    return (
        isinstance(results, dict)
        and {"method", "seed", "stages"} <= set(results)
        and isinstance(results["stages"], list)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("train_stage"), int)
            and isinstance(s.get("eval_stage"), int)
            and isinstance(s.get("metrics"), dict)
            for s in results["stages"]
        )
    )


def find_results(paths: list[Path]) -> list[dict[str, Any]]:
    found = []
    read: set[Path] = set()
    for p in paths:
        if p.is_file() and p.name == "results.json":
            files = [p]
        elif p.is_dir():
            # not in hidden folders: an experiment --overwrite has moved aside (`.name.replaced`)
            files = sorted(f for f in p.rglob("results.json") if not _hidden(f.relative_to(p)))
        elif p.exists():
            raise EvoloraError(f"{p}: a file, not a run folder (give the folder, or its results.json)")
        else:
            raise EvoloraError(f"{p}: no such run folder")
        for f in files:
            if f.resolve() in read:
                continue  # named twice (an experiment and one of its runs): read once
            read.add(f.resolve())
            r = read_json(f, "Rerun its experiment (the same command) to rebuild it from the stage records.")
            if not is_results_record(r):
                raise DamagedFileError(f, f"{f} is {NOT_A_RECORD}: rerun its experiment (the same command)")
            r["_path"] = str(f)
            found.append(r)
    if not found:
        started = started_without_results(paths)
        pending = f"; started, no stage finished yet: {', '.join(map(str, started))}" if started else ""
        raise EvoloraError(f"no results.json under {', '.join(map(str, paths))}{pending}")
    return found


def not_started(results: list[dict[str, Any]]) -> list[str]:
    """The runs (method and seed) the experiments of `results` were configured with (their config.yaml) that
    have not started: no run.json (nor results.json) yet. A report would leave them out without a word. An
    experiment whose config cannot be read (an older evolora's, edited by hand) names none."""
    import yaml

    from evolora.config import RunConfig

    missing = []
    for exp in sorted({Path(_experiment_of(r["_path"])) for r in results}):
        if not (exp / "experiment.json").is_file():
            continue
        try:
            cfg = RunConfig.model_validate(yaml.safe_load((exp / "config.yaml").read_text()))
        except (OSError, ValueError, TypeError, yaml.YAMLError, EvoloraError):
            continue
        for spec in cfg.strategies:
            label = cfg.label_of(spec)
            # (a run of an evolora before run.json, 2026-11-30, has its results.json)
            seeds = [s for s in cfg.seeds if not _started(exp / label / f"seed{s}")]
            if seeds:
                missing.append(f"{label} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return missing


def _started(run: Path) -> bool:
    return (run / "run.json").is_file() or (run / "results.json").is_file()


def started_without_results(paths: list[Path]) -> list[Path]:
    """The run folders under `paths` a run has started (its run.json) that hold no results.json yet: a run
    writes it after its first stage, so a report would leave such a method or seed out without a word."""
    return sorted(
        f.parent
        for p in paths
        if p.is_dir()
        for f in p.rglob("run.json")
        if not _hidden(f.relative_to(p)) and not (f.parent / "results.json").is_file()
    )


def check_comparable(results: list[dict[str, Any]]) -> None:
    """Refuse runs one report cannot put side by side: other data, another task or another protocol (their
    stages and rows are not the same: under `next_stage` a stage's column is a model of the stage before
    tested on all of it, under `leave_last_out` one of the stage tested on its users' last rows), or two runs
    of one method and seed (the report would average them as two seeds)."""
    for key, what in (("dataset", "datasets"), ("task", "tasks"), ("protocol", "protocols")):
        where: dict[str, list[str]] = defaultdict(list)
        for r in results:
            if key in r or key != "protocol":  # runs recorded before 2026-11-23 do not say their protocol
                where[str(r.get(key, "?"))].append(_experiment_of(r["_path"]))
        if len(where) > 1:
            listed = "; ".join(f"{v} ({', '.join(dict.fromkeys(p))})" for v, p in where.items())
            raise EvoloraError(
                f"these runs are on different {what}: {listed}. A report compares methods on the same "
                f"stages and rows: make one report per {key}"
            )
    first: dict[tuple[str, int], str] = {}
    for r in results:
        other = first.setdefault((r["method"], r["seed"]), r["_path"])
        if other != r["_path"]:
            raise EvoloraError(
                f"two runs of {r['method']} with seed {r['seed']}: {other} and {r['_path']}. A report "
                "averages a method's seeds: report them apart, or give one strategy another `label`"
            )
    _check_same_rows(results)
    _check_same_settings(results)


def _check_same_rows(results: list[dict[str, Any]]) -> None:
    """Every method must be scored on the same rows: the same data file and, stage by stage, as many
    evaluated samples of as many (other staging or eval.max_samples change them)."""
    digests = {
        r["data_files"]["sha256"]: r["_path"] for r in results if r.get("data_files", {}).get("sha256")
    }
    if len(digests) > 1:
        a, b = list(digests.values())[:2]
        raise EvoloraError(
            f"these runs read different data: {_experiment_of(a)} and {_experiment_of(b)}. A report "
            "compares methods on the same rows: make one report per data"
        )
    seen: dict[tuple[int, int], tuple[tuple[Any, Any], str]] = {}
    for r in results:
        for s in r["stages"]:
            size = (s.get("n_eval"), s.get("n_eval_total"))
            first = seen.setdefault((s["train_stage"], s["eval_stage"]), (size, r["_path"]))
            if first[0] != size:
                raise EvoloraError(
                    f"D{s['eval_stage']} is evaluated on {first[0][0]} of {first[0][1]} samples in "
                    f"{_experiment_of(first[1])} but {size[0]} of {size[1]} in {_experiment_of(r['_path'])}: "
                    "other staging or eval settings, so not the same rows. A report compares methods on the "
                    "same rows: make one report per setting"
                )
    # As many rows can still be other rows (another eval.seed): the stored predictions name them. The same
    # CTR rows can still carry other labels (another data.like_threshold, other sampled negatives): their
    # truth is compared too. (A next-item truth is an item index, numbered apart by LLM and ID models.)
    rows: dict[tuple[int, int], tuple[str, str]] = {}
    labels: dict[tuple[int, int], tuple[str, str]] = {}
    for r in results:
        for t, by_stage in (stored_predictions(r) or {}).items():
            for j, arrays in by_stage.items():
                if "rows" not in arrays:
                    continue
                _refuse_other(rows, (t, j), arrays["rows"], np.int64, r["_path"], _OTHER_ROWS)
                if r.get("task") == "ctr" and "truth" in arrays:
                    # as numbers: an ID model's int8 labels are an LLM's float ones
                    _refuse_other(labels, (t, j), arrays["truth"], np.float64, r["_path"], _OTHER_LABELS)


_OTHER_ROWS = (
    "D{stage} is evaluated on other samples in {first} than in {here} (as many, not the same: another "
    "eval.seed or staging). A report compares methods on the same rows: make one report per setting"
)
_OTHER_LABELS = (
    "D{stage}'s samples carry other labels in {first} than in {here} (the same rows: another "
    "data.like_threshold, or other sampled negatives). A report compares methods against the same labels: "
    "make one report per setting"
)


def _refuse_other(
    seen: dict[tuple[int, int], tuple[str, str]],
    key: tuple[int, int],
    values: Any,
    dtype: Any,
    path: str,
    message: str,
) -> None:
    """Raise `message` ({stage}: the evaluated one; {first}, {here}: the two experiments) when `values` are
    not those the first run to record `key` (training stage, evaluated stage) had."""
    digest = hashlib.sha256(np.asarray(values, dtype=dtype).tobytes()).hexdigest()
    first, where = seen.setdefault(key, (digest, path))
    if first != digest:
        raise EvoloraError(
            message.format(stage=key[1], first=_experiment_of(where), here=_experiment_of(path))
        )


def _check_same_settings(results: list[dict[str, Any]]) -> None:
    """A method's runs are averaged as seeds of one setting: runs of one label from experiments of other
    settings (train.lr, say) or other strategy options are refused, naming what differs."""
    contexts: dict[str, dict | None] = {}
    first: dict[str, tuple[dict[str, Any], str]] = {}
    for r in results:
        exp = _experiment_of(r["_path"])
        if exp not in contexts:
            context = _recorded_context(exp)
            contexts[exp] = None if context is None else _comparable(context)
        if contexts[exp] is None:  # an older evolora's folder
            continue
        # defaults as they were when it ran: two runs given the same options may not have run alike
        options = comparable_options(r.get("strategy"), run_options(Path(r["_path"]).parent, r))
        mine = {**contexts[exp], "strategy": r.get("strategy"), "options": options}
        theirs, where = first.setdefault(r["method"], (mine, exp))
        if theirs != mine:
            changes = config_changes(theirs, mine)
            raise EvoloraError(
                f"{r['method']} ran with other settings in {where} and {exp} ({changes}). A report "
                "averages a method's runs as seeds of one setting: give one of them another `label`"
            )


def _recorded_context(experiment: str) -> dict[str, Any] | None:
    """The settings an experiment folder recorded (experiment.json's context); None for an older evolora's."""
    path = Path(experiment) / "experiment.json"
    return read_json(path, "Rerun its experiment.").get("context") if path.is_file() else None


def _experiment_of(results_path: str) -> str:
    """runs/<name>/<label>/seed<k>/results.json -> runs/<name>: from the path made absolute (`seed7` given
    from inside its label's folder has `.` three parents up, no experiment; its settings went unchecked),
    shown relative to the working folder where it lies inside it."""
    folder = Path(os.path.normpath(Path(results_path).absolute())).parent.parent.parent
    return str(folder.relative_to(Path.cwd())) if folder.is_relative_to(Path.cwd()) else str(folder)


def _comparable(context: dict[str, Any]) -> dict[str, Any]:
    """An experiment's settings as two runs of one setting share them: where the data files lie is not a
    setting (their digest is checked apart), the precision is the report's to state per run, and next-item
    candidates left `auto` are the model's default."""
    context = definite_candidates(context)
    data = {k: v for k, v in context.get("data", {}).items() if k not in ("source", "meta")}
    model = {k: v for k, v in context.get("model", {}).items() if k != "precision"}
    return {**context, "data": data, "model": model}


def ranking_notes(results: list[dict[str, Any]]) -> list[str]:
    """What a report says when next-item runs rank among other candidates: the whole catalogue or the items
    seen by the stage (`candidates`), other items of the user left out (`task.exclude_history`), or a
    conventional model's equal scores ordered otherwise (`task.ties`). Their rows and true items are the
    same, their Hit@K (and `nll`) are over other sets."""
    from evolora.models.conventional import is_conventional

    ranked = [r for r in results if r.get("task") == "next_item"]
    contexts: dict[str, dict[str, Any] | None] = {}
    candidates: dict[str, list[str]] = defaultdict(list)
    left_out: dict[str, list[str]] = defaultdict(list)
    ties: dict[str, list[str]] = defaultdict(list)
    for r in ranked:
        exp = _experiment_of(r["_path"]) if "_path" in r else ""
        if exp not in contexts:
            context = _recorded_context(exp) if exp else None
            contexts[exp] = None if context is None else context.get("task", {})
        task = contexts[exp]
        conventional = is_conventional(str(r.get("model", "")))
        # Runs recorded before `candidates` existed ranked the catalogue (LLM) or the seen items.
        chosen = r.get("candidates") or ("seen" if conventional else "catalogue")
        candidates[chosen].append(r["method"])
        if task is None:  # an older evolora's folder, without its settings: nothing to say
            continue
        left_out[str(task.get("exclude_history", False)).lower()].append(r["method"])
        if conventional:
            ties[task.get("ties", "first")].append(r["method"])
    notes = []
    kinds = {is_conventional(str(r.get("model", ""))) for r in ranked}
    if kinds == {True, False} and set(candidates) != {"seen"}:
        notes.append(
            "Candidates differ: the LLM rows rank every item with a semantic ID (the trie covers the "
            "whole catalogue, items of later stages included), the conventional rows every item seen up "
            "to the evaluated stage; both rank the same true items of the same rows "
            "(`task.candidates: seen` ranks the LLM among the seen items too)."
        )
    elif len(candidates) > 1:
        named = {
            "catalogue": "every item with a semantic ID",
            "seen": "the items seen by the evaluated stage",
        }
        notes.append(
            f"Candidates differ: {_grouped(candidates, named)}; the same true items of the same rows, ranked "
            "among other sets."
        )
    if len(left_out) > 1:
        named = {"false": "none", "true": "the prompt's items", "rated": "every item the user rated before"}
        notes.append(
            f"Items left out of the rankings differ (task.exclude_history): {_grouped(left_out, named)}."
        )
    if len(ties) > 1:
        named = {"first": "to the item seen first", "random": "in a fixed random order"}
        notes.append(f"Equal scores are ordered otherwise (task.ties): {_grouped(ties, named)}.")
    return notes


def _grouped(methods_by: dict[str, list[str]], named: dict[str, str]) -> str:
    return "; ".join(
        f"{named.get(k, k)}: {', '.join(dict.fromkeys(methods))}" for k, methods in methods_by.items()
    )


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
