"""Small files in each source format, written by the tests."""

from __future__ import annotations

import gzip
import importlib
import json
from pathlib import Path

import pytest

REAL_ML100K = Path(__file__).resolve().parents[2] / "../shared/data/ml-100k"

# (user, item, rating, timestamp) in file order; timestamps unsorted with a tie (t=300) kept in file order.
RATINGS = [
    ("1", "1", 5, 300),
    ("2", "2", 3, 100),
    ("1", "2", 4, 200),
    ("2", "1", 2, 300),
    ("3", "3", 1, 400),
]
# (id, title without year, year or "", genres)
MOVIES = [
    ("1", "Toy Story", "1995", ["Animation", "Children's", "Comedy"]),
    ("2", "Misérables, Les", "1995", ["Drama", "Musical"]),
    ("3", "Land Before Time III: The Time of the Great Giving (1995)", "V", ["Animation"]),
]
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def grouplens_title(title: str, year: str) -> str:
    return f"{title} ({year})" if year else title


def write_ml100k(folder: Path, ratings: list = RATINGS, movies: list = MOVIES) -> Path:
    """GroupLens u.data / u.item (latin-1, pipe-separated, 19 genre flags)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    lines = []
    for mid, title, year, genres in movies:
        date = "01-Jan-1995" if year else ""
        flags = "|".join("1" if g in genres else "0" for g in GENRES)
        lines.append(f"{mid}|{grouplens_title(title, year)}|{date}||http://imdb/{mid}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return folder


def write_atomic(folder: Path, ratings: list = RATINGS, movies: list = MOVIES) -> Path:
    """RecBole atomic ml-100k.inter / ml-100k.item (utf-8, typed header)."""
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\n"]
    inter += [f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings]
    (folder / "ml-100k.inter").write_text("".join(inter), encoding="utf-8")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"]
    items += [f"{m}\t{title}\t{year}\t{' '.join(g)}\n" for m, title, year, g in movies]
    (folder / "ml-100k.item").write_text("".join(items), encoding="utf-8")
    return folder


def write_ml1m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    movies = [f"{m}::{grouplens_title(t, y)}::{'|'.join(g)}\n" for m, t, y, g in MOVIES]
    (folder / "movies.dat").write_bytes("".join(movies).encode("latin-1"))
    return folder


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    """One record a line; a str record is written as it is (python literals, broken lines)."""
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files `evolora.data.digest` hashes from now on, in order (filled as they come)."""
    digest_mod = importlib.import_module("evolora.data.digest")
    hashed: list[str] = []
    real = digest_mod.sha256_file

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(digest_mod, "sha256_file", counting)
    return hashed
