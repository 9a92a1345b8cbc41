"""Attention's share of a bf16-mixed CTR training step on a CPU, and the step with attention in fp32.

    python benchmarks/profile_attention.py [--config configs/quickstart.yaml] [--batch 8] [--steps 4]
                                           [--repeats 3] [--out benchmarks/results/attention.json]

Under `precision: bf16-mixed` autocast runs `scaled_dot_product_attention` in bf16. On the Xeon with AMX
where this was written, PyTorch's CPU flash-attention backward in bf16 took twice its fp32 time at the
shapes of a CTR training step (SmolLM2-135M, batch 8, ~150 tokens after a 66-token shared prefix), a third
of the whole step. This script measures, on the machine it runs on, evolora's training step (the task's loss
on a batch of stage-1 rows, backward; the default way: the prefix as a pass of its own) two ways, alternated
A, B, A, B over `--repeats` rounds of `--steps` steps (medians, two warm-up steps each):

- `bf16_attention`: as a run computes it today;
- `fp32_attention`: the same step with each attention call computed in fp32 (q, k, v and the mask cast up,
  autocast off inside, the output cast back to bf16) while gradients are on; everything else unchanged.

and, profiled over a few steps of the first way, the share of the step's CPU time spent in the attention
kernels forward and backward. Not a product setting: fp32 attention changes a bf16-mixed run's figures
(`loss_difference`: the two ways' losses on the first batch), which is the owner's call (issue 16). Needs
a CPU with native bf16 (AVX512-BF16 or AMX): elsewhere bf16-mixed is not what `auto` picks.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from profile_train_step import ctr_training
from record import description, write_record

_sdpa = F.scaled_dot_product_attention


@contextmanager
def fp32_attention() -> Any:
    """Attention computed in fp32 while gradients are on, inside this block."""

    def upcast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")):
            return _sdpa(q, k, v, *args, **kwargs)
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dtype.is_floating_point:
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            return _sdpa(q.float(), k.float(), v.float(), *args, **kwargs).to(torch.bfloat16)

    F.scaled_dot_product_attention = upcast  # transformers' sdpa attention looks it up at each call
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round and way")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of A, B (medians)")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()

    from evolora.models.precision import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        raise SystemExit("profile_attention measures bf16-mixed, which needs a CPU with native bf16 here")
    torch.set_num_threads(1)
    sets = ["output_dir=runs", "model.precision=bf16-mixed", "threads=1"]
    cfg, prepared, lm, task, params = ctr_training(args.config, sets, "profile_attention")
    rows = np.asarray(prepared.pools[1].train[: args.batch])

    def step() -> float:
        with lm.autocast():
            loss = task.loss(lm, rows)
        loss.backward()
        for p in params:
            p.grad = None
        return float(loss)

    def timed(fp32: bool) -> float:
        with fp32_attention() if fp32 else contextlib.nullcontext():
            for _ in range(2):
                step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
        return (time.perf_counter() - t0) / args.steps

    torch.manual_seed(0)
    loss_bf16 = step()
    with fp32_attention():
        loss_fp32 = step()
    seconds: dict[str, list[float]] = {"bf16_attention": [], "fp32_attention": []}
    for _ in range(args.repeats):
        seconds["bf16_attention"].append(timed(False))
        seconds["fp32_attention"].append(timed(True))
    median = {k: statistics.median(v) for k, v in seconds.items()}

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = [e for e in events if "flash_attention" in e.key]  # (PyTorch's CPU SDPA kernels)
    flash = {
        "forward": sum(e.self_cpu_time_total for e in attention if "backward" not in e.key),
        "backward": sum(e.self_cpu_time_total for e in attention if "backward" in e.key),
    }
    body = [len(task.encode(int(r)).body) for r in rows]
    record = {
        "config": args.config,
        "model": cfg.model.name,
        "precision": "bf16-mixed",
        "threads": 1,
        "batch": len(rows),
        "prefix_tokens": len(task.prefix),
        "body_tokens_mean": float(np.mean(body)),
        "seconds_median": median,
        "seconds_all": seconds,
        "speedup_fp32_attention": median["bf16_attention"] / median["fp32_attention"],
        "attention_forward_share": flash["forward"] / total,
        "attention_backward_share": flash["backward"] / total,
        "loss_difference": abs(loss_bf16 - loss_fp32),
    }
    write_record(args.out, record)
    print(record)


if __name__ == "__main__":
    main()
