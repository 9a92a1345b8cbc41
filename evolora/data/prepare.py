"""A run's data, prepared once: loaded, staged, turned into samples and split into per-stage pools."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from evolora.config import RunConfig
from evolora.data.ids import IdSpace
from evolora.data.loaders import load_dataset
from evolora.data.negatives import add_sampled_negatives
from evolora.data.samples import (
    SampleTable,
    StagePools,
    build_samples,
    hold_out_evaluation_rows,
    split_pools,
)
from evolora.data.schema import InteractionData
from evolora.data.staging import assign_stages, num_stages_of
from evolora.errors import ConfigError, DataError

log = logging.getLogger("evolora")


@dataclass
class Prepared:
    """Everything a run reads from its data: the loaded dataset, the staged interactions, the samples and
    each stage's train / validation / test pools. A trained run used for inference has no staged table
    (nor pools): its ID space comes saved with it."""

    data: InteractionData
    staged: pl.DataFrame | None
    table: SampleTable
    pools: dict[int, StagePools]
    space: IdSpace | None = None
    #: the cache files the task was built from, by kind ("item_vectors", "semantic_ids"): noted by the
    #: task's builder, or given beforehand by what knows a run's own (its bundle, its continued experiment)
    caches: dict[str, Path] = field(default_factory=dict)

    def id_space(self) -> IdSpace:
        """User and item indices of the staged data (what conventional models and RecLoRA's router read)."""
        if self.space is None:
            if self.staged is None:
                raise ValueError("no staged interactions and no saved ID space")
            self.space = IdSpace.from_staged(self.staged)
        return self.space


def prepare_data(cfg: RunConfig) -> Prepared:
    data = load_dataset(cfg.data)
    staged = assign_stages(data.interactions, cfg.staging, data.preset_stages, data.synthetic_time)
    if cfg.protocol == "next_stage" and num_stages_of(staged) < 2:
        # The config cannot tell: a log's own stage column (or a dataset's release) brings one stage.
        raise DataError(
            f"{data.source}: the data comes with one stage, and protocol: next_stage trains on a stage and "
            "evaluates on the next, so it needs at least 2: add stages to the data, stage it by time "
            "(staging.scheme: lsat), or set protocol: leave_last_out"
        )
    return prepare_staged(cfg, data, staged)


def prepare_staged(
    cfg: RunConfig,
    data: InteractionData,
    staged: pl.DataFrame,
    rebuilt: frozenset[int] = frozenset(),
    batches: Sequence[pl.DataFrame] = (),
) -> Prepared:
    """Samples and pools of interactions already cut into stages (a run's, or a run's plus updates).
    `rebuilt`: stages whose pools the caller replaces (an update's new stage): their pools go unreported.
    `batches`: the rows each update added to the run's log, oldest first (implicit feedback: each draws its
    own sampled negatives, leaving the run's and the earlier batches' as they were)."""
    task = cfg.task
    kept, least = task.history_kept(), task.min_history_or_default()
    table = build_samples(staged, num_stages_of(staged), data.like_threshold, kept, least, task.history_ties)
    if data.implicit and task.reads_labels:
        # Every real sample of implicit feedback is a positive: a task that learns labels needs negatives.
        if cfg.data.negatives == 0:
            raise ConfigError(
                f"{data.source}: every interaction is a positive (no rating or label column) and "
                f"data.negatives is 0, so the {task.name} task would have no negative samples; set "
                "data.negatives >= 1"
            )
        table = add_sampled_negatives(table, staged, cfg.data.negatives, cfg.data.negative_seed, batches)
    pools = split_pools(table, cfg.protocol, cfg.train.valid_fraction)
    if cfg.eval.stages != "next" and cfg.protocol == "next_stage":  # a stage's test pool is all of it
        histories = table if cfg.eval.hold_out_histories else None
        pools = hold_out_evaluation_rows(pools, cfg.eval.max_samples, cfg.eval.seed, histories)
    elif cfg.eval.stages != "next" and cfg.eval.hold_out_histories:
        # leave_last_out keeps test rows out of training already; a user's later rows still read them (the
        # newest history item of their next stage's rows is the last stage's test interaction)
        pools = hold_out_evaluation_rows(pools, cfg.eval.max_samples, cfg.eval.seed, table)
    elif cfg.eval.hold_out_histories:
        log.warning(
            "eval.hold_out_histories is for eval.stages seen or all; with next no model is tested on a stage "
            "whose rows it could have read as history, so it changes nothing"
        )
    for s, p in pools.items():
        if s in rebuilt:
            continue
        log.info(
            "stage %d: %d samples (train pool %d, valid %d, test %d)",
            s,
            len(table.stage_rows(s)),
            len(p.train),
            len(p.valid),
            len(p.test),
        )
    _warn_small_pools(cfg, pools, rebuilt)
    labels = cfg.data.label_column
    if task.reads_labels:
        _check_labels(table, data, labels)
    elif labels is not None and cfg.data.min_rating is None and (data.interactions["rating"] < 1).any():
        log.warning(
            "%s: a %s run reads every row as an interaction, those labelled 0 in %r too (shown, not chosen); "
            "data.min_rating: 1 keeps the rows labelled 1 only",
            data.source, task.name, labels,
        )  # fmt: skip
    return Prepared(data, staged, table, pools)


def _check_labels(table: SampleTable, data: InteractionData, label_column: str | None = None) -> None:
    """A task that learns labels needs likes and dislikes: refuse samples of one label, and say which stages
    have one label only (AUC is undefined there). `label_column`: a table's 0/1 column the labels come from
    (no threshold to set then)."""
    df = table.df
    if df.height == 0:
        return
    ratings = data.interactions["rating"]
    threshold = (
        f"rating > data.like_threshold {data.like_threshold:g}; ratings {ratings.min():g}-{ratings.max():g}"
        if label_column is None
        else f"the label column {label_column!r}"
    )
    if df["label"].n_unique() < 2:
        kind = "like" if df["label"][0] else "dislike"
        advice = (
            "set data.like_threshold between the lowest and highest rating"
            if label_column is None
            else f"give a log whose {label_column!r} holds both 0 and 1, or leave data.columns.label out to "
            "read every row as a positive (implicit feedback, with sampled negatives)"
        )
        raise DataError(
            f"{data.source}: every sample is a {kind} ({threshold}), so there is nothing to tell apart (AUC "
            f"is undefined): {advice}"
        )
    one_label = df.group_by("stage").agg(pl.col("label").n_unique().alias("n")).filter(pl.col("n") < 2)
    if one_label.height:
        stages = ", ".join(str(s) for s in sorted(one_label["stage"].to_list()))
        log.warning(
            "stage %s: every sample has the same label (%s): AUC there is undefined", stages, threshold
        )


def _warn_small_pools(cfg: RunConfig, pools: dict[int, StagePools], rebuilt: frozenset[int]) -> None:
    """Say where a budget asks for more samples than a stage holds: that stage then uses all it has."""
    last = max(pools)
    trained = [s for s in pools if (s < last or cfg.protocol != "next_stage") and s not in rebuilt]
    evaluated = [s for s in pools if (s > min(pools) or cfg.protocol != "next_stage") and s not in rebuilt]
    checks = [
        ("train.samples_per_stage", trained, lambda s: cfg.train.budget(s), "train"),
        ("train.valid_samples", trained, lambda s: cfg.train.budget(s, valid=True), "valid"),
        ("eval.max_samples", evaluated, lambda s: cfg.eval.max_samples, "test"),
    ]
    for key, stages, budget, pool in checks:
        short = [
            f"stage {s}: {len(getattr(pools[s], pool))} of {budget(s)}"
            for s in stages
            if budget(s) is not None and len(getattr(pools[s], pool)) < budget(s)
        ]
        if short:
            log.warning(
                "%s asks for more samples than the %s pool holds (%s): those stages use all they have",
                key, pool, "; ".join(short),
            )  # fmt: skip
