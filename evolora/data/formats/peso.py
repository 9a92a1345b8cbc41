"""PESO's pre-blocked release (Yoo et al., ICLR'26; spec §1.2): per-block JSON files of each user's items,
and optionally a semantic-ID index. See `load_peso_blocks`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from evolora.data.build import absolute
from evolora.data.readers import names_in
from evolora.data.schema import InteractionData
from evolora.errors import DataError
from evolora.io import read_json

log = logging.getLogger("evolora.data")

BLOCK_FILE = re.compile(r"^(?P<key>.+)\.all\.block_(?P<block>\d+)\.json$")
# Synthetic time: block b, position p (counted over the whole block in file order) -> b * 10**9 + p.
BLOCK_SPAN = 10**9


def load_peso_blocks(folder: str | Path, key: str | None = None) -> InteractionData:
    """PESO's pre-blocked release (Yoo et al., ICLR'26; spec §1.2): `<key>.all.block_<b>.json` for b = 0..T-1,
    each `{user: {"previous_block": [items], "current_block": [items]}}`, and optionally the semantic-ID index
    `<key>.index.*.json` (`{item: ["<a_51>", "<b_218>", ...]}`).

    `folder` may also be one of the block files (which names the key). `key` picks a dataset when the folder
    holds several.

    * Interactions come from the `current_block` lists only; each `previous_block` must equal the user's
      earlier `current_block`s joined (the release satisfies this; anything else is another format).
    * The release has neither ratings nor times. Every interaction is implicit feedback (`implicit`):
      rating 5.0 and `like_threshold` 0.0, so every interaction is a like, and a task that reads labels
      (CTR) gets sampled negatives (`data.negatives`), as for a table without ratings. Timestamps are
      synthetic, `block * 10**9 + position in the block`, so they keep block order and each user's order.
    * `preset_stages` = block + 1 (`staging.scheme: preset` uses them).
    * Items: `title` "item <id>" (there are no titles), `sid` = the index tokens joined. Items in the index
      that nobody interacted with stay in the table: they are valid decoding targets.
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        m = BLOCK_FILE.match(folder.name)
        if not m:
            raise DataError(f"{folder}: not a PESO block file (<key>.all.block_<n>.json)")
        folder, key = folder.parent, key or m["key"]
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, dict[int, Path]] = {}
    for p in folder.iterdir():
        if m := BLOCK_FILE.match(p.name):
            found.setdefault(m["key"], {})[int(m["block"])] = p
    if key is None:
        if len(found) != 1:
            what = "no PESO block files (<key>.all.block_<n>.json)" if not found else "several PESO datasets"
            raise DataError(
                f"{folder}: {what}; keys found: {sorted(found)}. Point data.source at one block file"
            )
        key = next(iter(found))
    if key not in found:
        raise DataError(f"{folder}: no block files for key {key!r}; keys found: {sorted(found)}")
    blocks = found[key]
    missing = sorted(set(range(max(blocks) + 1)) - set(blocks))
    if missing:
        raise DataError(f"{folder}: {key}.all.block_{missing[0]}.json is missing (blocks must run 0..T-1)")

    users: list[str] = []
    items: list[str] = []
    stages: list[int] = []
    timestamps: list[int] = []
    history: dict[str, list[str]] = {}
    for b in range(len(blocks)):
        path = blocks[b]
        position = 0
        for user, prev, curr in _peso_block_records(path):
            earlier = history.setdefault(user, [])
            if prev != earlier:
                common = min(len(prev), len(earlier))
                i = next((i for i in range(common) if prev[i] != earlier[i]), common)
                raise DataError(
                    f"{path}: user {user!r}: previous_block ({len(prev)} items) is not the user's earlier "
                    f"current_blocks joined ({len(earlier)} items); they differ at position {i}. Not PESO's "
                    "pre-blocked format"
                )
            earlier.extend(curr)
            n = len(curr)
            users += [user] * n
            items += curr
            stages += [b + 1] * n
            timestamps += range(b * BLOCK_SPAN + position, b * BLOCK_SPAN + position + n)
            position += n
        if position >= BLOCK_SPAN:
            raise DataError(f"{path}: more than {BLOCK_SPAN} interactions in one block")
    inter = pl.DataFrame(
        {"user_id": users, "item_id": items, "rating": [5.0] * len(users), "timestamp": timestamps},
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "rating": pl.Float64, "timestamp": pl.Int64},
    )
    _say_repeats(inter, blocks, stages)

    table = pl.DataFrame({"item_id": inter["item_id"].unique(maintain_order=True)})
    indexes = sorted(
        p for p in folder.iterdir() if p.name.startswith(f"{key}.index.") and p.suffix == ".json"
    )
    if len(indexes) > 1:
        raise DataError(f"{folder}: several semantic-ID indexes for {key}: {[p.name for p in indexes]}")
    if indexes:
        sids = _peso_index(indexes[0])
        # Index order first (it holds every item), then interacted items the index lacks.
        table = pl.concat([sids.select("item_id"), table.join(sids, on="item_id", how="anti")])
        table = table.join(sids, on="item_id", how="left", maintain_order="left")
        unindexed = inter.join(sids, on="item_id", how="anti")["item_id"].n_unique()
        if unindexed:
            log.warning("%s: %d interacted items have no semantic ID", indexes[0], unindexed)
    else:
        log.info("%s: no semantic-ID index (%s.index.*.json); items get no sid", folder, key)
    log.info("%s: PESO blocks carry no item titles; items are called 'item <id>'", folder)
    table = table.with_columns(title=pl.lit("item ") + pl.col("item_id")).select(
        "item_id", "title", *(["sid"] if indexes else [])
    )
    data = InteractionData(
        name=key,
        interactions=inter,
        items=table,
        like_threshold=0.0,
        implicit=True,
        source=str(folder),
        preset_stages=np.asarray(stages, dtype=np.int32),
        synthetic_time=True,
        files=absolute(*(blocks[b] for b in range(len(blocks))), *indexes),
    )
    return data.validate()


