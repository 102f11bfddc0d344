"""The service's application and process (service/server.py), against a real Redis.

``make_app``: every route reaches its handler, and nothing else does (a malformed id or an
unknown path is a JSON 404 of no endpoint); the binary cache is served only when configured;
a WebSocket message is capped at the body limit. ``serve`` (``cellblock service``): it serves
until SIGTERM or SIGINT, then stops listening, cuts its HTTP connections, closes its Redis
connections and returns 0, having closed its WebSockets with 1001 and ended its event streams
cleanly first; it refuses to start without tokens, and ends with the cause when its port is
taken or Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import tornado.httpserver
import tornado.netutil
from prometheus_client.parser import text_string_to_metric_families
from restio import ADMIN, ALICE, Rest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect
from upio import free_port

from cellblock import config as config_module
from cellblock.service import server
from cellblock.service.auth import Principal, Tokens, ensure_token_files
from cellblock.service.metrics import Metrics
from cellblock.service.store import Store

Until = Callable[..., Awaitable[Any]]  # the until fixture of tests/conftest.py
NO_ENDPOINT = "no endpoint"  # the message of the application's default handler, the 404
SID = "A" * 64  # the longest submission id a route takes


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    return error


async def redis_clients(redis_url: str) -> set[str]:
    """The ids of the connections Redis has, this question's own left out."""
    probe = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        own = str(await probe.client_id())
        return {c["id"] for c in await probe.client_list()} - {own}
    finally:
        await probe.aclose()


# -- make_app: the routes ---------------------------------------------------------------------

#: Every route with a request that reaches its handler, as an admin (who may call them all).
ROUTES = [
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/capacity"),
    ("GET", "/api/v1/submissions"),
    ("GET", f"/api/v1/submissions/{SID}"),
    ("GET", f"/api/v1/submissions/{SID}/events"),
    ("GET", "/api/v1/ws"),
    ("GET", "/api/v1/workers"),
    ("DELETE", "/api/v1/workers/executor-1"),
    ("POST", "/api/v1/admin/scale"),
    ("GET", "/api/v1/openapi.json"),
    ("POST", "/api/v1/packages"),
    ("GET", "/api/v1/packages/builds/0123456789abcdef0123456789abcdef"),
    ("GET", "/metrics"),
]


