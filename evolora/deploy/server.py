"""`evolora serve`: the promoted version of a deployed run behind HTTP (FastAPI + uvicorn).

    POST /score      {"user": ..., "items": [...]} or {"history": [...], "items": [...]} -> P(like) per item
    POST /recommend  {"user": ..., "k": 10} or {"history": [...], "k": 10}       -> the top k items
                     (CTR runs rank the candidates given as "items", leaving out items of the history)
    GET  /health     liveness, the version served and the one promoted (and why it is not served yet)
    GET  /version    the version served: id, stage, when, its gate
    GET  /openapi.json  the OpenAPI schema (GET /docs: a browser view of it, whose scripts come from a CDN)

One model serves at a time, from one worker thread: requests wait in a queue, and the worker answers all
the requests that arrived while it was busy (up to `max_batch` samples) with one forward pass over their
samples, so concurrent clients share batches (a batch's padded shape moves scores by rounding: `max_batch`
1 answers each request alone, the same whatever the traffic); a request the model cannot answer (an unknown
user or item, a malformed rating) fails alone, not the batch it arrived in. A watcher (`holder.py`) polls
the run's versions: when another version is promoted (`evolora update`, `evolora rollback`, in any process),
it loads that version beside the served one and swaps them between two batches; requests in flight finish on
the version they started with (the old one is torn down only once its last batch is answered), and every
answer names its version; a promoted version that fails to load leaves the served one answering, and is
tried again after `retry_seconds`. A request whose client disconnects is cancelled and dropped from its
batch. Requests only name users and items: nothing a client sends becomes a path.

(A little past 400 lines: the batcher, the endpoints and the sockets taken before the load are one serving
mechanism, read together; what a client may send is apart, in `requests.py`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request  # (module level: FastAPI resolves the handlers' annotations here)

from evolora.allocator import keep_freed_memory
from evolora.data.ids import accents_apart, known_form
from evolora.deploy.holder import ModelHolder, Served
from evolora.deploy.requests import (
    ERROR_ANSWERS,
    MAX_BODY_BYTES,
    UNREADABLE_BODY,
    BodyLimit,
    Query,
    RecommendQuery,
    ScoreQuery,
    clipped,
    disconnected,
    repeated_field,
    shown_id,
    validation_message,
)
from evolora.errors import EvoloraError, UnknownIdError

log = logging.getLogger("evolora")


@dataclass
class _Request:
    kind: str  # score | recommend
    user: str | None
    history: list[str] | list[tuple[str, float]] | None
    items: list[str] | None
    k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """One worker answering queued requests in batches, on one model at a time."""

    def __init__(self, holder: ModelHolder, max_batch: int = 256) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evolora-model")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and self._rows(batch) < self.max_batch:
                batch.append(self.queue.get_nowait())
            # A request whose client went away is cancelled (`ask`): nobody reads it, nothing computes it.
            batch = [req for req in batch if not req.future.done()]
            if not batch:
                continue
            served = self.holder.acquire()
            try:
                try:
                    answers = await loop.run_in_executor(self.executor, self._answer, served, batch)
                finally:
                    await loop.run_in_executor(self.executor, self.holder.release, served)
                for req, answer in zip(batch, answers, strict=True):
                    if req.future.done():
                        continue
                    if isinstance(answer, Exception):
                        req.future.set_exception(answer)
                    else:
                        req.future.set_result(answer)
            except Exception as e:
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)

    @staticmethod
    def _rows(batch: list[_Request]) -> int:
        return sum(len(r.items or ()) or 1 for r in batch)

    @staticmethod
    def _answer(served: Served, batch: list[_Request]) -> list[dict[str, Any] | Exception]:
        """Every request of the batch: score requests share one forward pass, recommend requests another.
        A request that cannot be answered gets its own error; the others are answered."""
        rec = served.rec
        out: dict[int, dict[str, Any] | Exception] = {}
        valid = []
        for i, r in enumerate(batch):
            try:
                rec.check(r.history, r.user, r.items)
                valid.append((i, r))
            except EvoloraError as e:
                out[i] = e

        def scores(group: list[_Request]) -> list[dict[str, Any]]:
            results = rec.score_many([(r.history, r.items or [], r.user) for r in group])
            return [{"version": served.version, "items": [s.to_dict() for s in one]} for one in results]

        def generated(group: list[_Request]) -> list[dict[str, Any]]:
            results = rec.recommend_many([(r.history, r.k, r.user) for r in group])
            return [{"version": served.version, "items": [s.to_dict() for s in top]} for top in results]

        def ranked(group: list[_Request]) -> list[dict[str, Any]]:
            results = rec.rank_many([(r.history, r.items or [], r.k, r.user) for r in group])
            return [
                {
                    "version": served.version,
                    "items": [s.to_dict() for s in one.items],
                    "left_out_seen": one.left_out_seen,
                }
                for one in results
            ]

        for kind, answer in (("score", scores), ("generate", generated), ("rank", ranked)):
            group = [(i, r) for i, r in valid if _kind(r) == kind]
            if group:
                results = _each_alone_on_failure(answer, [r for _, r in group])
                out.update((i, result) for (i, _), result in zip(group, results, strict=True))
        return [out[i] for i in range(len(batch))]


def _kind(request: _Request) -> str:
    """The pass a request shares: scoring, generating (next-item) or ranking given candidates (CTR)."""
    if request.kind == "score":
        return "score"
    return "generate" if request.items is None else "rank"


def _each_alone_on_failure(answer: Any, group: list[_Request]) -> list[dict[str, Any] | Exception]:
    """`answer(group)`, or, where the shared pass fails, each request answered alone: a request that
    passed `check` and still cannot be answered (a search too wide for the model, a value the checks did not
    foresee) fails alone, with its own error, and never hands it to the others."""
    try:
        return answer(group)
    except Exception as e:
        if len(group) == 1:
            return [e]
        return [one for r in group for one in _each_alone_on_failure(answer, [r])]


def create_app(holder: ModelHolder, max_batch: int = 256) -> Any:
    """The FastAPI application serving `holder`'s promoted version."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = Batcher(holder, max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        watcher = threading.Thread(target=holder.watch, name="evolora-watch", daemon=True)
        watcher.start()
        yield
        holder.stop()
        worker.cancel()

    app = FastAPI(
        title="evolora", description=f"{holder.method}, a deployed run of {holder.root}", lifespan=lifespan
    )

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    def wrong_endpoint(path: str, items_given: bool) -> str | None:
        """Why this run does not answer `path` as asked (an endpoint or `items` of the other task), if so."""
        served = holder.served
        if served is None:
            return None
        ctr = served.rec.scores_given
        if path == "/score" and not ctr:
            return "this run recommends (next-item): use /recommend"
        if path == "/recommend" and ctr and not items_given:
            return 'this run ranks given candidates (CTR): add "items"'
        if path == "/recommend" and not ctr and items_given:
            return 'this run generates its recommendations (next-item): leave out "items"'
        return None

    @app.exception_handler(RequestValidationError)
    async def one_message(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The endpoint comes before the body: a next-item run's /score is told to use /recommend, not
        # to fix a field it will then be told to leave out.
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):  # (what FastAPI decoded, this decodes too: for certainty)
            body = None
        wrong = wrong_endpoint(request.url.path, isinstance(body, dict) and body.get("items") is not None)
        return JSONResponse({"detail": wrong or validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def unreadable(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's 400 for a body it cannot decode at all; our own answers are 404 and 422
        if exc.status_code == 400:
            return JSONResponse({"detail": UNREADABLE_BODY}, status_code=422)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    def check(query: Query, items: list[str] | None) -> None:
        served = holder.served
        assert served is not None
        rec = served.rec
        # ids as the run knows them (`known_form`): one copied from a table file with its spaces is the run's
        users = rec.known_users_set
        user = None if query.user is None else known_form(query.user, users)
        if user is not None and user not in users:
            # (a user first seen after the version's data: what the CLI and the API advise too)
            apart = accents_apart([user], users)
            raise HTTPException(
                404, clipped(f'unknown user {shown_id(query.user)}: send their "history" instead{apart}')
            )
        known = rec.known_items
        named = [h if isinstance(h, str) else h[0] for h in query.history or []] + (items or [])
        as_known = {i: known_form(i, known) for i in named}
        unknown = sorted(i for i, k in as_known.items() if k not in known)
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            apart = accents_apart([as_known[i] for i in unknown], known)
            raise HTTPException(
                404, clipped(f"unknown items: {', '.join(map(shown_id, unknown[:10]))}{more}{apart}")
            )

    async def ask(
        request: Request, kind: str, query: Query, items: list[str] | None, k: int
    ) -> dict[str, Any]:
        twice = repeated_field(await request.body())  # (the body FastAPI read, kept by the request)
        if twice is not None:
            raise HTTPException(422, f"the body names {shown_id(twice)} twice: send each field once")
        check(query, items)
        loop = asyncio.get_running_loop()
        history = (
            None if query.history is None else [h if isinstance(h, str) else tuple(h) for h in query.history]
        )
        req = _Request(kind, query.user, history, items, k, loop.create_future(), loop)
        await batcher.queue.put(req)
        # uvicorn does not cancel a handler whose client disconnected: watch for it, and cancel the request
        # (unanswered, it is dropped from its batch), so that clients who gave up do not delay the others.
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({req.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not req.future.done():
            req.future.cancel()
            raise HTTPException(499, "the client closed the request")  # (nobody reads this answer)
        try:
            return req.future.result()
        except EvoloraError as e:
            # An id the version that answered does not know (it may have changed since `check`): 404.
            status = 404 if isinstance(e, UnknownIdError) else 422
            raise HTTPException(status, clipped(str(e))) from None

    @app.post("/score", responses=ERROR_ANSWERS)
    async def score(query: ScoreQuery, request: Request) -> dict[str, Any]:
        """P(like) of each item for a user or a history (CTR runs)."""
        if wrong := wrong_endpoint("/score", True):
            raise HTTPException(422, wrong)
        return await ask(request, "score", query, query.items, 0)

    @app.post("/recommend", responses=ERROR_ANSWERS)
    async def recommend(query: RecommendQuery, request: Request) -> dict[str, Any]:
        """The top k items for a user or a history: generated (next-item runs), or the given candidate
        `items` ranked by P(like), items of the history left out (CTR runs)."""
        if wrong := wrong_endpoint("/recommend", query.items is not None):
            raise HTTPException(422, wrong)
        return await ask(request, "recommend", query, query.items, query.k)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, the version served and the one promoted: they differ while a newly promoted version
        loads, or when it could not be loaded (`error` says why; the served one keeps answering)."""
        served = holder.served
        return {
            "status": "ok",
            "version": None if served is None else served.version,
            "promoted": holder.promoted,
            "method": holder.method,
            **({"error": holder.switch_error} if holder.switch_error else {}),
        }

    @app.get("/version")
    def version() -> dict[str, Any]:
        served = holder.served
        return {"method": holder.method, "seed": holder.seed, **(served.info if served else {})}

    # HEAD as well as GET: load balancers and monitors probe with either (RFC 9110); the schema lists GET
    for path, answer in (("/health", health), ("/version", version)):
        app.add_api_route(path, answer, methods=["HEAD"], include_in_schema=False)

    return app


@contextlib.contextmanager
def listening_on(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Sockets listening on `host:port`, one for each address the host name has (as uvicorn's own, through
    asyncio: `localhost` may be 127.0.0.1 and ::1), or an `EvoloraError` saying why there is none. Taken
    before the model loads (uvicorn would tell a taken port only after it) and held until uvicorn serves on
    them, so no other process can take the port meanwhile (a second server started during the load is
    refused; a client that connects during it waits for the load). Closed when the block ends."""
    if not 0 < port < 65536:
        raise EvoloraError(f"--port {port}: a port is 1-65535")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EvoloraError(f"--host {host}: {e.strerror}") from None
    listeners: list[socket.socket] = []
    try:
        unavailable = None
        for family, kind, proto, _, address in dict.fromkeys(found):
            listener = socket.socket(family, kind, proto)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # IPv6 alone: the host's IPv4 address has its own socket
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind(address)
                listener.listen(2048)  # uvicorn's backlog
            except OSError as e:
                listener.close()
                if e.errno != errno.EADDRNOTAVAIL:
                    raise EvoloraError(_cannot_listen(host, port, e)) from None
                unavailable = e  # a family this machine has no address of (asyncio passes it over too)
                continue
            listeners.append(listener)
        if not listeners:
            raise EvoloraError(_cannot_listen(host, port, unavailable or OSError(errno.EADDRNOTAVAIL, "")))
        yield listeners
    finally:
        for listener in listeners:
            listener.close()


def _cannot_listen(host: str, port: int, e: OSError) -> str:
    advice = {
        errno.EADDRINUSE: "another server there? choose another --port",
        errno.EADDRNOTAVAIL: "not an address of this machine: --host 127.0.0.1, or 0.0.0.0 for all",
        errno.EACCES: "ports below 1024 need privileges: choose a --port above 1023",
    }.get(e.errno or 0, "choose another --host or --port")
    return f"cannot listen on {host}:{port}: {e.strerror} ({advice})"


def serve(
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    method: str | None = None,
    seed: int | None = None,
    threads: int | None = None,
    max_batch: int = 256,
    model: str | Path | None = None,
    listeners: list[socket.socket] | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve the promoted version of a deployed run until stopped; `threads`: torch's CPU threads (None:
    every core), which the model worker uses; `max_batch`: the samples one forward pass takes across
    clients (1: every request alone); `model`: where the run's base model lies now, if not at its
    `model.name`; `listeners`: the sockets of `listening_on(host, port)`, if the caller took them first;
    `ready`: called once the model is loaded, before the first request is answered."""
    import torch
    import uvicorn

    with contextlib.ExitStack() as stack:
        if listeners is None:
            listeners = stack.enter_context(listening_on(host, port))
        if threads is not None:
            torch.set_num_threads(threads)
        keep_freed_memory()
        holder = ModelHolder(run_dir, method, seed, model=model)
        app = create_app(holder, max_batch)
        if ready is not None:
            ready()
        config = uvicorn.Config(app, host=host, port=port, log_level="warning")
        uvicorn.Server(config).run(sockets=listeners)
