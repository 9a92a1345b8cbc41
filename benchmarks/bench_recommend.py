"""Serving a trained run from Python: `Recommender.load` time and per-user latency of `score`/`recommend`.

Two small runs of the default model on ML-100K are trained once (a few samples, one epoch: latency does
not depend on how well a model learned) under `--runs`: the quickstart's CTR setting and the next-item
setting of configs/next-item-ml100k.yaml. Then, in this one process, each is loaded (timed), warmed up with
one call, and asked for `--users` known users in turn: CTR scores 20 candidate items per user, next-item
recommends k=10. Figures: load seconds, median and p90 seconds per user.

    python benchmarks/bench_recommend.py [--users 20] [--runs ~/.cache/evolora/bench-runs]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from record import description, write_record

SMALL = ["train.samples_per_stage=[16, 8]", "train.valid_samples=8", "train.epochs=1", "eval.max_samples=8"]


def train(config: str, name: str, runs: Path, extra: list[str]) -> Path:
    from evolora.config import load_config
    from evolora.experiment import run_experiment

    cfg = load_config(config, [f"output_dir={runs}", f"name={name}", "strategies=[finetune]", *SMALL, *extra])
    run_experiment(cfg)
    return runs / name


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--runs", default=str(Path.home() / ".cache" / "evolora" / "bench-runs"))
    ap.add_argument("--out", default="benchmarks/results/recommend.json")
    args = ap.parse_args()

    from evolora.api import Recommender

    runs = Path(args.runs)
    ctr_root = train("configs/quickstart.yaml", "bench-ctr", runs, [])
    next_root = train(
        "configs/next-item-ml100k.yaml", "bench-next-item", runs, ["task.semantic_ids.epochs=30"]
    )
    rng = np.random.default_rng(0)
    figures = {}
    for kind, root in (("ctr", ctr_root), ("next_item", next_root)):
        load_s, rec = timed(lambda root=root: Recommender.load(root, method="finetune"))
        users = [str(u) for u in rng.choice(rec.known_users, size=args.users, replace=False)]
        items = sorted(rec.strategy.task.items)

        def ask(user: str, rec=rec, kind=kind, items=items) -> object:
            if kind == "ctr":
                candidates = [str(i) for i in rng.choice(items, size=20, replace=False)]
                return rec.score(user=user, items=candidates)
            return rec.recommend(user=user, k=10)

        ask(users[0])  # warm-up
        seconds = [timed(lambda u=u: ask(u))[0] for u in users]
        figures[kind] = {
            "load_seconds": round(load_s, 2),
            "per_user_seconds_median": round(float(np.median(seconds)), 3),
            "per_user_seconds_p90": round(float(np.percentile(seconds, 90)), 3),
            "users": len(users),
            "request": "score 20 candidates" if kind == "ctr" else "recommend k=10 (10 beams)",
            "precision": rec.strategy.lm.precision,
        }
        rec.strategy.teardown()
        print(kind, figures[kind])
    result = {
        "benchmark": "recommend",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        **figures,
    }
    write_record(args.out, result)
    print(json.dumps(result, indent=2))  # with the machine block it added


if __name__ == "__main__":
    main()
