"""Integer indices for user and item ids, in order of first appearance in time (the ID space of a run).

Conventional recommenders read users and items as indices into embedding tables; the indices seen by stage
t are a prefix of the space, so the tables grow stage by stage. The space is saved with a run (JSON), so a
trained model can be used without reading the training data again.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

#: the spaces a loaded id loses at its ends (Unicode's White_Space, which polars' `str.strip_chars` strips;
#: Python's `str.strip` would also strip the separators \x1c-\x1f, which stay in a loaded id)
ID_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)


def accents_apart(asked: Iterable[str], known: Container[str]) -> str:
    """For an error about unknown ids: those of `asked` that are a run's id but for how their accents are
    encoded (Unicode NFC or NFD: "é" as one character, or as "e" and a combining mark, as macOS file names
    write it), which look the same on screen; "" when there are none. A look-up per id, not a scan."""
    shown = []
    for a in asked:
        forms = {unicodedata.normalize(form, a) for form in ("NFC", "NFD")} - {a}
        shown += [f"{a!r} is the run's {k!r}" for k in sorted(forms) if k in known]
    if not shown:
        return ""
    return (
        f" ({', '.join(shown[:3])} with its accents encoded otherwise, Unicode NFC or NFD: the two look "
        "alike; send ids as the run's data writes them)"
    )


def id_text(value: Any) -> str:
    """An id's text without spaces at its ends, as a table file's ids are read."""
    return str(value).strip(ID_SPACE)


def known_form(value: Any, known: Container[str]) -> str:
    """An id of a query as the run knows it: as given where the run has it so (a loader that keeps spaces:
    PESO's blocks), else without spaces at its ends (`id_text`), so that an id copied from a table file with
    them (`"bob "`) names the run's `"bob"`. An unknown id comes back stripped."""
    text = str(value)
    return text if text in known else id_text(text)


def number_form(ids: pl.Expr) -> pl.Expr:
    """A whole number's id without its leading zeros or `.0` ("007" and "7.0" read "7"); any other id as
    it is."""
    return ids.str.replace(r"^0*([0-9]+?)(?:\.0*)?$", "${1}")


def id_form(ids: pl.Expr) -> pl.Expr:
    """How an id reads however it was written: a number without its leading zeros or `.0`, and any other id
    in lower case, without surrounding spaces, its accents composed (Unicode NFC: a macOS file name's "é" is
    "e" and a combining accent)."""
    return number_form(ids.str.strip_chars().str.normalize("NFC").str.to_lowercase())


def known_forms(ids: pl.Expr, known: Iterable[str]) -> pl.Expr:
    """`known_form` of a column of ids (text)."""
    return pl.when(ids.is_in(list(known))).then(ids).otherwise(ids.str.strip_chars())


@dataclass(frozen=True)
class IdSpace:
    """User and item indices (1-based, in order of first appearance) and the stage each id first appears in.

    `users_known(t)` / `items_known(t)`: table sizes (index 0 included) that cover every id of stages <= t.
    """

    user_ids: list[str]  # index -> id; index 0 is ""
    item_ids: list[str]
    user_first_stage: np.ndarray  # [n_users + 1] int; index 0: 0
    item_first_stage: np.ndarray

    @classmethod
    def from_staged(cls, staged: pl.DataFrame) -> IdSpace:
        """From a staged interaction table (`user_id`, `item_id`, `timestamp`, `stage`)."""
        df = staged.with_row_index("_row").sort(["stage", "timestamp", "_row"])
        out = {}
        for col in ("user_id", "item_id"):
            first = df.group_by(col, maintain_order=True).agg(pl.col("stage").first())
            out[col] = (["", *first[col].to_list()], np.concatenate([[0], first["stage"].to_numpy()]))
        return cls(out["user_id"][0], out["item_id"][0], out["user_id"][1], out["item_id"][1])

    @property
    def n_users(self) -> int:
        return len(self.user_ids) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def users_known(self, stage: int) -> int:
        return 1 + int(np.searchsorted(self.user_first_stage[1:], stage, side="right"))

    def items_known(self, stage: int) -> int:
        return 1 + int(np.searchsorted(self.item_first_stage[1:], stage, side="right"))

    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids) if i}

    def item_index(self) -> dict[str, int]:
        return {v: i for i, v in enumerate(self.item_ids) if i}

    def to_json(self) -> dict[str, Any]:
        return {
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
            "user_first_stage": self.user_first_stage.tolist(),
            "item_first_stage": self.item_first_stage.tolist(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IdSpace:
        return cls(
            list(obj["user_ids"]),
            list(obj["item_ids"]),
            np.asarray(obj["user_first_stage"], dtype=np.int64),
            np.asarray(obj["item_first_stage"], dtype=np.int64),
        )
