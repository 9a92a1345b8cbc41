"""What a question to a trained run may hold, checked before any model work: where the run is (an
experiment folder with a method and seed, or a run folder), the candidate items, and a history (item ids
counted as liked, (item, rating) pairs, or a mapping item -> rating). Shared by the Python API, the CLI and
the server, so each gives the same one-line error for the same mistake; and the shapes of their answers.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from evolora.data.ids import IdSpace, known_forms
from evolora.errors import ConfigError, DamagedFileError, EvoloraError
from evolora.eval.runs import NOT_A_RECORD, is_results_record
from evolora.io import read_json

log = logging.getLogger("evolora")

History = Iterable[str] | Iterable[tuple[str, float]] | Mapping[str, float] | None


@dataclass(frozen=True)
class Scored:
    """One item and its score: P(like) for CTR runs, log p(item | history) for next-item runs."""

    item: str
    score: float
    title: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "score": self.score, "title": self.title}


@dataclass(frozen=True)
class Ranked:
    """A CTR run's ranking of given candidates: the top items, and the candidates left out as seen."""

    items: list[Scored]
    left_out_seen: list[str]


def item_list(items: Iterable[str]) -> list[str]:
    """Candidate item ids as a list of strings; a string is refused (iterated, it would be one-letter ids)."""
    if isinstance(items, str | bytes):
        raise EvoloraError(f"items: a list of item ids, not the string {items!r}")
    if not isinstance(items, Iterable):
        raise EvoloraError(f"items: a list of item ids, not {items!r}")
    return [str(i) for i in items]


def list_of(value: Any, kind: Any, what: str) -> list[Any]:
    """One value of `kind` or an iterable of them, as a list; anything else is `what`'s error."""
    if isinstance(value, kind):
        return [value]
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, str | bytes) else None
    if items is None or not all(isinstance(v, kind) for v in items):
        raise EvoloraError(f"{what}, not {value!r}")
    return items


def batch_of(queries: Any, method: str) -> list[Any]:
    """The queries of a batch method (`score_many`, ...): a list (or other iterable) of them."""
    if not isinstance(queries, Iterable) or isinstance(queries, str | bytes | Mapping):
        raise EvoloraError(f"{method}: a list of queries (tuples), not {queries!r}"[:300])
    return list(queries)


def query_of(query: Any, parts: tuple[str, ...], method: str) -> tuple[Any, ...]:
    """One query of a batch method (`score_many`, ...), checked to hold its parts."""
    if not isinstance(query, tuple | list) or len(query) != len(parts):
        raise EvoloraError(f"{method}: each query is a tuple ({', '.join(parts)}), not {query!r}")
    return tuple(query)


def count_of(k: Any) -> int:
    """How many items to return: a whole number >= 1 (a float or a string is refused, not rounded)."""
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise EvoloraError(f"k={k!r}: ask for a whole number of items, at least 1")
    return int(k)


def flag_of(value: Any, what: str) -> bool:
    """A yes/no option: True or False (a string such as "false" is truthy, so it is refused, not read)."""
    if not isinstance(value, bool | np.bool_):
        raise EvoloraError(f"{what}={value!r}: True or False")
    return bool(value)


def number_of(value: Any, what: str) -> int | None:
    """A stage or version number as given to `Recommender.load` (None: the default)."""
    if value is not None and (not isinstance(value, int | np.integer) or isinstance(value, bool)):
        raise ConfigError(f"{what}={value!r}: a {what} number (an int)")
    return None if value is None else int(value)


