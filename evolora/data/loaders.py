"""`load_dataset`: load `DataConfig.source` in its format, then apply the filters.

The formats live in `evolora.data.formats` (one module per family, registered in `FORMATS`); this module
picks one (`data.format`, or `detect_format`) and applies the like threshold, `min_rating`,
`max_interactions` and the k-core. The `load_*` readers of each format are exported by `evolora.data`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import polars as pl

from evolora.config import DataConfig
from evolora.data.fetch import fetch, registered_datasets
from evolora.data.filters import kcore, keep_recent, min_rating
from evolora.data.formats import FORMATS, Format
from evolora.data.schema import InteractionData
from evolora.errors import DataError

log = logging.getLogger("evolora.data")


def names_a_dataset(source: str) -> bool:
    """Whether `data.source` names a registered dataset (fetched into the cache, its files checksum-pinned)
    rather than a path: it is no existing path (an unknown name is an error when it is loaded)."""
    return not Path(source).expanduser().exists()


def load_dataset(cfg: DataConfig) -> InteractionData:
    """Load `cfg.source` (a registered name, fetched and cached, or a path), then apply the like threshold,
    `min_rating`, `max_interactions` (most recent N) and the k-core, in that order."""
    path = Path(cfg.source).expanduser()
    name = None
    if names_a_dataset(cfg.source):
        if cfg.source not in registered_datasets():
            raise DataError(
                f"data.source: {cfg.source!r} is neither an existing path nor a registered dataset "
                f"({', '.join(registered_datasets())})"
            )
        name, path = cfg.source, fetch(cfg.source)
    # A fetched folder holds whichever files its route brought (GroupLens or RecBole), so always detect.
    try:
        fmt = detect_format(path, cfg.meta) if name or cfg.format == "auto" else cfg.format
    except DataError as e:
        if name is None and cfg.source in registered_datasets():  # the path shadows the dataset
            raise DataError(
                f"{e} (the path {cfg.source} here is read, not the registered dataset of that name: move it, "
                "or run from another folder)"
            ) from None
        raise
    spec = FORMATS[fmt]
    if cfg.meta is not None and not spec.reads_meta:
        log.warning("data.meta (%s) is not read: %s data takes its items from its own files", cfg.meta, fmt)
    data = spec.load(*spec.resolve(path, cfg.meta), **(spec.options(cfg) if spec.options else {}))
    if name:
        data = replace(data, name=name)
    if cfg.like_threshold is not None:
        data = replace(data, like_threshold=cfg.like_threshold)
    if cfg.min_rating is not None:
        if data.implicit:
            raise DataError(
                f"{data.source}: data.min_rating keeps interactions by their rating, and this data has none "
                "(implicit feedback: every row is a positive)"
            )
        threshold = cfg.min_rating
        data = _filtered(
            data,
            lambda df: min_rating(df, threshold),
            f"data.min_rating {threshold:g}: kept {{kept}} of {data.interactions.height}",
        )
        if data.interactions.height == 0:
            raise DataError(f"{data.source}: no interaction is rated >= data.min_rating {threshold:g}")
    if cfg.max_interactions is not None and data.interactions.height > cfg.max_interactions:
        n = cfg.max_interactions
        data = _filtered(
            data,
            lambda df: keep_recent(df, n),
            f"kept the most recent {n} of {data.interactions.height} interactions",
        )
    if cfg.kcore.user > 1 or cfg.kcore.item > 1:
        before = data.interactions.height
        data = _filtered(
            data,
            lambda df: kcore(df, cfg.kcore.user, cfg.kcore.item),
            f"k-core users>={cfg.kcore.user} items>={cfg.kcore.item}: kept {{kept}} of {before}",
        )
        if data.interactions.height == 0:
            raise DataError(
                f"{data.source}: the k-core (users >= {cfg.kcore.user}, items >= {cfg.kcore.item}) removes "
                "every interaction; lower data.kcore"
            )
    log.info(
        "%s: %d interactions, %d users, %d items",
        data.name,
        data.interactions.height,
        data.n_users,
        data.n_items,
    )
    return data.validate()


def detect_format(path: str | Path, meta: str | None = None) -> Format:
    """Guess the format of a file or folder from file names (and, for Amazon, the first record's fields).
    `meta` is `data.meta`, which settles an Amazon folder holding several metadata files."""
    path = Path(path)
    for fmt, spec in FORMATS.items():
        if spec.detect(path, meta):
            return cast(Format, fmt)
    expected = list(dict.fromkeys(spec.expects for spec in FORMATS.values()))
    expected_text = ", ".join(expected[:-1]) + f" or {expected[-1]}"
    if path.is_dir():
        raise DataError(f"{path}: no data files found; expected {expected_text}")
    raise DataError(
        f"{path}: cannot guess the format from the file name; expected {expected_text}. Set data.format"
    )


def _filtered(data: InteractionData, keep: Any, note: str) -> InteractionData:
    """Apply a row filter (`keep(df) -> df`, dropping rows but never reordering them) to the interactions,
    carrying the preset stages along in a temporary column so they stay aligned."""
    df = data.interactions
    if data.preset_stages is not None:
        df = df.with_columns(_preset=pl.Series(data.preset_stages, dtype=pl.Int32))
    out = keep(df)
    preset = out["_preset"].to_numpy() if "_preset" in out.columns else None
    return data.with_interactions(out.drop("_preset", strict=False), note.format(kept=out.height), preset)