def _say_repeats(inter: pl.DataFrame, blocks: dict[int, Path], stages: list[int]) -> None:
    """A user's item listed again (in a later block or the same one) is kept, as the other formats keep a
    rating at another time, and said: the later one's history then holds the earlier. Row i comes from
    block file `blocks[stages[i] - 1]`."""
    again = inter.select(pl.len().over("user_id", "item_id") > 1).to_series()
    if again.any():
        i = int(again.arg_max())  # type: ignore[arg-type]
        log.warning(
            "%s: %d (user, item) pairs occur more than once (%d interactions, first: user %r, item %r); all "
            "are kept: a later one's history holds the earlier",
            blocks[stages[i] - 1],
            inter.filter(again).select("user_id", "item_id").n_unique(),
            int(again.sum()),
            *(inter["user_id"][i], inter["item_id"][i]),
        )


def _peso_block_records(path: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """(user, previous_block, current_block) per user, in file order, with ids as strings."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json.load keeps the last of repeated keys: a user given twice would lose a block of interactions.
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DataError(
                    f"{path}: {key!r} appears twice in one JSON object (each user, each field once)"
                )
            out[key] = value
        return out

    try:
        with open(path, "rb") as f:
            raw = json.load(f, object_pairs_hook=unique)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the JSON file ({e})"[:400]) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object of users, found {type(raw).__name__}")
    for user, record in raw.items():
        if not user.strip():
            raise DataError(f"{path}: an empty user id")
        lists = []
        for field in ("previous_block", "current_block"):
            value = record.get(field) if isinstance(record, dict) else None
            ids = value if isinstance(value, list) else [None]
            # JSON true/false are not ids (Python would take them for ints); nor is empty text
            if not all(isinstance(x, str | int) and not isinstance(x, bool) and str(x).strip() for x in ids):
                raise DataError(
                    f"{path}: user {user!r}: {field} should be a list of item ids, found {value!r}"[:300]
                )
            lists.append([str(x) for x in value])
        yield user, lists[0], lists[1]


def _peso_index(path: Path) -> pl.DataFrame:
    """`item_id`, `sid` from a PESO index file (`{item: ["<a_51>", "<b_218>", ...]}`)."""
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the JSON file ({e})"[:400]) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object of items, found {type(raw).__name__}")
    for item, tokens in raw.items():
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise DataError(
                f"{path}: item {item!r}: expected a list of token strings, found {tokens!r}"[:300]
            )
    return pl.DataFrame(
        {"item_id": list(raw), "sid": ["".join(t) for t in raw.values()]},
        schema={"item_id": pl.Utf8, "sid": pl.Utf8},
    )


# ------------------------------------------------------------------------------------------ registry hooks


def detect(path: Path, meta: str | None) -> bool:
    """Block files (a folder without its block 0 is still PESO's: the loader then names what is missing)."""
    return any(BLOCK_FILE.match(n) for n in names_in(path))


def resolve(path: Path, meta: str | None) -> tuple[Path]:
    return (path,)