@pytest.fixture
async def rest(service: Any) -> AsyncIterator[Rest]:
    rest = Rest(service.url)
    yield rest
    rest.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_each_route_reaches_its_handler(rest: Rest, method: str, path: str) -> None:
    answer = await rest.request(method, path, {} if method == "POST" else None, token=ADMIN)
    assert answer.code != 404 or NO_ENDPOINT not in answer.body.decode(), answer.body
    if path != "/api/v1/health":  # the one route open to anyone
        refused = await rest.request(method, path, {} if method == "POST" else None, token=None)
        assert refused.code == 401, (refused.code, refused.body)
        assert error_of(refused.body)["code"] == "unauthorized"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/v1",
        "/api/v1/",
        "/api/v2/health",
        "/api/v1/health/",
        "/api/v1/submissions/" + "A" * 65,  # an id longer than any the service makes
        "/api/v1/submissions/a.b",
        "/api/v1/submissions/a%2Fb/events",
        f"/api/v1/submissions/{SID}/events/more",
        "/api/v1/workers/a/b",
        "/api/v1/packages/builds/" + "0" * 33,
        "/api/v1/packages/builds/ABCDEF",  # the build ids are lower-case hex
        "/nix-cache/nix-cache-info",  # no binary cache is configured
        "/metrics/x",
    ],
)
async def test_anything_else_is_a_json_404_of_no_endpoint(rest: Rest, path: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        answer = await rest.request(method, path, token=ADMIN)
        assert answer.code == 404, (method, path, answer.code)
        assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
        error = error_of(answer.body)
        assert error["code"] == "not_found" and NO_ENDPOINT in error["message"]


@pytest.fixture
async def cache_service(
    redis_url: str, state_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[str, Path]]:
    """A service of ``make_app`` whose configuration names a binary cache: its URL, the cache."""
    cache = tmp_path / "binary-cache"
    cache.mkdir()
    cfg = config_module.load(state_dir, environ={"CELLBLOCK_CACHE__BINARY_CACHE": str(cache)})
    store = Store.connect(redis_url, retention=cfg.retention, queue_size=cfg.queue_size)
    app = server.make_app(store, cfg, Tokens({ALICE: Principal("alice", "client")}))
    http = tornado.httpserver.HTTPServer(app)
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    http.add_sockets([sock])
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", cache
    http.stop()
    await http.close_all_connections()
    await store.close()


@pytest.mark.timeout(30)
async def test_a_configured_binary_cache_is_served_behind_the_tokens(
    cache_service: tuple[str, Path],
) -> None:
    url, cache = cache_service
    (cache / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    rest = Rest(url)
    try:
        served = await rest.request("GET", "/nix-cache/nix-cache-info")
        assert (served.code, served.body) == (200, b"StoreDir: /nix/store\n")
        refused = await rest.request("GET", "/nix-cache/nix-cache-info", token="wrong")
        assert refused.code == 401 and "Basic" in refused.headers["WWW-Authenticate"]
        missing = await rest.request("GET", "/nix-cache/nar/none.nar.xz")
        assert missing.code == 404
        # The API is there as ever, beside it.
        assert (await rest.request("GET", "/api/v1/capacity")).code == 200
    finally:
        rest.close()


@pytest.mark.timeout(30)
async def test_a_websocket_message_over_the_body_limit_closes_the_socket(service: Any) -> None:
    request = HTTPRequest(service.ws_url, headers={"Authorization": f"Bearer {ALICE}"})
    conn = await websocket_connect(request)
    try:
        conn.write_message("x" * (1024 * 1024 + 1))  # the service fixture's max_body_size + 1
        assert await asyncio.wait_for(conn.read_message(), 10) is None
        assert conn.close_code == 1009  # message too big
    finally:
        conn.close()
    # A message within the limit is read, and answered (here: an error for a non-message).
    conn = await websocket_connect(request)
    try:
        conn.write_message("x" * 1000)
        answer = await asyncio.wait_for(conn.read_message(), 10)
        assert answer is not None and json.loads(answer)["type"] == "error"
    finally:
        conn.close()


# -- serve, in this process -------------------------------------------------------------------


@pytest.fixture
def served_config(state_dir: Path) -> config_module.Config:
    """The configuration ``serve`` reads: the client and admin tokens in the state directory."""
    ensure_token_files(state_dir, ALICE, ADMIN)
    return config_module.load(state_dir, environ={})


async def ws_connect(port: int) -> WebSocketClientConnection:
    url = f"ws://127.0.0.1:{port}/api/v1/ws"
    return await websocket_connect(HTTPRequest(url, headers={"Authorization": f"Bearer {ALICE}"}))


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> list[Store]:
    """Every store this process connects from now on (a spy: they are real)."""
    made: list[Store] = []
    connect = Store.connect.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Store], url: str, **kwargs: Any) -> Store:
        store: Store = connect(cls, url, **kwargs)
        made.append(store)
        return store

    monkeypatch.setattr(Store, "connect", classmethod(spy))
    return made


@dataclass
class Serving:
    """``serve`` running in this test's event loop."""

    task: asyncio.Task[int]
    port: int
    others: set[asyncio.Task[Any]]  # the tasks there were before it started

    def left(self) -> set[asyncio.Task[Any]]:
        """The tasks that have started since serve did and still run, serve and this test's
        own left out."""
        mine = {self.task, asyncio.current_task()}
        return {t for t in asyncio.all_tasks() - self.others - mine if not t.done()}


@pytest.fixture
async def serving(
    served_config: config_module.Config, redis_url: str, until: Until, stores: list[Store]
) -> AsyncIterator[Serving]:
    """``serve`` running in this test's event loop, once it answers. Once it answers, its
    signal handlers are in place (it sets them up as it listens, with no pause between): a
    SIGTERM to this process then reaches serve, not the test run."""
    port = free_port()
    others = asyncio.all_tasks()
    task = asyncio.create_task(server.serve(served_config, redis_url, "127.0.0.1", port))
    rest = Rest(f"http://127.0.0.1:{port}")

    async def healthy() -> bool:
        assert not task.done(), task
        with contextlib.suppress(ConnectionError, OSError):
            return (await rest.request("GET", "/api/v1/health", token=None)).code == 200
        return False

    serving = Serving(task, port, others)
    try:
        await until(healthy, "the service to answer")
        yield serving
    finally:
        rest.close()
        if not task.done():
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(task, 10)
        # What serve leaves running (the metrics' flusher) ends within this test, and any Redis
        # connection it opened again is closed: neither reaches the next test.
        if left := serving.left():
            await asyncio.wait(left, timeout=5)
        for store in stores:
            await store.close()


