"""`evolora serve` on loopback: concurrent clients through a version switch, and every bad request's 4xx."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from evolora.deploy.server import Batcher, ModelHolder, _Request, create_app
from evolora.deploy.update import update_run
from evolora.deploy.versions import Versions
from evolora.errors import ConfigError, EvoloraError
from evolora.experiment import run_experiment
from tests.helpers import EXAMPLE_TABLE, free_port, split_example_log, tiny_config

SMALL = {
    **EXAMPLE_TABLE,
    "train.epochs": 1,
    "train.samples_per_stage": 32,
    "strategies": "[finetune]",
}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with two versions: 0 (the run) and 1 (an update, promoted)."""
    tmp = tmp_path_factory.mktemp("served")
    split_example_log(tmp)
    cfg = tiny_config(tmp / "base.csv", tmp / "runs", **SMALL)
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    assert update_run(root, tmp / "new.csv", overrides=["update.min_gain=-1.0"]).promoted
    return root


@pytest.fixture
def server(deployed: Path):
    holder = ModelHolder(deployed, poll_seconds=0.1)
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(holder, max_batch=64), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", holder
    srv.should_exit = True
    thread.join(timeout=30)


def test_concurrent_clients_through_a_version_switch(server, deployed: Path) -> None:
    url, holder = server
    assert httpx.get(f"{url}/version").json()["version"] == 1
    users = sorted(holder.served.rec.known_users)[:20]
    items = ["sku-001", "sku-002", "sku-003", "sku-004", "sku-005"]
    answers: list[tuple[int, int | None, float]] = []
    switched = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for j in range(10):  # 20 clients x 10 requests
                body = (
                    {"user": users[i], "items": items}
                    if j % 2
                    else {"history": [items[j % 5]], "items": items}
                )
                r = c.post("/score", json=body)
                answers.append((r.status_code, r.json().get("version"), time.monotonic()))
                if i == 0 and j == 3:
                    Versions.open(deployed, "finetune", 0, 2).rollback(0)  # another process's rollback
                    switched.set()

    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(client, range(20)))
    assert time.monotonic() - t0 < 300
    assert len(answers) == 200 and all(code == 200 for code, _, _ in answers), {c for c, _, _ in answers}
    assert {v for _, v, _ in answers} <= {0, 1} and switched.is_set()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/version").json()["version"] != 0:
        assert time.monotonic() < deadline, "the server never switched to the promoted version"
        time.sleep(0.1)
    after = httpx.post(f"{url}/score", json={"user": users[0], "items": items}).json()
    assert after["version"] == 0 and len(after["items"]) == 5
    assert all(0 < s["score"] < 1 for s in after["items"])
    Versions.open(deployed, "finetune", 0, 2).rollback(1)  # leave the fixture as it was


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/score", {"items": ["sku-001"]}, 422),  # neither user nor history
        ("/score", {"user": "user-01", "history": [], "items": ["sku-001"]}, 422),  # both
        ("/score", {"user": "user-01", "items": []}, 422),  # nothing to score
        ("/score", {"user": "nobody", "items": ["sku-001"]}, 404),
        ("/score", {"history": ["no-such-item"], "items": ["sku-001"]}, 404),
        ("/score", {"user": "user-01", "items": ["no-such-item"]}, 404),
        ("/score", {"user": "user-01", "items": ["sku-001"] * 1001}, 422),  # oversized
        ("/score", {"user": "user-01", "items": "sku-001"}, 422),  # malformed
        ("/score", {"user": "user-01", "items": ["sku-001"], "path": "/etc/passwd"}, 422),  # unknown field
        ("/recommend", {"user": "user-01", "k": 5}, 422),  # a CTR run ranks candidates: none given
        ("/recommend", {"user": "user-01", "items": [], "k": 5}, 422),
        ("/recommend", {"user": "user-01", "items": ["no-such-item"], "k": 5}, 404),
        ("/score", {"history": [["sku-001", "five"]], "items": ["sku-001"]}, 422),  # a rating, not a number
        ("/score", {"history": [["sku-001", 10**400]], "items": ["sku-001"]}, 422),  # past a float: was 500
        # of the wrong type: refused, not converted (as the Python API refuses them)
        ("/score", {"history": [["sku-001", "5"]], "items": ["sku-001"]}, 422),
        ("/score", {"history": [["sku-001", True]], "items": ["sku-001"]}, 422),
        ("/recommend", {"user": "user-01", "items": ["sku-001"], "k": True}, 422),
        ("/recommend", {"user": "user-01", "items": ["sku-001"], "k": "2"}, 422),
        ("/recommend", {"user": "user-01", "items": ["sku-001"], "k": 2.0}, 422),
    ],
)
def test_bad_requests_get_their_4xx(server, path: str, body: dict, status: int) -> None:
    url, _ = server
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str)  # one message, not FastAPI's list of schema errors
    if body.get("user") == "nobody":  # with the advice the CLI and the Python API give
        assert r.json()["detail"] == "unknown user 'nobody': send their \"history\" instead"


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        ('{"history": [["sku-001"]], "items": ["sku-001"]}', True, "history[0]: give a list of up to 1000"),
        ('{"user": "user-01", "items": ["sku-001"]}', False, "content-type: application/json"),
        ('{"user": "user-01", "items": ["sku-001"], "path": "x"}', True, "unknown field 'path'"),
        ('{"user": "user-01"}', True, "items: missing: give a list of 1 to 1000 item ids"),
        ('{"items": ["sku-001"]}', True, "give `user` or `history`"),
        ('{"user": "user-01", "items": ["sku-001"]', True, "the body is not valid JSON"),
        # a parser keeps the last of two: the answer would be for a user the client may not have meant
        ('{"user": "user-01", "items": ["sku-001"], "user": "user-02"}', True, "names 'user' twice"),
    ],
)
def test_a_body_that_does_not_fit_gets_one_plain_message(
    server, body: str, headers: bool, message: str
) -> None:
    url, _ = server
    r = httpx.post(
        f"{url}/score",
        content=body,
        headers={"content-type": "application/json"} if headers else {},
        timeout=60,
    )
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_ids_with_spaces_at_their_ends_are_the_run_s(server) -> None:
    """A data file's ids are read without spaces at their ends; a request naming one with them (copied from
    the file) is answered for the run's id, as the Python API answers it."""
    url, _ = server
    plain = httpx.post(f"{url}/score", json={"user": "user-01", "items": ["sku-001"]}, timeout=60).json()
    padded = httpx.post(f"{url}/score", json={"user": "user-01 ", "items": [" sku-001"]}, timeout=60)
    assert padded.status_code == 200, padded.text
    assert padded.json()["items"] == plain["items"]
    given = {"history": [["sku-001 ", 5]], "items": ["sku-001"]}
    assert httpx.post(f"{url}/score", json=given, timeout=60).status_code == 200


