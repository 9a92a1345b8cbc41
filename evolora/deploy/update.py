"""`evolora update`: a new batch of interactions becomes the next stage of a deployed run, behind a gate.

1. The batch is read with the run's own loader and settings (any format it reads, the generic table too)
   and checked against everything the run has seen: rows older than the last stage's end and exact
   duplicates of seen rows are dropped and counted; bad values stop the update with the loader's error; a
   batch with nothing left is refused. Nothing changes until the update has finished.
2. The accepted rows become stage T+1 after the promoted version's stage T (the run's data, plus the rows
   of the versions it was built from, staged as they were). The chronological tail of the batch's samples
   (`update.holdout_fraction` of them) is held out for the gate; the rest of the stage is its train/valid
   pool (a `next_stage` run's first update: the stage it only evaluated, and the rest of the batch).
3. The promoted version is scored on the held-out samples, then the run's strategy trains stage T+1 from
   the promoted version's state (PESO anchors on it, LSAT trains a new short-term adapter, cumulative
   strategies bank it, RecLoRA continues its banks and router, conventional models grow their ID tables),
   and the candidate is scored on the same samples.
4. The gate promotes the candidate when its gain is at least `update.min_gain`; either way the candidate
   is kept as a new version with both figures and the decision. A batch is gated once: the same file
   sent again answers with its version, and update.* settings given then are reported as not applied
   (`evolora rollback` promotes any version).

Everything an update writes lives in its own work folder and is resumable (the stage machinery of
`continual/loop.py`); the version is recorded last, in one atomic write of versions.json, so `kill -9`
anywhere leaves the promoted version as it was, and rerunning the same command continues. One update of a
run at a time: a second is refused, naming the first. New items are learnt: a conventional model's ID tables
grow, and an LLM next-item run names them with its own quantizer in tokens it knows (`new_items.py`);
rows of items it cannot name are dropped and counted, with the reason.

Past ~400 lines: the steps above read in order here, with the checks of the batch and of the held-out
samples beside the flow they guard; what concerns the batch's new items is in `new_items.py`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from evolora import cost
from evolora.bundle import check_template, run_config, write_bundle
from evolora.config import RunConfig, StrategySpec, parse_override
from evolora.continual import Env, build_strategy, run_options
from evolora.continual.base import StageContext
from evolora.continual.loop import StageLoop
from evolora.data.digest import changed_files, data_digest, file_sha256
from evolora.data.fetch import MIRROR_ENV, copies_agree, registered_datasets
from evolora.data.loaders import load_dataset, names_a_dataset
from evolora.data.prepare import Prepared, prepare_staged
from evolora.data.samples import StagePools, draw
from evolora.data.schema import InteractionData
from evolora.data.staging import assign_stages
from evolora.data.times import SECONDS_PER_YEAR, day, fixed_unit_advice, settings_fixed
from evolora.deploy.new_items import (
    WithoutRecordCount,
    name_new_items,
    note_new_records,
    note_records_of_known_items,
    parent_semantic_ids,
    refuse_ids_written_otherwise,
)
from evolora.deploy.versions import Version, Versions, _now
from evolora.errors import ConfigError, DamagedFileError, DataError, EmptyStagesError
from evolora.eval.metrics import lower_is_better, metric_set
from evolora.experiment import (
    build_model_and_task,
    other_weights,
    resolve_config,
    trained_backbone,
    training_in_this_process,
    with_model_at,
)
from evolora.io import (
    atomic_write_bytes,
    atomic_write_json,
    load_npz,
    read_json,
    remove_stale_temporaries,
    save_npz,
)
from evolora.locks import exclusive
from evolora.models.conventional import is_conventional
from evolora.models.llm import set_threads
from evolora.models.precision import ON_A_GPU, check_machine
from evolora.queries import locate_run, number_of, read_results
from evolora.tasks.semantic import items_have_ids
from evolora.tracking import check_tracking, tracker_for

log = logging.getLogger("evolora")

_KEY = ["user_id", "item_id", "rating", "timestamp"]
_CLOCK_SLACK_S = 86_400  # a batch from a machine whose clock runs ahead, or from another time zone
# The settings one update may change: none changes a number the run produced (threads: how fast, where
# other work keeps cores busy; in floating point a sum's order may move the last bits, as between reruns).
_OVERRIDABLE = ("update", "tracking", "tracking_uri", "threads")
# Where the run's own data files are now (a run folder copied to another machine): their contents are checked
# against the sha256s the experiment recorded before any stage is rebuilt from them.
_DATA_PLACES = (("data", "source"), ("data", "meta"))
_MODEL_PLACE = ("model", "name")


@dataclass
class UpdateOutcome:
    version: Version
    promoted: bool
    already_applied: bool = False
    # update.* settings (and --items) given for a batch applied before: a batch is gated once, so they
    # changed nothing
    ignored: list[str] = field(default_factory=list)


def update_run(
    run_dir: str | Path,
    data_file: str | Path,
    method: str | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    items_file: str | Path | None = None,
) -> UpdateOutcome:
    """Train the next stage of a run's promoted version on `data_file` and gate it (see the module doc).

    `overrides`: `update.*` settings as `--set` takes them (`update.min_gain=0.0`), `tracking` and
    `tracking_uri` (where the gate is logged), `threads`, and where the run's inputs lie now (`data.source`,
    `data.meta`: their contents checked; `model.name`: the weights' fingerprint checked). `items_file`: the
    records (title, genre, ...) of the batch's new items, in the layout of the run's `data.meta` table, for a
    run that reads its item fields from one; the run's own files stay as they were (an experiment refuses
    changed data). Records of items the run knows are not read from it: a known item keeps its record.
    """
    # The gate's settings and where it is logged; whatever fixes the run's numbers stays as the run had it.
    parsed = [(s, *parse_override(s)) for s in overrides or []]  # (text, key, value)
    bad = [
        s for s, key, _ in parsed
        if key[0] not in _OVERRIDABLE and tuple(key[:2]) not in _DATA_PLACES and tuple(key) != _MODEL_PLACE
    ]  # fmt: skip
    if bad:
        raise ConfigError(
            f"{bad[0]}: an update takes update.* settings only, tracking or tracking_uri for where its "
            "gate is logged, threads, and data.source / data.meta / model.name where the run's own files "
            "are now (the run's other settings are fixed)"
        )
    # The base model elsewhere (`with_model_at`: refused for a conventional run, whose model.name names it)
    moved_model = [value for _, key, value in parsed if tuple(key) == _MODEL_PLACE]
    overrides = [s for s, key, _ in parsed if tuple(key) != _MODEL_PLACE]
    seed_dir, root = locate_run(Path(run_dir), method, number_of(seed, "seed"))  # seed="0" refused alike
    results = read_results(seed_dir)
    if results.get("complete") is False:  # still training, or stopped: its next stage is the run's own
        trained = [s["train_stage"] for s in results["stages"]]
        raise ConfigError(
            f"{seed_dir} has not finished its stages (trained: {trained or 'none'}): an update trains the "
            "stage after a run's last, so finish the run first (rerun `evolora run` on its config)"
        )
    cfg = resolve_config(run_config(root, [f"output_dir={root.parent}", *overrides]))
    cfg = with_model_at(cfg, str(moved_model[-1] or "") if moved_model else None)
    check_tracking(cfg)  # a store that cannot be opened stops the update before training
    metrics = metric_set(cfg.task.name)  # checked before any training, not at the gate
    # What this run's model scores (a conventional ranker has no nll, LSAT's next-item ensemble no nll_valid):
    # the figures its stages recorded. A reference (log_items: the size of the candidate set) is the same
    # for both versions.
    recorded = {k for s in results["stages"] for k in s.get("metrics", {})}
    names = [n for n in metrics.names if n not in metrics.references and n in recorded]
    if cfg.update.metric is not None and cfg.update.metric not in names:
        raise ConfigError(
            f"update.metric={cfg.update.metric!r}: the {cfg.task.name} task's gate can compare {names}"
        )
    check_machine(cfg.model.precision, cfg.model.quantization, cfg.model.device, ON_A_GPU)
    method = results["method"]
    registry = Versions.of_run(root, results)
    with (
        training_in_this_process(),  # the caller's threads and random state are put back after it
        exclusive(registry.folder / ".lock", f"updates of {method} (seed {results['seed']}) in {root}"),
    ):
        set_threads(cfg.threads)
        registry = Versions.of_run(root, results)  # as the lock holder left it
        # (`update={min_gain: 5}` names its keys in the mapping)
        given = {
            name
            for _, key, value in parsed
            if key[0] == "update"
            for name in (value if len(key) == 1 and isinstance(value, dict) else [key[-1]])
        }
        return _update(cfg, root, results, registry, Path(data_file), given, items_file)


def _update(
    cfg: RunConfig,
    root: Path,
    results: dict[str, Any],
    registry: Versions,
    data_file: Path,
    given: set[str],
    items_file: str | Path | None,
) -> UpdateOutcome:
    started = cost.clock()  # what the update takes, set-up to gate, is the version's `cost`
    cost.take()
    _remove_superseded_work(registry)
    remove_stale_temporaries(registry.folder)  # left by killed updates; this one holds the update lock
    parent = registry.current
    items_file = None if items_file is None else Path(items_file)
    if items_file is None:  # the batch is read with the run's item file (its records of the run's items)
        _refuse_moved_data(cfg, root, ("meta",))
    batch = _read_batch(cfg, data_file, items_file)
    digest = _batch_digest(cfg, batch, items_file)
    records = None if items_file is None else {"file": str(items_file), "sha256": file_sha256(items_file)}
    # Rerunning a finished update: the batch is in the promoted version's line, or a child of it (kept).
    line = []
    v: Version | None = parent
    while v is not None:
        line.append(v)
        v = None if v.parent is None else registry.get(v.parent)
    line += [c for c in registry.versions if c.parent == parent.id]
    for v in line:
        if v.data.get("sha256") == digest:
            log.info("%s was applied before: version %d", data_file, v.id)
            if v.gate:  # logged already, unless the update was stopped before it could be
                _track_gate(cfg, root, results, v)
            ignored = [
                f"update.{k}={getattr(cfg.update, k)} (version {v.id} was gated with {v.gate[k]})"
                for k in sorted(given)
                if k in v.gate and v.gate[k] != getattr(cfg.update, k)
            ]
            built_with = v.data.get("items_file")
            if records is not None and (built_with or {}).get("sha256") != records["sha256"]:
                was = f"--items {built_with['file']}" if built_with else "no --items"
                ignored.append(f"--items {items_file} (version {v.id} was built with {was})")
            return UpdateOutcome(v, registry.promoted == v.id, already_applied=True, ignored=ignored)
    # The held-out samples depend on these settings: another choice is another candidate, trained apart
    # (a killed update resumed with other settings must not reuse the first one's gate predictions).
    # ("batch": the tail of the batch's samples since 2026-12-05, of the whole stage before: a candidate
    # killed under the earlier rule is not continued under this one)
    held = f"batchholdout{cfg.update.holdout_fraction:g}-{cfg.update.max_holdout or 'all'}"
    # So do the new items' records (--items, not in the batch's digest: the prompts, IDs and bundle take
    # them), so a killed update rerun with another file does not finish the first one's candidate.
    held += f"-items{records['sha256'][:12]}" if records is not None else ""
    # And the sampled negatives of implicit data: drawn apart for each batch since 2026-12-06, over the whole
    # table before (an attempt killed under that rule held out other negatives: not continued)
    held += "-negperbatch" if batch.implicit and cfg.task.reads_labels else ""
    work = registry.folder / "work" / f"from-v{parent.id}-{digest[:12]}-{held}"
    stage = parent.stage + 1

    original, existing, items, earlier_batches = _history(cfg, root, registry, parent)
    _refuse_a_batch_in_1970(cfg, data_file, batch, existing)
    accepted, report = _accept(batch, existing, data_file, cfg.data.min_rating)
    refuse_ids_written_otherwise(data_file, accepted, existing, cfg.update.lookalike_ids == "new")
    known = items["item_id"]
    if items_file is not None:
        note_records_of_known_items(batch.items, items, f"--items {items_file}")
    elif cfg.data.format == "table" and cfg.data.meta is None:  # the items' fields come from the rows
        note_records_of_known_items(batch.items, items, f"{data_file}'s rows")
    items = _with_batch_items(items, batch)
    note_new_records(items, known, accepted, items_file, llm=not is_conventional(cfg.model.name))
    pretrained = trained_backbone(cfg, "--set model.name=PATH names it")
    if other_weights(root, pretrained):  # (the fingerprint its experiment recorded)
        raise ConfigError(
            f"{root}: the weights loaded for model.name={cfg.model.name} are not those the run trained on "
            "(another folder's contents, the hub's weights instead of evolora's converted copy or the "
            "reverse), so the next stage would learn on other weights: load the weights it ran on"
        )
    # An LLM next-item run names the batch's new items with its quantizer; the IDs the candidate is built
    # and bundled with are the work folder's (`build_cfg`'s shared caches), never the experiment's.
    build_cfg, caches = cfg, {}
    if cfg.task.name == "next_item" and pretrained is not None:
        build_cfg = cfg.model_copy(update={"output_dir": str(work)})
        parent_ids = parent_semantic_ids(cfg, root, parent, items)
        offered = accepted["item_id"].unique()
        accepted, caches["semantic_ids"] = name_new_items(
            build_cfg, parent_ids, items, accepted, report, pretrained
        )
        items = _without_unnamed(items, known, offered, accepted["item_id"])
    # users and items no earlier row has (`evolora versions` shows them; an item's record sent ahead of its
    # rows is not a rated item yet)
    for column, key in (("user_id", "new users"), ("item_id", "new items")):
        report[key] = int(accepted[column].unique().is_in(existing[column].unique().implode()).not_().sum())
    data, staged = _combined(original, existing, items, accepted, stage)
    dropped = _dropped_note(report)
    try:
        # `_hold_out` builds the new stage's pools
        batches = [*earlier_batches, accepted]
        prepared = prepare_staged(cfg, data, staged, rebuilt=frozenset({stage}), batches=batches)
    except EmptyStagesError as e:
        if e.stages != [stage]:
            raise
        # the run's staging advice does not apply: an update cannot change its settings
        raise DataError(
            f"{data_file}: none of the {accepted.height} new rows{dropped} has "
            f"{cfg.task.min_history_or_default()} earlier interactions of its user (the run's "
            "task.min_history), so the new stage would have no samples (all users new?): send the rows with "
            "rows of users the run knows, or with the next batch"
        ) from None
    holdout = _hold_out(cfg, prepared, stage, accepted, dropped)
    pools = prepared.pools[stage]
    table = prepared.table.df
    # implicit data: each sample counted with its sampled negatives (update.max_holdout counts samples alone)
    negatives = (
        " (each with its sampled negatives)" if "sampled" in table.columns and table["sampled"].any() else ""
    )
    log.info(
        "update of %s, version %d -> stage %d: %d rows accepted of %d (%s); %d samples%s: train pool %d, "
        "valid %d, held out %d (the gate judges on %d of them)",
        registry.method, parent.id, stage, accepted.height, report["rows_in_file"],
        ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none dropped",
        len(prepared.table.stage_rows(stage)), negatives, len(pools.train), len(pools.valid), len(pools.test),
        len(holdout),
    )  # fmt: skip

    prepared.caches = caches
    lm, task = build_model_and_task(build_cfg, prepared, pretrained)
    check_template(root, task)
    # the options it ran with, defaults as they were then: a default changed since must not change it
    options = run_options(root / results["method"] / f"seed{results['seed']}", results)
    spec = StrategySpec(name=results["strategy"], label=results["method"], **options)
    strategy = build_strategy(spec, Env(lm, task, cfg, prepared), results["seed"])
    try:
        strategy.setup()
        loop = StageLoop(strategy, prepared.pools, work, None, {"method": registry.method})
        task.before_stage(lm, parent.stage)
        loop.restore_state(parent.stage, stage_dir=root / parent.folder, deployed=parent.id > 0)
        ctx = StageContext(stage, stage, prepared.pools, strategy.seed, work / f"stage-{stage}", holdout)
        before = _gate_predictions(loop, ctx, work / "gate" / "promoted.npz", "the promoted version")
        loop.train_stage(ctx)
        after = _gate_predictions(loop, ctx, work / "gate" / "candidate.npz", "the candidate")
    finally:
        strategy.teardown()
    gate = _decide(cfg, task, before, after, holdout)
    write_bundle(work, build_cfg, prepared)
    _write_parquet(work / "accepted.parquet", accepted.with_columns(stage=pl.lit(stage, dtype=pl.Int32)))
    atomic_write_json(work / "gate.json", gate)
    version = Version(
        id=max(v.id for v in registry.versions) + 1,
        parent=parent.id,
        stage=stage,
        created=_now(),
        folder=str((work / f"stage-{stage}").relative_to(root)),
        data={
            "file": str(data_file),
            "sha256": digest,
            **({"items_file": records} if records else {}),
            **report,
        },
        gate=gate,
        promoted_at_creation=gate["promote"],
        # earlier sittings' kept work (epochs, a finished job, the gate's scores) is carried in: counted once
        cost=cost.stage_cost(cost.take(), since=started),
    )
    registry.add(version, promote=gate["promote"])
    _remove_superseded_work(registry)  # this batch's attempts with other gate settings
    _track_gate(cfg, root, results, version)
    return UpdateOutcome(version, gate["promote"])


def _remove_superseded_work(registry: Versions) -> None:
    """Delete the work folders no update can use again: those of a (parent version, batch) pair that a
    recorded version answers (a rerun of that batch on that parent is told "applied before"), but its own.

    They are left by updates killed and then rerun with other gate settings (the work folder's name holds
    them) or by an evolora that named work folders otherwise; each holds a stage's adapters and checkpoints.
    Called under the update lock; a removal cut short is finished by the next update."""
    work = registry.folder / "work"
    if not work.is_dir():
        return
    answered = {
        (v.parent, str(v.data.get("sha256", ""))[:12]) for v in registry.versions if v.parent is not None
    }
    kept = {(registry.root / v.folder).parent.resolve() for v in registry.versions}
    for folder in sorted(work.iterdir()):
        parts = folder.name.split("-")  # from-v<parent>-<digest[:12]>[-<gate settings>]
        if len(parts) < 3 or parts[0] != "from" or not parts[1][1:].isdigit() or folder.resolve() in kept:
            continue
        if (int(parts[1][1:]), parts[2]) in answered:
            log.info("removing %s: an update of the same batch on the same version is recorded", folder)
            shutil.rmtree(folder)


def _track_gate(cfg: RunConfig, root: Path, results: dict[str, Any], version: Version) -> None:
    """Log the gate; the version is recorded already, so a store gone since the start is a warning."""
    tracker = tracker_for(cfg, root)
    try:
        with tracker.experiment(cfg):
            tracker.gate(results["method"], results["seed"], version.id, version.gate, version.data)
    except ConfigError as e:
        log.warning("the gate of version %d is not logged (%s); rerunning the update logs it", version.id, e)


# ------------------------------------------------------------------------------------------ the data
def _batch_digest(cfg: RunConfig, batch: InteractionData, items_file: Path | None) -> str | None:
    """What identifies a batch: its files' digest as read without `--items` (the rows' file, and the run's
    items table where it has one). Records of new items given another way make no other batch: a batch is
    gated once."""
    files = list(batch.files)
    if items_file is not None and cfg.data.meta is not None:
        given = str(items_file.resolve())
        files = [str(Path(cfg.data.meta).expanduser().resolve()) if f == given else f for f in files]
    return data_digest(dataclasses.replace(batch, files=tuple(files)))["sha256"]


def _read_batch(cfg: RunConfig, data_file: Path, items_file: Path | None = None) -> InteractionData:
    if not data_file.exists():
        raise DataError(f"{data_file}: no such file or folder")
    if items_file is not None:
        if cfg.data.columns is None or cfg.data.meta is None:
            raise ConfigError(
                f"--items {items_file}: this run reads no items table (data.meta of a table run); the "
                "batch's rows carry their items' fields, if the run maps any (data.columns)"
            )
        if not items_file.is_file():
            raise DataError(f"--items {items_file}: no such file")
    # The run's loader and settings, on the new file alone: no k-core or recency cut of a batch, and no
    # stage column: the whole batch is the next stage.
    # `min_rating` is applied in `_accept`, so its rows are counted among the dropped ones.
    settings = {"source": str(data_file), "kcore": cfg.data.kcore.model_copy(update={"user": 0, "item": 0}),
              "max_interactions": None, "min_rating": None}  # fmt: skip
    if cfg.data.columns is not None and cfg.data.columns.stage is not None:
        settings["columns"] = cfg.data.columns.model_copy(update={"stage": None})
    if items_file is not None:
        settings["meta"] = str(items_file)
    # the loader's count of items without a record here takes in those the run knows (and the records
    # earlier versions took): `note_new_records` counts the new ones
    quiet = [WithoutRecordCount()]
    data_log = logging.getLogger("evolora.data")
    for f in quiet:
        data_log.addFilter(f)
    try:
        with settings_fixed():  # the run's time unit and separator: the loader's advice says to write in them
            batch = load_dataset(cfg.data.model_copy(update=settings))
    except DataError as e:
        if cfg.data.format == "table":
            raise
        # A packaged dataset's loader reads its own files (MovieLens's u.data beside u.item, say), not a batch
        # of rows: say how a run takes new rows, instead of leaving the user with a missing u.item.
        raise DataError(
            f"{e}; {data_file} is read as this run's data ({cfg.data.source}, data.format: "
            f"{cfg.data.format}) was, so it must be in that dataset's own file layout. To update a run with "
            "rows of your own, run it on a table (data.format: table, with data.columns): "
            "`evolora data to-csv` writes a dataset as one and configs/deploy-ml100k.yaml runs ML-100K so"
        ) from None
    finally:
        for f in quiet:
            data_log.removeFilter(f)
    return batch


def _refuse_a_batch_in_1970(
    cfg: RunConfig, data_file: Path, batch: InteractionData, existing: pl.DataFrame
) -> None:
    """A batch whose times the run's unit reads in 1970, where the run's are decades later: written in another
    unit; every row would be dropped as older than the run's stages."""
    latest, run_latest = batch.interactions["timestamp"].max(), existing["timestamp"].max()
    in_1970 = isinstance(latest, int) and latest < SECONDS_PER_YEAR
    if in_1970 and isinstance(run_latest, int) and run_latest >= 20 * SECONDS_PER_YEAR:
        raise DataError(
            f"{data_file}: every time falls in 1970 as the run's unit reads them: "
            f"{fixed_unit_advice(cfg.data.time_unit)}"
        )


