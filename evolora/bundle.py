"""What inference needs from a run, saved beside it, so a trained model is used without its training data.

    runs/<name>/inference/
        bundle.json          dataset name, like threshold, stages, the history a sample keeps
        items.parquet        the item table (ids, titles, text fields, semantic IDs where the data has them)
        histories.parquet    every user's latest interactions at the end of each stage (stage, user_id,
                             items, ratings), and every item they rated up to it (seen): what "recommend
                             for user U" reads
        id_space.json        user and item indices (conventional models, RecLoRA's router)
        _shared/             the cached semantic IDs (with their quantizer) and item embeddings the run was
                             built from, as `RunConfig.shared_root` lays them out; bundle.json names them
                             (`caches`), and the task builders read them from there

A prompt template file the run read (`task.template: my.txt`) is kept beside them, as
`runs/<name>/template.txt` (`keep_template`): `run_config` reads the experiment's config with it, so
inference, exports and updates use the text the run trained with, wherever the file went or however it was
edited since.

`write_bundle` runs once per experiment, after the data is prepared and the model built (the caches exist
then); `load_bundle` gives back the config and a `Prepared` that the task registry's builders accept.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import polars as pl

from evolora.config import RunConfig, load_config
from evolora.data.ids import IdSpace
from evolora.data.prepare import Prepared
from evolora.data.samples import SampleTable
from evolora.data.schema import INTERACTION_SCHEMA, InteractionData
from evolora.errors import EvoloraError
from evolora.io import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_table,
)
from evolora.overrides import as_overrides
from evolora.tasks.semantic import caches_by_settings, quantizer_path

BUNDLE = "inference"
TEMPLATE_COPY = "template.txt"  # in the experiment folder: the text of the template file the run read
log = logging.getLogger("evolora")


def _reads_a_template_file(cfg: RunConfig) -> bool:
    """Whether `task.template` names a file (not a built-in template; some tasks have none)."""
    spec = getattr(cfg.task, "template", None)
    return spec is not None and spec not in getattr(cfg.task, "builtin_templates", ())


def keep_template(root: Path, cfg: RunConfig, text: str | None) -> None:
    """Keep `text`, the template file's text the run's task read, in the experiment folder (a built-in
    template keeps none: a copy an earlier setting left is removed)."""
    copy = Path(root) / TEMPLATE_COPY
    if text is None or not _reads_a_template_file(cfg):
        copy.unlink(missing_ok=True)
    elif not copy.is_file() or copy.read_text(encoding="utf-8") != text:
        atomic_write_text(copy, text)


def run_config(root: Path, overrides: list[str] | None = None) -> RunConfig:
    """The experiment's `config.yaml` (with `overrides`), its template file read from the run's own copy
    where it kept one: the file itself may have been edited, moved or left on another machine since."""
    copy = Path(root) / TEMPLATE_COPY
    own = as_overrides({"task.template": copy.resolve()}) if copy.is_file() else []
    return load_config(Path(root) / "config.yaml", [*own, *(overrides or [])])


def check_template(root: Path, task: Any) -> None:
    """Refuse a prompt template whose text is not the one the experiment recorded (a run of an evolora
    before `template.txt`, whose file was edited since): its models were trained on the old text."""
    text = getattr(task, "template", None)
    marker = Path(root) / "experiment.json"
    recorded = read_json(marker).get("template_sha256") if marker.is_file() else None
    if text is None or recorded is None or hashlib.sha256(text.encode("utf-8")).hexdigest() == recorded:
        return
    raise EvoloraError(
        f"{root}: the prompt template (task.template) changed since the experiment ran: its models were "
        "trained with the old text; put the file back as it was"
    )


def bundle_dir(root: Path) -> Path:
    return Path(root) / BUNDLE


def user_histories(staged: pl.DataFrame, n_stages: int, keep: int) -> pl.DataFrame:
    """Per stage t and user: the user's latest `keep` interactions of stages <= t, oldest first, and
    `seen`, every item they rated in stages <= t (what a recommendation leaves out)."""
    ordered = staged.with_row_index("_row").sort(["user_id", "timestamp", "_row"])
    parts = []
    for t in range(1, n_stages + 1):
        parts.append(
            ordered.filter(pl.col("stage") <= t)
            .group_by("user_id", maintain_order=True)
            .agg(
                items=pl.col("item_id").tail(keep),
                ratings=pl.col("rating").tail(keep),
                seen=pl.col("item_id").unique(maintain_order=True),
            )
            .with_columns(stage=pl.lit(t, dtype=pl.Int32))
        )
    return pl.concat(parts).select("stage", "user_id", "items", "ratings", "seen")


def _write_parquet(path: Path, df: pl.DataFrame) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


def bundle_is_current(
    folder: Path,
    key: str | None,
    history_len: int,
    data_sha256: str | None = None,
    caches: dict[str, str] | None = None,
) -> bool:
    """Whether the bundle in `folder` was made for the experiment of settings `key` (None: any), whose samples
    keep `history_len` items, from the data files of digest `data_sha256` (None: any), with the cache files
    `caches` (as bundle.json names them; None: any). An experiment whose first attempt failed takes new
    settings, or data changed before any stage ran, or item caches built anew, and the bundle that attempt
    wrote is stale; a bundle of an older evolora has no key: its history length decides, and one older
    still lacks the items each user rated (`seen`)."""
    if not (folder / "bundle.json").is_file():
        return False
    meta = read_json(folder / "bundle.json", "Delete the inference folder: it is rebuilt from the data.")
    made_from = meta.get("data_sha256")
    if data_sha256 is not None and made_from is not None and made_from != data_sha256:
        return False
    if caches is not None and meta.get("caches") != caches:
        return False
    made_for = meta.get("context_key")
    if made_for is not None:
        return key is None or made_for == key
    # Older still: without `seen` a recommendation leaves out only the history it shows.
    histories = folder / "histories.parquet"
    try:
        seen = "seen" in pl.read_parquet_schema(histories)
    except (OSError, pl.exceptions.PolarsError):  # gone or damaged: made again
        return False
    return seen and meta.get("history_len") == history_len


def _bundled(cfg: RunConfig, kind: str, path: Path) -> Path:
    """Where a cache file goes in a bundle: where `cfg.shared_root` has it (one from elsewhere: by kind)."""
    shared = path.relative_to(cfg.shared_root) if path.is_relative_to(cfg.shared_root) else None
    return Path("_shared") / (shared or Path(kind) / path.name)


def write_bundle(
    root: Path, cfg: RunConfig, prepared: Prepared, key: str | None = None, data_sha256: str | None = None
) -> Path:
    """Save what inference needs (once: an existing bundle made for this experiment's settings `key` from
    the data of digest `data_sha256`, with the cache files the task was built from, is kept; one made for
    others is replaced)."""
    folder = bundle_dir(root)
    inside = {kind: _bundled(cfg, kind, path) for kind, path in prepared.caches.items() if path.is_file()}
    caches = {kind: where.as_posix() for kind, where in inside.items()}
    if bundle_is_current(folder, key, prepared.table.history_len, data_sha256, caches):
        return folder
    if (folder / "bundle.json").is_file():
        log.info(
            "%s was made for other settings, data or item caches of this experiment: written anew", folder
        )
    if prepared.staged is None:
        raise ValueError("a bundle is written from a run's prepared data")
    table = prepared.table
    with atomic_directory(folder) as out:
        _write_parquet(out / "items.parquet", prepared.data.items)
        _write_parquet(
            out / "histories.parquet", user_histories(prepared.staged, table.n_stages, table.history_len)
        )
        atomic_write_json(out / "id_space.json", prepared.id_space().to_json())
        for kind, where in inside.items():
            source = prepared.caches[kind]
            beside = [quantizer_path(source)] if kind == "semantic_ids" else []  # an update's encoder
            for path, target in [(source, out / where), *[(q, out / where.parent / q.name) for q in beside]]:
                if path.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
        atomic_write_json(
            out / "bundle.json",
            {
                "dataset": prepared.data.name,
                "like_threshold": prepared.data.like_threshold,
                "ratings": rating_range(prepared.data.interactions["rating"], cfg.data.min_rating),
                "n_stages": table.n_stages,
                "history_len": table.history_len,
                **({"context_key": key} if key is not None else {}),
                **({"data_sha256": data_sha256} if data_sha256 is not None else {}),
                "caches": caches,
            },
        )
    return folder


def rating_range(ratings: pl.Series, min_rating: float | None) -> list[float | None] | None:
    """[lowest, highest] rating of the run's data: the scale a query's ratings are checked against. Where
    `data.min_rating` left the rows below it out, their ratings are still on the scale: no lowest (None).
    None for data without ratings."""
    given = ratings.drop_nulls()
    if given.is_empty():
        return None
    return [None if min_rating is not None else float(given.min()), float(given.max())]


def bundled_rating_range(root: Path) -> tuple[float, float] | None:
    """The bundle's `rating_range` (lowest -inf where none), None where a bundle of an earlier evolora
    recorded none."""
    recorded = read_json(bundle_dir(root) / "bundle.json").get("ratings")
    if not recorded:
        return None
    low, high = recorded
    return (-math.inf if low is None else float(low), float(high))


def load_bundle(root: Path, cfg: RunConfig) -> tuple[RunConfig, Prepared, pl.DataFrame]:
    """(the config with its shared caches read from the bundle, a `Prepared` without training data, the
    users' histories)."""
    folder = bundle_dir(root)
    advice = "Delete the inference folder and load the run again: it is rebuilt from the data."
    if not (folder / "bundle.json").is_file():  # a run's own is rebuilt before this: a version's was deleted
        raise EvoloraError(
            f"{folder} is missing: what this version needs for inference (the data up to it) was deleted. "
            "Load another version, or promote one with `evolora rollback RUN N` (`evolora versions` lists "
            "them)"
        )
    meta = read_json(folder / "bundle.json", advice)
    items = read_table(folder / "items.parquet", advice)
    empty = pl.DataFrame(schema=INTERACTION_SCHEMA)
    data = InteractionData(meta["dataset"], empty, items, like_threshold=float(meta["like_threshold"]))
    table = SampleTable(query_frame([]), meta["n_stages"], meta["history_len"], data.like_threshold)
    space = IdSpace.from_json(read_json(folder / "id_space.json", advice))
    inference_cfg = cfg.model_copy(update={"output_dir": str(folder)})
    if "caches" in meta:
        caches = {kind: folder / inside for kind, inside in meta["caches"].items()}
    else:  # an older evolora's bundle: its copies are named by the settings' key
        caches = caches_by_settings(inference_cfg, data)
    return (
        inference_cfg,
        Prepared(data, None, table, {}, space, caches),
        read_table(folder / "histories.parquet", advice),
    )


def query_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Sample rows (user, target item, history, stage) shaped like a run's sample table, for inference."""
    schema = {
        "user_id": pl.Utf8,
        "item_id": pl.Utf8,
        "rating": pl.Float64,
        "label": pl.Int8,
        "timestamp": pl.Int64,
        "stage": pl.Int32,
        "hist_items": pl.List(pl.Utf8),
        "hist_ratings": pl.List(pl.Float64),
        "user_kind": pl.Utf8,
        "sampled": pl.Boolean,
    }
    if rows and "rated" in rows[0]:  # every item a query's user rated, which `exclude_history: rated` reads
        schema["rated"] = pl.List(pl.Utf8)
    return pl.DataFrame([{**QUERY_DEFAULTS, **r} for r in rows], schema=schema)


#: what a query's sample row holds besides its user, target, history and stage (no label: it is asked)
QUERY_DEFAULTS: dict[str, Any] = {
    "rating": 0.0,
    "label": 0,
    "timestamp": 0,
    "user_kind": "active",
    "sampled": False,
}
