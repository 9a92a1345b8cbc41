"""Throughput and memory of CTR training and scoring, as ratios against a plain baseline loop.

The baseline is what a hand-written TALLRec loop does: left-padded prompts through the whole causal LM,
vocabulary logits at every position, P(Yes) read from the full softmax, fp32; training with HF-style labels
(-100 on the prompt). Each evolora variant runs on the same samples in the same process run, so the ratios
compare like with like on whatever machine runs this.

    python benchmarks/bench_ctr.py [--model NAME] [--samples 48] [--out benchmarks/results/ctr.json]

It also runs, in one thread, evolora's scoring and fwd+bwd interleaved with a plain transformers + PEFT loop
on the same model and rows (`interleaved`), and reports the FLOP/s evolora reaches as a fraction of a
matrix-product peak measured in the same process.

Every variant runs in its own subprocess so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from record import description, write_record

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


def matmul_peak(dtype_name: str, n: int = 1024, repeats: int = 7) -> float:
    """FLOP/s of the best of `repeats` n x n matrix products in this thread (2·n³ FLOPs each)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(model: str, precision: str, samples: int, batch: int, repeats: int) -> dict:
    """Runs inside a subprocess, one thread: evolora's CTR scoring and fwd+bwd against a plain
    transformers + PEFT loop on the same PEFT model and rows (right padding, full vocabulary logits, the
    loss over the answer tokens), alternating A, B, A, B so load drifts hit both; medians and achieved
    FLOP/s as a fraction of a matmul peak measured here.

    FLOPs counted (P the decoder's linear-layer parameters, d its width, V the vocabulary): scoring
    2·P·T + 2·2·d·n (the two answer rows of the output layer for each of n prompts); fwd+bwd
    4·P·(T + A) + 4·V·d·A, a forward and a backward pass (activation gradients only through the frozen base;
    LoRA's weight gradients are negligible) over the T prompt tokens and A answer tokens, with full-vocabulary
    logits at the answer tokens. T counts the real (non-padding) tokens as computed: the shared instruction
    prefix once per batch where it runs as a pass of its own (a CPU), in every row elsewhere, and each row's
    own tokens once. Attention scores are left out (under 10% at ~200
    tokens and this model's width), so the fraction is a lower bound.
    """
    import numpy as np
    import torch

    from evolora.config import CtrTaskConfig, ModelConfig, load_config
    from evolora.experiment import prepare_data
    from evolora.models.llm import LoraLM, splits_prefix
    from evolora.tasks.ctr import ctr_task_for

    torch.set_num_threads(1)
    cfg = load_config(None, ["staging.n_stages=4", "eval.max_samples=64"])
    prepared = prepare_data(cfg)
    lm = LoraLM.from_config(ModelConfig(name=model, precision=precision))
    task = ctr_task_for(cfg.model_copy(update={"task": CtrTaskConfig()}), prepared, lm.tokenizer)
    rows = np.sort(np.random.default_rng(0).choice(prepared.pools[2].test, size=samples, replace=False))
    tok = lm.tokenizer
    pad = tok.pad_token_id or 0

    def plain_batch(rs: np.ndarray, with_answer: bool):
        seqs, answers = [], []
        for r in rs:
            e = task.encode(int(r))
            seqs.append(task.prefix + e.body + (e.answer if with_answer else []))
            answers.append(len(e.answer) if with_answer else 0)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # right padding
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = torch.full_like(ids, -100)
        for i, (s, a) in enumerate(zip(seqs, answers, strict=True)):
            labels[i, len(s) - a : len(s)] = ids[i, len(s) - a : len(s)]
        return ids.to(lm.device), mask.to(lm.device), labels.to(lm.device), [len(s) for s in seqs]

    def plain_score(rs: np.ndarray) -> np.ndarray:
        ids, mask, _, lengths = plain_batch(rs, False)
        with torch.no_grad(), lm.autocast():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        last = logits[torch.arange(len(rs)), torch.tensor(lengths) - 1]
        pair = torch.softmax(last[:, [task.yes_id, task.no_id]], -1)
        return pair[:, 0].cpu().numpy()

    def plain_train(rs: np.ndarray) -> None:
        ids, mask, labels, _ = plain_batch(rs, True)
        with lm.autocast():
            loss = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()

    def ours_score(rs: np.ndarray) -> np.ndarray:
        return np.asarray(task.predict(lm, rs, batch))

    def ours_train(rs: np.ndarray) -> None:
        task.loss(lm, rs).backward()

    def over_batches(fn) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            fn(rows[i : i + batch])
        return time.perf_counter() - t0

    lm.model.eval()
    agree = float(np.abs(plain_score(rows[:batch]) - ours_score(rows[:batch])).max())
    kinds = ("plain score", "evolora score", "plain fwd+bwd", "evolora fwd+bwd")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        lm.model.eval()
        times["plain score"].append(over_batches(plain_score))
        times["evolora score"].append(over_batches(ours_score))
        lm.activate("default", trainable=True)
        lm.model.train()
        times["plain fwd+bwd"].append(over_batches(plain_train))
        times["evolora fwd+bwd"].append(over_batches(ours_train))
        lm.model.zero_grad(set_to_none=True)

    cfg_m = lm.base.config
    decoder = lm.base.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    # The shared instruction prefix is computed once per batch where it is a pass of its own (a CPU), in
    # every row elsewhere (as the plain loop computes it): counted as computed, not as read.
    separate = lm.separate_prefix_pass if lm.separate_prefix_pass is not None else splits_prefix(lm.device)
    prefix_passes = -(-len(rows) // batch) if separate else len(rows)
    tokens = prefix_passes * len(task.prefix) + sum(len(task.encode(int(r)).body) for r in rows)
    answer_tokens = sum(len(task.encode(int(r)).answer) for r in rows)
    vocab_rows = cfg_m.vocab_size * cfg_m.hidden_size
    # evolora computes 2 output rows per scored prompt; fwd+bwd adds the answer tokens, full-vocab at them
    score_flops = 2 * linear * tokens + 2 * 2 * cfg_m.hidden_size * len(rows)
    train_flops = 4 * linear * (tokens + answer_tokens) + 4 * vocab_rows * answer_tokens
    peak = matmul_peak("bf16" if precision == "bf16-mixed" else "fp32")
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "precision": precision,
        "threads": torch.get_num_threads(),
        "rows": len(rows),
        "repeats": repeats,
        "seconds_median": med,
        "seconds_all": times,
        "speedup_score": med["plain score"] / med["evolora score"],
        "speedup_fwd_bwd": med["plain fwd+bwd"] / med["evolora fwd+bwd"],
        "max_probability_difference": agree,
        "tokens": tokens,
        "matmul_peak_gflops": peak / 1e9,
        "evolora_score_gflops": score_flops / med["evolora score"] / 1e9,
        "evolora_fwd_bwd_gflops": train_flops / med["evolora fwd+bwd"] / 1e9,
        "score_fraction_of_peak": score_flops / med["evolora score"] / peak,
        "fwd_bwd_fraction_of_peak": train_flops / med["evolora fwd+bwd"] / peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/ctr.json")
    ap.add_argument("--interleaved-samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.child.startswith("interleaved "):
        precision = args.child.split(" ", 1)[1]
        sizes = (args.interleaved_samples, args.batch, args.repeats)
        print(json.dumps(interleaved(args.model, precision, *sizes)))
        return
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
    plain = {}
    precisions = ["fp32"] + (["bf16-mixed"] if cpu_has_native_bf16() else [])
    for precision in precisions:
        cmd = [sys.executable, __file__, "--child", f"interleaved {precision}", "--model", args.model]
        cmd += ["--interleaved-samples", str(args.interleaved_samples), "--repeats", str(args.repeats)]
        cmd += ["--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"interleaved {precision} failed:\n{out.stderr[-2000:]}")
        plain[precision] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"measured: interleaved against transformers + PEFT, {precision}", file=sys.stderr)
    base = rows[next(iter(VARIANTS))]
    from evolora.models.precision import machine

    print(f"\nCTR throughput, {args.model}, {args.samples} samples, batch {args.batch}, {machine()}")
    print(
        f"{'variant':42s} {'score/s':>8s} {'x base':>7s} {'train/s':>8s} {'x base':>7s} {'peak RSS MB':>12s}"
    )
    for name, r in rows.items():
        score, train = r["score_samples_per_s"], r["train_samples_per_s"]
        print(
            f"{name:42s} {score:8.2f} {score / base['score_samples_per_s']:7.2f} "
            f"{train:8.2f} {train / base['train_samples_per_s']:7.2f} {r['peak_rss_mb']:12.0f}"
        )
    print("\nInterleaved, one thread, same rows: evolora vs a plain transformers + PEFT loop")
    for precision, r in plain.items():
        print(
            f"{precision:10s} scoring {r['speedup_score']:.2f}x, fwd+bwd {r['speedup_fwd_bwd']:.2f}x "
            f"(max |dP| {r['max_probability_difference']:.1e}); achieved {r['evolora_score_gflops']:.1f} / "
            f"{r['evolora_fwd_bwd_gflops']:.1f} GFLOP/s = {r['score_fraction_of_peak']:.0%} / "
            f"{r['fwd_bwd_fraction_of_peak']:.0%} of the {r['matmul_peak_gflops']:.1f} GFLOP/s matmul peak"
        )
    record = {
        "model": args.model,
        "samples": args.samples,
        "batch": args.batch,
        "interleaved_vs_transformers_peft": plain,
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
    write_record(args.out, record)


if __name__ == "__main__":
    main()