def _refuse_moved_data(cfg: RunConfig, root: Path, settings: tuple[str, ...]) -> None:
    """The run's data files named by `settings` (data.source, data.meta) where it ran, or an error saying
    how to give where they are now (a run folder copied to another machine)."""
    gone = [
        f"data.{k}={v}" for k in settings if (v := getattr(cfg.data, k))
        and not Path(v).expanduser().exists() and not (k == "source" and v in registered_datasets())
    ]  # fmt: skip
    if gone:
        raise DataError(
            f"{root}: the run's own data is not where it ran ({', '.join(gone)}), and an update rebuilds the "
            "stages each version trained on from it: give where it is now with --set data.source=PATH "
            "(data.meta=PATH for its item file); the files' contents are checked against the run's record"
        )


def _history(
    cfg: RunConfig, root: Path, registry: Versions, parent: Version
) -> tuple[InteractionData, pl.DataFrame, pl.DataFrame, list[pl.DataFrame]]:
    """(the run's data, the staged interactions the parent version was trained on, the items it knows,
    the rows each update on its line added, oldest first)."""
    _refuse_moved_data(cfg, root, ("source", "meta"))
    data = load_dataset(cfg.data)
    marker = root / "experiment.json"
    recorded = (read_json(marker) if marker.is_file() else {}).get("data_files") or {}
    # A registered dataset's files are checked against pinned checksums when fetched; where every route's
    # copy loads as the same rows (ml-100k: GroupLens' own or RecBole's), the files differ by the route
    # alone, so they are not compared. ml-1m's copies key movies differently: compared.
    registered = names_a_dataset(cfg.data.source)
    same_rows = registered and copies_agree(cfg.data.source)
    now = None if same_rows or recorded.get("sha256") is None else data_digest(data)
    if now is not None and now["sha256"] != recorded["sha256"]:
        # Restaged, the edited files would put rows no version was trained on into past stages, ungated.
        changed = changed_files(recorded, now)
        if registered:
            raise DataError(
                f"{root}: the cache holds another copy of {cfg.data.source} than the experiment ran on "
                f"({', '.join(changed)} differ; the copies key their items differently), and an update "
                "rebuilds what each version was trained on from it: fetch the copy it ran on (`evolora data "
                f"fetch {cfg.data.source} --force` where its route is reachable, or ${MIRROR_ENV})"
            )
        meta = Path(cfg.data.meta).name if cfg.data.meta else None
        hint = f" (new items' records go in with --items FILE, not into {meta})" if meta in changed else ""
        raise DataError(
            f"{root}: its data files changed since the experiment ran ({', '.join(changed)}, read from "
            f"{Path(cfg.data.source).expanduser().resolve()}), and an update rebuilds what each version was "
            f"trained on from them: put back the files it ran on, and send new rows with --data{hint}"
        )
    staged = assign_stages(data.interactions, cfg.staging, data.preset_stages, data.synthetic_time)
    parts, items = [staged.select([*_KEY, "stage"])], data.items
    chain = []
    v: Version | None = parent
    while v is not None and v.parent is not None:
        chain.append(v)
        v = registry.get(v.parent)
    for version in reversed(chain):
        work = (root / version.folder).parent
        parts.append(_read_version_table(work / "accepted.parquet", version, parent).select([*_KEY, "stage"]))
        later = _read_version_table(work / "inference" / "items.parquet", version, parent)
        items = pl.concat([items, later], how="diagonal_relaxed")
        items = items.unique("item_id", keep="first", maintain_order=True)
    return data, pl.concat(parts, how="vertical_relaxed"), items, parts[1:]


