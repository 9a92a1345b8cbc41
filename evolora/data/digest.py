"""Content digests of files: `data_digest` for the run record, `file_sha256` for it and the caches, and
`file_record` / `file_damage`, how the dataset cache and the converted default model check their files.

Hashes are cached in-process by (absolute path, size, mtime_ns, ctime_ns, inode): a file is hashed once per
process unless it changes on disk, so checking the same files again (every `fetch`, every run record) costs
a `stat` each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evolora.data.schema import InteractionData
from evolora.errors import DataError
from evolora.io import sha256_file

_SHA256_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, cached by (path, size, mtime_ns, ctime_ns, inode): a file replaced by
    one of the same size and mtime (`cp -p`, `rsync -t`, `tar x` keep the mtime) has another inode or ctime,
    which no tool sets back. Raises `OSError` if unreadable."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = sha256_file(path)
    return _SHA256_CACHE[key]


def file_record(path: str | Path) -> dict[str, Any]:
    """A file's size, mtime and sha256: what `file_damage` checks it against later."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def file_damage(path: Path, record: Any) -> str | None:
    """What is wrong with the file at `path` against its `file_record` (None: nothing found): missing, of
    another size, or of another sha256. The sha256 is computed only when the file's mtime is not the recorded
    one (a file rewritten in place), so a large file is not hashed on every use. A record without a size or
    an mtime (written by an older evolora) has those checks skipped."""
    if not isinstance(record, Mapping) or not isinstance(record.get("sha256"), str):
        return "has an unreadable record"
    try:
        stat = path.stat()
        if record.get("size") is not None and stat.st_size != record["size"]:
            return f"has {stat.st_size} bytes, not the {record['size']} recorded"
        if stat.st_mtime_ns != record.get("mtime_ns") and file_sha256(path) != record["sha256"]:
            return f"does not match its recorded sha256 {record['sha256']}"
    except OSError as e:
        return f"is missing or unreadable ({e.strerror or e})"
    return None


def changed_files(before: dict, after: dict) -> list[str]:
    """The file names whose sha256 differs between two `data_digest`s (or that only one of them has)."""
    old, new = before.get("files", {}), after.get("files", {})
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))


def data_digest(data: InteractionData) -> dict[str, object]:
    """`{"sha256": ..., "files": {name: sha256, ...}}` over `data.files`, in read order.

    Files are named by their file name (by their full path when two share a name), so the same data read
    from another folder has the same digest. The overall sha256 hashes each name and file sha256 in order; it
    is None when the data records no files (built in memory).
    """
    names = [Path(p).name for p in data.files]
    if len(set(names)) < len(names):
        names = list(data.files)
    files: dict[str, str] = {}
    for name, path in zip(names, data.files, strict=True):
        try:
            files[name] = file_sha256(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read the data file to record its checksum ({e})") from None
    if not files:
        return {"sha256": None, "files": {}}
    overall = hashlib.sha256()
    for name, sha in files.items():
        overall.update(f"{name}\t{sha}\n".encode())
    return {"sha256": overall.hexdigest(), "files": files}
