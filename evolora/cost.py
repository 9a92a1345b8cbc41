"""Where a run's time goes: seconds and tokens per part of the work, recorded with every stage.

Work is wrapped in `part(name)`; a part's seconds are its own (a part started inside another is taken out of
the outer one), so the parts of a stage add up to the time the stage took, less what no part covers (shown
as `other`). The LLM backbone reports its forward passes through `count_tokens` (a hook on its decoder):
the tokens read (padding excluded), and of those, the ones a backward pass follows (a forward pass run
with gradients while the model trains). Conventional models count no tokens.

Parts used by evolora (`PARTS`): training passes, validation between epochs, evaluation of a stage, LSAT's
weight search, InfLoRA's input statistics, RecLoRA's router inputs; in the set-up, reading and staging the
data (with the files' digests), model loading, item embeddings and RQ-VAE; anywhere, writing files
(checkpoints, adapters, records: `io.py`); waiting for another process that trains a shared job (its
training is then `saved`, at the seconds it took that process).
Saved time is what reuse skipped: a shared training job or stored predictions, at the seconds they took
when they were computed, on both clocks (`saved_seconds`, `saved_cpu_seconds`).

A resumed stage costs what all its sittings spent on work that was kept: a training job stores its parts
with every epoch's checkpoint and with its finished record (`mark`/`since`), and a rerun adds them back
(`carry`), to the parts and to the stage's totals (recorded apart as `earlier_sittings`). Work lost to the
interruption (an epoch not yet checkpointed) is counted where it is redone, once.

Every part has two clocks: `seconds`, wall-clock time, and `cpu_seconds`, the CPU time of the whole process
(every thread; `time.process_time`). Wall time is what a user waited; CPU time is what the work cost, and it
stays the same when other programs share the cores or the process is paused (a run stopped with SIGSTOP for
an hour adds an hour of wall time and no CPU time), so tables of runs made under load state CPU time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PARTS = (
    "training",
    "validation",
    "evaluation",
    "lsat_search",
    "inflora_statistics",
    "reclora_router",
    "data",
    "model_loading",
    "item_embeddings",
    "rqvae",
    "writing",
    "waiting",
)

_local = threading.local()


def _ledger() -> dict[str, dict[str, float]]:
    if not hasattr(_local, "ledger"):
        _local.ledger, _local.stack, _local.saved, _local.carried = {}, [], [0.0, 0.0], [0.0, 0.0]
    return _local.ledger


def _zero() -> dict[str, float]:
    return {"seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "backward_tokens": 0}


def _entry(name: str) -> dict[str, float]:
    return _ledger().setdefault(name, _zero())


def clock() -> tuple[float, float]:
    """(wall-clock, process CPU) seconds now; differences of two readings give both clocks of a span."""
    return time.perf_counter(), time.process_time()


@contextmanager
def part(name: str) -> Iterator[None]:
    """Count the block's time (and the tokens its forward passes read) under `name`."""
    _ledger()
    frame = {"name": name, "inner": 0.0, "inner_cpu": 0.0}
    _local.stack.append(frame)
    wall0, cpu0 = clock()
    try:
        yield
    finally:
        wall1, cpu1 = clock()
        elapsed, elapsed_cpu = wall1 - wall0, cpu1 - cpu0
        _local.stack.pop()
        entry = _entry(name)
        entry["seconds"] += elapsed - frame["inner"]
        entry["cpu_seconds"] += elapsed_cpu - frame["inner_cpu"]
        if _local.stack:
            _local.stack[-1]["inner"] += elapsed
            _local.stack[-1]["inner_cpu"] += elapsed_cpu


def count_tokens(tokens: int, backward: bool) -> None:
    """Tokens a forward pass read, in the innermost open part (`other` outside any)."""
    _ledger()
    name = _local.stack[-1]["name"] if _local.stack else "other"
    entry = _entry(name)
    entry["tokens"] += tokens
    if backward:
        entry["backward_tokens"] += tokens


def saved(seconds: float, cpu_seconds: float = 0.0) -> None:
    """Seconds a reuse skipped (a shared job's training, stored predictions), wall-clock and CPU (0 where the
    reused work was recorded before its CPU time was kept)."""
    _ledger()
    _local.saved[0] += float(seconds)
    _local.saved[1] += float(cpu_seconds)


