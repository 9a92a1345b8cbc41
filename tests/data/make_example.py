"""Writes the example of the README's "Your own data": `example_log.csv` and `example_items.csv`.

A shop's log: 30 users rate 20 of 40 products each (1-5 stars, ISO datetimes over the first half of 2024).
The title decides the rating: "Sunny ..." products get 4 or 5 stars, "Rainy ..." ones 1 or 2 (5% the other
way), so a model that reads titles can learn it. Deterministic: `python -m tests.data.make_example` writes
the same bytes every time (a test checks the shipped files against it).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_USERS, PER_USER, N_ITEMS = 30, 20, 40
START = datetime(2024, 1, 1, tzinfo=UTC)
SPAN_MINUTES = 182 * 24 * 60  # January to June


def example_rows(seed: int = 7) -> tuple[list[str], list[str]]:
    """The lines of the log and of the items table, headers first."""
    rng = np.random.default_rng(seed)
    items = ["iid,name,genre"]
    for i in range(1, N_ITEMS + 1):
        sunny = i % 2 == 0
        name = f"Sunny Day Kit {i}" if sunny else f"Rainy Night Kit {i}"
        items.append(f"sku-{i:03d},{name},{'summer' if sunny else 'winter'}")
    log = ["uid,iid,ts,stars"]
    for u in range(1, N_USERS + 1):
        bought = rng.choice(np.arange(1, N_ITEMS + 1), size=PER_USER, replace=False)
        minutes = np.sort(rng.choice(SPAN_MINUTES, size=PER_USER, replace=False))
        for i, m in zip(bought, minutes, strict=True):
            liked = (i % 2 == 0) != (rng.random() < 0.05)
            stars = int(rng.integers(4, 6)) if liked else int(rng.integers(1, 3))
            when = (START + timedelta(minutes=int(m))).strftime("%Y-%m-%dT%H:%M:%S")
            log.append(f"user-{u:02d},sku-{i:03d},{when},{stars}")
    return log, items


def write_example(folder: Path = HERE) -> tuple[Path, Path]:
    log, items = example_rows()
    log_path, items_path = folder / "example_log.csv", folder / "example_items.csv"
    log_path.write_text("\n".join(log) + "\n", encoding="utf-8")
    items_path.write_text("\n".join(items) + "\n", encoding="utf-8")
    return log_path, items_path


if __name__ == "__main__":
    for path in write_example():
        print(path)