def _read_version_table(path: Path, version: Version, parent: Version) -> pl.DataFrame:
    """A table an earlier update wrote, which the promoted version builds on; one line if it is gone."""
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedFileError(
            path,
            f"{path}: version {version.id}'s {path.name} is missing or damaged ({first}), and the promoted "
            f"version {parent.id} builds on it: restore the file, or roll back to a version before "
            f"{version.id} (`evolora rollback`)",
        ) from None


def _accept(
    batch: InteractionData, existing: pl.DataFrame, data_file: Path, lowest: float | None = None
) -> tuple[pl.DataFrame, dict]:
    """The batch's rows that are new: rated >= `lowest` (the run's `data.min_rating`), not older than what
    was seen, not seen already."""
    rows = batch.interactions.select(_KEY)
    # A row dated after today is a clock or unit error; accepted, it would be the last stage's end, and every
    # later batch would be dropped as older until a rollback. Times a loader made up to order rows (PESO's
    # blocks: 10^9 s apart, in 2065 by the third) are no dates.
    late = time.time() + _CLOCK_SLACK_S
    future = rows.filter(pl.col("timestamp") > late) if not batch.synthetic_time else rows.clear()
    if future.height:
        raise DataError(
            f"{data_file}: {future.height} of {rows.height} rows are dated after today (the latest "
            f"{day(int(future['timestamp'].max()), with_time=True)} UTC): fix their times (a clock or unit "
            "error) or leave them out; accepted, they would make every later batch older than the last stage"
        )
    low = rows["rating"] < lowest if lowest is not None else pl.Series([False] * rows.height)
    # A row the run has (a batch sent again) is "already seen", though it is also older than the last stage.
    seen = rows.select(pl.struct(_KEY).is_in(existing.select(pl.struct(_KEY)).to_series().implode()))
    seen = seen.to_series() & ~low
    older = (rows["timestamp"] < existing["timestamp"].max()) & ~low & ~seen
    kept = rows.filter(~low & ~seen & ~older)
    # Kept, as a file's own rows of one moment and two ratings are, but said: the run holds the other rating
    moment = ["user_id", "item_id", "timestamp"]
    rerated = kept.join(existing.select(moment).unique(), on=moment, how="semi")
    if rerated.height:
        log.warning(
            "%s: %d rows share their user, item and timestamp with a row of the run of another rating "
            "(first: user %r, item %r); all are kept",
            *(data_file, rerated.height, rerated["user_id"][0], rerated["item_id"][0]),
        )
    dropped = {}
    if batch.duplicates_removed:
        dropped["repeated in the file"] = batch.duplicates_removed
    for why, n in [
        (f"rated below data.min_rating {lowest:g}" if lowest is not None else "", int(low.sum())),
        ("already seen", int(seen.sum())),
        ("older than the last stage's end", int(older.sum())),
    ]:
        if n:
            dropped[why] = n
    in_file = rows.height + batch.duplicates_removed
    report = {"rows_in_file": in_file, "accepted": kept.height, "dropped": dropped}
    if kept.height == 0:
        raise DataError(
            f"{data_file}: nothing new to learn from: {in_file} rows, "
            + ", ".join(f"{n} {why}" for why, n in dropped.items())
        )
    return kept, report