async def open_events(port: int, http: AsyncHTTPClient, until: Until) -> asyncio.Future[Any]:
    """The live events of a submission that stays queued (no executor here), which the service
    would stream for ever; once the first has come."""
    rest = Rest(f"http://127.0.0.1:{port}")
    try:
        sid = (await rest.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201))["id"]
    finally:
        rest.close()
    received: list[bytes] = []
    events = asyncio.ensure_future(
        http.fetch(
            f"http://127.0.0.1:{port}/api/v1/submissions/{sid}/events",
            headers={"Authorization": f"Bearer {ALICE}"},
            streaming_callback=received.append,
            request_timeout=60,
        )
    )
    await until(lambda: received, "the first events")
    return events


@pytest.mark.timeout(30)
async def test_serve_runs_until_sigterm_then_closes_its_connections_and_its_store(
    serving: Serving, redis_url: str, until: Until
) -> None:
    task, port = serving.task, serving.port
    http = AsyncHTTPClient(force_instance=True)
    try:
        events = await open_events(port, http, until)
        services = await redis_clients(redis_url)
        assert services  # the service's own, the event stream's blocking read among them
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 10) == 0
        assert (await asyncio.wait_for(events, 5)).code == 200  # ended, not cut off
        assert not listening(port)

        # Those very connections (the metrics' flusher may open another meanwhile).
        async def closed() -> bool:
            return not services & await redis_clients(redis_url)

        await until(closed, "the store's connections to close")
    finally:
        http.close()


async def health_answers(redis_url: str) -> float:
    """How many GET /api/v1/health the service processes have answered 200, as /metrics says."""
    store = Store.connect(redis_url, retention=60, queue_size=1)
    try:
        exposition, _ = await Metrics(store).render()
    finally:
        await store.close()
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
        if sample.name == "cellblock_http_requests_total"
        and sample.labels == {"method": "GET", "handler": "HealthHandler", "code": "200"}
    )


@pytest.mark.timeout(30)
async def test_serve_writes_its_last_request_counts_and_uses_redis_no_more_once_returned(
    serving: Serving, redis_url: str
) -> None:
    rest = Rest(f"http://127.0.0.1:{serving.port}")
    try:
        for _ in range(3):  # counted in this process, not yet in Redis (flushed each second)
            assert (await rest.request("GET", "/api/v1/health", token=None)).code == 200
    finally:
        rest.close()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving.task, 10) == 0
    left = serving.left()  # the metrics' flusher, pending still (nothing left for it to write)
    if left:
        await asyncio.wait(left, timeout=10)
    assert await redis_clients(redis_url) == set()
    assert await health_answers(redis_url) == 4  # the fixture's first, and these three


@pytest.mark.timeout(30)
async def test_serve_closes_its_websockets_with_going_away(serving: Serving) -> None:
    task, port = serving.task, serving.port
    ws = await ws_connect(port)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, 10) == 0
        assert await asyncio.wait_for(ws.read_message(), 5) is None
        assert ws.close_code == 1001  # going away
    finally:
        ws.close()


# -- cellblock service, a process of its own --------------------------------------------------


