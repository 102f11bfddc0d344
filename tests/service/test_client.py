"""The Python client (cellblock.service.client) against the real service and real executors:
REST calls, the WebSocket stream (submitting and watching) and its resumption after a dropped
connection, its keepalive and close handshakes, the idle WebSockets it keeps, and the mapping of
every error answer (of a REST call or of the WebSocket handshake) onto the client's exceptions.
Fake servers only inject faults: answers the service never gives, a peer that goes silent."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from websockets.asyncio.client import ClientConnection
from websockets.frames import CloseCode
from websockets.protocol import State

from cellblock import errors
from cellblock.service import client as client_package
from cellblock.service.client import (
    ApiError,
    BadRequest,
    Client,
    ClientError,
    Conflict,
    Forbidden,
    NotFound,
    QueueFull,
    ServiceUnavailable,
    StreamInterrupted,
    Unauthorized,
)
from cellblock.service.client import websocket as websocket_module
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


async def test_watch_follows_a_submission_made_over_rest(alice: Client, executor: Any) -> None:
    sid = (await alice.submit(SLOW))["id"]
    async with alice.watch(sid) as watched:
        events = [event async for event in watched]
    assert_complete(events)
    assert {e["id"] for e in events} == {sid}
    assert stdout_of(events) == SLOW_OUTPUT
    assert events[-1]["submission"]["stages"]["run"]["status"] == "ok"
    assert watched.submission == events[-1]["submission"]
    async with alice.watch(sid, since=3) as later:
        assert [event async for event in later] == events[3:]


async def test_watch_resumes_after_the_connection_drops(alice: Client, executor: Any) -> None:
    alice.reconnect_delay = 0.6  # lines are printed while no connection is open
    sid = (await alice.submit(SLOW))["id"]
    events = []
    dropped = False
    async with alice.watch(sid) as watched:
        async for event in watched:
            events.append(event)
            if event["type"] == "output" and not dropped:
                dropped = True
                assert watched.connection is not None
                watched.connection.transport.abort()  # the TCP connection, no close frame
    assert dropped
    assert watched.reconnects == 1
    assert_complete(events)
    assert stdout_of(events) == SLOW_OUTPUT


async def test_leaving_a_watch_closes_its_connection_with_a_close_handshake(
    alice: Client,
) -> None:
    sid = (await alice.submit({"run": "true"}))["id"]  # no executor: it stays queued
    watched = alice.watch(sid)
    first = await anext(watched)
    assert first["seq"] == 1
    assert first["status"] == "queued"
    connection = watched.connection
    assert connection is not None and alice._websockets.open == {connection}
    await watched.aclose()
    assert alice._websockets.open == set()
    await asyncio.wait_for(connection.wait_closed(), websocket_module.CLOSE_GRACE + 1)
    assert connection.close_code == CloseCode.NORMAL_CLOSURE  # the service's close frame came
    assert (await alice.get(sid))["status"] == "queued"


async def test_cancel(alice: Client, executor: Any) -> None:
    sid = (await alice.submit({"run": "echo started; sleep 30"}))["id"]
    async with alice.watch(sid) as watched:
        async for event in watched:
            if event["type"] == "output":
                break
    answer = await alice.cancel(sid)
    assert answer == {"id": sid, "status": "cancelled"}
    async with alice.watch(sid) as watched:
        events = [event async for event in watched]
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
    with pytest.raises(BadRequest) as invalid:
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


async def test_a_message_larger_than_a_mebibyte_arrives(alice: Client, executor: Any) -> None:
    """The ``finished`` event carries the whole output: 3 MB here, over the websockets
    library's default limit of 1 MiB a message (the client allows 256 MiB)."""
    big = {"run": "head -c 3000000 /dev/zero | tr '\\0' x", "limits": {"run": {"output": 2**22}}}
    submission = await alice.run(big)
    assert submission["status"] == "finished", {**submission, "stages": None}
    assert submission["stages"]["run"]["stdout"] == "x" * 3_000_000


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
                    stream.connection.transport.abort()  # the TCP connection, no close frame
                else:
                    await stream.connection.close()
                events.append({"dropped": True})
    assert stream.reconnects == 1
    drop = events.index({"dropped": True})
    events.pop(drop)
    assert_complete(events)
    assert stdout_of(events) == SLOW_OUTPUT
    assert stdout_of(events[drop:]), "the drop should come before the end of the output"


