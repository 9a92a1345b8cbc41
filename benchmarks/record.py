"""What every benchmark stores beside its figures: the machine they were measured on, written the same way.

The CPU's flags decide which kernels run (AVX2, AVX512, native bf16), and the load average says whether
something else shared the cores, so a figure without them cannot be compared with another machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def description(doc: str | None) -> str:
    """A script's --help description: its docstring's first paragraph, on one line."""
    return " ".join((doc or "").split("\n\n")[0].split())


def refuse_partial_record(ap: argparse.ArgumentParser, args: argparse.Namespace, option: str) -> None:
    """A run of some of a benchmark's parts (`option` narrowed) would replace the record of all of them in
    results/: it has to be written elsewhere."""
    name = option.lstrip("-").replace("-", "_")
    given, default = getattr(args, name), ap.get_default(name)
    if sorted(given) != sorted(default) and args.out == ap.get_default("out"):
        ap.error(f"{option} picks a subset: pass --out too (the record in {args.out} holds them all)")


def cpu_flags() -> list[str]:
    """The CPU's vector-instruction flags that decide kernel speed (Linux; empty elsewhere)."""
    from evolora.models.precision import cpu_info

    return sorted(f for f in cpu_info()[1] if f.startswith(("avx", "amx", "fma")))


def machine_record() -> dict[str, Any]:
    """The machine, software and load at the time of writing."""
    import torch

    from evolora.models.precision import machine

    return {
        "name": machine(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write `record` as JSON to `path` with the machine under "machine" (keys the benchmark set there, such
    as the threads of its worker processes, win over what this process sees)."""
    record["machine"] = {**machine_record(), **record.get("machine", {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a benchmark stopped while writing leaves the record before it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"written: {path}")
    return path