def test_an_id_whose_accents_are_encoded_otherwise_is_named(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown id that is a known one with its accents encoded otherwise (NFD for NFC) looks the same on
    screen: the 404 says what it is."""
    from evolora.api import Recommender
    from evolora.data.ids import accents_apart

    url, holder = server
    known = set(holder.served.rec.known_users_set) | {"Zo\u00eb"}
    monkeypatch.setattr(Recommender, "known_users_set", property(lambda self: known))
    r = httpx.post(f"{url}/score", json={"user": "Zoe\u0308", "items": ["sku-001"]}, timeout=60)
    assert r.status_code == 404 and "'Zoe\u0308' is the run's 'Zo\u00eb'" in r.json()["detail"], r.text
    assert "accents encoded otherwise" in r.json()["detail"]
    assert accents_apart(["Zoe\u0308", "nobody", "Zo\u00eb"], {"Zo\u00eb"}).count("is the run's") == 1
    assert accents_apart(["Ren\u00e9"], {"Zo\u00eb"}) == accents_apart(["bob"], {"bob "}) == ""


def test_an_id_the_answering_version_does_not_know_is_404(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request checked against one version and answered by the next (a switch in between) that does not
    know its user is still a 404, not a 422."""
    url, holder = server
    from evolora.api import Recommender

    known = set(holder.served.rec.known_users_set) | {"ghost"}
    monkeypatch.setattr(Recommender, "known_users_set", property(lambda self: known))
    r = httpx.post(f"{url}/score", json={"user": "ghost", "items": ["sku-001"]}, timeout=60)
    assert r.status_code == 404 and "unknown user 'ghost'" in r.json()["detail"], r.text


def test_health_docs_and_size_limit(server) -> None:
    url, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    # load balancers and monitors probe with HEAD too (it was a 405)
    assert httpx.head(f"{url}/health").status_code == httpx.head(f"{url}/version").status_code == 200
    assert httpx.get(f"{url}/docs").status_code == 200
    schema = httpx.get(f"{url}/openapi.json").json()
    # The schema says what the errors are: one line in "detail" (it listed FastAPI's list of schema errors)
    for path in ("/score", "/recommend"):
        answers = schema["paths"][path]["post"]["responses"]
        assert set(answers) == {"200", "404", "413", "422"}
        assert all(
            answers[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
            for code in ("404", "413", "422")
        )
    assert schema["components"]["schemas"]["Problem"]["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    json_type = {"content-type": "application/json"}
    big = httpx.post(f"{url}/score", content=b"{" + b" " * (2 << 20) + b"}", headers=json_type)
    assert big.status_code == 413
    chunks = (b" " * 65536 for _ in range(40))  # 2.5 MiB that never declare their length
    chunked = httpx.post(f"{url}/score", content=chunks, headers=json_type)
    assert chunked.status_code == 413, chunked.text
    small = (part for part in [b'{"user": "user-01", ', b'"items": ["sku-001"]}'])
    assert httpx.post(f"{url}/score", content=small, headers=json_type, timeout=60).status_code == 200
    r = httpx.post(f"{url}/score", content=b"not json", headers=json_type)
    assert r.status_code == 422


def test_an_address_in_use_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evolora.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The run folder does not exist: the address is checked first, so the answer comes at once.
        result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-run"), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-run"), "--port", "70000"])
    assert result.exit_code == 2 and "a port is 1-65535" in result.output
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-run"), "--port", str(port)])
    assert result.exit_code == 2 and "neither an experiment folder" in result.output  # the port is free again
    assert "serving" not in result.output  # said only for a run it can serve
    # an address of another machine: the advice is about the host, not the port
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-run"), "--host", "192.0.2.1"])
    assert result.exit_code == 2 and "not an address of this machine" in result.output, result.output


