"""`evolora serve` under load: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients, with and
without batching requests across clients.

The CTR run of `bench_recommend.py` (SmolLM2-135M on ML-100K; trained there if missing) is served in this
process on loopback. Each request scores 20 candidate items for a random known user. "batched": the server's
worker answers every request queued while it was busy in one forward pass (up to 256 samples); "one by
one": each request alone (max_batch = 1). Both servers run side by side and take turns at each level
(batched, one by one, batched, ...), so load drifts hit both; figures are medians over the repeats. With
one client nothing can be batched: its ratio is the null that the other levels' ratios are read against.

    python benchmarks/bench_serve.py [--runs ~/.cache/evolora/bench-runs] [--clients 1 4 16]
        [--requests 16] [--repeats 3] [--out benchmarks/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from record import description, refuse_partial_record, write_record


def start(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def load(url: str, users: list[str], items: list[str], clients: int, per_client: int) -> dict:
    rng = np.random.default_rng(clients)
    latencies: list[float] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            for _ in range(per_client):
                body = {
                    "user": str(rng.choice(users)),
                    "items": [str(x) for x in rng.choice(items, 20, replace=False)],
                }
                t0 = time.perf_counter()
                r = c.post("/score", json=body)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(float(np.percentile(latencies, 50)), 2),
        "p99_s": round(float(np.percentile(latencies, 99)), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--runs", default=str(Path.home() / ".cache" / "evolora" / "bench-runs"))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16], help="concurrency levels")
    ap.add_argument(
        "--requests", type=int, default=16, help="requests per level and turn (split over clients)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="turns of each server at each level")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    refuse_partial_record(ap, args, "--clients")

    from bench_recommend import train

    from evolora.deploy.server import ModelHolder, create_app

    root = train("configs/quickstart.yaml", "bench-ctr", Path(args.runs), [])
    holder = ModelHolder(root, method="finetune")
    users = sorted(holder.served.rec.known_users)
    items = sorted(holder.served.rec.known_items)
    modes = {"batched": 256, "one_by_one": 1}
    servers = {mode: start(create_app(holder, max_batch=b)) for mode, b in modes.items()}
    for url, _, _ in servers.values():
        load(url, users, items, 1, 1)  # warm-up
    figures: dict[str, list[dict]] = {mode: [] for mode in modes}
    for clients in args.clients:
        per_client = max(1, args.requests // clients)
        turns: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, (url, _, _) in servers.items():
                turns[mode].append(load(url, users, items, clients, per_client))
        for mode, runs in turns.items():
            row = {"clients": clients, "requests": runs[0]["requests"], "repeats": len(runs)}
            for key in ("requests_per_s", "p50_s", "p99_s"):
                row[key] = round(float(np.median([r[key] for r in runs])), 3)
            figures[mode].append(row)
        gain = figures["batched"][-1]["requests_per_s"] / figures["one_by_one"][-1]["requests_per_s"]
        print(
            f"{clients} clients: batched {gain:.2f}x one by one",
            figures["batched"][-1],
            figures["one_by_one"][-1],
        )
    for _, server, thread in servers.values():
        server.should_exit = True
        thread.join()
    result = {
        "benchmark": "serve",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "request": "POST /score, 20 candidate items of a known user",
        "precision": holder.served.rec.strategy.lm.precision,
        **figures,
        "batched_vs_one_by_one": {
            str(b["clients"]): round(b["requests_per_s"] / o["requests_per_s"], 3)
            for b, o in zip(figures["batched"], figures["one_by_one"], strict=True)
        },
    }
    write_record(args.out, result)
    print(json.dumps(result, indent=2))  # with the machine block it added


if __name__ == "__main__":
    main()
