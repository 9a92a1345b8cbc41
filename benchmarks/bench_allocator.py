"""What `keep_freed_memory` (evolora/allocator.py) saves: page faults, kernel time and CPU time per workload.

Each workload runs in a fresh process twice per repeat, alternating, once with glibc's default thresholds
(`EVOLORA_KEEP_FREED_MEMORY=0`, the baseline) and once with them raised, one torch thread, on the same rows:

* `ctr`: SmolLM2-135M (fp32) scoring ML-100K D2 test rows and training on D1 rows (the quickstart's task);
* `next_item`: the same model's trie beam search (10 beams) and training on `configs/next-item-ml100k.yaml`
  (RQ-VAE semantic IDs, built and cached on first use);
* `conventional`: SASRec's full-softmax training steps and full ranking at 39k items on PESO's CDs & Vinyl
  release (`configs/conventional-next-item-cds.yaml`; skipped without `../shared/data`).

Per phase the child records wall seconds, user and system CPU seconds and minor page faults (getrusage), and
a digest of what it computed (predictions, losses, trained weights): the two modes must compute exactly the
same thing. Each phase runs twice and the second pass is measured (a run's steady state: its batch shapes
recur over epochs and stages).
The record gives medians over repeats and the ratios baseline / tuned of CPU seconds (user + system: less
sensitive to other load on the machine than wall time) and of wall time.

    python benchmarks/bench_allocator.py [--workloads ctr next_item conventional] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from record import description, refuse_partial_record, write_record

CDS_CONFIG = "configs/conventional-next-item-cds.yaml"


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def _phase(fn) -> tuple[dict[str, float], Any]:
    a = _usage()
    out = fn()
    b = _usage()
    return {"wall_s": b[0] - a[0], "user_s": b[1] - a[1], "sys_s": b[2] - a[2], "faults": b[3] - a[3]}, out


def _digest(h: Any, value: Any) -> None:
    if isinstance(value, dict):
        for k in sorted(value):
            h.update(k.encode())
            _digest(h, value[k])
    elif isinstance(value, list | tuple):
        for v in value:
            _digest(h, v)
    elif value is not None:
        h.update(np.ascontiguousarray(np.asarray(value)).tobytes())


def child(workload: str, samples: int, batch: int) -> dict[str, Any]:
    """Runs in a fresh process: the workload's scoring and training phases, measured."""
    import torch

    from evolora.allocator import keep_freed_memory
    from evolora.config import load_config
    from evolora.experiment import build_model_and_task, prepare_data

    applied = keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if workload == "ctr":
        cfg = load_config(None, ["staging.n_stages=4", "model.precision=fp32"])
    elif workload == "next_item":
        cfg = load_config("configs/next-item-ml100k.yaml", ["output_dir=runs"])
    else:
        cfg = load_config(CDS_CONFIG, ["model.name=sasrec"])
    prepared = prepare_data(cfg)
    lm, task = build_model_and_task(cfg, prepared)
    if workload == "conventional":
        task.before_stage(lm, 1)
        lm.reset_adapter("default", seed=0)
        eval_rows, train_rows = prepared.pools[1].valid[:samples], prepared.pools[1].train[: samples * 3]
    else:
        rng = np.random.default_rng(0)
        eval_rows = np.sort(rng.choice(prepared.pools[2].test, size=samples, replace=False))
        train_rows = prepared.pools[1].train[:samples]
    h = hashlib.sha256()
    lm.activate("default", trainable=False)
    # Each phase runs twice and the second pass is measured: the steady state of a run, whose batches
    # repeat their shapes over epochs and stages (the tuned heap grows during the first pass).
    task.predict(lm, eval_rows, batch)
    scoring, pred = _phase(lambda: task.predict(lm, eval_rows, batch))
    _digest(h, task.save_predictions(pred))

    lm.activate("default", trainable=True)
    lm.model.train()
    params = list(lm.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)

    def train() -> list[float]:
        losses = []
        for i in range(0, len(train_rows), batch):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(lm, train_rows[i : i + batch])
            loss.backward()
            opt.step()
            losses.append(float(loss))
        return losses

    _digest(h, train())
    training, losses = _phase(train)
    _digest(h, losses)
    _digest(h, [p.detach().numpy() for p in params])
    return {
        "allocator_tuned": applied,
        "scoring": scoring,
        "training": training,
        "scored": len(eval_rows),
        "trained": len(train_rows),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "digest": h.hexdigest(),
    }


def _run_child(workload: str, tuned: bool, samples: int, batch: int) -> dict[str, Any]:
    env = {**os.environ, "EVOLORA_KEEP_FREED_MEMORY": "1" if tuned else "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", workload, "--samples", str(samples), "--batch", str(batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{workload} ({'tuned' if tuned else 'default'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--workloads", nargs="+", default=["ctr", "next_item", "conventional"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/allocator.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=None, help="rows scored; as many trained (x3 for SASRec)")
    ap.add_argument("--batch", type=int, default=None)
    args = ap.parse_args()
    refuse_partial_record(ap, args, "--workloads")
    if args.child:
        print(json.dumps(child(args.child, args.samples, args.batch)))
        return

    from evolora.config import load_config

    sizes = {"ctr": (24, 8), "next_item": (16, 8), "conventional": (1024, 256)}
    record: dict[str, Any] = {}
    for workload in args.workloads:
        if workload == "conventional" and not Path(load_config(CDS_CONFIG).data.source).exists():
            print("conventional: skipped (PESO's CDs & Vinyl release is not on this machine)")
            continue
        samples, batch = (args.samples or sizes[workload][0]), (args.batch or sizes[workload][1])
        runs: dict[str, list[dict[str, Any]]] = {"default": [], "tuned": []}
        for _ in range(args.repeats):
            for label in ("default", "tuned"):
                runs[label].append(_run_child(workload, label == "tuned", samples, batch))
        if not all(r["allocator_tuned"] for r in runs["tuned"]):
            raise SystemExit("the allocator could not be tuned here (not glibc?): nothing to compare")
        digests = {r["digest"] for rs in runs.values() for r in rs}
        entry: dict[str, Any] = {"scored": samples, "batch": batch, "same_results": len(digests) == 1}
        for phase in ("scoring", "training"):
            med = {
                label: {
                    key: float(np.median([r[phase][key] for r in rs]))
                    for key in ("wall_s", "user_s", "sys_s", "faults")
                }
                for label, rs in runs.items()
            }
            cpu = {label: m["user_s"] + m["sys_s"] for label, m in med.items()}
            entry[phase] = {
                **med,
                "cpu_ratio": cpu["default"] / cpu["tuned"],
                "wall_ratio": med["default"]["wall_s"] / med["tuned"]["wall_s"],
                "sys_share_default": med["default"]["sys_s"] / cpu["default"],
            }
        entry["peak_rss_mb"] = {label: max(r["peak_rss_mb"] for r in rs) for label, rs in runs.items()}
        record[workload] = entry
        print(workload, json.dumps(entry, indent=1))
        if not entry["same_results"]:
            raise SystemExit(f"{workload}: the two allocators computed different results")
    record["machine"] = {"torch_threads": 1}  # each measurement runs in a one-thread subprocess
    write_record(args.out, record)


if __name__ == "__main__":
    main()