def test_serving_is_said_once_the_model_is_loaded(deployed: Path, tmp_path: Path) -> None:
    """ "serving ... Ctrl-C stops" came before the load, and then the load's error."""
    from typer.testing import CliRunner

    from evolora.cli import app

    missing = tmp_path / "no-model"
    result = CliRunner().invoke(
        app, ["serve", str(deployed), "--port", str(free_port()), "--model", str(missing)]
    )
    assert result.exit_code == 2 and "loading" in result.output, result.output
    assert "Ctrl-C stops" not in result.output  # (the folder's name holds "serving")


def test_the_port_is_held_while_the_model_loads(deployed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The address was probed and let go before the model loaded, and uvicorn bound it only after: a second
    server started meanwhile got the port, and this one then failed with uvicorn's error. The socket checked
    is the one served on."""
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.deploy import server as server_module

    port, seen = free_port(), {}

    def loading(*args, **kwargs) -> ModelHolder:
        with socket.socket() as second:
            second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                second.bind(("127.0.0.1", port))
                seen["second server"] = "bound"
            except OSError:
                seen["second server"] = "refused"
        return ModelHolder(*args, **kwargs)

    def run(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        seen["served on"] = [s.getsockname()[1] for s in sockets or []]

    monkeypatch.setattr(server_module, "ModelHolder", loading)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    result = CliRunner().invoke(app, ["serve", str(deployed), "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert seen == {"second server": "refused", "served on": [port]}
    with socket.socket() as after:  # let go once serving ends
        after.bind(("127.0.0.1", port))


def test_a_host_name_of_two_addresses_is_listened_on_at_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--host localhost` where the name is 127.0.0.1 and ::1 (Debian's and macOS's /etc/hosts): uvicorn
    listens on both, and so must the sockets taken before the model loads (the first alone refused IPv4
    clients). Each family has its own socket (IPv6 only on the IPv6 one), as asyncio binds them."""
    from evolora.deploy.server import listening_on

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port, real = free_port(), socket.getaddrinfo

    def both(host, *args, **kwargs):  # the name resolves to both loopbacks
        if host != "dual.test":
            return real(host, *args, **kwargs)
        return [*real("127.0.0.1", *args, **kwargs), *real("::1", *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    with listening_on("dual.test", port) as listeners:
        assert sorted(s.family for s in listeners) == [socket.AF_INET, socket.AF_INET6]
        six = next(s for s in listeners if s.family == socket.AF_INET6)
        assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        for address in ("127.0.0.1", "::1"):
            with socket.create_connection((address, port), timeout=5):
                pass  # accepted into the backlog: both addresses listen
    assert all(s.fileno() == -1 for s in listeners)  # closed when the block ends


def test_max_batch_one_answers_every_request_alone(deployed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched with other clients' requests, an answer moved by rounding (the batch's padded shape):
    `--max-batch 1` scores every request in a pass of its own, the same to the last digit as sent alone."""
    import asyncio

    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.deploy import server as server_module
    from evolora.deploy.server import Batcher, _Request

    given: dict[str, object] = {}
    monkeypatch.setattr(server_module, "serve", lambda run_dir, **kw: given.update(kw))
    result = CliRunner().invoke(app, ["serve", str(deployed), "--port", str(free_port()), "--max-batch", "1"])
    assert result.exit_code == 0 and given["max_batch"] == 1, result.output
    result = CliRunner().invoke(app, ["serve", str(deployed), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
    port = free_port()
    result = CliRunner().invoke(app, ["serve", str(deployed), "--host", "::1", "--port", str(port)])
    assert result.exit_code == 0 and f"http://[::1]:{port}" in result.output, result.output  # a URL's form

    holder = ModelHolder(deployed)
    batches: list[int] = []
    answer = Batcher._answer
    monkeypatch.setattr(
        Batcher, "_answer", staticmethod(lambda served, b: (batches.append(len(b)), answer(served, b))[1])
    )

    async def three_at_once() -> list[object]:
        batcher = Batcher(holder, max_batch=1)
        worker = asyncio.create_task(batcher.run())
        loop = asyncio.get_running_loop()
        asks = [
            _Request("score", None, ["sku-001"] * n, ["sku-002", "sku-003"], 0, loop.create_future(), loop)
            for n in (1, 12, 3)
        ]
        for req in asks:
            await batcher.queue.put(req)
        answers = [await req.future for req in asks]
        worker.cancel()
        return answers

    answers = asyncio.run(three_at_once())
    assert batches == [1, 1, 1]
    alone = holder.served.rec.score_many([(["sku-001"] * 12, ["sku-002", "sku-003"], None)])[0]
    assert [s["score"] for s in answers[1]["items"]] == [s.score for s in alone]


def test_a_ctr_run_ranks_given_candidates(server) -> None:
    url, holder = server
    rec = holder.served.rec
    user = sorted(rec.known_users)[0]
    seen = rec.history_of(user)[0][-1]
    fresh = [i for i in ["sku-001", "sku-002", "sku-003", "sku-004"] if i not in rec.seen_by(user)]
    body = {"user": user, "items": [*fresh, seen, fresh[0]], "k": 2}
    r = httpx.post(f"{url}/recommend", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    # the best two of the unseen candidates, as /score ranks them; the seen one is named, not ranked
    scores = httpx.post(f"{url}/score", json={"user": user, "items": fresh}, timeout=60).json()["items"]
    best = sorted(scores, key=lambda s: -s["score"])[:2]
    assert [s["item"] for s in answer["items"]] == [s["item"] for s in best]
    assert answer["left_out_seen"] == [seen] and answer["version"] == 1


def test_a_bad_request_fails_alone_not_its_batch(server) -> None:
    """Requests that arrive together share one forward pass; one that cannot be answered must not take
    the others down with it (nor hand them its error)."""
    _, holder = server
    user = sorted(holder.served.rec.known_users)[0]
    batch = [
        _Request("score", user, None, ["sku-001"], 0, None, None),
        _Request("score", None, [("sku-001", float("nan"))], ["sku-002"], 0, None, None),
        _Request("score", None, ["sku-003"], ["sku-002", "sku-004"], 0, None, None),
    ]
    good, bad, other = Batcher._answer(holder.served, batch)
    assert isinstance(bad, EvoloraError) and "the rating of 'sku-001' is nan" in str(bad)
    assert [s["item"] for s in good["items"]] == ["sku-001"]
    assert [s["item"] for s in other["items"]] == ["sku-002", "sku-004"]


def test_a_request_that_fails_in_the_shared_pass_fails_alone(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure past `check` (a rating too large for a float, a next-item search too wide for the model)
    was set on every request of the batch: each got a 500, or the other client's message."""
    _, holder = server
    rec = holder.served.rec
    score_many = rec.score_many

    def failing(queries, *args, **kwargs):
        if any(history == ["sku-009"] for history, _, _ in queries):
            raise RuntimeError("this query alone cannot be scored")
        return score_many(queries, *args, **kwargs)

    monkeypatch.setattr(rec, "score_many", failing)
    batch = [
        _Request("score", None, ["sku-001"], ["sku-002"], 0, None, None),
        _Request("score", None, ["sku-009"], ["sku-002"], 0, None, None),
        _Request("score", None, ["sku-003"], ["sku-002", "sku-004"], 0, None, None),
    ]
    good, bad, other = Batcher._answer(holder.served, batch)
    assert isinstance(bad, RuntimeError) and str(bad) == "this query alone cannot be scored"
    alone = score_many([(["sku-001"], ["sku-002"], None)])[0]
    assert [s["score"] for s in good["items"]] == [s.score for s in alone]
    assert [s["item"] for s in other["items"]] == ["sku-002", "sku-004"]


def test_the_wrong_endpoint_is_said_before_the_body_is_judged(
    server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A next-item run's /score without items was told to add items, then to use /recommend; its
    /recommend with empty items to give some, then to leave them out. (A CTR run stands in for one.)"""
    url, holder = server
    monkeypatch.setattr(holder.served.rec, "scores_given", False)
    for path, body, told in [
        ("/score", {"user": "user-01"}, "this run recommends (next-item): use /recommend"),
        (
            "/score",
            {"user": "user-01", "items": ["sku-001"]},
            "this run recommends (next-item): use /recommend",
        ),
        ("/recommend", {"user": "user-01", "items": [], "k": 3}, 'leave out "items"'),
        ("/recommend", {"user": "user-01", "k": 0}, "k: "),  # the right endpoint: the body's fault
        ("/recommend", {"user": "user-01", "items": None, "k": 0}, "k: "),  # null: no items (review)
    ]:
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert r.status_code == 422 and told in r.json()["detail"], (path, body, r.text)


def test_a_version_switch_tears_the_old_model_down_after_its_batch(deployed: Path) -> None:
    """A version promoted while a batch computes is served from the next batch on; the old version is torn
    down only once that batch is answered (its teardown changes the model the batch is computing on)."""
    import asyncio

    holder = ModelHolder(deployed, poll_seconds=0.05)
    assert holder.served.version == 1
    events: list[str] = []
    holder.served.rec.strategy.teardown = lambda: events.append("teardown of 1")
    computing, finish = threading.Event(), threading.Event()

    def answer(served, batch):
        computing.set()
        assert finish.wait(60)
        events.append(f"answered on {served.version}")
        return [{"version": served.version} for _ in batch]

    batcher = Batcher(holder)
    batcher._answer = answer

    async def one_request_through_a_switch() -> dict:
        loop = asyncio.get_running_loop()
        worker = asyncio.create_task(batcher.run())
        future = loop.create_future()
        await batcher.queue.put(_Request("score", "user-01", None, ["sku-001"], 0, future, loop))
        assert await asyncio.to_thread(computing.wait, 60)
        Versions.open(deployed, "finetune", 0, 2).rollback(0)  # promoted while the batch computes
        watcher = threading.Thread(target=holder.watch, daemon=True)
        watcher.start()
        deadline = time.monotonic() + 60
        while holder.served.version != 0:
            assert time.monotonic() < deadline, "the watcher never switched versions"
            await asyncio.sleep(0.05)
        assert events == []  # switched, but the batch in flight still uses version 1 untouched
        finish.set()
        answered = await future
        holder.stop()
        worker.cancel()
        return answered

    try:
        assert asyncio.run(one_request_through_a_switch()) == {"version": 1}
        assert events == ["answered on 1", "teardown of 1"]
    finally:
        finish.set()
        holder.stop()
        Versions.open(deployed, "finetune", 0, 2).rollback(1)  # leave the fixture as it was


def test_what_a_client_sent_is_not_echoed_at_any_length(server) -> None:
    """A body that cannot be decoded at all is a one-line 422 like any malformed body; an unknown id is
    quoted cut short; a history over the limit says the limit."""
    url, _ = server
    json_type = {"content-type": "application/json"}
    for body in (b'{"user": "\xff\xfe", "items": ["sku-001"]}', b"[" * 100_000 + b"]" * 100_000):
        r = httpx.post(f"{url}/score", content=body, headers=json_type, timeout=60)
        assert r.status_code == 422 and "could not be read as JSON" in r.json()["detail"], r.text
    long_id = "x" * 500_000
    for body in ({"user": long_id, "items": ["sku-001"]}, {"user": "user-01", "items": [long_id, "y"]}):
        r = httpx.post(f"{url}/score", json=body, timeout=60)
        assert r.status_code == 404 and len(r.text) < 400 and "500000 characters" in r.text, r.text[:400]
    r = httpx.post(f"{url}/score", json={"history": ["sku-001"] * 1001, "items": ["sku-001"]}, timeout=60)
    assert r.status_code == 422 and "up to 1000 item ids" in r.json()["detail"], r.text
    r = httpx.post(
        f"{url}/score", json={"user": "user-01", "items": ["sku-001"], "z" * 100_000: 1}, timeout=60
    )
    assert r.status_code == 422 and len(r.text) < 400 and "unknown field" in r.text, r.text[:400]


def test_a_request_whose_client_went_away_is_not_computed(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn keeps a handler running after its client disconnects: a request queued behind a long batch
    by a client that gave up is dropped, not computed before the next client's."""
    url, _ = server
    computed: list[list[str]] = []
    computing, finish = threading.Event(), threading.Event()

    def answer(served, batch):
        computed.append([item for r in batch for item in r.items])
        computing.set()
        assert finish.wait(60)
        return [{"version": served.version, "items": []} for _ in batch]

    monkeypatch.setattr(Batcher, "_answer", staticmethod(answer))
    body = {"user": "user-01", "items": ["sku-001"]}
    first = threading.Thread(target=lambda: httpx.post(f"{url}/score", json=body, timeout=60))
    first.start()
    assert computing.wait(60)  # the worker is busy with the first request
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/score", json={**body, "items": ["sku-002"]}, timeout=0.5)  # gives up
    time.sleep(1.0)  # the server notices the disconnect (it polls every 0.05 s)
    finish.set()
    first.join(60)
    r = httpx.post(f"{url}/score", json={**body, "items": ["sku-003"]}, timeout=60)
    assert r.status_code == 200 and computed == [["sku-001"], ["sku-003"]], computed


def test_a_promoted_version_that_cannot_be_loaded_is_said_and_tried_again_later(deployed: Path) -> None:
    """The served version keeps answering; /health says which version is promoted and why it is not
    served; the load is not retried at every poll, but after `retry_seconds`."""
    from fastapi.testclient import TestClient

    holder = ModelHolder(deployed, poll_seconds=0.05)
    loads: list[int] = []

    def broken(version: int):
        loads.append(version)
        raise EvoloraError("its state.safetensors is missing")

    holder._load = broken
    registry = Versions.open(deployed, "finetune", 0, 2)
    try:
        registry.rollback(0)
        holder.promoted = holder._promoted()
        for _ in range(3):
            holder.check_promoted()
        assert loads == [0] and holder.served.version == 1
        health = TestClient(create_app(holder)).get("/health").json()
        assert health["version"] == 1 and health["promoted"] == 0
        assert "version 0 could not be loaded: its state.safetensors is missing" in health["error"]
        holder.retry_seconds = 0.0
        holder.check_promoted()
        assert loads == [0, 0]
        del holder._load  # loadable again
        holder.check_promoted()
        assert holder.served.version == 0 and holder.switch_error is None
        assert "error" not in TestClient(create_app(holder)).get("/health").json()
    finally:
        Versions.open(deployed, "finetune", 0, 2).rollback(1)  # leave the fixture as it was


def test_a_registry_gone_while_serving_keeps_the_served_version(deployed: Path, tmp_path: Path) -> None:
    """versions.json moved away (or the run folder with it) read as "version 0 promoted": the server rolled
    itself back to a version nobody promoted. It keeps the served one, says why in /health, and goes on
    when the file is back."""
    from fastapi.testclient import TestClient

    holder = ModelHolder(deployed, poll_seconds=0.05)
    loads: list[int] = []
    holder._load = lambda version: loads.append(version)  # type: ignore[method-assign]
    registry = holder._registry().file
    aside = tmp_path / "versions.json"
    registry.rename(aside)
    try:
        for _ in range(3):
            holder.poll()
        assert loads == [] and holder.served.version == holder.promoted == 1
        health = TestClient(create_app(holder)).get("/health").json()
        assert health["version"] == health["promoted"] == 1
        assert (
            "the run's versions cannot be read" in health["error"]
            and "versions.json is missing" in health["error"]
        )
    finally:
        aside.rename(registry)
    holder.poll()
    assert loads == [] and holder.switch_error is None


def test_a_poll_reads_the_registry_only_when_it_changed(deployed: Path, monkeypatch) -> None:
    """A server polls twice a second for months: an unchanged versions.json is not read and parsed again
    each time. A promotion (the file replaced) and an edit in place are both seen at the next poll."""
    import json

    import evolora.deploy.holder as holder_module

    holder = ModelHolder(deployed, poll_seconds=0.05)
    holder._load = lambda version: holder_module.Served(holder.served.rec, version, {})  # type: ignore
    reads: list[int] = []
    real_open = Versions.open

    def counted_open(*args, **kwargs):
        reads.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(holder_module.Versions, "open", counted_open)
    for _ in range(5):
        holder.poll()
    assert reads == [] and holder.promoted == 1
    try:
        Versions.open(deployed, "finetune", 0, 2).rollback(0)  # replaces the file
        holder.poll()
        assert holder.promoted == 0 and holder.served.version == 0
        reads.clear()
        holder.poll()
        assert reads == []
        file = holder._registry().file
        raw = json.loads(file.read_text())
        raw["promoted"] = 1
        with open(file, "r+") as f:  # an edit in place: same inode, another size or time
            f.write(json.dumps(raw, indent=2))
            f.truncate()
        holder.poll()
        assert holder.promoted == 1 and holder.served.version == 1
        # an edit the file's identity cannot show (same size, same tick) is read within REREAD_SECONDS
        reads.clear()
        holder._read_at -= holder_module.REREAD_SECONDS
        holder.poll()
        assert reads == [1]
    finally:
        Versions.open(deployed, "finetune", 0, 2).rollback(1)


def test_a_version_whose_model_was_deleted_is_not_promoted(deployed: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(deployed, copy)
    registry = Versions.open(copy, "finetune", 0, 2)
    state = copy / registry.get(0).folder / "trained" / "state.safetensors"
    state.unlink()
    with pytest.raises(ConfigError, match=r"version 0 cannot be served: .*state.safetensors is missing"):
        registry.rollback(0)
    assert Versions.open(copy, "finetune", 0, 2).promoted == 1
    # An update's inference files are not rebuilt: one of them gone, its version cannot be promoted (only
    # bundle.json was checked; histories.parquet gone, the rollback took and every query failed)
    other = tmp_path / "other"
    shutil.copytree(deployed, other)
    registry = Versions.open(other, "finetune", 0, 2)
    assert registry.rollback(0)
    ((other / registry.get(1).folder).parent / "inference" / "histories.parquet").unlink()
    with pytest.raises(ConfigError, match=r"version 1 cannot be served: .*histories.parquet is missing"):
        registry.rollback(1)


def test_a_label_run_takes_labels_in_a_request(tmp_path: Path) -> None:
    """A run on a 0/1 label column: [item, true] is the label 1 as [item, 1] is; 0.3 is refused naming the
    column (a rating run refuses true: `test_bad_requests_get_their_4xx`)."""
    import polars as pl
    from fastapi.testclient import TestClient

    from tests.helpers import EXAMPLE_DATA

    log = pl.read_csv(EXAMPLE_DATA / "example_log.csv")
    log.with_columns(clicked=(pl.col("stars") > 3).cast(pl.Int8)).drop("stars").write_csv(
        tmp_path / "log.csv"
    )
    columns = "{user: uid, item: iid, time: ts, label: clicked, title: name}"
    cfg = tiny_config(tmp_path / "log.csv", tmp_path / "runs", **{**SMALL, "data.columns": columns})
    run_experiment(cfg)
    holder = ModelHolder(Path(cfg.output_dir) / cfg.name, poll_seconds=60)
    with TestClient(create_app(holder)) as client:
        scores = []
        for first, second in ((True, False), (1, 0), (1.0, 0.0)):
            body = {"history": [["sku-001", first], ["sku-002", second]], "items": ["sku-003"]}
            r = client.post("/score", json=body)
            assert r.status_code == 200, r.text
            scores.append(r.json()["items"])
        assert scores[0] == scores[1] == scores[2]
        r = client.post("/score", json={"history": [["sku-001", 0.3]], "items": ["sku-003"]})
        assert r.status_code == 422 and "this run's data has labels ('clicked')" in r.json()["detail"], r.text
