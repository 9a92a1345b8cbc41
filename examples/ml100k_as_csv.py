"""MovieLens-100K as a team's own log would look: CSV files for `data.format: table`, cut by time.

    python examples/ml100k_as_csv.py [OUT_DIR] [--new-fraction 0.05]

writes OUT_DIR/ratings.csv (every rating but the latest 5%), OUT_DIR/new-ratings.csv (the latest 5%: what
arrives after the run, for `evolora update`) and OUT_DIR/movies.csv (id, title, genre), from evolora's copy
of ML-100K (fetched and checksum-verified on first use).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evolora.config import DataConfig
from evolora.data import fetch, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="ml100k-csv")
    ap.add_argument(
        "--new-fraction", type=float, default=0.05, help="the latest share of ratings kept apart (0 < f < 1)"
    )
    args = ap.parse_args()
    if not 0 < args.new_fraction < 1:  # NaN fails this too
        ap.error(f"--new-fraction {args.new_fraction}: give a share strictly between 0 and 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"{out}: a file is there, not a folder")
    fetch("ml-100k")
    data = load_dataset(DataConfig(source="ml-100k"))
    ratings = data.interactions.sort("timestamp", maintain_order=True).rename(
        {"user_id": "user", "item_id": "movie", "timestamp": "time"}
    )
    cut = int(ratings.height * (1 - args.new_fraction))
    if not 0 < cut < ratings.height:  # a share so near 0 or 1 that one file would hold no rating
        ap.error(f"--new-fraction {args.new_fraction}: leaves no rating in one of the two files")
    out.mkdir(parents=True, exist_ok=True)
    ratings[:cut].write_csv(out / "ratings.csv")
    ratings[cut:].write_csv(out / "new-ratings.csv")
    columns = [c for c in ("item_id", "title", "genre") if c in data.items.columns]
    data.items.select(columns).rename({"item_id": "movie"}).write_csv(out / "movies.csv")
    print(f"{out}: ratings.csv ({cut} rows), new-ratings.csv ({ratings.height - cut} rows), movies.csv")


if __name__ == "__main__":
    main()
