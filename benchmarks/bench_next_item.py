"""Next-item evaluation throughput (users/s): evolora's batched trie beam search against HF `generate`.

The baseline is how PESO's release evaluates: `model.generate(num_beams=10, num_return_sequences=10,
prefix_allowed_tokens_fn=...)` one user at a time (its test batch size is 1), here with the same prefix trie
so both search the same space. evolora runs users in batches, shares the prompt's instruction prefix, and
builds the constraint mask from the trie directly. Both run in this process on the same users, after a
warm-up, interleaved with the second ratio's two searches (medians); the script also reports how often the
two agree on the top item (they should, up to ties). Without the config's data (PESO's release in
`../shared/data`) it says so and writes nothing.

A second ratio measures what evaluation no longer repeats, on the same users and model in this process:
`long_way` is evolora's search with a copy of each prompt's keys and values per beam and PEFT's merged
vocabulary matrix rebuilt for every pass (what it did before), against the default (one prompt cache for
all beams through a 4-D mask, looked-up token rows), `--repeats` times each, and must rank the same items.

A third ratio times `model.merge_lora` (the LoRA update merged into the base weights for the search) against
the LoRA products on the same users, with a random B standing in for a trained adapter, and says how many
users it ranks the same and by how much the scores differ.

Last, one search is timed by phase (`phase_profile`): where the time goes, the passes' FLOP/s against a
matmul peak measured here, and the users/s the search would reach with its passes at that peak.

    python benchmarks/bench_next_item.py [--config configs/next-item-cds-peso.yaml] [--users 24]
        [--threads 1] [--precision fp32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from record import description, write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--config", default="configs/next-item-cds-peso.yaml")
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/next_item.json")
    ap.add_argument("--model", help="the backbone (default: the config's model.name)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from evolora.config import load_config
    from evolora.data.fetch import registered_datasets
    from evolora.experiment import build_model_and_task, prepare_data

    sets = ["output_dir=runs", f"model.precision={args.precision}"]
    cfg = load_config(args.config, sets + ([f"model.name={args.model}"] if args.model else []))
    if not Path(cfg.data.source).expanduser().exists() and cfg.data.source not in registered_datasets():
        print(f"skipped: {cfg.data.source} is not on this machine (pass --config for another dataset)")
        return
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(prepared.pools[2].test, size=args.users, replace=False))
    lm.activate("default", trainable=False)

    trie = task.trie

    def allowed(batch_id: int, ids: torch.Tensor, start: int) -> list[int]:
        generated = tuple(ids[start:].tolist())
        if len(generated) >= trie.depth:
            return [lm.tokenizer.eos_token_id]
        return trie.children(generated)

    def hf_generate_top(rs: np.ndarray) -> list:
        """The plain way: HF `generate` with beam search, one user at a time, the trie as its constraint."""
        top = []
        for r in rs:
            e = task.encode(int(r))
            prompt = torch.tensor([task.prefix + e.body], device=lm.device)
            with torch.no_grad(), lm.autocast():
                out = lm.model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    num_beams=task.cfg.beams,
                    num_return_sequences=task.cfg.beams,
                    max_new_tokens=trie.depth,
                    do_sample=False,
                    prefix_allowed_tokens_fn=lambda b, ids, s=prompt.shape[1]: allowed(b, ids, s),
                    pad_token_id=lm.tokenizer.pad_token_id,
                    eos_token_id=None,
                    use_cache=True,
                )
            top.append(trie.item(tuple(out[0, prompt.shape[1] : prompt.shape[1] + trie.depth].tolist())))
        return top

    task.predict(lm, rows[:2], args.batch)  # warm-ups
    hf_generate_top(rows[:1])
    # Interleaved (evolora, the long way, HF generate, evolora, ...), so load drifts hit all three; medians.
    ours_times, long_times, base_times = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = task.predict(lm, rows, args.batch)
        ours_times.append(time.perf_counter() - t0)
        with the_long_way(lm):
            t0 = time.perf_counter()
            long = task.predict(lm, rows, args.batch)
            long_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        base_top = hf_generate_top(rows)
        base_times.append(time.perf_counter() - t0)
    ours_rate = len(rows) / float(np.median(ours_times))
    long_rate = len(rows) / float(np.median(long_times))
    base_rate = len(rows) / float(np.median(base_times))
    same_items = float(np.mean(np.all(long.items == ours.items, axis=1)))
    agree = float(np.mean(np.array(base_top) == ours.items[:, 0]))

    # `model.merge_lora`: the same search on base weights with the update merged in, on a trained-like
    # adapter (B drawn at random, fixed seed: a fresh adapter's B = 0 would merge nothing), interleaved.
    merged_rate, unmerged_rate, merged_same, merged_diff = merged_comparison(lm, task, rows, args)

    phases = phase_profile(lm, task, rows, args)

    # Training throughput of the next-item loss, for the record.
    lm.activate("default", trainable=True)
    lm.model.train()
    train_rows = prepared.pools[1].train[: args.batch * 3]
    task.loss(lm, train_rows[: args.batch]).backward()
    t0 = time.perf_counter()
    for i in range(0, len(train_rows), args.batch):
        task.loss(lm, train_rows[i : i + args.batch]).backward()
    train_rate = len(train_rows) / (time.perf_counter() - t0)

    record = {
        "config": args.config,
        "model": cfg.model.name,
        "precision": lm.precision,
        "users": len(rows),
        "beams": task.cfg.beams,
        "items": len(task.item_ids),
        "id_tokens": trie.depth,
        "baseline_hf_generate_users_per_s": base_rate,
        "evolora_users_per_s": ours_rate,
        "speedup": ours_rate / base_rate,
        "long_way_users_per_s": long_rate,
        "speedup_vs_long_way": ours_rate / long_rate,
        "same_items_as_long_way": same_items,
        "merged_users_per_s": merged_rate,
        "unmerged_users_per_s_same_adapter": unmerged_rate,
        "speedup_merged": merged_rate / unmerged_rate,
        "merged_same_items": merged_same,
        "merged_max_score_difference": merged_diff,
        "top1_agreement": agree,
        **phases,
        "train_samples_per_s": train_rate,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_record(args.out, record)
    print(json.dumps(record, indent=2))  # with the machine block it added


def merged_comparison(lm: Any, task: Any, rows: np.ndarray, args: argparse.Namespace) -> tuple[float, ...]:
    """users/s with and without `model.merge_lora` (medians of interleaved repeats), the share of users
    ranked the same, and the largest difference of a ranked item's score."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _, _, b in lm.lora_pairs():
            b.normal_(0, 0.02)
    times: dict[bool, list[float]] = {False: [], True: []}
    out = {}
    for _ in range(args.repeats):
        for merge in (False, True):
            lm.merge_lora = merge
            t0 = time.perf_counter()
            out[merge] = task.predict(lm, rows, args.batch)
            times[merge].append(time.perf_counter() - t0)
    lm.merge_lora = False
    a, b = out[False], out[True]
    finite = np.isfinite(a.scores) & np.isfinite(b.scores)
    rates = [len(rows) / float(np.median(times[m])) for m in (True, False)]
    same = float(np.mean(np.all(a.items == b.items, axis=1)))
    return rates[0], rates[1], same, float(np.max(np.abs(a.scores - b.scores)[finite]))


