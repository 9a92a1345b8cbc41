"""Atomic file writes, safe reads, checksums and the cache directory.

Every file a run writes goes through these helpers: a write lands in a temporary sibling and is renamed into
place, so a run killed at any instant leaves either the old file or the new one, never half of one. So does a
power cut: what is renamed into place is flushed to the disk first (each file of a folder included, whoever
wrote it), and the folder holding the rename after it, so the rename itself lasts (`_sync_tree`,
`_sync_folder`).

Reading never executes code from a file: JSON, npz without pickles, and `save_state`/`load_state` for
anything holding tensors (safetensors with a JSON skeleton, no pickle). A file that cannot be read back
raises `DamagedFileError` naming it.

In a multi-process launch only the main process writes, and every process waits until the write is done
(`parallel.py`), so all of them read the same files afterwards.

Past ~400 lines: every way a file reaches or leaves a run folder is here, so the two promises above (a kill
or a power cut leaves a whole file, a read runs no code) are checked in one module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evolora import cost, parallel
from evolora.errors import ConfigError, DamagedFileError


def cache_dir() -> Path:
    """Where downloads and converted models live: `$EVOLORA_CACHE`, else `~/.cache/evolora`."""
    root = os.environ.get("EVOLORA_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "evolora"  # "~/x" is not ./~/x
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        named = f"EVOLORA_CACHE={root}" if root else f"the cache folder {path}"
        raise ConfigError(
            f"{named} cannot be made ({e.strerror or e}): set EVOLORA_CACHE to a folder you can write"
        ) from None
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with cost.part("writing"), parallel.one_writer() as writes:
        if writes:
            _write_bytes(Path(path), data)


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (`os.umask` can only be read by
    setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_bytes(path: Path, data: bytes) -> None:
    _make_folders(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600) whatever the umask; a run folder is read by teammates and by
        # a server running as another user, so the file gets the mode a plain open() would have given it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                # Closing flushes what is left: a full disk would raise a second time over the first error.
                with contextlib.suppress(OSError):
                    f.close()
                raise
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException:
        # A folder made read-only meanwhile cannot lose the temporary: the write's own error is the one to
        # tell (the next run removes stale temporaries)
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, strict: bool = False) -> None:
    """`obj` as indented JSON, atomically. `strict`: standard JSON, every NaN or infinite float written as
    null (`finite_json`), for the files users read with other tools; evolora's own records keep Python's
    NaN, which its readers expect."""
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False) if strict else json.dumps(obj, indent=2)
    atomic_write_text(path, text + "\n")


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None. Standard JSON has neither: Python writes
    them as bare `NaN`/`Infinity`, which jq, JavaScript and most other JSON readers refuse; an undefined
    metric (the AUC of a group with one class) is null instead."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def read_json(path: str | Path, advice: str = "") -> Any:
    """A JSON file; a damaged one raises `DamagedFileError` naming it, followed by `advice`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, _damaged(path, f"not valid JSON: {e}", advice)) from None


def read_table(path: str | Path, advice: str = "") -> Any:
    """A Parquet file as a polars DataFrame; a damaged or missing one raises `DamagedFileError` naming it."""
    import polars as pl

    if not Path(path).is_file():
        raise DamagedFileError(path, f"{path} is missing. {advice}".strip())
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedFileError(path, _damaged(path, first, advice)) from None


def _damaged(path: str | Path, reason: str, advice: str) -> str:
    return f"{path} is damaged or truncated ({reason}). {advice}".strip()


def load_tensors(path: str | Path, advice: str = "") -> dict[str, Any]:
    """The tensors of a safetensors file (adapters, models); a damaged one raises `DamagedFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        reason = f"not a readable safetensors file: {e}"
        raise DamagedFileError(path, _damaged(path, reason, advice)) from None


def save_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    """Numeric arrays as one `.npz`, atomically (object arrays are refused: they would need pickles)."""
    import io

    import numpy as np

    with cost.part("writing"):  # encoding copies every array: a file's cost, not the caller's
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | Path, advice: str = "") -> dict[str, Any]:
    """The arrays of an `.npz` written by `save_npz`, never unpickling anything."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DamagedFileError(path, _damaged(path, f"not a readable .npz: {e}", advice)) from None


# ------------------------------------------------------------------------------------------ tensor state
# Strategy state and training checkpoints are nested dicts and lists of numbers, strings, tensors and
# arrays. They are stored as one safetensors file: the tensors as its entries, the structure as JSON in its
# metadata, with tensors replaced by references. Loading builds only plain values and tensors.