def _with_batch_items(items: pl.DataFrame, batch: InteractionData) -> pl.DataFrame:
    """The items the parent version knows, then those of the batch's item table it does not. Semantic IDs
    in new records count only for a run whose items came with theirs (`source: auto` decides by them)."""
    new_items = batch.items.join(items.select("item_id"), on="item_id", how="anti")
    if "sid" in new_items.columns and not items_have_ids(items):
        new_items = new_items.drop("sid")
    return pl.concat([items, new_items], how="diagonal_relaxed")


def _without_unnamed(
    items: pl.DataFrame, known: pl.Series, offered: pl.Series, named: pl.Series
) -> pl.DataFrame:
    """The items of a next-item version: a new item the batch's rows brought (`offered`) that got no ID,
    and a new item known only by its id (no record, no row), are not its own. Recorded, the next batch
    would find them known, keep that record and never name them from the record it brings. A new item's
    record sent ahead of its rows stays (the batch that brings them names it from it)."""
    new = ~pl.col("item_id").is_in(known.implode())
    unnamed = pl.col("item_id").is_in(offered.filter(~offered.is_in(named.implode())).implode())
    bare = pl.col("title") == pl.col("item_id") if "title" in items.columns else pl.lit(True)
    return items.filter(~(new & (unnamed | (bare & ~pl.col("item_id").is_in(named.implode())))))


