"""RecLoRA's personalized layer against a plain LoRA of the same rank: training step time and peak memory.

Each variant trains on the same batch (8 prompts of ~160 tokens, q_proj/v_proj, r = 8) in its own subprocess,
so its peak memory (max RSS) is its own; figures are ratios to the plain PEFT LoRA measured in the same run.

    python benchmarks/bench_personalized.py [--model NAME] [--n-meta 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from record import description, write_record

VARIANTS = {
    "plain LoRA (PEFT)": {"mode": "plain"},
    "personalized, combine=factors": {"mode": "factors"},
    "personalized, combine=products": {"mode": "products"},
}


def measure(model: str, mode: str, n_meta: int, steps: int, batch: int, length: int) -> dict:
    import resource

    import torch

    from evolora.config import ModelConfig
    from evolora.models.llm import LoraLM
    from evolora.models.personalized import PersonalizedLoRA

    torch.manual_seed(0)
    torch.set_num_threads(1)
    lm = LoraLM.from_config(ModelConfig(name=model, precision="fp32"))
    ids = torch.randint(0, lm.base.config.vocab_size, (batch, length))
    if mode == "plain":
        lm.activate("default", trainable=True)
        params = lm.trainable_parameters()
        route = None
    else:
        lm.activate("default", trainable=False)
        personal = PersonalizedLoRA(lm, d_gate=256, n_meta=n_meta, combine=mode)
        params = list(personal.parameters())
        route = personal.route(torch.randn(batch, 256))
        route.__enter__()
    opt = torch.optim.AdamW(params, lr=1e-4)
    lm.model.train()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        lm.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {
        "step_seconds": statistics.median(times[1:]),  # after a warm-up step
        "trainable_parameters": sum(p.numel() for p in params),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--n-meta", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=160)
    ap.add_argument("--out", default="benchmarks/results/personalized.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = VARIANTS[args.child]
        print(json.dumps(measure(args.model, spec["mode"], args.n_meta, args.steps, args.batch, args.length)))
        return
    rows = {}
    for name in VARIANTS:
        opts = ["--n-meta", str(args.n_meta), "--steps", str(args.steps), "--batch", str(args.batch)]
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--model",
            args.model,
            "--length",
            str(args.length),
            *opts,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["plain LoRA (PEFT)"]
    shape = f"batch {args.batch}x{args.length}, N_m={args.n_meta}, r=8"
    print(f"\npersonalized vs plain LoRA, {args.model}, {shape}")
    head = ("variant", "step s", "x plain", "params", "peak RSS MB", "x plain")
    print(f"{head[0]:34s} {head[1]:>8s} {head[2]:>8s} {head[3]:>10s} {head[4]:>12s} {head[5]:>8s}")
    for name, r in rows.items():
        step, rss = r["step_seconds"], r["peak_rss_mb"]
        print(
            f"{name:34s} {step:8.2f} {step / base['step_seconds']:8.2f} "
            f"{r['trainable_parameters']:10d} {rss:12.0f} {rss / base['peak_rss_mb']:8.2f}"
        )
    record = {
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "n_meta": args.n_meta,
        "variants": rows,
        "ratios_vs_plain": {
            name: {
                "step_time": r["step_seconds"] / base["step_seconds"],
                "peak_rss": r["peak_rss_mb"] / base["peak_rss_mb"],
            }
            for name, r in rows.items()
        },
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