def rating_of(
    value: Any, item: Any, scale: tuple[float, float] | None = None, labels: str | None = None
) -> float:
    """A history entry's rating as a finite number, or an error naming the item. A number only, but for a
    label run's true/false (below): read as a number, `True` would be the rating 1 (a dislike on a 5-star
    scale), and a string is a mistake somewhere upstream, not a rating to convert. `scale`: the lowest and
    highest rating of the run's data (lowest -inf where `data.min_rating` left the rows below it out); one
    outside it is an error: a prompt reads a rating only as above or below the like threshold, so a rating of
    another scale (0/1 flags, ten stars) would be misread without a word. `labels`: the run's 0/1 label
    column (`data.columns.label`): then a rating is a label, 0 or 1, or true or false as the column may hold
    them."""
    if labels is not None:
        if isinstance(value, bool | np.bool_) or (isinstance(value, numbers.Real) and value in (0, 1)):
            return float(value)
        raise EvoloraError(
            f"history: the rating of {item!r} is {value!r}, and this run's data has labels ({labels!r}): "
            "give 0 or 1 (false or true), or the item id alone for a like"
        )
    if isinstance(value, bool | np.bool_):
        raise EvoloraError(
            f"history: the rating of {item!r} is {value!r}, a label, which only a run on a 0/1 label column "
            "takes: give a number on this run's scale, or the item id alone for a like"
        )
    is_number = isinstance(value, numbers.Real)
    try:
        number = float(value) if is_number else math.nan
    except OverflowError:  # a whole number past a float's range (JSON numbers are unbounded)
        raise EvoloraError(
            f"history: the rating of {item!r} is a number past a float's range, not a rating"
        ) from None
    if not math.isfinite(number):
        raise EvoloraError(f"history: the rating of {item!r} is {value!r}, not a number")
    if scale is not None and not scale[0] <= number <= scale[1]:
        lo, hi = scale
        if lo == hi:  # implicit feedback: every interaction a positive, and a model that never read a dislike
            raise EvoloraError(
                f"history: the rating of {item!r} is {value!r}, and this run's data has no ratings (every "
                "interaction is a positive, implicit feedback): give the item ids alone"
            )
        span = f"at most {hi:g}" if lo == -math.inf else f"{lo:g} to {hi:g}"
        raise EvoloraError(
            f"history: the rating of {item!r} is {value!r}, outside the run's ratings, {span} (the lowest "
            "and highest in its data); give one on that scale, or the item id alone for a like"
        )
    return number


def history_entry(
    entry: Any, liked: float, scale: tuple[float, float] | None = None, labels: str | None = None
) -> tuple[str, float]:
    """One history entry: an item id (counted as liked) or an (item id, rating) pair."""
    if isinstance(entry, tuple | list):
        if len(entry) != 2:
            raise EvoloraError(f"history: {entry!r} is neither an item id nor an (item id, rating) pair")
        return str(entry[0]), rating_of(entry[1], entry[0], scale, labels)
    return str(entry), liked


def history_pairs(
    history: History, liked: float, scale: tuple[float, float] | None = None, labels: str | None = None
) -> list[tuple[str, float]]:
    """A history as (item id, rating) pairs, oldest first; ids given without a rating count as `liked`.
    Ratings given must lie in `scale` (the run's lowest and highest; None: any number), or be labels where
    the run's data has a label column (`labels`, its name; see `rating_of`)."""
    if history is None:
        return []
    if isinstance(history, str | bytes):
        raise EvoloraError(f"history: a list of item ids or (item, rating) pairs, not the string {history!r}")
    if isinstance(history, Mapping):
        return [(str(i), rating_of(r, i, scale, labels)) for i, r in history.items()]
    if isinstance(history, set | frozenset):
        raise EvoloraError("history: a list, oldest first, not a set (a set has no order; the order counts)")
    if not isinstance(history, Iterable):
        raise EvoloraError(f"history: a list of item ids or (item, rating) pairs, not {history!r}")
    return [history_entry(h, liked, scale, labels) for h in history]


def trained_stage(
    seed_dir: Path, results: dict[str, Any], stage: int | None, protocol: str, deployed: Iterable[int] = ()
) -> int:
    """The stage whose model a question to a run (its `results.json`) reads: `stage`, or its last trained
    one (with a warning when the run has not finished), checked to have a finished model. `deployed`: the
    versions an update trained on `stage`, named when the run itself has no model after it."""
    from evolora.continual.loop import is_trained

    trained = [s["train_stage"] for s in results["stages"]]
    t = stage if stage is not None else last_trained_stage(results)
    if t not in trained:
        raise ConfigError(no_model_after(seed_dir, t, results, protocol, deployed))
    if stage is None and not results.get("complete", True):
        log.warning("%s has not finished its stages: this is its model after stage %d", seed_dir, t)
    if not is_trained(seed_dir / f"stage-{t}"):
        # results.json records it, but its trained files are gone (a folder copied in part, or deleted)
        raise ConfigError(
            f"{seed_dir}: stage {t}'s trained model is missing or incomplete (stage-{t}/trained), though "
            f"results.json records the stage; rerun its experiment (`evolora run`) to train it again"
        )
    return t


