"""The version a server answers with: loaded beside the served one when another is promoted (`evolora
update`, `evolora rollback`, in any process), swapped in between two batches, and torn down once its last
batch is answered; a promoted version that fails to load leaves the served one answering, and is tried
again after `retry_seconds`. `server.py` serves it."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evolora.api import Recommender
from evolora.deploy.versions import Versions
from evolora.queries import last_trained_stage, locate_run, read_results

log = logging.getLogger("evolora")
#: how long a registry whose file looks unchanged is trusted before it is read again anyway
REREAD_SECONDS = 30.0


@dataclass
class Served:
    rec: Recommender
    version: int
    info: dict[str, Any]
    in_use: int = 0  # batches computing on it now
    retired: bool = False  # another version is served: tear this one down once `in_use` falls to 0


@dataclass
class ModelHolder:
    """The version being served, and the watcher that swaps in a newly promoted one."""

    run_dir: Path
    method: str | None = None
    seed: int | None = None  # None: 0, or a run folder's own
    model: str | Path | None = None  # where the run's base model lies now (None: its model.name)
    poll_seconds: float = 0.5
    retry_seconds: float = 30.0  # before loading again a promoted version that failed to load
    served: Served | None = None
    promoted: int | None = None  # as the registry says (`served` lags behind while it loads, or fails to)
    switch_error: str | None = None  # why the promoted version is not the served one, if it failed to load
    _failed: tuple[int, float] | None = None  # (version, when) of the last failed load
    _registered: bool = False  # the run has had a versions.json: from then on its absence is no "version 0"
    _unreadable: str | None = None  # why the registry cannot be read now (said once, until it can)
    _read_as: tuple[int, ...] | None = None  # the registry file's identity when last read (see `_promoted`)
    _read_at: float = 0.0  # when (monotonic) it was last read
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        seed_dir, self.root = locate_run(Path(self.run_dir), self.method, self.seed)
        results = read_results(seed_dir)
        self.method, self.seed = results["method"], results["seed"]
        self.last_stage = last_trained_stage(results)
        self.promoted = self._promoted()
        self.served = self._load(self.promoted)

    def _registry(self) -> Versions:
        return Versions.open(self.root, self.method or "", self.seed, self.last_stage)

    def _promoted(self) -> int:
        """The promoted version. The registry is parsed again when its file changed, and at least every
        `REREAD_SECONDS`: each write of evolora's replaces it, longer, and an edit in place changes its
        size or time, except one of the same size within a clock tick (and a reused inode), which that
        re-read catches. A poll of an unchanged registry mostly costs one `stat`, not a read and a parse."""
        file = Versions(self.root, self.method or "", self.seed or 0).file
        try:
            st = file.stat()
        except FileNotFoundError:
            if self._registered:  # moved, being restored, the run folder gone: not "version 0, promoted"
                raise FileNotFoundError(f"{file} is missing") from None
            self._read_as = None
            return self._registry().promoted  # never updated: version 0
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        fresh = time.monotonic() - self._read_at < REREAD_SECONDS
        if identity == self._read_as and self.promoted is not None and fresh:
            return self.promoted
        promoted = self._registry().promoted
        self._registered, self._read_as, self._read_at = True, identity, time.monotonic()
        return promoted

    def _load(self, version: int) -> Served:
        t0 = time.perf_counter()
        rec = Recommender.load(
            self.root, method=self.method, seed=self.seed, version=version, model=self.model
        )
        v = self._registry().get(version)
        info = {"version": v.id, "stage": v.stage, "created": v.created, "parent": v.parent, "gate": v.gate}
        log.info("serving version %d (stage %d), loaded in %.1f s", v.id, v.stage, time.perf_counter() - t0)
        return Served(rec, version, info)

    def acquire(self) -> Served:
        """The version to answer a batch with; `release` it when the batch is answered."""
        with self._lock:
            served = self.served
            assert served is not None
            served.in_use += 1
            return served

    def release(self, served: Served) -> None:
        with self._lock:
            served.in_use -= 1
            done = served.retired and served.in_use == 0
        if done:
            served.rec.strategy.teardown()

    def switch_to(self, version: int) -> None:
        """Load `version` and serve it from the next batch on; the one it replaces is torn down after
        the batches still computing on it (a teardown can change the shared model under them)."""
        fresh = self._load(version)
        with self._lock:
            old, self.served = self.served, fresh
            if old is None:
                return
            old.retired = True
            idle = old.in_use == 0
        if idle:
            old.rec.strategy.teardown()

    def watch(self) -> None:
        """Poll for another promoted version and swap it in (run in a thread)."""
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def poll(self) -> None:
        """Read which version is promoted and swap it in if another is served. A registry being replaced,
        damaged or gone keeps the served version answering (said once, and in /health) until it reads."""
        try:
            self.promoted = self._promoted()
        except Exception as e:
            if str(e) != self._unreadable:  # not twice a second
                served = self.served.version if self.served is not None else None
                log.warning("could not read the run's versions (%s): still serving version %s", e, served)
                self._unreadable = str(e)
                self.switch_error = f"the run's versions cannot be read: {e}"
            return
        if self._unreadable is not None:
            log.info("the run's versions can be read again")
            self._unreadable = self.switch_error = None
        self.check_promoted()

    def check_promoted(self) -> None:
        """Swap in the promoted version if another one is served. One that fails to load is kept serving
        the one before and said (`switch_error`, in /health), and tried again after `retry_seconds`: a
        broken version is not loaded twice a second."""
        wanted, served = self.promoted, self.served
        if wanted is None or served is None or wanted == served.version:
            self.switch_error, self._failed = None, None
            return
        failed = self._failed
        if failed is not None and failed[0] == wanted and time.monotonic() - failed[1] < self.retry_seconds:
            return
        try:
            self.switch_to(wanted)
        except Exception as e:
            self._failed = (wanted, time.monotonic())
            self.switch_error = f"version {wanted} could not be loaded: {e}"
            log.warning(
                "%s; still serving version %d (tried again in %.0f s)",
                self.switch_error, served.version, self.retry_seconds,
            )  # fmt: skip
            return
        self.switch_error, self._failed = None, None

    def stop(self) -> None:
        self._stop.set()