_STATE_KEY = "evolora_state"
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


def _encode(obj: Any, tensors: dict[str, Any]) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared memory
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError("object arrays cannot be stored without pickles")
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_state(path: str | Path, state: Any) -> None:
    """Write nested dicts/lists/tuples of plain values, tensors and numeric arrays as one safetensors file,
    atomically."""
    from safetensors.torch import save

    with cost.part("writing"):  # serialising copies every tensor: a checkpoint's cost, not training's
        tensors: dict[str, Any] = {}
        skeleton = _encode(state, tensors)
        blob = save(tensors, metadata={"format": "pt", _STATE_KEY: json.dumps(skeleton)})
        atomic_write_bytes(path, blob)


def load_state(path: str | Path, advice: str = "") -> Any:
    """Read a file written by `save_state`; a damaged file raises `DamagedFileError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        skeleton = json.loads(meta[_STATE_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, ValueError) as e:
        reason = f"not a readable evolora state file: {type(e).__name__}: {e}"
        raise DamagedFileError(path, _damaged(path, reason, advice)) from None
    return _decode(skeleton, tensors)


def check_writable_folder(path: Path, what: str) -> None:
    """Create the folder `path` (named `what` in errors) if it is missing; a file there, a folder that
    cannot be created or one this user cannot write to is a `ConfigError`, before any work."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: a file is there, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what} {path}: the folder cannot be created ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: this user cannot write there")
    try:  # a file system that refuses new entries whatever the modes say (/proc, a read-only mount, root)
        os.rmdir(tempfile.mkdtemp(dir=path, prefix=".evolora-probe-"))
    except OSError as e:
        raise ConfigError(f"{what} {path}: nothing can be written there ({e.strerror})") from None


#: what a folder holds without being anyone's work: file browsers' and version control's placeholders
_PLACEHOLDERS = frozenset({".DS_Store", ".gitkeep", "Thumbs.db", "desktop.ini"})


def other_entries(folder: Path, marker: str) -> list[str]:
    """The names in `folder` showing it is not an output of the kind `marker` marks (a file every such
    output holds): none where it holds the marker or is not a folder, and none for what killed atomic
    writes left or placeholders (.gitkeep, .DS_Store)."""
    try:
        if not folder.is_dir() or (folder / marker).is_file():
            return []
        names = [p.name for p in folder.iterdir()]
    except FileNotFoundError:  # gone meanwhile (moved aside by the process replacing it)
        return []
    left_by_writes = [n for n in names if n.startswith(".") and n.endswith(".tmp")]
    return sorted(n for n in names if n not in left_by_writes and n not in _PLACEHOLDERS)


def check_replaceable(path: str | Path, marker: str, what: str) -> Path:
    """`path` resolved, if an output folder may be written there: absent, empty, or an earlier output
    of the same kind (it holds `marker`). Anything else is refused, since writing replaces the whole folder:
    `--out .` or a folder of other files would be lost."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        raise ConfigError(f"{path} is a file; give a folder for {what}")
    if path.exists() and not path.is_dir():  # a device, a pipe, a socket: moved aside, it would be lost
        raise ConfigError(f"{path} is not a folder (a device, pipe or socket); give a folder for {what}")
    if other_entries(path, marker):
        raise ConfigError(
            f"{path} holds other files (it is not an earlier {what}: no {marker}); writing replaces the "
            "whole folder, so give a new or empty folder, or remove this one yourself"
        )
    check_writable_folder(path.parent, f"the folder of the {what}")
    return path


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error (the
    block counts as `writing` in the cost profile: it writes the folder's files)."""
    with cost.part("writing"), parallel.one_writer() as writes:
        if writes:
            yield from _atomic_directory(Path(path))
        else:  # another process writes the folder; this one's copy is thrown away
            scratch = Path(tempfile.mkdtemp(prefix="evolora-scratch-"))
            try:
                yield scratch
            finally:
                shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_temporaries(
    folder: Path, keep: tuple[str, ...] = (), older_than: float | None = None
) -> int:
    """Delete the `.<name>.<random>.tmp` files and folders that atomic writes under `folder` left when they
    were killed (a temporary copy of an adapter or a bundle each); how many. Only for a caller that holds the
    lock keeping every other writer out of `folder`: a live write's temporary looks the same. `keep`: the
    names of subfolders of `folder` that other locks guard, left alone. `older_than`: for a folder others
    write to without that lock, only temporary files nothing has written to for so many seconds (a live
    single-file write is modified within seconds; a folder's age tells nothing, so those are left)."""
    if not folder.is_dir():
        return 0
    removed, now = 0, time.time()
    pending = [p for p in folder.iterdir() if p.name not in keep]
    while pending:
        entry = pending.pop()
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            if entry.is_dir() and not entry.is_symlink():
                pending.extend(entry.iterdir())
        elif older_than is not None:
            try:
                if entry.is_file() and not entry.is_symlink() and now - entry.stat().st_mtime > older_than:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                pass
        else:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_killed_copies(path: Path) -> int:
    """What an atomic write of `path` left beside it when killed: its temporary copies, deleted (a file's, or
    a whole folder of `atomic_directory`: an export with --merge, a full model), and, where the kill fell
    between a folder's two renames, the earlier folder set aside, put back; how many copies were deleted.
    Only for a caller holding a lock that keeps every other writer of `path` out: a live write's temporary
    looks the same."""
    if not path.parent.is_dir():
        return 0
    # mkdtemp's names: the prefix, 8 random characters, the suffix (a folder "exp.v2" is another's)
    mine = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = 0
    for entry in path.parent.iterdir():
        if mine.fullmatch(entry.name) and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed += 1
    _put_back_set_aside(path)
    return removed


