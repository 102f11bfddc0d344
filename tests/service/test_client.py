"""The Python client (cellblock.service.client) against the real service and real executors:
REST calls, server-sent events, the WebSocket stream and its resumption after a dropped
connection, and the mapping of every error answer onto the client's exceptions."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from cellblock import errors
from cellblock.service import client as client_module
from cellblock.service.client import (
    ApiError,
    Client,
    ClientError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QueueFull,
    ServiceUnavailable,
    StreamInterrupted,
    Unauthorized,
)
from cellblock.service.store import Store

#: Prints eight lines, 0.25 s apart: long enough to drop the connection in the middle.
SLOW = {"run": "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.25; done"}
SLOW_OUTPUT = "".join(f"line {i}\n" for i in range(1, 9))


@pytest.fixture
async def alice(service: Any) -> AsyncIterator[Client]:
    async with Client(service.url, "alice-token", timeout=10) as client:
        yield client


@pytest.fixture
async def admin(service: Any) -> AsyncIterator[Client]:
    async with Client(service.url, "admin-token", timeout=10) as client:
        yield client


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_complete(events: list[dict[str, Any]]) -> None:
    """Sequence numbers 1..n without gaps or repeats, ending with ``finished``."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "finished"
    assert [e["type"] for e in events].count("finished") == 1


def stdout_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e["type"] == "output" and e["stream"] == "stdout")


# -- REST ---------------------------------------------------------------------------------------


async def test_health_and_openapi(alice: Client) -> None:
    health = await alice.health()
    assert health["status"] == "ok"
    assert {"executors", "builders", "queued"} <= health.keys()
    document = await alice.openapi()
    assert "/api/v1/submissions" in document["paths"]


async def test_submit_wait_get_list(alice: Client, service: Any, executor: Any) -> None:
    done = await alice.submit({"run": "echo hi; echo oops >&2"}, wait=True, timeout=50)
    assert done["status"] == "finished"
    assert done["stages"]["run"]["stdout"] == "hi\n"
    assert done["stages"]["run"]["stderr"] == "oops\n"
    assert await alice.get(done["id"]) == done
    queued = await alice.submit({"run": "true"})
    assert set(queued) == {"id", "status"}
    listed = [s["id"] for s in await alice.list(limit=10)]
    assert listed[:2] == [queued["id"], done["id"]]
    assert [s["id"] for s in await alice.list(limit=1)] == [queued["id"]]
    async with Client(service.url, "bob-token") as bob:
        assert await bob.list() == []
        with pytest.raises(NotFound):  # someone else's id answers exactly like an unknown one
            await bob.get(done["id"])


async def test_events_over_sse(alice: Client, executor: Any) -> None:
    sid = (await alice.submit(SLOW))["id"]
    events = [event async for event in alice.events(sid)]
    assert_complete(events)
    assert {e["id"] for e in events} == {sid}
    assert stdout_of(events) == SLOW_OUTPUT
    assert events[-1]["submission"]["stages"]["run"]["status"] == "ok"
    later = [event async for event in alice.events(sid, since=3)]
    assert later == events[3:]


async def test_events_resume_after_the_connection_drops(alice: Client, executor: Any) -> None:
    alice.reconnect_delay = 0.6  # lines are printed while no connection is open
    sid = (await alice.submit(SLOW))["id"]
    events = []
    dropped = False
    async for event in alice.events(sid):
        events.append(event)
        if event["type"] == "output" and not dropped:
            dropped = True
            [response] = alice._responses  # the SSE connection of this iterator
            response._stream.close()
    assert dropped
    assert_complete(events)
    assert stdout_of(events) == SLOW_OUTPUT


async def test_leaving_an_events_loop_closes_its_connection(alice: Client) -> None:
    sid = (await alice.submit({"run": "true"}))["id"]  # no executor: it stays queued
    iterator = alice.events(sid)
    first = await anext(iterator)
    assert first["seq"] == 1
    assert first["status"] == "queued"
    assert len(alice._responses) == 1
    await iterator.aclose()
    assert alice._responses == set()
    assert (await alice.get(sid))["status"] == "queued"


async def test_cancel(alice: Client, executor: Any) -> None:
    sid = (await alice.submit({"run": "echo started; sleep 30"}))["id"]
    async for event in alice.events(sid):
        if event["type"] == "output":
            break
    answer = await alice.cancel(sid)
    assert answer == {"id": sid, "status": "cancelled"}
    events = [event async for event in alice.events(sid)]
    assert_complete(events)
    assert events[-1]["submission"]["status"] == "cancelled"
    with pytest.raises(Conflict):
        await alice.cancel(sid)


