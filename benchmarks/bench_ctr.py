"""Throughput and memory of CTR training and scoring, as ratios against a plain baseline loop.

The baseline is what a hand-written TALLRec loop does: left-padded prompts through the whole causal LM,
vocabulary logits at every position, P(Yes) read from the full softmax, fp32; training with HF-style labels
(-100 on the prompt). Each evolora variant runs on the same samples in the same process run, so the ratios
compare like with like on whatever machine runs this.

    python benchmarks/bench_ctr.py [--model NAME] [--samples 48] [--out benchmarks/results/ctr.json]

Every variant runs in its own subprocess so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "baseline (full logits, fp32)": {"mode": "baseline", "precision": "fp32", "share_prefix": False},
    "evolora answer-position logits, fp32": {"mode": "evolora", "precision": "fp32", "share_prefix": False},
    "+ shared prompt prefix, fp32": {"mode": "evolora", "precision": "fp32", "share_prefix": True},
    "+ shared prefix, bf16-mixed": {"mode": "evolora", "precision": "bf16-mixed", "share_prefix": True},
}


def measure(model: str, mode: str, precision: str, share_prefix: bool, samples: int, batch: int) -> dict:
    """Runs inside a subprocess: samples/s for scoring and for training, and peak RSS."""
    import resource

    import numpy as np
    import torch

    from evolora.config import CtrTaskConfig, ModelConfig, load_config
    from evolora.experiment import prepare_data
    from evolora.models.llm import LoraLM
    from evolora.tasks.ctr import ctr_task_for

    cfg = load_config(None, ["staging.n_stages=4", "eval.max_samples=64"])
    prepared = prepare_data(cfg)
    lm = LoraLM.from_config(ModelConfig(name=model, precision=precision))
    task = ctr_task_for(
        cfg.model_copy(update={"task": CtrTaskConfig(share_prefix=share_prefix)}), prepared, lm.tokenizer
    )
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(prepared.pools[2].test, size=samples, replace=False))

    if mode == "baseline":
        tok = lm.tokenizer

        def batch_ids(rs: np.ndarray, with_answer: bool):
            seqs = []
            for r in rs:
                e = task.encode(int(r))
                seqs.append(task.prefix + e.body + (e.answer if with_answer else []))
            width = max(map(len, seqs))
            pad = tok.pad_token_id or 0
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=lm.device)  # left padding
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
            labels = ids.clone()
            for i in range(len(seqs)):
                answer = len(task.encode(int(rs[i])).answer) if with_answer else 0
                labels[i, : width - answer] = -100
            return ids, mask, labels

        def score(rs: np.ndarray) -> None:
            ids, mask, _ = batch_ids(rs, False)
            with torch.no_grad():
                logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, -1]
            p = torch.softmax(logits, -1)
            (p[:, task.yes_id] / (p[:, task.yes_id] + p[:, task.no_id])).cpu().numpy()

        def train_step(rs: np.ndarray) -> None:
            ids, mask, labels = batch_ids(rs, True)
            lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    else:

        def score(rs: np.ndarray) -> None:
            task.predict(lm, rs, batch)

        def train_step(rs: np.ndarray) -> None:
            task.loss(lm, rs).backward()

    score(rows[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        score(rows[i : i + batch])
    score_rate = len(rows) / (time.perf_counter() - t0)

    lm.activate("default", trainable=True)
    lm.model.train()
    train_rows = rows[: max(batch, len(rows) // 2)]
    train_step(train_rows[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(train_rows), batch):
        train_step(train_rows[i : i + batch])
    train_rate = len(train_rows) / (time.perf_counter() - t0)
    lengths = [len(task.prefix) + len(task.encode(int(r)).body) for r in rows]
    return {
        "score_samples_per_s": score_rate,
        "train_samples_per_s": train_rate,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_prompt_tokens": float(np.mean(lengths)),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/ctr.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = VARIANTS[args.child]
        print(json.dumps(measure(args.model, samples=args.samples, batch=args.batch, **spec)))
        return

    from evolora.models.precision import cpu_has_native_bf16

    rows = {}
    skipped = {}
    for name, spec in VARIANTS.items():
        if spec["precision"] == "bf16-mixed" and not cpu_has_native_bf16():
            # Emulated bf16 runs several times slower than fp32: not a configuration anyone should use.
            skipped[name] = "this CPU has no native bf16 (AVX512-BF16/AMX); precision auto uses fp32"
            print(f"skipped: {name} ({skipped[name]})", file=sys.stderr)
            continue
        sizes = ["--samples", str(args.samples), "--batch", str(args.batch)]
        cmd = [sys.executable, __file__, "--child", name, "--model", args.model, *sizes]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured: {name}", file=sys.stderr)
    base = rows[next(iter(VARIANTS))]
    machine = platform.processor() or platform.machine()
    print(f"\nCTR throughput, {args.model}, {args.samples} samples, batch {args.batch}, {machine}")
    print(
        f"{'variant':42s} {'score/s':>8s} {'x base':>7s} {'train/s':>8s} {'x base':>7s} {'peak RSS MB':>12s}"
    )
    for name, r in rows.items():
        score, train = r["score_samples_per_s"], r["train_samples_per_s"]
        print(
            f"{name:42s} {score:8.2f} {score / base['score_samples_per_s']:7.2f} "
            f"{train:8.2f} {train / base['train_samples_per_s']:7.2f} {r['peak_rss_mb']:12.0f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "samples": args.samples,
        "batch": args.batch,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "variants": rows,
        "skipped": skipped,
        "ratios_vs_baseline": {
            name: {
                "score": r["score_samples_per_s"] / base["score_samples_per_s"],
                "train": r["train_samples_per_s"] / base["train_samples_per_s"],
                "peak_rss": r["peak_rss_mb"] / base["peak_rss_mb"],
            }
            for name, r in rows.items()
        },
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
