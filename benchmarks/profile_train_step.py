"""Where a CTR training step's time goes, on whatever device the model runs on (the GPU when there is one).

    python benchmarks/profile_train_step.py [--config configs/quickstart.yaml] [--model NAME]
                                            [--batch 8 [32 ...]] [--steps 10] [--repeats 3] [--set k=v ...]
                                            [--out benchmarks/results/profile_train_step.json]

One step is the task's loss on a batch of the config's stage-1 training rows, backward, and AdamW on the
adapter. Three ways of computing the same loss are timed, alternated A, B, C, A, B, C over `--repeats` rounds
of `--steps` steps (medians; the device synchronised around the clock, two warm-up steps each):

- `prefix_pass`: `task.loss` with the template's shared instruction run as a pass of its own (one row; its
  keys/values repeated over the batch) before the rest (`LoraLM.separate_prefix_pass = True`);
- `prefix_in_every_row`: `task.loss` with the instruction in front of every sequence (one pass);
- `plain_hf_peft`: the PEFT model called the plain way (right padding, labels on the answer tokens,
  vocabulary logits at every position), the baseline.

`default_way` says which of the first two a run uses on this device (`models.llm.splits_prefix`). For those
two, `score_step_s` is the time of scoring the same batch (yes/no logits, no gradient), measured the same way.
`trainer_step_s` is a step of evolora's own epoch loop (`train.trainer._train_epoch` over as many rows, in
batches of the same size, without length grouping), alternated with the others: what the loop adds to the
default way's bare step (reading the loss for the progress bar, clipping, the scheduler), which on a GPU
includes a host-device synchronisation per step.

Then each is profiled for a few steps with `torch.profiler`: the operations launched per step (on a GPU, the
kernels; on a CPU, the aten operations) and the share of the step's wall time the device was busy
(`device_busy`: summed kernel time / wall time; on a CPU not measured). A step that is slow on a GPU for
reasons other than its arithmetic (host-bound: many small kernels, the device waiting for Python) has a
low `device_busy` and a step time near kernels x a few microseconds. The 25 costliest operations of the
default way's step are kept with their call counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from record import description, write_record


def _timed(fn: Callable[[int], None], steps: int, device: torch.device) -> float:
    """Seconds per call of `fn`, after two warm-up calls, the device synchronised around the clock."""
    for i in range(2):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def _profiled(fn: Callable[[int], None], steps: int, device: torch.device) -> tuple[dict, list]:
    """Operations per step and the device's busy share over `steps` profiled calls, and the events."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    fn(0)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    if device.type == "cuda":
        # Kernels, memsets and copies are the events with time on the device and no CPU-side time of
        # their own; aten operations carry device time of the kernels they launched, so they are left out.
        device_events = [e for e in events if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
        launched = sum(e.count for e in device_events)
        busy = sum(e.self_device_time_total for e in device_events) / 1e6 / wall
    else:
        launched = sum(e.count for e in events if e.key.startswith("aten::"))
        busy = None
    figures = {
        "ops_per_step": round(launched / steps),
        "device_busy": None if busy is None else round(busy, 3),
        "profiled_wall_s_per_step": round(wall / steps, 5),  # the profiler's own overhead included
    }
    return figures, list(events)


def _top(events: list, device: torch.device, n: int = 25) -> list[dict]:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:n]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1e3, 3),
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
        }
        for e in events
    ]