async def test_admin_workers_drain_and_scale(
    admin: Client, alice: Client, executor: Any, redis_url: str
) -> None:
    for _ in range(200):
        workers = await admin.workers()
        if workers:
            break
        await asyncio.sleep(0.05)
    [worker] = workers
    assert worker["id"] == executor.worker_id
    assert worker["kind"] == "executor"
    with pytest.raises(Forbidden) as caught:
        await alice.workers()
    assert isinstance(caught.value, Unauthorized)
    with pytest.raises(Conflict):  # the test service is not supervised by `cellblock up`
        await admin.scale(executors=2)
    store = Store.connect(redis_url, retention=60, queue_size=50)
    try:
        await store.supervise(ttl=30)
        answer = await admin.scale(executors=3, builders=1)
        assert answer["status"] == "scaling"
        assert await store.scale() == {"executors": 3, "builders": 1}
    finally:
        await store.close()
    with pytest.raises(InvalidRequest) as invalid:
        await admin.scale(executors=-1)
    assert invalid.value.problems[0].field == "executors"
    assert (await admin.drain(worker["id"]))["status"] == "draining"
    with pytest.raises(NotFound):
        await admin.drain("no-such-worker")


# -- the WebSocket stream -----------------------------------------------------------------------


async def test_run_hands_every_event_to_the_callback(alice: Client, executor: Any) -> None:
    events: list[dict[str, Any]] = []
    submission = await alice.run(SLOW, on_event=events.append)
    assert_complete(events)
    assert submission == events[-1]["submission"]
    assert submission["status"] == "finished"
    assert stdout_of(events) == SLOW_OUTPUT

    async def record(event: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        events.append(event)

    events.clear()
    await alice.run({"run": "echo again"}, on_event=record)
    assert_complete(events)


async def test_stream_and_watch(alice: Client, executor: Any) -> None:
    async with alice.stream(SLOW) as stream:
        events = [event async for event in stream]
    assert_complete(events)
    assert stream.id == events[0]["id"]
    assert stream.submission == events[-1]["submission"]
    assert stream.reconnects == 0
    async with alice.watch(stream.id, since=2) as watched:
        assert [event async for event in watched] == events[2:]


@pytest.mark.parametrize("how", ["abruptly", "cleanly"])
async def test_stream_resumes_after_the_websocket_drops(
    alice: Client, executor: Any, how: str
) -> None:
    alice.reconnect_delay = 0.6  # lines are printed while no connection is open
    events = []
    async with alice.stream(SLOW) as stream:
        async for event in stream:
            events.append(event)
            if event["type"] == "output" and stream.reconnects == 0 and len(events) < 20:
                assert stream.connection is not None
                if how == "abruptly":
                    stream.connection.protocol.stream.close()  # the TCP connection, no close frame
                else:
                    stream.connection.close()
                events.append({"dropped": True})
    assert stream.reconnects == 1
    drop = events.index({"dropped": True})
    events.pop(drop)
    assert_complete(events)
    assert stdout_of(events) == SLOW_OUTPUT
    assert stdout_of(events[drop:]), "the drop should come before the end of the output"


async def test_cancelling_the_consumer_leaves_the_submission_running(
    alice: Client, executor: Any
) -> None:
    stream = alice.stream({"run": "echo started; sleep 2; echo done"})

    async def consume() -> None:
        async for _ in stream:
            pass

    task = asyncio.create_task(consume())
    while stream.id is None or stream.last_seq < 3:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.connection is None
    assert alice._websockets == set()
    events = [event async for event in alice.events(stream.id)]
    assert events[-1]["submission"]["status"] == "finished"
    assert events[-1]["submission"]["stages"]["run"]["stdout"] == "started\ndone\n"


async def test_stream_gives_up_after_bounded_attempts(service: Any, executor: Any) -> None:
    async with Client(service.url, "alice-token", reconnect_attempts=2, reconnect_delay=0.01) as c:
        stream = c.stream(SLOW)
        first = await anext(stream)
        c.url = closed_port_url()  # every reconnection now fails
        assert stream.connection is not None
        stream.connection.protocol.stream.close()
        with pytest.raises(StreamInterrupted) as caught:
            async for _ in stream:
                pass
        await stream.aclose()
    assert stream.reconnects == 2
    assert isinstance(caught.value, ServiceUnavailable)
    assert caught.value.submission_id == first["id"]
    assert caught.value.last_seq == stream.last_seq >= 1
    assert c.url in caught.value.message
    assert "cancel" in caught.value.message


# -- errors -------------------------------------------------------------------------------------


async def test_unauthorized(service: Any) -> None:
    async with Client(service.url, "wrong-token") as client:
        for call in (client.list(), client.get("x"), client.submit({"run": "true"})):
            with pytest.raises(Unauthorized) as caught:
                await call
            assert caught.value.status == 401
            assert caught.value.code == "unauthorized"
        with pytest.raises(Unauthorized):
            await client.run({"run": "true"})
        with pytest.raises(Unauthorized):
            await anext(client.events("x"))
        assert (await client.health())["status"] == "ok"  # the one endpoint without a token


async def test_not_found(alice: Client) -> None:
    for call in (alice.get("no-such-id"), alice.cancel("no-such-id")):
        with pytest.raises(NotFound) as caught:
            await call
        assert caught.value.status == 404
    with pytest.raises(NotFound) as sse:
        await anext(alice.events("no-such-id"))
    assert "no-such-id" in sse.value.message
    with pytest.raises(NotFound) as ws:
        await anext(alice.watch("no-such-id"))
    assert ws.value.status is None  # an error message on the WebSocket has no HTTP status
    assert ws.value.code == "not_found"


BAD = {"files": [{"name": "/etc/passwd", "content": "x"}], "run": "true"}


async def test_invalid_request_carries_the_details(alice: Client) -> None:
    with pytest.raises(InvalidRequest) as rest:
        await alice.submit(BAD)
    with pytest.raises(InvalidRequest) as ws:
        await alice.run(BAD)
    for exc in (rest.value, ws.value):
        assert isinstance(exc, errors.InvalidRequest)  # the CLI's exit status 2 and output
        assert exc.code == "invalid_request"
        assert [p.field for p in exc.problems] == ["files[0].name"]
        assert exc.details == [{"field": "files[0].name", "message": exc.problems[0].message}]
        assert exc.as_json()["error"]["details"] == exc.details  # type: ignore[index]
    assert rest.value.status == 422
    with pytest.raises(InvalidRequest) as too_high:
        await alice.submit({"run": "true", "limits": {"run": {"cpu": 10**6}}})
    assert too_high.value.code == "limit_exceeded"
    assert too_high.value.problems[0].field == "limits.run.cpu"


async def test_queue_full(alice: Client) -> None:
    # No executor: the queue (50 places in the tests) fills up.
    await asyncio.gather(*(alice.submit({"run": "true"}) for _ in range(50)))
    with pytest.raises(QueueFull) as rest:
        await alice.submit({"run": "true"})
    assert rest.value.status == 429
    assert rest.value.code == "queue_full"
    with pytest.raises(QueueFull) as ws:
        await alice.run({"run": "true"})
    assert ws.value.retry_after is None  # the WebSocket has no Retry-After
    assert len(await alice.list(limit=100)) == 50  # nothing was half-accepted
    assert rest.value.retry_after == 5


async def test_unreachable_service() -> None:
    url = closed_port_url()
    async with Client(url, "token", timeout=5) as client:
        calls = [client.health(), client.get("x"), client.run({"run": "true"})]
        calls.append(anext(client.events("x")))
        for call in calls:
            with pytest.raises(ServiceUnavailable) as caught:
                await call
            assert caught.value.message == f"cannot reach the Cellblock service at {url}: " + (
                "Connection refused"
            )
            assert caught.value.url == url


def test_a_url_that_is_not_http() -> None:
    with pytest.raises(ClientError, match="not an http"):
        Client("localhost:8765", "token")


# -- endpoints the service does not have yet, and answers only a gateway gives ------------------


class FakeService:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.answers: dict[tuple[str, str], tuple[int, dict[str, str], Any]] = {}


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeService, str]]:
    state = FakeService()

    class Handler(tornado.web.RequestHandler):
        async def prepare(self) -> None:
            body = json.loads(self.request.body) if self.request.body else None
            self.request_key = (self.request.method or "", urllib.parse.unquote(self.request.path))
            state.requests.append((*self.request_key, body))
            assert self.request.headers["Authorization"] == "Bearer t"
            status, headers, answer = state.answers[self.request_key]
            self.set_status(status)
            for name, value in headers.items():
                self.set_header(name, value)
            self.finish(answer if isinstance(answer, str) else json.dumps(answer))

    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Handler)]))
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets([sock])
    yield state, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.stop()
    await server.close_all_connections()


