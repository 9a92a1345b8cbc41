"""Where a CTR training step's time goes, on whatever device the model runs on (the GPU when there is one).

    python benchmarks/profile_train_step.py [--config configs/quickstart.yaml] [--model NAME] [--steps 10]
                                            [--batch 8] [--out benchmarks/results/profile_train_step.json]

It times the steps of evolora's training (the task's loss on a batch of the config's stage-1 training rows,
backward, AdamW on the adapter) and the same loss alone without backward, each after two warm-up steps and
with the device synchronised around the clock; then it profiles a few steps with `torch.profiler` and keeps
the 25 operations that took the most time on the device (self time; on a CPU the host's), with their call
counts. A step that is slow on a GPU for reasons other than its arithmetic (many small kernels, host work
between them, copies) shows here: compare the step's seconds with the operations' device time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from record import write_record


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn`, after two warm-up calls, the device synchronised around the clock."""
    for _ in range(2):
        fn(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--model", help="the backbone (default: the config's model.name)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/profile_train_step.json")
    args = ap.parse_args()

    from evolora.config import load_config
    from evolora.experiment import build_model_and_task, prepare_data

    sets = ["output_dir=runs", f"model.precision={args.precision}"]
    cfg = load_config(args.config, sets + ([f"model.name={args.model}"] if args.model else []))
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    task.before_stage(lm, 1)
    lm.activate("default", trainable=True)
    lm.model.train()
    params = [p for p in lm.trainable_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pool = prepared.pools[1].train
    batches = [pool[(i * args.batch) % len(pool) :][: args.batch] for i in range(args.steps + 2)]
    batches = [b if len(b) == args.batch else pool[: args.batch] for b in batches]

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        task.loss(lm, np.asarray(batches[i % len(batches)])).backward()
        optimizer.step()

    def forward(i: int) -> None:
        with torch.no_grad():
            task.loss(lm, np.asarray(batches[i % len(batches)]))

    device = lm.device
    seconds = {
        "train_step": _timed(step, args.steps, device),
        "loss_without_backward": _timed(forward, args.steps, device),
    }
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(min(5, args.steps)):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    on_device = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, on_device, 0.0), reverse=True)[:25]
    top = [
        {
            "op": e.key,
            "calls": e.count,
            "self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 3),
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
        }
        for e in events
    ]
    kernels = sum(e.count for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0)
    record = {
        "model": cfg.model.name,
        "device": str(device),
        "precision": cfg.model.precision,
        "batch": args.batch,
        "steps": args.steps,
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
        "train_samples_per_s": round(args.batch / seconds["train_step"], 2),
        "profiled_steps": min(5, args.steps),
        "device_ops_in_profile": kernels,
        "top_ops": top,
    }
    write_record(Path(args.out), record)
    print(json.dumps({k: v for k, v in record.items() if k != "top_ops"}, indent=2))
    for e in top[:12]:
        print(f"{e['op'][:60]:60s} {e['calls']:6d} {e['self_device_ms']:10.2f} {e['self_cpu_ms']:10.2f}")


if __name__ == "__main__":
    main()