def ctr_training(config: str, sets: list[str], script: str) -> tuple[Any, Any, Any, Any, list]:
    """(config, prepared data, model, task, trainable parameters) of a CTR config, its default adapter made
    trainable at stage 1 in train mode: the set-up of a training step's profile (here and in
    profile_attention.py)."""
    from evolora.config import load_config
    from evolora.experiment import build_model_and_task, prepare_data

    cfg = load_config(config, sets)
    if cfg.task.name != "ctr":
        raise SystemExit(f"{script} measures the CTR task; the config's task is {cfg.task.name}")
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    task.before_stage(lm, 1)
    lm.activate("default", trainable=True)
    lm.model.train()
    return cfg, prepared, lm, task, [p for p in lm.trainable_parameters() if p.requires_grad]


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--model", help="the backbone (default: the config's model.name)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and way")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of A, B, C (medians)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--set", action="append", default=[], dest="sets", help="a config override, k=v")
    ap.add_argument("--out", default="benchmarks/results/profile_train_step.json")
    args = ap.parse_args()

    from evolora.models.llm import splits_prefix
    from evolora.models.precision import precision_name

    sets = ["output_dir=runs", f"model.precision={args.precision}", *args.sets]
    sets += [f"model.name={args.model}"] if args.model else []
    cfg, prepared, lm, task, params = ctr_training(args.config, sets, "profile_train_step")
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pool = np.asarray(prepared.pools[1].train)
    device = lm.device
    default_way = "prefix_pass" if splits_prefix(device) else "prefix_in_every_row"

    def plain_inputs(rows: np.ndarray) -> dict[str, torch.Tensor]:
        seqs, answers = [], []
        for r in rows:
            e = task.encode(int(r))
            seqs.append(task.prefix + e.body + e.answer)
            answers.append(len(e.answer))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), task.pad_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for i, (s, a) in enumerate(zip(seqs, answers, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(s) - a : len(s)] = ids[i, len(s) - a : len(s)]
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def ways(batches: list[np.ndarray]) -> dict[str, Callable[[int], None]]:
        plain = [plain_inputs(b) for b in batches]

        def evolora(i: int, separate: bool) -> None:
            lm.separate_prefix_pass = separate
            optimizer.zero_grad(set_to_none=True)
            task.loss(lm, batches[i % len(batches)]).backward()
            optimizer.step()

        def plain_step(i: int) -> None:
            optimizer.zero_grad(set_to_none=True)
            with lm.autocast():
                loss = lm.model(**plain[i % len(plain)]).loss
            loss.backward()
            optimizer.step()

        return {
            "prefix_pass": lambda i: evolora(i, separate=True),
            "prefix_in_every_row": lambda i: evolora(i, separate=False),
            "plain_hf_peft": plain_step,
        }

    def trainer_epoch(rows: np.ndarray, batch: int) -> Callable[[int], None]:
        from evolora.train.trainer import _train_epoch

        tcfg = cfg.train.model_copy(update={"batch_size": batch, "grad_accum": 1, "group_by_length": False})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

        def epoch(i: int) -> None:
            _train_epoch(lm, task, params, rows, tcfg, 0, i, optimizer, scheduler, None, "profiling")

        return epoch

    def scoring(batches: list[np.ndarray], separate: bool) -> Callable[[int], None]:
        def score(i: int) -> None:
            lm.separate_prefix_pass = separate
            lm.model.eval()
            task.answer_logits(lm, batches[i % len(batches)])
            lm.model.train()

        return score

    results, top = [], []
    for batch in args.batch:
        starts = [(i * batch) % max(1, len(pool) - batch + 1) for i in range(args.steps + 2)]
        batches = [pool[s : s + batch] for s in starts]
        steps = ways(batches)
        scores = {"prefix_pass": scoring(batches, True), "prefix_in_every_row": scoring(batches, False)}
        epoch = trainer_epoch(np.concatenate(batches[: args.steps]), batch)
        times: dict[str, list[float]] = {name: [] for name in [*steps, *(f"score {n}" for n in scores)]}
        times["trainer"] = []
        for _ in range(args.repeats):
            for name, fn in steps.items():
                times[name].append(_timed(fn, args.steps, device))
            for name, fn in scores.items():
                times[f"score {name}"].append(_timed(fn, args.steps, device))
            times["trainer"].append(_timed(epoch, 1, device) / args.steps)  # one epoch = `steps` steps
        row: dict = {"batch": batch, "ways": {}}
        for name, fn in steps.items():
            seconds = statistics.median(times[name])
            figures, events = _profiled(fn, min(3, args.steps), device)
            row["ways"][name] = {
                "step_s": round(seconds, 5),
                "samples_per_s": round(batch / seconds, 2),
                **figures,
            }
            if name in scores:
                row["ways"][name]["score_step_s"] = round(statistics.median(times[f"score {name}"]), 5)
            if name == default_way:
                row["ways"][name]["trainer_step_s"] = round(statistics.median(times["trainer"]), 5)
                top = top or _top(events, device)
        lm.separate_prefix_pass = None
        base = row["ways"]["plain_hf_peft"]["step_s"]
        for figures in row["ways"].values():
            figures["vs_plain"] = round(base / figures["step_s"], 3)  # > 1: faster than the baseline
        results.append(row)
        print(json.dumps(row, indent=2))

    record = {
        "model": cfg.model.name,
        "device": str(device),
        "precision": precision_name(cfg.model.precision, device),
        "prefix_tokens": len(task.prefix),
        "default_way": default_way,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
        "top_ops_evolora": top,
    }
    write_record(Path(args.out), record)
    for e in top[:12]:
        print(f"{e['op'][:60]:60s} {e['calls']:6d} {e['self_device_ms']:10.2f} {e['self_cpu_ms']:10.2f}")


if __name__ == "__main__":
    main()