async def test_packages_and_prefetch_follow_the_protocol(fake: tuple[FakeService, str]) -> None:
    state, url = fake
    package = {"name": "gcc", "version": "13", "store_path": "/nix/store/x-gcc", "size": 1,
               "cached_at": "t", "last_used": "t", "uses": 2}  # fmt: skip
    state.answers[("GET", "/api/v1/packages")] = (200, {}, {"packages": [package]})
    state.answers[("POST", "/api/v1/packages")] = (202, {}, {"id": "p1", "status": "queued"})
    async with Client(url, "t") as client:
        assert await client.packages() == [package]
        assert await client.prefetch(["gcc", "python3"]) == {"id": "p1", "status": "queued"}
        await client.prefetch("jq")
    assert state.requests == [
        ("GET", "/api/v1/packages", None),
        ("POST", "/api/v1/packages", {"names": ["gcc", "python3"]}),
        ("POST", "/api/v1/packages", {"names": ["jq"]}),
    ]


async def test_answers_of_a_gateway_and_retry_after(fake: tuple[FakeService, str]) -> None:
    state, url = fake
    full = {"error": {"code": "queue_full", "message": "full", "details": []}}
    state.answers[("POST", "/api/v1/submissions")] = (503, {"Retry-After": "7"}, full)
    state.answers[("GET", "/api/v1/health")] = (502, {}, "<html>Bad Gateway</html>")
    state.answers[("GET", "/api/v1/workers")] = (500, {}, "<html>oops</html>")
    state.answers[("GET", "/api/v1/submissions/a b")] = (200, {}, "not json")
    async with Client(url, "t") as client:
        with pytest.raises(QueueFull) as full_error:
            await client.submit({"run": "true"})
        assert full_error.value.retry_after == 7
        assert full_error.value.status == 503
        with pytest.raises(ServiceUnavailable, match="502"):
            await client.health()
        with pytest.raises(ApiError) as internal:
            await client.workers()
        assert internal.value.status == 500
        assert "oops" in internal.value.message
        with pytest.raises(ApiError, match="other than JSON"):
            await client.get("a b")


