"""How a team's own log scales through data preparation: reading it, cutting it into stages, building the
samples (each with its user's history) and the inference bundle's per-user histories, at 10^5 to 3 x 10^6
interactions.

Each size runs in a process of its own (one thread; polars too), so the peak resident memory (ru_maxrss) is
that size's alone. The log is synthetic and written as Parquet first: users with skewed activity
(log-normal), items with Zipf-like popularity (p ~ rank^-0.9), ratings 1-5, timestamps over two years, an
items table with a title for every item. Settings: `data.format: table`, `staging.scheme: lsat`, 4 stages,
the CTR task with `history_len` 10 (every interaction with at least one earlier one is a sample).

Baseline: the smallest log, so each figure is also a ratio to it (10x the rows at 10x the time is linear).

    python benchmarks/bench_data.py              # writes benchmarks/results/data.json
    python benchmarks/bench_data.py --sizes 1e5 1e6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import description, refuse_partial_record, write_record

SIZES = [100_000, 1_000_000, 3_000_000]


def write_log(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """A synthetic log of `n` interactions (about n/10 users, n/20 items) and its items table, as Parquet."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    users, items = max(n // 10, 10), max(n // 20, 10)
    weight = rng.lognormal(0.0, 1.0, users)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    start = 1_672_531_200  # 2023-01-01
    log = pl.DataFrame(
        {
            "uid": "u" + pl.Series(rng.choice(users, n, p=weight / weight.sum())).cast(pl.Utf8),
            "iid": "i" + pl.Series(rng.choice(items, n, p=popularity / popularity.sum())).cast(pl.Utf8),
            "ts": rng.integers(start, start + 2 * 365 * 86_400, n),
            "stars": rng.integers(1, 6, n),
        }
    ).unique(["uid", "iid", "ts"], keep="first", maintain_order=True)
    table = pl.DataFrame({"iid": log["iid"].unique().sort()}).with_columns(name="Product " + pl.col("iid"))
    log_path, items_path = folder / f"log-{n}.parquet", folder / f"items-{n}.parquet"
    log.write_parquet(log_path)
    table.write_parquet(items_path)
    return log_path, items_path, {"rows": log.height, "users": log["uid"].n_unique(), "items": table.height}


def measure_one(n: int) -> dict[str, object]:
    """Time each phase of preparing a log of `n` rows, in this process."""
    import torch

    from evolora.bundle import user_histories
    from evolora.config import load_config
    from evolora.data.loaders import load_dataset
    from evolora.data.prepare import prepare_staged
    from evolora.data.staging import assign_stages

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        log_path, items_path, sizes = write_log(Path(tmp), n)
        cfg = load_config(
            None,
            [
                f"data.source={log_path}", "data.format=table", f"data.meta={items_path}",
                "data.columns={user: uid, item: iid, time: ts, rating: stars, title: name}",
                "staging.scheme=lsat", "staging.n_stages=4", "task.history_len=10", "task.min_history=1",
                f"output_dir={tmp}", "threads=1",
            ],
        )  # fmt: skip
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        data = load_dataset(cfg.data)
        seconds["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        staged = assign_stages(data.interactions, cfg.staging, data.preset_stages)
        seconds["stages"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepared = prepare_staged(cfg, data, staged)
        seconds["samples_and_pools"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        histories = user_histories(staged, prepared.table.n_stages, prepared.table.history_len)
        seconds["bundle_histories"] = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        **sizes,
        "samples": len(prepared.table),
        "bundle_rows": histories.height,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 3),
        "peak_rss_mb": round(peak_kib / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--sizes", nargs="+", type=float, default=SIZES)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)  # a worker: one size, JSON to stdout
    args = ap.parse_args()
    refuse_partial_record(ap, args, "--sizes")
    if args.one is not None:
        print(json.dumps(measure_one(int(args.one))))
        return
    env = {**os.environ, "POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1"}
    rows = []
    for n in [int(s) for s in args.sizes]:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n)], env=env, capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    base = rows[0]
    for r in rows:
        r["vs_smallest"] = {
            "rows": round(r["rows"] / base["rows"], 2),
            "total_seconds": round(r["total_seconds"] / base["total_seconds"], 2),
            "peak_rss_mb": round(r["peak_rss_mb"] / base["peak_rss_mb"], 2),
        }
    record = {
        "benchmark": "data preparation of an own log (table format), one thread",
        "settings": "4 lsat stages, CTR samples with history_len 10, min_history 1",
        "sizes": rows,
        "machine": {"polars_threads": 1, "torch_threads": 1},  # the workers' (set in measure_one)
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