def _put_back_set_aside(path: Path) -> None:
    """A replacement of `path` killed between its two renames left no `path`, and the earlier folder aside as
    `.<name>.old`: that complete copy is put back (either the old folder or the new one, never neither);
    beside a `path` that exists, it is what a finished replacement did not get to delete."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not old.is_symlink() and not path.exists():
        old.rename(path)
        _sync_folder(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _atomic_directory(path: Path) -> Iterator[Path]:
    if path.exists() and not path.is_dir():  # a file, device or pipe is no earlier folder to replace
        raise ConfigError(f"{path} exists and is not a folder: nothing is written over it")
    _make_folders(path.parent)
    _put_back_set_aside(path)
    old = path.with_name(f".{path.name}.old")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _plain_modes(tmp)
        _sync_tree(tmp)
        if path.exists():
            # Two renames keep the window without any complete copy as short as possible (a folder cannot
            # replace a non-empty one in one rename). Every caller marks the folder as done in a file written
            # after it, so a kill inside the window only means the folder is written again.
            os.replace(path, old)
            os.replace(tmp, path)
            _sync_folder(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            _sync_folder(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_modes(root: Path) -> None:
    """Give a finished folder the modes plain writes under the umask give: mkdtemp makes the folder private
    (0700), and some writers (safetensors' `save_file`) make private files (0600); see `_write_bytes`."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name, mode in [*((d, 0o777) for d in dirs), *((f, 0o666) for f in files)]:
            entry = os.path.join(folder, name)
            if not os.path.islink(entry):  # a link has no mode of its own
                os.chmod(entry, mode & ~mask)


def _sync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to the disk before it is renamed into place: its writers
    (safetensors, polars, tokenizers) only close their files, which leaves the data in the page cache, so a
    power cut after the rename could leave the new names with empty or partial contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            entry = os.path.join(folder, name)
            if not os.path.islink(entry):
                fd = os.open(entry, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _sync_folder(Path(folder))


def _make_folders(folder: Path) -> None:
    """`folder` and its missing parents, each flushed into its own parent as it is made: a new folder the
    disk does not hold yet would take everything renamed into it along at a power cut."""
    missing = []
    while not folder.is_dir() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)  # (another process may make it meanwhile)
        _sync_folder(made.parent)


def _sync_folder(folder: Path) -> None:
    """Flush `folder`'s entries (the names made, renamed or removed in it) to the disk: a rename lasts
    through a power cut only once the folder holding it is synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a system that cannot open folders (Windows) has no such flush to ask for
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder: nothing more can be asked of them
        pass
    finally:
        os.close(fd)


def atomic_write_png(figure: Any, path: str | Path, **savefig: Any) -> None:
    """A matplotlib figure as a PNG file, atomically through a temporary of its own (two report writers at
    once shared one fixed temporary name and one of them crashed)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig)
    atomic_write_bytes(path, buffer.getvalue())


def set_aside(path: str | Path) -> Path:
    """Rename a damaged file or folder to a hidden sibling (kept for inspection) and return the new path."""
    path = Path(path)
    target = path.with_name(f".{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    with parallel.one_writer() as writes:
        if writes:
            with contextlib.suppress(FileNotFoundError):  # another process set it aside first
                os.replace(path, target)
    return target


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hash of a JSON-serialisable object; key order does not matter."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]
