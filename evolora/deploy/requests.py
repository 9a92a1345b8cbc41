"""What a client of `evolora serve` may send: the request bodies, their limits (`BodyLimit`: the size, before
anything parses a body), and one plain message for a body that does not fit them (FastAPI's default is a
list of schema errors, several for one mistake)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

MAX_ITEMS = 1000  # per request
MAX_HISTORY = 1000
MAX_K = 100
MAX_BODY_BYTES = 1 << 20


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(None, description="a user the run knows: their history is used")
    # strict: a rating or k of another type ("5") is refused, not coerced, as the Python API does (true and
    # false: labels, which a run whose data has a label column takes and any other refuses)
    history: list[str | tuple[str, StrictBool | StrictInt | StrictFloat]] | None = Field(
        None,
        max_length=MAX_HISTORY,
        description="item ids (liked), or [item, rating] pairs (on a 0/1 label column: 0, 1, true or false)",
    )

    @model_validator(mode="after")
    def _one_of(self) -> Query:
        if (self.user is None) == (self.history is None):
            raise ValueError("give `user` or `history` (one of them; an empty history is [])")
        return self


class ScoreQuery(Query):
    items: list[str] = Field(..., min_length=1, max_length=MAX_ITEMS)


class RecommendQuery(Query):
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    items: list[str] | None = Field(
        None, min_length=1, max_length=MAX_ITEMS, description="the candidates to rank (CTR runs only)"
    )


class Problem(BaseModel):
    """Every 4xx answer's body: one line saying what is wrong (not FastAPI's list of schema errors)."""

    detail: str


#: the error answers of /score and /recommend, as the OpenAPI schema lists them
ERROR_ANSWERS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "an unknown user or item, named"},
    413: {"model": Problem, "description": f"a body over {MAX_BODY_BYTES} bytes"},
    422: {
        "model": Problem,
        "description": "a body that does not fit (the field named), or a query the run cannot answer",
    },
}


# What each field takes, for the message of a body that does not fit.
_EXPECTED = {
    "user": "a user id (a string)",
    "history": f"a list of up to {MAX_HISTORY} item ids (each counted as liked) or [item id, rating] pairs",
    "items": f"a list of 1 to {MAX_ITEMS} item ids (strings)",
    "k": f"a whole number from 1 to {MAX_K}",
}
_EXAMPLE = '{"user": "196", "items": ["242", "302"]}'


#: a body FastAPI could not decode at all (not UTF-8, JSON nested too deep, a number of thousands of digits)
UNREADABLE_BODY = (
    f"the body could not be read as JSON (not UTF-8, nested too deep, or too long a number); e.g. {_EXAMPLE}"
)


def repeated_field(body: bytes) -> str | None:
    """A field a JSON body names twice, if any: JSON parsers keep the last silently, so `{"user": "a",
    "user": "b"}` would be answered for b, whatever the client meant."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names: set[str] = set()
        for name, _ in items:
            if name in names and not repeated:
                repeated.append(name)
            names.add(name)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except ValueError:  # (FastAPI has read it already: an unreadable body was answered before)
        return None
    return repeated[0] if repeated else None


def shown_id(value: Any, limit: int = 60) -> str:
    """An id a client sent, as an error message quotes it: cut to `limit` characters (a client's mistake
    is not echoed back at any length)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]} ({len(str(value))} characters)"


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
        return f"unknown field {shown_id(field)}: a query has user or history, and items or k"
    where = field + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    if field in _EXPECTED:
        return f"{where}: {'missing: ' if kind == 'missing' else ''}give {_EXPECTED[field]}"
    return f"{where}: {e['msg']}"


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it, whether it
    declares its length or arrives in chunks (which declare none)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body, size, more = [], 0, True
        while more:  # at most `limit` bytes are held: the body is read once, here, and replayed
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        from fastapi.responses import JSONResponse

        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        await response(scope, receive, send)


async def disconnected(request: Any, every: float = 0.05) -> None:
    """Returns once the client of `request` has disconnected."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)


def clipped(message: str, limit: int = 500) -> str:
    """A message that may quote what a client sent, at a bounded length."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
