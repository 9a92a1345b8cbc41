"""Results shared by every run in an output folder (`<output_dir>/_shared/`): training jobs and predictions.

A job whose result depends only on data, seed and configuration (a fresh adapter without regulariser:
every strategy's first stage, retraining, LSAT's adapters) is stored once, content-addressed, and reused by
other strategies and experiments; so are predictions of a shared adapter. A damaged entry is set aside
(kept for inspection) and recomputed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evolora.config import TrainConfig
from evolora.continual.base import TrainJob
from evolora.errors import DamagedFileError
from evolora.io import load_npz, read_json, set_aside, stable_hash

log = logging.getLogger("evolora.continual")


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass
class SharedStore:
    """Content-addressed training results and predictions, shared by all experiments in an output folder.

    A job's key covers everything its result depends on: data, staging, task and model settings
    (`context_key`), the training settings of its stage, the seed, the stage and the exact sample rows. So
    experiments that differ only in later stages (another `lr_inherit`, another strategy) reuse stage 1.
    """

    root: Path
    context_key: str  # hash of the settings that fix the samples and the model (everything but `train`)

    def job_key(self, job: TrainJob, seed: int, stage: int, train: TrainConfig) -> str:
        settings = train.for_job(job.init).model_dump(mode="json")
        settings.pop("lr_inherit", None)
        return stable_hash(
            {
                "ctx": self.context_key,
                "train": settings,
                "seed": seed,
                "stage": stage,
                "train_rows": rows_digest(job.train_rows),
                "valid_rows": rows_digest(job.valid_rows),
            },
            length=20,
        )

    def job_dir(self, key: str) -> Path:
        return self.root / "jobs" / key

    def predictions_file(self, adapter_key: str, rows: np.ndarray) -> Path:
        return self.root / "predictions" / f"{stable_hash([adapter_key, rows_digest(rows)], 20)}.npz"

    def job_lock(self, key: str) -> Path:
        return self.root / "jobs" / f".{key}.lock"

    def remove_stale_temporaries(self, key: str) -> None:
        """Delete what a killed write of job `key` left (call holding its lock: no one else writes it)."""
        for tmp in (self.root / "jobs").glob(f".{key}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

    def reuse_job(self, lm: Any, key: str, adapter: str) -> dict[str, Any] | None:
        """Load a stored training result into `adapter` and return its record; None when there is none. A
        damaged one is set aside (kept for inspection) and None returned, so the job is trained again."""
        folder = self.job_dir(key)
        if not (folder / "result.json").is_file():
            return None
        try:
            lm.load_adapter(folder / "adapter", adapter)
            return read_json(folder / "result.json")
        except DamagedFileError as e:
            aside = set_aside(folder)
            log.warning(
                "shared training result %s is damaged (%s): set aside as %s, trained again", key, e, aside
            )
            return None

    def load_predictions(self, path: Path) -> dict[str, np.ndarray] | None:
        if not path.is_file():
            return None
        try:
            return load_npz(path)
        except DamagedFileError as e:
            aside = set_aside(path)
            log.warning("shared predictions %s are damaged (%s): set aside as %s, recomputed", path, e, aside)
            return None