def last_trained_stage(results: dict[str, Any]) -> int:
    """The last stage a run's `results.json` records as trained (0: none yet)."""
    return max((s["train_stage"] for s in results["stages"]), default=0)


def no_model_after(
    seed_dir: Path, t: int, results: dict[str, Any], protocol: str, deployed: Iterable[int] = ()
) -> str:
    """Why a run (its `results.json`) has no model after stage `t`, and what to ask for instead; `deployed`:
    the versions an update trained on stage `t`."""
    from evolora.data.samples import train_stages

    trained = [s["train_stage"] for s in results["stages"]]
    why = f"{seed_dir}: no model after stage {t}: the run trained stages {trained or 'none'}"
    if deployed := list(deployed):
        return (
            f"{why}; stage {t} was trained by an update: ask for its version {deployed} "
            + "(--version, version=)"
        )
    planned = train_stages(protocol, int(results.get("n_stages", 0)))
    if t in planned and not results.get("complete", True):
        return (
            f"{why} of {planned}: it has not finished (rerun its experiment to continue), or ask for a "
            "trained stage"
        )
    if trained and t == max(trained) + 1 and protocol == "next_stage":
        return f"{why} (next_stage only evaluates the last stage; its data trains the next update's model)"
    return why


def read_results(seed_dir: Path) -> dict[str, Any]:
    """A run's `results.json`; one that is damaged, or not a run's record (no method, seed or stages), raises
    `DamagedFileError` naming it."""
    path = Path(seed_dir) / "results.json"
    results = read_json(path, "Rerun its experiment: stage records rebuild it.")
    if not is_results_record(results):
        raise DamagedFileError(
            path, f"{path} is {NOT_A_RECORD}: rerun its experiment, whose stage records rebuild it"
        )
    return results


def _check_in_its_experiment(run: Path, own: dict[str, Any]) -> Path:
    """The experiment folder of the run folder `run` (absolute; a linked run folder is its link's place):
    a run is read with its experiment's config.yaml and inference bundle two levels up, so one copied out
    of it, or under another experiment, is refused (it read a wrong config.yaml, or answered from another
    experiment's data)."""
    run = Path(os.path.abspath(run))  # "." or "../seed0" given: the folder's own parents (links kept)
    root = run.parent.parent
    where = f"{own.get('method')}/seed{own.get('seed')}"
    if not (root / "config.yaml").is_file() or run.parent.name != own.get("method"):
        raise ConfigError(
            f"{run} is a run folder outside its experiment: a run is read with its experiment folder "
            f"(runs/<name>, holding config.yaml, with this run at {where}); copy or give the whole "
            "experiment folder"
        )
    marker = root / "experiment.json"  # (deleted, it is made again by the next run: nothing to compare)
    ran_on = (own.get("data_files") or {}).get("sha256")
    has = (read_json(marker).get("data_files") or {}).get("sha256") if marker.is_file() else None
    if ran_on and has and ran_on != has:
        raise ConfigError(
            f"{run} was not run by the experiment in {root}: it ran on other data (the experiment's data "
            f"files differ); give the experiment folder it came from, with this run at {where}"
        )
    return root


def locate_run(path: Path, method: str | None, seed: int | None) -> tuple[Path, Path]:
    """(the run's seed folder, the experiment folder) from either of them.

    `seed`: None means 0 in an experiment folder, and the folder's own in a run folder; a method or seed
    given with a run folder must be its own (a conflict is an error, not silently the folder's)."""
    if (path / "results.json").is_file():
        own = read_results(path)
        for what, given, has in [("method", method, own.get("method")), ("seed", seed, own.get("seed"))]:
            if given is not None and given != has:
                raise ConfigError(
                    f"{path} is the run of {own.get('method')!r} with seed {own.get('seed')}, not {what} "
                    f"{given!r}: give its experiment folder {path.parent.parent} to choose another"
                )
        return path, _check_in_its_experiment(path, own)
    seed = 0 if seed is None else seed
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"{path}: neither an experiment folder (config.yaml) nor a run folder (results.json)"
        )
    methods = sorted(p.name for p in path.iterdir() if (p / f"seed{seed}" / "results.json").is_file())
    if not methods:
        finished = sorted(
            {int(r.parent.name[4:]) for r in path.glob("*/seed*/results.json") if r.parent.name[4:].isdigit()}
        )
        raise ConfigError(
            f"{path}: no finished run with seed {seed} (--seed, or seed= in Python; "
            + (f"finished seeds: {finished})" if finished else "no run has finished yet)")
        )
    if method is None:
        if len(methods) != 1:
            raise ConfigError(
                f"{path}: choose a method (--method, or method= in Python) among the runs of seed {seed}: "
                f"{methods}"
            )
        method = methods[0]
    if method not in methods:
        raise ConfigError(f"{path}: no finished run of {method!r} with seed {seed} (there are: {methods})")
    return path / method / f"seed{seed}", path