def _combined(
    original: InteractionData, existing: pl.DataFrame, items: pl.DataFrame, accepted: pl.DataFrame, stage: int
) -> tuple[InteractionData, pl.DataFrame]:
    batch_rows = accepted.with_columns(stage=pl.lit(stage, dtype=existing["stage"].dtype))
    staged = pl.concat([existing, batch_rows], how="vertical_relaxed").sort("timestamp", maintain_order=True)
    interactions = staged.select(_KEY)
    data = InteractionData(
        original.name, interactions, items, original.like_threshold, implicit=original.implicit
    )
    return data, staged


def _dropped_note(report: dict[str, Any]) -> str:
    """What the batch lost before it could give samples, for a refusal that the loss may explain."""
    dropped = report["dropped"]
    if not dropped:
        return ""
    reasons = ", ".join(f"{why} {n}" for why, n in dropped.items())
    return f" (kept of the file's {report['rows_in_file']}; dropped: {reasons})"


def _hold_out(
    cfg: RunConfig, prepared: Prepared, stage: int, accepted: pl.DataFrame, dropped: str = ""
) -> np.ndarray:
    """The chronological tail of the batch's samples (`update.holdout_fraction` of them), for the gate; the
    pool keeps the rest of the stage as train and valid. A `next_stage` run's first update adds the batch to
    the stage it only evaluated: a tail of the whole stage would hold out the batch entirely (it is the
    newest), and the candidate would learn nothing of it."""
    rows = prepared.table.stage_rows(stage)
    keys = ["user_id", "item_id", "timestamp"]
    df = prepared.table.df[rows]
    real = ~df["sampled"].to_numpy() if "sampled" in df.columns else np.ones(len(rows), dtype=bool)
    # A sampled negative (implicit data) follows its positive: the two are one sample, held out together.
    sample_of = np.cumsum(real) - 1
    matched = df.select(keys).with_row_index("_at").join(accepted.select(keys).unique(), on=keys, how="semi")
    in_batch = np.zeros(len(rows), dtype=bool)
    in_batch[matched["_at"].to_numpy()] = True
    batch = np.unique(sample_of[in_batch & real])  # the batch's samples, in time order
    n_hold = max(1, math.ceil(cfg.update.holdout_fraction * len(batch)))
    if len(batch) - n_hold < 2:
        raise DataError(
            f"the batch's {accepted.height} new rows{dropped} give {len(batch)} samples: too few to train on "
            f"and hold {n_hold} out for the gate"
        )
    held = batch[-n_hold:]
    hold = rows[np.isin(sample_of, held)]
    rest = np.setdiff1d(rows, hold)  # sorted: the stage's order, which is chronological
    n_valid = max(1, round(cfg.train.valid_fraction * len(rest)))
    prepared.pools[stage] = StagePools(stage, rest[:-n_valid], rest[-n_valid:], hold)
    # `max_holdout` of the held-out samples, each with its negatives (for explicit data, the draw of rows)
    chosen = draw(held, cfg.update.max_holdout, cfg.eval.seed, stage, salt=3)
    return rows[np.isin(sample_of, chosen)]