def phase_profile(lm: Any, task: Any, rows: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """Where one search's time goes, and how far from a matmul peak measured here each pass runs.

    Decoder passes and the output layer after them are timed by phase: the prompt pass (the history, after
    the shared prefix), the decoding steps (`beams` rows per user and step, each with the full-vocabulary
    output layer the log-softmax needs) and the true item's teacher-forced tokens (`nll`); `rest` is the
    search's own bookkeeping (trie look-ups, masks, log-softmax, top-k). FLOPs: 2·P per token through the
    decoder's linear layers (P) and 2·V·d per row through the output layer (V x d); attention scores left
    out, so the fractions are lower bounds.
    `ceiling_users_per_s` is what the search would give with the prompt and decoding passes at the peak and
    the rest as measured: the most any faster kernel could give on this CPU.
    """
    from bench_ctr import matmul_peak

    from evolora.models.llm import pass_tokens
    from evolora.tasks import decoding

    spent = {"prompt": 0.0, "decode": 0.0, "target": 0.0}
    tokens = {"prompt": 0, "decode": 0, "target": 0}
    phase = ["prompt"]
    run_decoder, advance, forced = (
        decoding.run_decoder,
        decoding._SharedPromptBeams.advance,
        decoding._teacher_forced,
    )

    def timed_run(decoder, cache, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = run_decoder(decoder, cache, **kw)
        spent[phase[0]] += time.perf_counter() - t0
        tokens[phase[0]] += pass_tokens(kw["input_ids"], kw["attention_mask"])
        return out

    def in_phase(name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            phase[0] = name
            try:
                return fn(*a, **kw)
            finally:
                phase[0] = "prompt"

        return wrapped

    logits_from_hidden = lm.logits_from_hidden

    def timed_head(*a: Any, **kw: Any) -> Any:  # the output layer's time goes to the phase its FLOPs do
        t0 = time.perf_counter()
        out = logits_from_hidden(*a, **kw)
        spent[phase[0]] += time.perf_counter() - t0
        return out

    lm.logits_from_hidden = timed_head
    decoding.run_decoder = timed_run
    decoding._SharedPromptBeams.advance = in_phase("decode", advance)
    decoding._teacher_forced = in_phase("target", forced)
    try:
        t0 = time.perf_counter()
        task.predict(lm, rows, args.batch)
        total = time.perf_counter() - t0
    finally:
        decoding.run_decoder, decoding._SharedPromptBeams.advance = run_decoder, advance
        decoding._teacher_forced = forced
        del lm.logits_from_hidden  # the instance attribute; the class's method shows through again
    decoder = lm.base.get_decoder()
    linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    head = lm.base.get_output_embeddings().weight.numel()
    flops = {
        "prompt": 2 * linear * tokens["prompt"] + 2 * head * len(rows),
        "decode": 2 * (linear + head) * tokens["decode"],
    }
    peak = matmul_peak("fp32")
    rest = total - sum(spent.values())
    at_peak = flops["prompt"] / peak + flops["decode"] / peak + spent["target"] + rest
    return {
        "matmul_peak_gflops": peak / 1e9,
        **{f"{k}_seconds_share": v / total for k, v in spent.items()},
        "rest_seconds_share": rest / total,
        "prompt_tokens_per_user": tokens["prompt"] / len(rows),
        "decode_rows_per_user": tokens["decode"] / len(rows),
        "prompt_fraction_of_peak": flops["prompt"] / spent["prompt"] / peak,
        "decode_fraction_of_peak": flops["decode"] / spent["decode"] / peak,
        "ceiling_users_per_s": len(rows) / at_peak,
        "profiled_users_per_s": len(rows) / total,
    }


@contextlib.contextmanager
def the_long_way(lm: Any) -> Iterator[None]:
    """evolora's search as it ran before: a prompt cache copied per beam, PEFT's own token-row layers."""
    from evolora.tasks import decoding

    share = decoding._beams_share_the_prompt
    layers = [(m, type(m)) for m in lm.token_layers()]
    decoding._beams_share_the_prompt = lambda lm, columns: False
    for m, cls in layers:
        m.__class__ = cls.__mro__[1]  # token_rows.install made it a subclass of PEFT's
    try:
        yield
    finally:
        decoding._beams_share_the_prompt = share
        for m, cls in layers:
            m.__class__ = cls


if __name__ == "__main__":
    main()
