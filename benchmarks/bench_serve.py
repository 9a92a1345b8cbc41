"""`evolora serve` under load: requests/s and p50/p99 latency at 1, 4 and 16 concurrent clients, with and
without batching requests across clients.

The CTR run of `bench_recommend.py` (SmolLM2-135M on ML-100K; trained there if missing) is served in this
process on loopback. Each request scores 20 candidate items for a random known user. "batched": the server's
worker answers every request queued while it was busy in one forward pass (up to 256 samples); "one by
one": each request alone (max_batch = 1).

    python benchmarks/bench_serve.py [--runs ~/.cache/evolora/bench-runs]
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
from record import description, write_record

LEVELS = {1: 8, 4: 4, 16: 2}  # clients: requests per client


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
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()

    from bench_recommend import train

    from evolora.deploy.server import ModelHolder, create_app

    root = train("configs/quickstart.yaml", "bench-ctr", Path(args.runs), [])
    holder = ModelHolder(root, method="finetune")
    users = sorted(holder.served.rec.known_users)
    items = sorted(holder.served.rec.known_items)
    figures: dict[str, list[dict]] = {}
    for mode, max_batch in (("batched", 256), ("one_by_one", 1)):
        url, server, thread = start(create_app(holder, max_batch=max_batch))
        load(url, users, items, 1, 1)  # warm-up
        figures[mode] = [load(url, users, items, c, n) for c, n in LEVELS.items()]
        print(mode, figures[mode])
        server.should_exit = True
        thread.join()
    result = {
        "benchmark": "serve",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "request": "POST /score, 20 candidate items of a known user",
        "precision": holder.served.rec.strategy.lm.precision,
        **figures,
    }
    write_record(args.out, result)
    print(json.dumps(result, indent=2))  # with the machine block it added


if __name__ == "__main__":
    main()