@pytest.fixture
def service_env() -> dict[str, str]:
    """This environment without settings of Cellblock's: the tests give their own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}


@pytest.fixture
def start_service(
    tmp_path: Path, service_env: dict[str, str]
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``cellblock service`` with these arguments (stderr in tmp_path/service.log). Run in
    tmp_path, so that nothing of the working directory comes first on its module path."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / "service.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellblock", "service", *args],
            cwd=tmp_path,
            env=service_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def service_log(tmp_path: Path) -> str:
    return (tmp_path / "service.log").read_text()


async def start_serving(
    start_service: Callable[..., subprocess.Popen[bytes]],
    redis_url: str,
    state_dir: Path,
    tmp_path: Path,
    until: Until,
) -> tuple[subprocess.Popen[bytes], int]:
    """``cellblock service`` with tokens, once it answers: the process and its port."""
    ensure_token_files(state_dir, ALICE, ADMIN)
    port = free_port()
    proc = start_service(
        "--redis", redis_url, "--host", "127.0.0.1", "--port", str(port),
        "--state-dir", str(state_dir), "--log-level", "info",
    )  # fmt: skip
    rest = Rest(f"http://127.0.0.1:{port}")

    async def healthy() -> bool:
        assert proc.poll() is None, service_log(tmp_path)
        with contextlib.suppress(ConnectionError, OSError):
            return (await rest.request("GET", "/api/v1/health", token=None)).code == 200
        return False

    try:
        await until(healthy, "the service to answer")
    finally:
        rest.close()
    return proc, port


def logged(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in service_log(tmp_path).splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_the_service_process_serves_until_a_signal_then_ends_cleanly(
    start_service: Callable[..., subprocess.Popen[bytes]],
    redis_url: str,
    state_dir: Path,
    tmp_path: Path,
    until: Until,
    stop: signal.Signals,
) -> None:
    proc, port = await start_serving(start_service, redis_url, state_dir, tmp_path, until)
    # It made the executors' consumer group before it listened.
    probe = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        [jobs_key] = await probe.keys("*:jobs")
        assert [g["name"] for g in await probe.xinfo_groups(jobs_key)] == ["executors"]
    finally:
        await probe.aclose()
    http = AsyncHTTPClient(force_instance=True)
    try:
        ws = await ws_connect(port)
        events = await open_events(port, http, until)
        proc.send_signal(stop)
        assert await asyncio.to_thread(proc.wait, 15) == 0, service_log(tmp_path)
        assert await asyncio.wait_for(ws.read_message(), 5) is None
        ws.close()
        assert (await asyncio.wait_for(events, 5)).code == 200  # ended, not cut off
        assert not listening(port)
        assert await redis_clients(redis_url) == set()
        said = [line["event"] for line in logged(tmp_path)]
        assert "service listening" in said and said.index("service stopped") > said.index(
            "service listening"
        )
    finally:
        http.close()


@pytest.mark.timeout(60)
async def test_stopping_with_a_live_event_stream_ends_it_cleanly_and_logs_no_error(
    start_service: Callable[..., subprocess.Popen[bytes]],
    redis_url: str,
    state_dir: Path,
    tmp_path: Path,
    until: Until,
) -> None:
    proc, port = await start_serving(start_service, redis_url, state_dir, tmp_path, until)
    http = AsyncHTTPClient(force_instance=True)
    try:
        events = await open_events(port, http, until)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        # A whole response: the client reconnects and resumes from its Last-Event-ID.
        assert (await asyncio.wait_for(events, 5)).code == 200
    finally:
        http.close()
    errors = [line["event"] for line in logged(tmp_path) if line["level"] == "error"]
    assert errors == []


@pytest.mark.timeout(60)
async def test_without_any_token_the_service_refuses_to_start(
    start_service: Callable[..., subprocess.Popen[bytes]],
    redis_url: str,
    state_dir: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    proc = start_service(
        "--redis", redis_url, "--port", str(port), "--state-dir", str(state_dir)
    )  # fmt: skip
    assert await asyncio.to_thread(proc.wait, 30) == 3  # a system failure (cellblock/cli.py)
    assert "no tokens are configured" in service_log(tmp_path)
    assert not listening(port)


@pytest.mark.timeout(60)
async def test_a_port_in_use_ends_the_service_with_the_cause(
    start_service: Callable[..., subprocess.Popen[bytes]],
    redis_url: str,
    state_dir: Path,
    tmp_path: Path,
) -> None:
    ensure_token_files(state_dir, ALICE, ADMIN)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_service(
            "--redis", redis_url, "--host", "127.0.0.1", "--port", str(port),
            "--state-dir", str(state_dir),
        )  # fmt: skip
        assert await asyncio.to_thread(proc.wait, 30) != 0
    assert "Address already in use" in service_log(tmp_path)


@pytest.mark.timeout(60)
async def test_an_unreachable_redis_ends_the_service_before_it_listens(
    start_service: Callable[..., subprocess.Popen[bytes]], state_dir: Path, tmp_path: Path
) -> None:
    ensure_token_files(state_dir, ALICE, ADMIN)
    port = free_port()
    nowhere = tmp_path / "no-redis.sock"
    proc = start_service(
        "--redis", f"unix://{nowhere}", "--port", str(port), "--state-dir", str(state_dir)
    )  # fmt: skip
    assert await asyncio.to_thread(proc.wait, 30) != 0
    assert str(nowhere) in service_log(tmp_path)
    assert not listening(port)