def saved_total() -> tuple[float, float]:
    """The (wall-clock, CPU) seconds `saved` has counted since the last `take` (the difference of two
    readings is what the work between them saved)."""
    _ledger()
    return float(_local.saved[0]), float(_local.saved[1])


def cpu_of(parts: dict[str, dict[str, Any]]) -> float:
    """The CPU seconds of recorded parts (as `since` gives them), all added."""
    return float(sum(p.get("cpu_seconds", 0.0) for p in parts.values()))


def mark() -> dict[str, dict[str, float]]:
    """The parts counted so far, copied: `since(mark())` is what was counted after this point."""
    return {k: dict(v) for k, v in _ledger().items()}


def since(earlier: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """What each part counted after the `mark` `earlier` (closed parts only; parts that counted nothing are
    left out)."""
    out = {}
    for name, entry in _ledger().items():
        before = earlier.get(name, _zero())
        delta = {f: entry[f] - before.get(f, 0) for f in entry}
        if any(delta.values()):
            out[name] = _rounded(delta)
    return out


def carry(parts: dict[str, dict[str, Any]]) -> None:
    """Count the parts an earlier sitting spent on work this one keeps (a checkpoint's epochs, a job
    finished before its stage was recorded): they join the parts and the stage's totals."""
    _ledger()
    for name, p in parts.items():
        entry = _entry(name)
        for f in entry:
            entry[f] += p.get(f, 0)
        _local.carried[0] += p.get("seconds", 0.0)
        _local.carried[1] += p.get("cpu_seconds", 0.0)


def added(*records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Parts (as `since` gives them) summed part by part."""
    out: dict[str, dict[str, float]] = {}
    for parts in records:
        for name, p in parts.items():
            entry = out.setdefault(name, _zero())
            for f in entry:
                entry[f] += p.get(f, 0)
    return {name: _rounded(entry) for name, entry in out.items()}


def measured(compute: Callable[[], Any], name: str | None = None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """`compute()` as a span of part `name` (by default the innermost open part, `other` outside any), and
    what it cost: its parts, nested ones included."""
    _ledger()
    before = mark()
    with part(name or (_local.stack[-1]["name"] if _local.stack else "other")):
        result = compute()
    return result, since(before)


def to_arrays(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`parts` as two numeric arrays, to travel in an `.npz` beside the predictions they paid for."""
    import numpy as np

    fields = list(_zero())
    return {
        "cost_parts": np.array(list(parts), dtype=str),
        "cost_values": np.array([[p.get(f, 0) for f in fields] for p in parts.values()], dtype=float).reshape(
            len(parts), len(fields)
        ),
    }


def from_arrays(arrays: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The parts `to_arrays` stored (none in files from before they were kept)."""
    if "cost_parts" not in arrays:
        return {}
    fields = list(_zero())
    return {
        str(name): dict(zip(fields, map(float, row), strict=True))
        for name, row in zip(arrays["cost_parts"], arrays["cost_values"], strict=True)
    }


def take() -> dict[str, Any]:
    """The parts counted since the last `take` (outside any open part), and start again."""
    ledger = _ledger()
    out = {
        "parts": {k: _rounded(v) for k, v in sorted(ledger.items())},
        "saved_seconds": round(_local.saved[0], 3),
        "saved_cpu_seconds": round(_local.saved[1], 3),
        "carried": tuple(_local.carried),
    }
    _local.ledger, _local.saved, _local.carried = {}, [0.0, 0.0], [0.0, 0.0]
    return out


def _rounded(entry: dict[str, float]) -> dict[str, Any]:
    return {
        "seconds": round(entry["seconds"], 3),
        "cpu_seconds": round(entry["cpu_seconds"], 3),
        "tokens": int(entry["tokens"]),
        "backward_tokens": int(entry["backward_tokens"]),
    }


def stage_cost(taken: dict[str, Any], since: tuple[float, float]) -> dict[str, Any]:
    """A stage's cost record from `take()` and the `clock()` reading at its start: its parts, `other` (the
    stage's time no part covers) and its totals on both clocks, earlier sittings' carried parts included."""
    wall, cpu = clock()
    earlier_wall, earlier_cpu = taken.get("carried", (0.0, 0.0))
    total_seconds, total_cpu = wall - since[0] + earlier_wall, cpu - since[1] + earlier_cpu
    parts = dict(taken["parts"])
    covered = sum(p["seconds"] for k, p in parts.items() if k != "other")
    covered_cpu = sum(p["cpu_seconds"] for k, p in parts.items() if k != "other")
    other = parts.pop("other", _rounded(_zero()))
    other = {
        **other,
        "seconds": round(max(0.0, total_seconds - covered), 3),
        "cpu_seconds": round(max(0.0, total_cpu - covered_cpu), 3),
    }
    out = {
        "total_seconds": round(total_seconds, 3),
        "total_cpu_seconds": round(total_cpu, 3),
        "parts": {**parts, "other": other},
        "saved_seconds": taken["saved_seconds"],
        "saved_cpu_seconds": taken["saved_cpu_seconds"],
    }
    if earlier_wall or earlier_cpu:
        out["earlier_sittings"] = {"seconds": round(earlier_wall, 3), "cpu_seconds": round(earlier_cpu, 3)}
    return out


def of_processes(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One cost record (`stage_cost`) for the processes of a launch, each one's record given in process
    order: CPU seconds and tokens summed over them (the work each did: under DDP each read its share of the
    rows), wall-clock seconds and saved seconds (both clocks: each process reused the same work) the main
    process's (they ran side by side), and `processes`,
    how many there were. One record: itself."""
    if len(records) == 1:
        return records[0]
    main = records[0]
    names = dict.fromkeys(k for r in records for k in r["parts"])
    parts = {}
    for name in names:
        entry = dict(main["parts"].get(name, {**_rounded(_zero())}))
        for f in ("cpu_seconds", "tokens", "backward_tokens"):
            total = sum(r["parts"].get(name, {}).get(f, 0) for r in records)
            entry[f] = round(total, 3) if f == "cpu_seconds" else int(total)
        parts[name] = entry
    out = {**main, "parts": parts, "processes": len(records)}
    if all("total_cpu_seconds" in r for r in records):
        out["total_cpu_seconds"] = round(sum(r["total_cpu_seconds"] for r in records), 3)
    earlier = [r["earlier_sittings"] for r in records if "earlier_sittings" in r]
    if earlier:  # what each process carried in, added as its CPU seconds are
        carried_cpu = round(sum(e.get("cpu_seconds", 0.0) for e in earlier), 3)
        wall = main.get("earlier_sittings", {}).get("seconds", 0.0)
        out["earlier_sittings"] = {"seconds": wall, "cpu_seconds": carried_cpu}
    return out


def add(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several cost records summed (a run's summary from its stages)."""
    parts: dict[str, dict[str, float]] = {}
    for c in costs:
        for k, p in c.get("parts", {}).items():
            e = parts.setdefault(k, _zero())
            for f in e:
                e[f] += p.get(f, 0)
    out = {
        "total_seconds": round(sum(c.get("total_seconds", 0.0) for c in costs), 3),
        "parts": {k: _rounded(v) for k, v in parts.items()},
        "saved_seconds": round(sum(c.get("saved_seconds", 0.0) for c in costs), 3),
    }
    earlier = [c["earlier_sittings"] for c in costs if "earlier_sittings" in c]
    if earlier:
        out["earlier_sittings"] = {
            f: round(sum(e[f] for e in earlier), 3) for f in ("seconds", "cpu_seconds")
        }
    # Records written before CPU time was kept have none: a sum over some of them would be no total at all.
    for key in ("total_cpu_seconds", "saved_cpu_seconds"):
        if all(key in c for c in costs):
            out[key] = round(sum(c[key] for c in costs), 3)
    return out


def setups_of(results: dict[str, Any]) -> dict[str, Any]:
    """A run's set-up costs by sitting (`setups`, as results.json records them). A file of an evolora before
    2026-12-05 kept only its last sitting's, one per experiment and process: keyed by those, so that the
    runs of that process name it alike and a report counts it once."""
    if results.get("setups"):
        return dict(results["setups"])
    last = results.get("setup_cost")
    if not last:
        return {}
    who = (results.get("experiment"), results.get("context_key"), results.get("worker"))
    return {"earlier: {} {} {}".format(*who): last}


def timed(name: str) -> Any:
    """`part(name)` around every call of the decorated function."""
    import functools

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with part(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
