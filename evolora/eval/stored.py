"""The predictions a run folder stored, as the report's intervals read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evolora.io import load_npz

Arrays = dict[str, np.ndarray]


def stored_predictions(run: dict[str, Any], matrix: bool = False) -> dict[int, dict[int, Arrays]] | None:
    """{training stage t: {evaluated stage j: arrays}} of a run's `results.json` (`_path`): the protocol's
    evaluation of each stage, and with `matrix` every entry R[t][j] it recorded. None when a file is missing
    or its arrays carry no truth (an evolora from before they did): nothing to resample."""
    if "_path" not in run:
        return None
    folder = Path(run["_path"]).parent
    out: dict[int, dict[int, Arrays]] = {}
    for s in run["stages"]:
        t, own = s["train_stage"], s["eval_stage"]
        entries = map(int, s.get("matrix", {})) if matrix else [own]
        for j in entries:
            f = folder / f"stage-{t}" / ("predictions.npz" if j == own else f"predictions-stage-{j}.npz")
            if not f.is_file():
                return None
            arrays = load_npz(f, "Delete it and rerun the experiment to evaluate that stage again.")
            if "truth" not in arrays:
                return None
            out.setdefault(t, {})[j] = arrays
    return out or None
