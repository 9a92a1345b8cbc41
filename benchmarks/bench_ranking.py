"""A conventional model's full ranking of 32k items: `stable_top_k` against the full stable sort it replaced.

On PESO's CDs & Vinyl release (`configs/conventional-next-item-cds.yaml`, 39,191 items), each conventional
next-item model ranks the D1 validation users (8,494; the 31,650 items known at D1 scored, top 10 kept)
through the task's own `predict`, twice per repeat, interleaved: once with the ranked list cut from a full
stable descending sort of every row (the code before `stable_top_k`, kept here as the baseline) and once as
the task does it now. The model is freshly initialised with every ID row marked trained, as after training (an
untrained model scores every cold item alike, which would send every row down `stable_top_k`'s full-sort
path). Both give the same items and scores (checked); the record has users/s of each and their ratio.

    python benchmarks/bench_ranking.py [--models sasrec gru4rec mf two_tower] [--users 8494] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from record import description, refuse_partial_record, write_record

CONFIG = "configs/conventional-next-item-cds.yaml"


def full_sort(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the rankers did before `stable_top_k`: a full stable descending sort of every row, cut to k."""
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--models", nargs="+", default=["sasrec", "gru4rec", "mf", "two_tower"])
    ap.add_argument("--users", type=int, default=None, help="default: every D1 validation user")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/ranking.json")
    args = ap.parse_args()
    refuse_partial_record(ap, args, "--models")

    import evolora.tasks.conventional as conventional
    from evolora.config import load_config
    from evolora.experiment import build_model_and_task, prepare_data

    torch.set_num_threads(args.threads)
    base = load_config(CONFIG)
    if not Path(base.data.source).exists():
        print(f"skipped: {base.data.source} (PESO's CDs & Vinyl release) is not on this machine")
        return
    prepared = prepare_data(base)
    rows = prepared.pools[1].valid[: args.users]
    top_k = conventional.stable_top_k
    results: dict[str, dict[str, float]] = {}
    for name in args.models:
        cfg = load_config(CONFIG, [f"model.name={name}"])
        lm, task = build_model_and_task(cfg, prepared)
        task.before_stage(lm, 1)
        lm.reset_adapter("default", seed=0)
        lm.activate("default", trainable=False)
        with torch.no_grad():
            for pname, p in lm.model.named_parameters():
                if pname.endswith("seen"):
                    p.fill_(1.0)
        seconds: dict[str, list[float]] = {"full_sort": [], "stable_top_k": []}
        out = {}
        try:
            for _ in range(args.repeats):
                for label, fn in (("full_sort", full_sort), ("stable_top_k", top_k)):
                    conventional.stable_top_k = fn  # the task's `_top` calls it by this name
                    t0 = time.perf_counter()
                    out[label] = task.predict(lm, rows, args.batch)
                    seconds[label].append(time.perf_counter() - t0)
        finally:
            conventional.stable_top_k = top_k
        a, b = out["full_sort"], out["stable_top_k"]
        same = bool(np.array_equal(a.items, b.items) and np.array_equal(a.scores, b.scores))
        old, new = min(seconds["full_sort"]), min(seconds["stable_top_k"])
        results[name] = {
            "full_sort_users_per_s": len(rows) / old,
            "stable_top_k_users_per_s": len(rows) / new,
            "speedup": old / new,
            "identical": same,
        }
        print(f"{name:10s} full sort {old:6.2f} s  top-k {new:6.2f} s  {old / new:5.1f}x  identical: {same}")
    record = {
        "config": CONFIG,
        "users": len(rows),
        "items_known": int(task.known[1]),
        "batch": args.batch,
        "repeats": args.repeats,
        "results": results,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