async def test_the_websocket_pings_and_sends_at_once(alice: Client, executor: Any) -> None:
    """Keepalive pings every 15 s, a pong awaited 15 s; TCP_NODELAY (which the service sets on
    its side too), so that a small message is not held back by Nagle's algorithm."""
    async with alice.stream({"run": "echo hi"}) as stream:
        await anext(stream)
        connection = stream.connection
        assert connection is not None
        assert (connection.ping_interval, connection.ping_timeout) == (15.0, 15.0)
        assert connection.keepalive_task is not None and not connection.keepalive_task.done()
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert await asyncio.wait_for(await connection.ping(), 5) >= 0  # the service answers
        async for _ in stream:
            pass


async def test_a_connection_whose_pongs_stop_is_dropped_and_resumed(
    alice: Client, executor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keepalive notices a peer that has gone silent (here: this side stops reading, so
    no pong arrives), drops the connection, and the stream resumes on a new one."""
    # Short, but long enough for the service's pong on a busy machine.
    monkeypatch.setattr(websocket_module, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(websocket_module, "PING_TIMEOUT", 0.5)
    monkeypatch.setattr(websocket_module, "CLOSE_GRACE", 0.1)
    alice.reconnect_delay = 0.05
    events = []
    async with alice.stream(SLOW) as stream:
        async for event in stream:
            events.append(event)
            if event["type"] == "output" and stream.reconnects == 0:
                assert stream.connection is not None
                stream.connection.transport.pause_reading()
    assert stream.reconnects == 1
    assert_complete(events)
    assert stdout_of(events) == SLOW_OUTPUT


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
    assert alice._websockets.open == set()
    async with alice.watch(stream.id) as watched:
        events = [event async for event in watched]
    assert events[-1]["submission"]["status"] == "finished"
    assert events[-1]["submission"]["stages"]["run"]["stdout"] == "started\ndone\n"


async def test_stream_gives_up_after_bounded_attempts(service: Any, executor: Any) -> None:
    async with Client(service.url, "alice-token", reconnect_attempts=2, reconnect_delay=0.01) as c:
        stream = c.stream(SLOW)
        first = await anext(stream)
        c.url = closed_port_url()  # every reconnection now fails
        assert stream.connection is not None
        stream.connection.transport.abort()
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


async def test_closing_the_client_closes_every_websocket_with_a_close_handshake(
    alice: Client, executor: Any
) -> None:
    idle = await connection_of(alice, {"run": "echo one"})
    sid = (await alice.submit({"run": "sleep 30"}))["id"]
    watched = alice.watch(sid)
    await anext(watched)
    busy = watched.connection
    assert busy is not None and alice._websockets.open == {idle, busy}
    await alice.close()
    for connection in (idle, busy):
        assert connection.state is State.CLOSED
        assert connection.close_code == CloseCode.NORMAL_CLOSURE
    with pytest.raises(ClientError, match="closed"):  # after what had arrived already
        async for _ in watched:
            pass
    async with Client(alice.url, "alice-token") as other:  # it went on running
        assert (await other.cancel(sid))["status"] == "cancelled"


async def test_closing_from_another_threads_event_loop(alice: Client, executor: Any) -> None:
    """As ipykernel does: ``do_shutdown`` runs on its control thread's loop."""
    connection = await connection_of(alice, {"run": "echo one"})
    await asyncio.to_thread(asyncio.run, alice.close())
    assert connection.state is State.CLOSED
    assert connection.close_code == CloseCode.NORMAL_CLOSURE
    assert alice._websockets.open == set() and alice._http is None


async def test_closing_waits_for_a_silent_peer_only_for_a_grace_period(
    alice: Client, executor: Any
) -> None:
    connection = await connection_of(alice, {"run": "echo one"})
    connection.transport.pause_reading()  # the service's close frame is never read
    start = time.monotonic()
    await alice.close()
    elapsed = time.monotonic() - start
    assert websocket_module.CLOSE_GRACE <= elapsed < websocket_module.CLOSE_GRACE + 1
    assert connection.state is State.CLOSED
    assert connection.close_code == CloseCode.ABNORMAL_CLOSURE  # no close frame came back


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
        with pytest.raises(Unauthorized) as handshake:  # the WebSocket's handshake is refused
            await anext(client.watch("x"))
        assert handshake.value.status == 401
        assert handshake.value.code == "unauthorized"
        assert client._websockets.open == set()
        assert (await client.health())["status"] == "ok"  # the one endpoint without a token


async def test_not_found(alice: Client) -> None:
    for call in (alice.get("no-such-id"), alice.cancel("no-such-id")):
        with pytest.raises(NotFound) as caught:
            await call
        assert caught.value.status == 404
    with pytest.raises(NotFound) as ws:
        await anext(alice.watch("no-such-id"))
    assert "no-such-id" in ws.value.message
    assert ws.value.status is None  # an error message on the WebSocket has no HTTP status
    assert ws.value.code == "not_found"


BAD = {"files": [{"name": "/etc/passwd", "content": "x"}], "run": "true"}


async def test_bad_request_carries_the_details(alice: Client) -> None:
    with pytest.raises(BadRequest) as rest:
        await alice.submit(BAD)
    with pytest.raises(BadRequest) as ws:
        await alice.run(BAD)
    for exc in (rest.value, ws.value):
        assert isinstance(exc, errors.InvalidRequest)  # the CLI's exit status 2 and output
        assert exc.code == "invalid_request"
        assert [p.field for p in exc.problems] == ["files[0].name"]
        assert exc.details == [{"field": "files[0].name", "message": exc.problems[0].message}]
        assert exc.as_json()["error"]["details"] == exc.details  # type: ignore[index]
    assert rest.value.status == 422
    with pytest.raises(BadRequest) as too_high:
        await alice.submit({"run": "true", "limits": {"run": {"cpu": 10**6}}})
    assert too_high.value.code == "limit_exceeded"
    assert too_high.value.problems[0].field == "limits.run.cpu"
    assert not hasattr(client_package, "InvalidRequest")  # one InvalidRequest: cellblock.errors'


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
        calls.append(anext(client.watch("x")))
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


def document(code: str, details: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": f"the {code} message", "details": details or []}}


REFUSALS = {
    "400": (400, {}, document("invalid_json"), BadRequest),
    "401": (401, {}, document("unauthorized"), Unauthorized),
    "403": (403, {}, document("forbidden"), Forbidden),
    "404": (404, {}, document("not_found"), NotFound),
    "413": (413, {}, document("body_too_large"), BadRequest),
    "422": (422, {}, document("invalid_request", [{"field": "f", "message": "m"}]), BadRequest),
    "426": (426, {"Sec-WebSocket-Version": "13"}, document("websocket_version"), ApiError),
    "429": (429, {"Retry-After": "3"}, document("queue_full"), QueueFull),
    "503 with Retry-After": (503, {"Retry-After": "4"}, document("queue_full"), QueueFull),
    "503 of a gateway": (503, {}, "<html>Service Unavailable</html>", ServiceUnavailable),
    "502": (502, {}, "<html>Bad Gateway</html>", ServiceUnavailable),
    "500": (500, {}, "<html>oops</html>", ApiError),
    "301": (301, {"Location": "https://elsewhere.test/api/v1/ws"}, "", ApiError),
}


@pytest.mark.parametrize("answer", REFUSALS.values(), ids=REFUSALS.keys())
async def test_a_refused_handshake_raises_what_a_rest_call_would(
    fake: tuple[FakeService, str], answer: tuple[int, dict[str, str], Any, type[Exception]]
) -> None:
    """The same answer to the WebSocket's handshake (with the token as a Bearer header) and to
    a REST call raises the same error, with the same fields. A redirect is not followed."""
    state, url = fake
    status, headers, body, expected = answer
    state.answers[("GET", "/api/v1/ws")] = (status, headers, body)
    state.answers[("GET", "/api/v1/submissions/x")] = (status, headers, body)
    async with Client(url, "t") as client:
        with pytest.raises(expected) as handshake:
            await client.run({"run": "true"})
        with pytest.raises(expected) as rest:
            await client.get("x")
        assert client._websockets.open == set()
    assert type(handshake.value) is type(rest.value) is expected
    assert handshake.value.message == rest.value.message
    for field in ("status", "code", "details", "retry_after", "problems"):
        assert getattr(handshake.value, field, None) == getattr(rest.value, field, None), field
    assert [r[:2] for r in state.requests] == [
        ("GET", "/api/v1/ws"),
        ("GET", "/api/v1/submissions/x"),
    ]
    if status == 301:
        assert "redirects to https://elsewhere.test/api/v1/ws" in handshake.value.message


@pytest.fixture
async def silent() -> AsyncIterator[tuple[str, asyncio.Queue[asyncio.StreamReader]]]:
    """A server that accepts connections and reads them but never answers: the URL, and the
    readers of the connections it accepted."""
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await accepted.put(reader)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", accepted
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_cancelling_during_the_handshake_leaves_no_socket(
    silent: tuple[str, asyncio.Queue[asyncio.StreamReader]],
) -> None:
    url, accepted = silent
    async with Client(url, "t") as client:
        run = asyncio.create_task(client.run({"run": "true"}))
        reader = await asyncio.wait_for(accepted.get(), 5)
        request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert request.startswith(b"GET /api/v1/ws HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer t\r\n" in request
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the client closed its socket
        assert client._websockets.open == set()


async def test_a_handshake_without_an_answer_times_out(
    silent: tuple[str, asyncio.Queue[asyncio.StreamReader]],
) -> None:
    url, accepted = silent
    async with Client(url, "t", timeout=0.3) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.run({"run": "true"})
        assert caught.value.message == f"cannot reach the Cellblock service at {url}: " + (
            "no answer within 0.3 s"
        )
        reader = accepted.get_nowait()
        await reader.readuntil(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""


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


# -- the idle WebSockets ------------------------------------------------------------------------


async def connection_of(client: Client, request: dict[str, Any]) -> ClientConnection:
    """The WebSocket a run of ``request`` used (checking the run finished)."""
    used = []
    async with client.stream(request) as stream:
        async for _ in stream:
            used.append(stream.connection)
    assert stream.submission is not None and stream.submission["status"] == "finished"
    assert len(set(map(id, used))) == 1
    assert used[0] is not None
    return used[0]


async def test_a_finished_streams_websocket_serves_the_next_stream(
    alice: Client, executor: Any
) -> None:
    first = await connection_of(alice, {"run": "echo one"})
    assert [ws for ws, _ in alice._websockets.idle] == [first]
    assert await connection_of(alice, {"run": "echo two"}) is first  # no new handshake
    # One the service has closed meanwhile is left for a new one.
    first.transport.abort()
    await asyncio.sleep(0.05)
    third = await connection_of(alice, {"run": "echo three"})
    assert third is not first and first not in alice._websockets.open


async def test_an_idle_websocket_is_kept_only_for_a_while(
    alice: Client, executor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await connection_of(alice, {"run": "echo one"})
    monkeypatch.setattr(websocket_module, "IDLE_REUSE", 0.0)
    assert await connection_of(alice, {"run": "echo two"}) is not first
    await alice.close()
    assert alice._websockets.idle == [] and alice._websockets.open == set()


async def test_at_most_a_few_idle_websockets_are_kept(alice: Client, executor: Any) -> None:
    runs = websocket_module.IDLE_WEBSOCKETS + 2
    used = await asyncio.gather(*(connection_of(alice, {"run": "echo"}) for _ in range(runs)))
    assert len(set(map(id, used))) == runs  # concurrent streams: a connection each
    kept = [ws for ws, _ in alice._websockets.idle]
    assert len(kept) == websocket_module.IDLE_WEBSOCKETS
    assert alice._websockets.open == set(kept)
