"""The items an update brings: their records (`--items`), and semantic IDs for an LLM next-item run; and
new ids that are the run's own written another way (a batch exported with numbers for text ids).

A run's IDs are fixed at stage 1 as a deployed tokenizer would be, and its model has token rows only for the
codes its items use. The items of an update's batch that the parent version cannot name are encoded by the
run's own RQ-VAE (`tasks.semantic.add_new_items`), within those codes, and the grown IDs are written to the
update's work folder, which the candidate is built from and its version's bundle copies; the experiment's
cache and earlier versions' bundles are never changed. Rows of items that still have no ID are dropped and
counted with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from evolora.bundle import bundle_dir
from evolora.config import RunConfig
from evolora.data.ids import id_form
from evolora.data.schema import INTERACTION_SCHEMA, InteractionData
from evolora.deploy.versions import Version
from evolora.errors import DataError
from evolora.experiment import own_caches
from evolora.io import atomic_write_bytes, atomic_write_json, read_json
from evolora.models.semantic_ids import SemanticIds
from evolora.tasks.semantic import add_new_items, quantizer_path, semantic_ids_path_by_settings

log = logging.getLogger("evolora")


def parent_semantic_ids(cfg: RunConfig, root: Path, parent: Version, items: pl.DataFrame) -> Path:
    """The semantic IDs the parent version was built with: those its bundle names (version 0's bundle is
    the run's; where a run has none, those its experiment was built from)."""
    data = InteractionData("ids", pl.DataFrame(schema=INTERACTION_SCHEMA), items)
    bundle = bundle_dir(root if parent.parent is None else (root / parent.folder).parent)
    meta = read_json(bundle / "bundle.json") if (bundle / "bundle.json").is_file() else {}
    if "semantic_ids" in meta.get("caches", {}):
        inside = Path(meta["caches"]["semantic_ids"])
    else:  # an older evolora's bundle, named by the settings' key
        inside = "_shared" / semantic_ids_path_by_settings(cfg, data).relative_to(cfg.shared_root)
    own = own_caches(root, cfg, data).get("semantic_ids") if parent.parent is None else None
    for path in [bundle / inside, *([own] if own is not None else [])]:
        if path.is_file():
            return path
    raise DataError(
        f"the semantic IDs of version {parent.id} are missing ({bundle / inside}); "
        f"rerun the experiment (evolora run) to rebuild them"
    )


def name_new_items(
    cfg: RunConfig,
    parent_ids: Path,
    items: pl.DataFrame,
    accepted: pl.DataFrame,
    report: dict,
    pretrained: tuple[Any, Any],
) -> tuple[pl.DataFrame, Path]:
    """Give the batch's new items semantic IDs (`add_new_items`: the run's quantizer, the tokens the model
    knows) in `cfg`'s shared caches (the work folder's, its own: keyed by settings); rows of items still
    without one are dropped and counted. The IDs are written once: a resumed update keeps those it gave.
    Returns (the accepted rows kept, the IDs' file)."""
    data = InteractionData("items", pl.DataFrame(schema=INTERACTION_SCHEMA), items)
    ids = semantic_ids_path_by_settings(cfg, data)
    record = ids.with_name(f"{ids.stem}.new-items.json")
    if not ids.is_file():
        sids = SemanticIds.load(parent_ids)
        quantizer = quantizer_path(parent_ids)
        if quantizer.is_file():  # for the next update, through this version's bundle
            ids.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(quantizer_path(ids), quantizer.read_bytes())
        named = add_new_items(cfg, sids, quantizer, data, accepted["item_id"].to_list(), pretrained)
        atomic_write_json(record, {"added": named.added, "unnamed": named.unnamed})
        named.sids.save(ids)  # last: its file says the IDs are complete
    sids = SemanticIds.load(ids)
    given = read_json(record, "Delete the update's work folder and rerun it.")
    if given["added"]:
        log.info("semantic IDs for %d new items", len(given["added"]))
        report["new items named"] = len(given["added"])
    unknown = ~accepted["item_id"].is_in(list(sids.item_ids))
    if unknown.any():
        missing = accepted.filter(unknown)["item_id"]
        for why, group in given["unnamed"].items():
            n = int(missing.is_in(group).sum())
            if n:
                report["dropped"][f"items without a semantic ID: {why}"] = n
        report["accepted"] = int((~unknown).sum())
    if unknown.all():
        raise DataError(
            "nothing new to learn from: no item of the batch has a semantic ID ("
            + "; ".join(given["unnamed"])
            + ")"
        )
    return accepted.filter(~unknown), ids


#: lookalikes fewer than this are said, never refused: one new "John" beside a "john" may be another person
MIN_LOOKALIKES_REFUSED = 5


def refuse_ids_written_otherwise(
    data_file: Path, accepted: pl.DataFrame, existing: pl.DataFrame, take_as_new: bool = False
) -> None:
    """A batch whose new users or items are mostly the run's own under another spelling ('1' for '001', 7
    for '7.0', 'b00x' for 'B00X'): an export that wrote the ids otherwise. Taken as new, the update learns
    from nobody's history and the run holds every item twice; so at least half such ids (and at least
    `MIN_LOOKALIKES_REFUSED`) is an error unless `take_as_new` (`update.lookalike_ids: new`), and fewer a
    warning naming them."""
    for column, what in (("item_id", "item"), ("user_id", "user")):
        known = existing.select(pl.col(column).unique())
        new = accepted.select(pl.col(column).unique()).join(known, on=column, how="anti")
        if new.height == 0:
            continue
        forms = known.select(pl.col(column).alias("run_id"), id_form(pl.col(column)).alias("form"))
        alike = (
            new.with_columns(form=id_form(pl.col(column)))
            .join(forms.unique("form", keep="first"), on="form")
            .sort(column)
        )
        if alike.height == 0:
            continue
        shown = ", ".join(f"{n!r} for {k!r}" for n, k in alike.select(column, "run_id").head(3).iter_rows())
        said = (
            f"{data_file}: {alike.height} of the batch's {new.height} new {what} ids are the run's written "
            f"another way ({shown}{', ...' if alike.height > 3 else ''}: leading zeros, numbers for text, "
            "another case or accent form)"
        )
        if 2 * alike.height >= new.height and alike.height >= MIN_LOOKALIKES_REFUSED and not take_as_new:
            raise DataError(
                f"{said}; write them as the run's data does (or, if they are other {what}s, "
                "--set update.lookalike_ids=new)"
            )
        log.warning("%s; taken as new, as they differ", said)


class WithoutRecordCount(logging.Filter):
    """Drops the table loader's count of a batch's items without a record in `--items` (or the run's own
    `data.meta`): the items the run knows are among them and keep their own records; `note_new_records`
    counts the new items without one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "have no record here" not in record.getMessage()


def note_records_of_known_items(given: pl.DataFrame, items: pl.DataFrame, source: str) -> None:
    """Say which records (`given`, as the batch's loader read them from `source`: `--items FILE`, or the
    batch's own rows where the run's items come from its rows) of items the run knows differ
    from the run's own (`items`): they are not read, as a known item keeps the record its versions were
    trained with, and a corrected title would otherwise be dropped without a word. Records equal to the
    run's (a whole catalogue sent again) and the loader's bare ones (titled by their id) say nothing."""
    # (fields of one type only: a column the loader typed otherwise this time is not a corrected record)
    fields = [
        c
        for c in given.columns
        if c in items.columns and c != "item_id" and given.schema[c] == items.schema[c]
    ]
    if not fields:
        return
    run = items.select("item_id", *(pl.col(c).alias(f"{c}_run") for c in fields))
    both = given.select("item_id", *fields).join(run, on="item_id")
    if "title" in fields:
        both = both.filter(pl.col("title") != pl.col("item_id"))
    differ = both.filter(pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_run")) for c in fields))
    if differ.height:
        first = differ.row(0, named=True)
        field = next(c for c in fields if first[c] != first[f"{c}_run"])
        n = differ.height
        log.warning(
            "%s: the records of %d item%s the run knows differ from the run's (e.g. %r: %s %r here, "
            "%r in the run) and are not read: an item keeps the record its versions were trained with",
            source, n, "s" if n > 1 else "", first["item_id"], field, first[field], first[f"{field}_run"],
        )  # fmt: skip


def note_new_records(
    items: pl.DataFrame, known: pl.Series, accepted: pl.DataFrame, items_file: Path | None, llm: bool
) -> None:
    """Log how many of the batch's new items have a record (from `--items`, or the batch's own columns);
    a bare one is titled by its id, which is all an LLM reads of it (`llm`), so that is a warning there."""
    arrived = items.filter(
        ~pl.col("item_id").is_in(known.implode()) & pl.col("item_id").is_in(accepted["item_id"].implode())
    )
    bare = arrived.filter(pl.col("title") == pl.col("item_id")).height if "title" in arrived.columns else 0
    if items_file is not None:
        log.info(
            "--items %s: records of %d of the batch's %d new items",
            items_file,
            arrived.height - bare,
            arrived.height,
        )
    if not bare:
        return
    where = f"in {items_file}" if items_file is not None else "(--items FILE gives the new items' records)"
    said = f"{bare} of the batch's {arrived.height} new items have no record {where}: called by their id"
    if llm:  # the model reads an item by its text: an id tells it nothing (and names a semantic ID badly)
        log.warning("%s, the only text the model reads of them", said)
    else:
        log.info(said)