# -- finding the service ------------------------------------------------------------------------


def test_from_environment(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("http://example.test:1234\n")
    (tmp_path / "token").write_text("client-secret\n")
    (tmp_path / "admin-token").write_text("admin-secret\n")
    client = Client.from_environment(tmp_path, environ={})
    assert (client.url, client.token) == ("http://example.test:1234", "client-secret")
    assert Client.from_environment(tmp_path, admin=True, environ={}).token == "admin-secret"
    env = {"CELLBLOCK_URL": "https://cb.test/", "CELLBLOCK_TOKEN": "e1",
           "CELLBLOCK_ADMIN_TOKEN": "e2"}  # fmt: skip
    client = Client.from_environment(tmp_path, environ=env)
    assert (client.url, client.token) == ("https://cb.test", "e1")
    assert Client.from_environment(tmp_path, admin=True, environ=env).token == "e2"
    explicit = Client.from_environment(tmp_path, url="http://x.test", token="t", environ=env)
    assert (explicit.url, explicit.token) == ("http://x.test", "t")
    by_variable = Client.from_environment(environ={"CELLBLOCK_STATE_DIR": str(tmp_path)})
    assert by_variable.token == "client-secret"
    assert "secret" not in repr(by_variable)


def test_from_environment_without_a_token(tmp_path: Path) -> None:
    client = Client.from_environment(tmp_path, environ={"CELLBLOCK_TOKEN": "t"})
    assert client.url == "http://127.0.0.1:8765"
    with pytest.raises(ClientError) as caught:
        Client.from_environment(tmp_path, admin=True, environ={"CELLBLOCK_TOKEN": "t"})
    assert "CELLBLOCK_ADMIN_TOKEN" in caught.value.message
    assert str(tmp_path / "admin-token") in caught.value.message


async def connection_of(client: Client, request: dict[str, Any]) -> Any:
    """The WebSocket a run of ``request`` used (checking the run finished)."""
    used = []
    async with client.stream(request) as stream:
        async for _ in stream:
            used.append(stream.connection)
    assert stream.submission is not None and stream.submission["status"] == "finished"
    assert len(set(map(id, used))) == 1
    return used[0]


async def test_a_finished_streams_websocket_serves_the_next_stream(
    alice: Client, executor: Any
) -> None:
    first = await connection_of(alice, {"run": "echo one"})
    assert [ws for ws, _ in alice._idle] == [first]
    assert await connection_of(alice, {"run": "echo two"}) is first  # no new handshake
    # One the service has closed meanwhile is left for a new one.
    first.protocol.stream.close()
    await asyncio.sleep(0.05)
    third = await connection_of(alice, {"run": "echo three"})
    assert third is not first and first not in alice._websockets


async def test_an_idle_websocket_is_kept_only_for_a_while(
    alice: Client, executor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await connection_of(alice, {"run": "echo one"})
    monkeypatch.setattr(client_module, "IDLE_REUSE", 0.0)
    assert await connection_of(alice, {"run": "echo two"}) is not first
    await alice.close()
    assert alice._idle == [] and alice._websockets == set()
