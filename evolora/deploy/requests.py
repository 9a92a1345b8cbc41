"""What a client of `evolora serve` may send: the request bodies, their limits, and one plain message for a
body that does not fit them (FastAPI's default is a list of schema errors, several for one mistake)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ITEMS = 1000  # per request
MAX_HISTORY = 1000
MAX_K = 100
MAX_BODY_BYTES = 1 << 20


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(None, description="a user the run knows: their history is used")
    history: list[str | tuple[str, float]] | None = Field(
        None, max_length=MAX_HISTORY, description="item ids (liked), or [item, rating] pairs"
    )

    @model_validator(mode="after")
    def _one_of(self) -> Query:
        if (self.user is None) == (self.history is None):
            raise ValueError("give `user` or `history` (one of them; an empty history is [])")
        return self


class ScoreQuery(Query):
    items: list[str] = Field(..., min_length=1, max_length=MAX_ITEMS)


class RecommendQuery(Query):
    k: int = Field(10, ge=1, le=MAX_K)
    items: list[str] | None = Field(
        None, min_length=1, max_length=MAX_ITEMS, description="the candidates to rank (CTR runs only)"
    )


# What each field takes, for the message of a body that does not fit.
_EXPECTED = {
    "user": "a user id (a string)",
    "history": "a list of item ids (each counted as liked) or [item id, rating] pairs",
    "items": f"a list of 1 to {MAX_ITEMS} item ids (strings)",
    "k": f"a whole number from 1 to {MAX_K}",
}
_EXAMPLE = '{"user": "196", "items": ["242", "302"]}'


def validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    """One line for the first problem of a request body, naming the field and what it takes."""
    e = errors[0]
    kind, loc = e["type"], [p for p in e["loc"] if p != "body"]
    if kind == "json_invalid":
        return f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}); e.g. {_EXAMPLE}"
    if kind == "value_error":
        return str(e["msg"]).removeprefix("Value error, ")
    if not loc:
        return f"send a JSON object with the header content-type: application/json, e.g. {_EXAMPLE}"
    field = str(loc[0])
    if kind == "extra_forbidden":
        return f"unknown field {field!r}: a query has user or history, and items or k"
    where = field + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    if field in _EXPECTED:
        return f"{where}: {'missing: ' if kind == 'missing' else ''}give {_EXPECTED[field]}"
    return f"{where}: {e['msg']}"