# ------------------------------------------------------------------------------------------ the gate
def _gate_predictions(loop: StageLoop, ctx: StageContext, path: Path, who: str) -> Any:
    """A version's (`who`'s) scores of the held-out samples, stored with what they cost (a resumed update
    counts them once)."""
    if path.is_file():
        arrays = load_npz(path)
        cost.carry(cost.from_arrays(arrays))
        return loop.task.load_predictions(arrays)
    ctx = dataclasses.replace(ctx, asked=f"gate: {who} on the held-out samples")  # (a bar's words)
    preds, spent = cost.measured(lambda: loop.s.predict(ctx, ctx.eval_rows), "evaluation")
    save_npz(path, {**loop.task.save_predictions(preds), **cost.to_arrays(spent)})
    return preds


def _decide(cfg: RunConfig, task: Any, before: Any, after: Any, rows: np.ndarray) -> dict[str, Any]:
    metric = cfg.update.metric or task.primary_metric  # a metric the task records: `update_run` checked
    promoted = float(task.metrics(before, rows)[metric])
    candidate = float(task.metrics(after, rows)[metric])
    sign = -1.0 if lower_is_better(metric) else 1.0
    gain = sign * (candidate - promoted)
    if math.isnan(gain):
        decision, promote = "kept: the held-out samples cannot judge (the metric is undefined on them)", False
    else:
        # a gain of exactly min_gain passes: 0.52 - 0.53 is -0.010000000000000009 in floating point
        promote = gain >= cfg.update.min_gain - 1e-9
        decision = ("promoted" if promote else "kept, not promoted") + (
            f": gain {gain:+.4f} {'>=' if promote else '<'} min_gain {cfg.update.min_gain:+.4f}"
        )
    log.info("gate on %d held-out samples: %s %.4f (candidate) vs %.4f (promoted): %s",
             len(rows), metric, candidate, promoted, decision)  # fmt: skip

    def figure(x: float) -> float | None:  # an undefined metric is null: JSON has no NaN
        return None if math.isnan(x) else x

    return {
        "metric": metric, "candidate": figure(candidate), "promoted": figure(promoted), "gain": figure(gain),
        "min_gain": cfg.update.min_gain, "holdout_samples": len(rows), "promote": promote,
        "decision": decision, "holdout_fraction": cfg.update.holdout_fraction,
        "max_holdout": cfg.update.max_holdout,
    }  # fmt: skip


def _write_parquet(path: Path, df: pl.DataFrame) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())
