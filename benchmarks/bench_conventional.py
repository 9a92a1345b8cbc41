"""Training and evaluation throughput of the conventional recommenders on ML-100K, as ratios against MF.

For each model and task (CTR: all five models; next-item: all but DIN) on the stage-1 pools of the configs
`configs/conventional-ctr-ml100k.yaml` and `configs/conventional-next-item-ml100k.yaml`:

* training: samples/s of loss + backward + AdamW step, through the task's own `loss` (CTR: BCE; next-item:
  full softmax over the known items, BPR with sampled negatives for MF);
* evaluation: samples/s of CTR scoring, users/s of next-item full ranking (every known item scored,
  top 10 kept), through the task's own `predict`.

All models run in this process on the same rows, so the ratios against MF compare like with like on
whatever machine runs this.

    python benchmarks/bench_conventional.py [--train-samples 4096] [--eval-samples 1024] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from record import description, write_record

CONFIGS = {
    "ctr": "configs/conventional-ctr-ml100k.yaml",
    "next_item": "configs/conventional-next-item-ml100k.yaml",
}


def measure(cfg, prepared, rows_train: np.ndarray, rows_eval: np.ndarray, batch: int) -> dict[str, float]:
    from evolora.experiment import build_model_and_task

    lm, task = build_model_and_task(cfg, prepared)
    task.before_stage(lm, 1)
    lm.reset_adapter("default", seed=0)
    lm.activate("default", trainable=True)
    opt = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-3)
    lm.model.train()

    def step(rows: np.ndarray) -> None:
        opt.zero_grad(set_to_none=True)
        task.loss(lm, rows).backward()
        opt.step()

    step(rows_train[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(rows_train), batch):
        step(rows_train[i : i + batch])
    train_rate = len(rows_train) / (time.perf_counter() - t0)

    lm.activate("default", trainable=False)
    task.predict(lm, rows_eval[:batch], batch)  # warm-up
    t0 = time.perf_counter()
    task.predict(lm, rows_eval, batch)
    eval_rate = len(rows_eval) / (time.perf_counter() - t0)
    n_params = sum(p.numel() for n, p in lm.model.named_parameters() if not n.endswith("seen"))
    return {"train_samples_per_s": train_rate, "eval_per_s": eval_rate, "parameters": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--train-samples", type=int, default=4096)
    ap.add_argument("--eval-samples", type=int, default=1024, help="CTR samples; next-item users are capped")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/conventional.json")
    args = ap.parse_args()

    from evolora.config import load_config
    from evolora.experiment import prepare_data
    from evolora.models.conventional import MODELS

    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict[str, float]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for task_name, path in CONFIGS.items():
        cfg = load_config(path)
        prepared = prepare_data(cfg)
        pools = prepared.pools[1]
        rows_train = pools.train[: args.train_samples]
        # CTR: samples of the next stage; next-item: each user's held-out last item of stage 1.
        rows_eval = (prepared.pools[2].test if task_name == "ctr" else pools.test)[: args.eval_samples]
        sizes[task_name] = {"train": len(rows_train), "eval": len(rows_eval)}
        results[task_name] = {}
        for name, cls in MODELS.items():
            if task_name == "next_item" and not cls.ranking:
                continue
            model_cfg = load_config(path, [f"model.name={name}"])
            results[task_name][name] = measure(model_cfg, prepared, rows_train, rows_eval, args.batch)
            print(f"measured: {task_name} {name}", flush=True)

    from evolora.models.precision import machine

    print(
        f"\nConventional models on ML-100K, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{machine()}"
    )
    unit = {"ctr": "samples/s", "next_item": "users/s"}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for task_name, rows in results.items():
        base = rows["mf"]
        ratios[task_name] = {}
        print(f"\n{task_name}: train {sizes[task_name]['train']} samples, eval {sizes[task_name]['eval']}")
        print(f"{'model':10s} {'train/s':>9s} {'x MF':>6s} {'eval ' + unit[task_name]:>17s} {'x MF':>6s}")
        for name, r in rows.items():
            tr = r["train_samples_per_s"] / base["train_samples_per_s"]
            ev = r["eval_per_s"] / base["eval_per_s"]
            ratios[task_name][name] = {"train": tr, "eval": ev}
            print(f"{name:10s} {r['train_samples_per_s']:9.0f} {tr:6.2f} {r['eval_per_s']:17.0f} {ev:6.2f}")
    record = {
        "batch": args.batch,
        "sizes": sizes,
        "eval_unit": unit,
        "results": results,
        "ratios_vs_mf": ratios,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
