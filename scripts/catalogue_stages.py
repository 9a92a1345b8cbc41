"""Stages that change the catalogue, not only the time: a dataset's log cut into equal-count periods by time,
each period keeping only the interactions with items of that stage's genre group, written as a table with
a stage column (`data.columns.stage`) for `evolora run`.

    python scripts/catalogue_stages.py ml-100k --out runs/data/ml100k-genres.csv \\
        --stage "Drama,Romance,War,Film-Noir,Documentary" \\
        --stage "Action,Adventure,Sci-Fi,Thriller,Horror,Crime,Mystery,Western" \\
        --stage "Comedy,Children's,Animation,Musical,Fantasy" \\
        --stage "Drama,Romance,War,Film-Noir,Documentary"

Time-cut stages of MovieLens are mostly new user cohorts on one catalogue with a steady liked share
(`evolora data info`), so there is little for a fine-tuned adapter to forget. Here stage t holds period t's
ratings of group t's films only: an item is in a group when at least one of its genres is in the group and
none is in another (distinct) group, so a film that is both a drama and a comedy is in neither. A group may
come back (stage 4 = stage 1's genres above), which makes the newest stage a test of what stage 1 taught.

The periods are the `lsat` scheme's (equal counts, ties kept together), so the stages follow one another in
time as a stage column must. Rows of other items are left out, histories included: the log is the
catalogue-shift world, not MovieLens with gaps. Writes the log to `--out` (user, item, time, rating, stage;
its name is the dataset's name in run records) and the items beside it (`<name>-items.csv`: item, title,
genre, year), and prints each stage's rows, users, items and liked share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from evolora.config import DataConfig, StagingConfig
from evolora.data import assign_stages, load_dataset
from evolora.data.schema import InteractionData
from evolora.errors import DataError, EvoloraError

GENRE_SEPARATOR = ", "


def item_groups(items: pl.DataFrame, groups: list[frozenset[str]]) -> pl.Series:
    """Each item's group (an index into the distinct `groups`), or null: an item is in a group when one of
    its genres is in the group and none is in another group."""
    if "genre" not in items.columns:
        raise DataError("the items have no genre: catalogue stages need one")
    found = []
    for genre in items["genre"].to_list():
        genres = set(genre.split(GENRE_SEPARATOR)) if genre else set()
        hits = [g for g, group in enumerate(groups) if genres & group]
        found.append(hits[0] if len(hits) == 1 else None)
    return pl.Series("group", found, dtype=pl.Int32)


def catalogue_stages(data: InteractionData, stages: list[frozenset[str]]) -> pl.DataFrame:
    """The interactions (`user_id`, `item_id`, `rating`, `timestamp`, `stage`) of period t whose item is in
    stage t's group, for t = 1..len(stages); periods by time, in equal counts."""
    if len(stages) < 2:
        raise DataError("give at least two stages (--stage)")
    distinct = list(dict.fromkeys(stages))
    unknown = set().union(*stages) - _all_genres(data.items)
    if unknown:
        raise DataError(f"no item has the genres {sorted(unknown)}")
    group_of_stage = pl.DataFrame(
        {"stage": list(range(1, len(stages) + 1)), "group": [distinct.index(s) for s in stages]},
        schema={"stage": pl.Int32, "group": pl.Int32},
    )
    items = data.items.select("item_id", group=item_groups(data.items, distinct))
    periods = assign_stages(data.interactions, StagingConfig(scheme="lsat", n_stages=len(stages)))
    kept = periods.join(items, on="item_id").join(group_of_stage, on=["stage", "group"], how="semi")
    kept = kept.sort("timestamp", "stage", maintain_order=True).drop("group")
    empty = sorted(set(range(1, len(stages) + 1)) - set(kept["stage"].unique().to_list()))
    if empty:
        raise DataError(f"stages {empty} have no interactions with their group's items")
    return kept


def _shared_genres(stages: list[frozenset[str]]) -> set[str]:
    """Genres in more than one distinct group."""
    distinct = list(dict.fromkeys(stages))
    return {g for i, a in enumerate(distinct) for b in distinct[i + 1 :] for g in a & b}


def _all_genres(items: pl.DataFrame) -> set[str]:
    genres = items["genre"].drop_nulls().to_list() if "genre" in items.columns else []
    return {g for text in genres for g in text.split(GENRE_SEPARATOR)}


def items_file(log_file: Path) -> Path:
    return log_file.with_name(f"{log_file.stem}-items.csv")


def write(data: InteractionData, staged: pl.DataFrame, out: Path) -> None:
    """The log as `out` (a .csv file) and its items as `items_file(out)`."""
    if out.suffix != ".csv":
        raise DataError(f"{out}: --out names the log's .csv file")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged.select(user="user_id", item="item_id", time="timestamp", rating="rating", stage="stage").write_csv(
        out
    )
    fields = [c for c in ("title", "genre", "year") if c in data.items.columns]
    used = data.items.join(staged.select("item_id").unique(), on="item_id", how="semi")
    used.select(pl.col("item_id").alias("item"), *fields).write_csv(items_file(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source",
        help="a registered dataset (ml-100k, ml-1m) or a MovieLens or Amazon file or folder (a table log "
        "needs data.columns, which this script does not take)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the log's .csv file (items beside it)")
    parser.add_argument(
        "--stage", action="append", required=True, help="one stage's genres, comma-separated (repeat)"
    )
    args = parser.parse_args()
    if args.out.suffix != ".csv":  # before the minutes of loading
        parser.error(f"--out {args.out}: name the log's .csv file")
    if len(args.stage) < 2:
        parser.error("give at least two stages (--stage, repeated)")
    stages = [frozenset(g.strip() for g in s.split(",") if g.strip()) for s in args.stage]
    if not all(stages):
        parser.error(f"--stage {args.stage[stages.index(frozenset())]!r}: give at least one genre")
    shared = _shared_genres(stages)
    if shared:  # an item of a genre in two groups is in neither: one group would lose it silently
        parser.error(
            f"the genres {', '.join(sorted(shared))} are in two different stages' groups; an item of one "
            "would belong to neither: give each genre to one group (a group may repeat as a whole)"
        )
    try:
        data = load_dataset(DataConfig(source=args.source))
        staged = catalogue_stages(data, stages)
        write(data, staged, args.out)
    except EvoloraError as e:  # a user's mistake: one line, as the evolora command prints it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = staged.group_by("stage").agg(
        rows=pl.len(),
        users=pl.col("user_id").n_unique(),
        items=pl.col("item_id").n_unique(),
        liked=(pl.col("rating") > data.like_threshold).mean().round(4),
    )
    print(f"{args.out}: {staged.height} of {data.interactions.height} interactions")
    print(summary.sort("stage"))


if __name__ == "__main__":
    main()