def sample_shape(samples: pl.DataFrame) -> pl.DataFrame:
    """Sample rows whose columns hold what the tasks read: an item id per row, a list of item ids and a list
    of as many ratings (numbers) per row; ids given as numbers become their strings, as in queries."""
    for column in ("hist_items", "hist_ratings"):
        dtype = samples[column].dtype
        if not isinstance(dtype, pl.List):
            raise EvoloraError(f"predict_samples: `{column}` holds a list per row, not {dtype}")
    if samples["hist_ratings"].dtype == pl.List(pl.Null):  # every history empty (a batch of new users)
        samples = samples.with_columns(pl.col("hist_ratings").cast(pl.List(pl.Float64)))
    if not samples["hist_ratings"].dtype.inner.is_numeric():  # type: ignore[union-attr]
        raise EvoloraError(
            f"predict_samples: `hist_ratings` holds lists of numbers, not {samples['hist_ratings'].dtype}"
        )
    for column in ("item_id", "hist_items", "hist_ratings"):
        values = samples[column]
        nulls = values.is_null() if column == "item_id" else values.is_null() | values.list.contains(None)
        if nulls.any():
            row = int(nulls.arg_true()[0])
            raise EvoloraError(f"predict_samples: `{column}` of row {row} is or holds a missing value")
    ratings = samples["hist_ratings"].explode().drop_nulls().cast(pl.Float64)
    if not ratings.is_finite().all():
        bad = ratings.filter(~ratings.is_finite())[0]
        raise EvoloraError(f"predict_samples: `hist_ratings` holds {bad}, not a rating")
    uneven = samples["hist_items"].list.len() != samples["hist_ratings"].list.len()
    if uneven.any():
        row = int(uneven.arg_true()[0])
        raise EvoloraError(
            f"predict_samples: row {row} has {samples['hist_items'][row].len()} hist_items and "
            f"{samples['hist_ratings'][row].len()} hist_ratings: one rating per history item"
        )
    return samples.with_columns(pl.col("item_id").cast(pl.Utf8), pl.col("hist_items").cast(pl.List(pl.Utf8)))


def checked_samples(samples: pl.DataFrame, n_stages: int, space: IdSpace | None) -> pl.DataFrame:
    """`Recommender.predict_samples`'s rows, their shape checked (item ids and lists of them as text, ratings
    as numbers, one per history item), their stages checked (1..n_stages) and, for a model with user IDs
    (`space`), users it does not know made its cold user, as a query with a history and no user."""
    samples = sample_shape(samples)
    stages = samples["stage"]
    if not stages.dtype.is_integer():
        raise EvoloraError(f"predict_samples: `stage` holds whole numbers 1..{n_stages}, not {stages.dtype}")
    if stages.null_count():
        raise EvoloraError(f"predict_samples: `stage` has {stages.null_count()} missing values")
    outside = sorted(set(stages.filter((stages < 1) | (stages > n_stages)).to_list()))
    if outside:
        raise EvoloraError(
            f"predict_samples: stage {outside[0]} is not one of the run's stages 1..{n_stages}"
        )
    if space is None:
        return samples
    index = space.user_index()
    samples = samples.with_columns(known_forms(pl.col("user_id").cast(pl.Utf8), index).alias("user_id"))
    users = pl.col("user_id")
    known = samples.select(users.is_in(list(index)))["user_id"]
    if known.all():
        return samples
    log.info("predict_samples: %d rows of users the run does not know, scored as new users", (~known).sum())
    return samples.with_columns(pl.when(known).then(users).otherwise(pl.lit("")).alias("user_id"))
