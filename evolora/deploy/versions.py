"""The versions of a deployed run: what each update produced, and which one is promoted (served).

    runs/<name>/deploy/<method>-seed<k>/
        versions.json      every version, and the promoted one; written atomically, last, by every change
        .lock              held by an update (one at a time), naming its process
        work/<key>/        an update's resumable work: its trained stage, the accepted rows, the gate's
                           predictions, the inference bundle of the data up to it

Version 0 is the run as `evolora run` left it (its last trained stage). Each update adds a version whose
parent is the version promoted when it started; the gate decides whether it becomes the promoted one.
`rollback` makes an earlier version the promoted one, and the next update builds on it.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evolora.continual.loop import stage_state_file, trained_folder
from evolora.errors import ConfigError, DamagedFileError
from evolora.io import atomic_write_json, read_json
from evolora.queries import last_trained_stage

log = logging.getLogger("evolora")


@dataclass
class Version:
    id: int
    parent: int | None
    stage: int  # the training stage whose model this version is
    created: str
    folder: str  # the stage folder holding the model, relative to the run's experiment folder
    data: dict[str, Any] = field(default_factory=dict)  # file, sha256, row counts of the update
    gate: dict[str, Any] = field(default_factory=dict)  # metric, both figures, the decision
    promoted_at_creation: bool = True
    #: what the update took, as a stage's `cost` (parts: data, model loading, training, the gate's
    #: evaluation, ...); empty for version 0 (the run's stages record theirs) and updates before 2026-12-05
    cost: dict[str, Any] = field(default_factory=dict)


@dataclass
class Versions:
    """The registry of one deployed run (one method and seed of an experiment)."""

    root: Path  # the experiment folder (runs/<name>)
    method: str
    seed: int
    versions: list[Version] = field(default_factory=list)
    promoted: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # promotions and rollbacks, in order

    @property
    def folder(self) -> Path:
        return self.root / "deploy" / f"{self.method}-seed{self.seed}"

    @property
    def file(self) -> Path:
        return self.folder / "versions.json"

    @classmethod
    def open(cls, root: Path, method: str, seed: int, last_stage: int) -> Versions:
        """The registry of a run; a run never updated has version 0 only (its last trained stage)."""
        reg = cls(Path(root), method, seed)
        if reg.file.is_file():
            advice = "It is rewritten from nothing only by hand: restore it from a backup."
            raw = read_json(reg.file, advice)
            problem = _registry_problem(raw)
            if problem is not None:  # valid JSON of another shape (edited by hand, another program's file)
                raise DamagedFileError(reg.file, f"{reg.file} is damaged ({problem}). {advice}")
            reg.versions = [Version(**v) for v in raw["versions"]]
            reg.promoted = int(raw["promoted"])
            reg.history = list(raw.get("history", []))
            return reg
        folder = f"{method}/seed{seed}/stage-{last_stage}"
        # Version 0 dates from when `evolora run` finished training its last stage, not from this call: as
        # recorded (a copy without -p gives the file the copy's mtime), or the file's mtime for older runs.
        trained = reg.root / folder / "trained" / "trained.json"
        created = _trained_at(trained) if trained.is_file() else _now()
        reg.versions = [Version(0, None, last_stage, created, folder, {"source": "evolora run"})]
        return reg

    @classmethod
    def of_run(cls, root: Path, results: dict[str, Any]) -> Versions:
        """The registry of the run whose `results.json` is `results`, in experiment folder `root`."""
        return cls.open(root, results["method"], results["seed"], last_trained_stage(results))

    def get(self, version: int) -> Version:
        for v in self.versions:
            if v.id == version:
                return v
        raise ConfigError(f"no version {version} (versions: {[v.id for v in self.versions]})")

    @property
    def current(self) -> Version:
        return self.get(self.promoted)

    def add(self, version: Version, promote: bool) -> None:
        self.versions.append(version)
        if promote:
            self._promote(version.id, "update")
        self.save()

    def rollback(self, version: int) -> bool:
        """Promote `version` again; False (and nothing written) when it is the promoted one already. A
        version whose model or inference bundle was deleted is refused: promoted, it could not be served."""
        v = self.get(version)
        if version == self.promoted:
            return False
        missing = [str(path) for path in self._model_files(v) if not path.is_file()]
        if not missing:
            missing = self._missing_adapters(trained_folder(self.root / v.folder))
        if missing:
            raise ConfigError(
                f"version {version} cannot be served: {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing (deleted?); promote another version"
            )
        self._promote(version, "rollback")
        self.save()
        return True

    @staticmethod
    def _missing_adapters(unit: Path) -> list[str]:
        """The adapters a stage saved (its trained.json names them; an older one's: the folders there) whose
        weights are gone (PEFT's file, a conventional model's: some `.safetensors` in each folder)."""
        try:
            named = read_json(unit / "trained.json").get("adapters")
        except DamagedFileError as e:
            return [f"{e.path} (damaged)"]
        folders = [unit / "adapters" / n for n in named] if isinstance(named, list) else [
            a for a in sorted((unit / "adapters").glob("*")) if a.is_dir()
        ]  # fmt: skip
        return [f"{a}/*.safetensors" for a in folders if not any(a.glob("*.safetensors"))]

    def _model_files(self, v: Version) -> list[Path]:
        """What loading version `v` reads first: its stage's trained record and strategy state, and the
        bundle of its data (a version an update made; version 0's is rebuilt from the run's data)."""
        unit = trained_folder(self.root / v.folder)
        inference = (self.root / v.folder).parent / "inference"
        # (every file of the bundle: an update's is not rebuilt, so one of them gone makes it unloadable)
        parts = ("bundle.json", "items.parquet", "histories.parquet", "id_space.json")
        bundle = [inference / part for part in parts] if v.parent is not None else []
        return [unit / "trained.json", stage_state_file(unit), *bundle]

    def _promote(self, version: int, why: str) -> None:
        self.history.append({"promoted": version, "previous": self.promoted, "by": why, "at": _now()})
        self.promoted = version

    def save(self) -> None:
        atomic_write_json(
            self.file,
            {
                "method": self.method,
                "seed": self.seed,
                "promoted": self.promoted,
                "versions": [asdict(v) for v in self.versions],
                "history": self.history,
            },
        )


def _registry_problem(raw: Any) -> str | None:
    """What keeps `raw` (a parsed versions.json) from being a registry, or None."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not an object"
    listed = raw.get("versions")
    if not isinstance(listed, list) or not listed or not all(isinstance(v, dict) for v in listed):
        return "'versions' is not a list of versions"
    fields = {f.name for f in dataclass_fields(Version)}
    needed = {
        f.name for f in dataclass_fields(Version) if f.default is MISSING and f.default_factory is MISSING
    }
    for v in listed:
        if set(v) - fields or needed - set(v) or not isinstance(v.get("id"), int):
            return f"a version of other fields: {sorted(v)}"
    ids = [v["id"] for v in listed]
    promoted = raw.get("promoted")
    if not isinstance(promoted, int) or isinstance(promoted, bool) or promoted not in ids:
        return f"promoted {promoted!r} is not one of its versions {ids}"
    if not isinstance(raw.get("history", []), list):
        return "'history' is not a list"
    return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _trained_at(trained: Path) -> str:
    at = read_json(trained, "Rerun its experiment: the stage is trained again.").get("trained_at")
    return at if isinstance(at, str) else _stamp(trained.stat().st_mtime)


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
