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
from evolora.io import load_npz, read_json, remove_stale_temporaries, set_aside, stable_hash

log = logging.getLogger("evolora.continual")


#: A killed single-file write's temporary is stale once nothing has written to it for this long: a live one
#: (bytes prepared in memory, then written at once) is modified within seconds.
STALE_AFTER_SECONDS = 60.0


def remove_stale_shared_temporaries(root: Path, older_than: float = STALE_AFTER_SECONDS) -> int:
    """Delete the `.<name>.<random>.tmp` files killed writes left under `root` (`_shared/`: predictions,
    item vectors, semantic IDs), those not written to for `older_than` seconds; how many. Other experiments
    write there without this one's lock, so age tells a dead write from a live one; `jobs/` is left to the
    job locks (`SharedStore.remove_stale_temporaries`)."""
    return remove_stale_temporaries(root, keep=("jobs",), older_than=older_than)


def recorded_shared_keys(experiment: Path) -> frozenset[str]:
    """The shared keys the stage records of an experiment folder name (jobs it trained or reused)."""
    keys = set()
    for info in [
        *experiment.glob("*/seed*/stage-*/jobs/*/info.json"),
        *experiment.glob("*/seed*/stage-*/jobs/*.json"),
    ]:
        try:
            key = read_json(info).get("shared_key")
        except DamagedFileError:
            continue
        if key:
            keys.add(key)
    return frozenset(keys)


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


#: training settings that act only through which rows a job gets (the rows are in the key by digest): left
#: out of a job's key, so that experiments differing in later stages' budgets share stage 1. (Gradient
#: checkpointing is not one: it runs a shared prompt prefix in every row, where LoRA dropout draws other
#: masks, so its jobs train other adapters; at its default it is not in the settings, as before.)
_ROW_ONLY_SETTINGS = ("samples_per_stage", "valid_samples", "valid_fraction")


@dataclass
class SharedStore:
    """Content-addressed training results and predictions, shared by all experiments in an output folder.

    A job's key covers everything its result depends on: data, staging, task and model settings and what
    was read under paths and names, the data files' and the prompt template's contents and the model
    weights' fingerprint (`context_key`), the training settings of its stage, the seed, the stage and the
    exact sample rows. So experiments that differ only in later stages (another `lr_inherit`, another
    strategy, other budgets after stage 1) reuse stage 1, and one on an edited file or other weights under
    the same name does not.

    Keys of an older evolora left the inputs' digests and the budgets of other stages out
    (`legacy_context_key`). Its entries still serve the continued experiment that used them, whose inputs
    its record checks: those its stage records name (`own_keys`: trained or reused by one of its runs) and
    one a run trained in a sitting that ended before recording it (`continuing`); no other experiment,
    which may have read other contents under the same paths, reuses them.
    """

    root: Path
    context_key: str  # hash of the settings and inputs that fix the samples and the model (not `train`)
    legacy_context_key: str | None = None  # the same without the inputs' digests (keys before 2026-12-05)
    own_keys: frozenset[str] = frozenset()  # legacy keys this experiment's stage records name
    continuing: bool = False  # the experiment had work before this sitting (not a new or overwritten one)

    def job_key(self, job: TrainJob, seed: int, stage: int, train: TrainConfig) -> str:
        return self._key(self.context_key, _ROW_ONLY_SETTINGS, job, seed, stage, train)

    def legacy_job_key(self, job: TrainJob, seed: int, stage: int, train: TrainConfig) -> str | None:
        """The key an older evolora gave this job (None without a legacy context)."""
        if self.legacy_context_key is None:
            return None
        return self._key(self.legacy_context_key, (), job, seed, stage, train)

    @staticmethod
    def _key(
        context: str, left_out: tuple[str, ...], job: TrainJob, seed: int, stage: int, train: TrainConfig
    ) -> str:
        """A job's key: its stage's training settings but `lr_inherit` (resolved) and `left_out`."""
        settings = train.for_job(job.init).model_dump(mode="json")
        for name in ("lr_inherit", *left_out):
            settings.pop(name, None)
        return stable_hash(
            {
                "ctx": context,
                "train": settings,
                "seed": seed,
                "stage": stage,
                "train_rows": rows_digest(job.train_rows),
                "valid_rows": rows_digest(job.valid_rows),
            },
            length=20,
        )

    def reuse_legacy_job(
        self, lm: Any, job: TrainJob, seed: int, stage: int, train: TrainConfig, run_id: str
    ) -> tuple[str, dict[str, Any]] | None:
        """(its key, its record) of this job as an older evolora stored it for this experiment (class
        docstring), loaded into the job's adapter; None when there is none."""
        key = self.legacy_job_key(job, seed, stage, train)
        if key is None or not self.continuing or not (self.job_dir(key) / "result.json").is_file():
            return None
        if key not in self.own_keys:
            try:
                record = read_json(self.job_dir(key) / "result.json")
            except DamagedFileError:
                return None
            if record.get("trained_for") != run_id:
                return None
        stored = self.reuse_job(lm, key, job.adapter)
        return None if stored is None else (key, stored)

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
