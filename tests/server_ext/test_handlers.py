"""The extension's handlers in a real Jupyter server, in front of the real Cellblock service:
Jupyter's auth on every handler, the REST/SSE and WebSocket proxy both ways, the status page
and its data, and the answers when the service is missing or down."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.websocket
from jupyter_server.auth import Authorizer
from jupyterio import ADMIN, ALICE, BOB, Connect, Fetch, browser_view, closed_port
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from cellblock.service import api as service_api
from cellblock.service import websocket as service_websocket

JSON_TYPE = "application/json; charset=utf-8"
#: A header that marks the tests' own requests to the service, which the upstream spy ignores.
DIRECT = "X-Test-Direct"
API = ("api", "v1")


# --- helpers -------------------------------------------------------------------------------


@dataclass
class Upstream:
    """The requests the Jupyter server's process sends to the Cellblock service (a spy on
    ``AsyncHTTPClient.fetch``: every request still goes out for real)."""

    service_url: str
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    futures: list[tuple[str, asyncio.Future[Any]]] = field(default_factory=list)

    def urls(self) -> list[str]:
        return [url for url, _ in self.requests]

    def paths(self) -> list[str]:
        return [url.removeprefix(self.service_url) for url in self.urls()]


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch, service: Any) -> Upstream:
    spy = Upstream(service.url)
    real = AsyncHTTPClient.fetch

    def fetch(self: AsyncHTTPClient, request: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(request, HTTPRequest):
            url, headers = request.url, dict(request.headers)
        else:
            url, headers = str(request), dict(kwargs.get("headers") or {})
        future = real(self, request, *args, **kwargs)
        if url.startswith(service.url) and DIRECT not in headers:
            spy.requests.append((url, headers))
            spy.futures.append((url, future))
        return future

    monkeypatch.setattr(AsyncHTTPClient, "fetch", fetch)
    return spy


@dataclass
class ServiceSockets:
    """The service's own WebSocket handlers (a spy on the real class): the proxy's upstream
    connections, as the service sees them."""

    opened: list[Any] = field(default_factory=list)
    closed: list[Any] = field(default_factory=list)

    def live(self) -> int:
        return len(self.opened) - len(self.closed)


@pytest.fixture
def service_sockets(monkeypatch: pytest.MonkeyPatch) -> ServiceSockets:
    spy = ServiceSockets()
    handler = service_websocket.WebSocketHandler
    real_open, real_on_close = handler.open, handler.on_close

    def open_(self: Any, *args: Any, **kwargs: Any) -> None:
        spy.opened.append(self)
        real_open(self, *args, **kwargs)

    def on_close(self: Any) -> None:
        spy.closed.append(self)
        real_on_close(self)

    monkeypatch.setattr(handler, "open", open_)
    monkeypatch.setattr(handler, "on_close", on_close)
    return spy


async def direct(
    service: Any, method: str, path: str, body: Any = None, token: str = ALICE
) -> HTTPResponse:
    """A request straight to the service, past the Jupyter server."""
    client = AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(
            f"{service.url}{path}",
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"Bearer {token}", DIRECT: "1"},
            raise_error=False,
        )
    finally:
        client.close()


def as_json(response: HTTPResponse) -> Any:
    """The JSON body, of a response that says it is JSON (the service's own answers add the
    charset; the extension's status.json is Jupyter's plain application/json)."""
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    return json.loads(response.body)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Server-sent events as ``{"id", "event", "data"}`` (data decoded from JSON)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        if fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def ignore(_: bytes) -> None:
    """A streaming callback that drops what arrives (and returns None: tornado awaits
    anything else)."""


async def anonymous(
    http_server_client: Any, jp_base_url: str, path: str, **kwargs: Any
) -> HTTPResponse:
    """A request to the Jupyter server with no credentials at all."""
    response: HTTPResponse = await http_server_client.fetch(
        f"{jp_base_url}{path}", raise_error=False, follow_redirects=False, **kwargs
    )
    return response


@pytest.fixture
async def worker(launch: Any) -> Any:
    """One real executor, registered with the service."""
    return await launch()


class DenyCellblock(Authorizer):
    """A Jupyter authorizer that allows everything except the ``cellblock`` resource (what a
    deployment restricting some users, e.g. read-only collaborators, would configure)."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        return resource != "cellblock"


# --- Jupyter's authentication and authorization --------------------------------------------


async def test_without_jupyter_credentials_every_handler_refuses(
    jp_serverapp: Any, http_server_client: Any, jp_base_url: str, jp_ws_fetch: Any,
    service: Any, upstream: Upstream,
) -> None:  # fmt: skip
    # The page redirects to Jupyter's login; the APIs answer 403. POST and DELETE stop at
    # Jupyter's XSRF check already (a request without a token header is a cookie request).
    page = await anonymous(http_server_client, jp_base_url, "cellblock/")
    assert page.code == 302
    assert page.headers["Location"] == f"{jp_base_url}login?next=%2Fa%2540b%2Fcellblock%2F"
    for path in ("status.json", "api/v1/submissions", "api/v1/health"):
        path = f"cellblock/{path}"
        assert (await anonymous(http_server_client, jp_base_url, path)).code == 403, path
    post = await anonymous(
        http_server_client, jp_base_url, "cellblock/api/v1/submissions", method="POST",
        body=json.dumps({"run": "true"}),
    )  # fmt: skip
    assert post.code == 403 and b"_xsrf" in post.body
    delete = await anonymous(
        http_server_client, jp_base_url, "cellblock/api/v1/submissions/x", method="DELETE"
    )
    assert delete.code == 403
    with pytest.raises(HTTPClientError) as refused:
        await tornado.websocket.websocket_connect(
            f"ws://127.0.0.1:{jp_serverapp.port}{jp_base_url}cellblock/api/v1/ws"
        )
    assert refused.value.code == 403
    # Nothing reached the service, and alice (the extension's token) submitted nothing.
    assert upstream.requests == []
    listed = as_json(await direct(service, "GET", "/api/v1/submissions"))
    assert listed["submissions"] == []


async def test_a_wrong_jupyter_token_is_refused_everywhere(
    fetch: Fetch, connect: Connect, upstream: Upstream
) -> None:
    wrong = {"Authorization": "token not-the-jupyter-token"}
    page = await fetch("", headers=wrong)
    assert page.code == 302 and "/login?next=" in page.headers["Location"]
    assert (await fetch("status.json", headers=wrong)).code == 403
    assert (await fetch(*API, "submissions", headers=wrong)).code == 403
    for method, body in (("POST", {"run": "true"}), ("DELETE", None)):
        answer = await fetch(*API, "submissions", method=method, body=body, headers=wrong)
        assert answer.code == 403, method
    with pytest.raises(HTTPClientError) as refused:
        await connect(headers=wrong)
    assert refused.value.code == 403
    assert upstream.requests == []


async def test_with_jupyter_credentials_every_handler_answers(
    fetch: Fetch, connect: Connect, worker: Any
) -> None:
    page = await fetch("")
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert (await fetch("status.json")).code == 200
    health = await fetch(*API, "health")
    assert health.code == 200 and as_json(health)["executors"] == 1
    created = await fetch(*API, "submissions", method="POST", body={"run": "true"})
    assert created.code == 201
    sid = as_json(created)["id"]
    assert (await fetch(*API, "submissions", sid)).code == 200
    ws = await connect()
    assert (await ws.ask({"type": "status", "id": sid}))["type"] == "submission"
    await ws.close()


async def test_the_jupyter_token_as_a_query_argument_authenticates_and_is_not_forwarded(
    jp_serverapp: Any, http_server_client: Any, jp_base_url: str, service: Any,
    upstream: Upstream,
) -> None:  # fmt: skip
    token = jp_serverapp.identity_provider.token
    response = await anonymous(
        http_server_client, jp_base_url, f"cellblock/api/v1/submissions?limit=3&token={token}"
    )
    assert response.code == 200
    assert upstream.requests == [
        (f"{service.url}/api/v1/submissions?limit=3", {"Authorization": f"Bearer {ALICE}"})
    ]


@pytest.mark.parametrize(
    "jp_server_config_extra",
    [{"ServerApp": {"authorizer_class": DenyCellblock}}],
    ids=["deny-cellblock"],
    indirect=True,
)
async def test_a_jupyter_authorizer_that_denies_cellblock_is_obeyed_by_every_handler(
    fetch: Fetch, connect: Connect, upstream: Upstream, service_sockets: ServiceSockets
) -> None:
    assert (await fetch("")).code == 403
    assert (await fetch("status.json")).code == 403
    assert (await fetch(*API, "submissions")).code == 403
    created = await fetch(*API, "submissions", method="POST", body={"run": "true"})
    assert created.code == 403
    assert (await fetch(*API, "submissions", "x", method="DELETE")).code == 403
    # The WebSocket too: it carries submissions as much as POST does.
    with pytest.raises(HTTPClientError) as refused:
        await connect()
    assert refused.value.code == 403
    assert upstream.requests == [] and service_sockets.opened == []


# --- the REST proxy ------------------------------------------------------------------------


async def test_post_get_list_and_delete_pass_through_both_ways(
    fetch: Fetch, service: Any, upstream: Upstream
) -> None:
    # No executor: the submissions stay queued.
    created = await fetch(*API, "submissions", method="POST", body={"run": "sleep 30"})
    assert created.code == 201
    # The service's own headers, not the Jupyter APIHandler's defaults.
    assert created.headers["Content-Type"] == JSON_TYPE
    assert created.headers["Cache-Control"] == "no-store"
    first = as_json(created)
    assert set(first) == {"id", "status"} and first["status"] == "queued"
    sid = first["id"]
    # It is alice's (the extension's token), as the service itself says.
    assert (await direct(service, "GET", f"/api/v1/submissions/{sid}")).code == 200
    assert (await direct(service, "GET", f"/api/v1/submissions/{sid}", token=BOB)).code == 404

    got = await fetch(*API, "submissions", sid)
    assert got.code == 200 and as_json(got)["id"] == sid
    assert as_json(got)["status"] == "queued"

    second = as_json(await fetch(*API, "submissions", method="POST", body={"run": "true"}))
    listed = as_json(await fetch(*API, "submissions", params={"limit": "1"}))
    assert [s["id"] for s in listed["submissions"]] == [second["id"]]
    listed = as_json(await fetch(*API, "submissions", params={"limit": "5"}))
    assert {s["id"] for s in listed["submissions"]} == {sid, second["id"]}

    cancelled = await fetch(*API, "submissions", sid, method="DELETE")
    assert cancelled.code == 200
    assert as_json(cancelled) == {"id": sid, "status": "cancelled"}
    assert as_json(await fetch(*API, "submissions", sid))["status"] == "cancelled"
    again = await fetch(*API, "submissions", sid, method="DELETE")
    assert again.code == 409 and as_json(again)["error"]["code"] == "conflict"

    # Every request went to the service as alice, with the Jupyter user's query and body.
    assert set(upstream.paths()) == {
        "/api/v1/submissions",
        f"/api/v1/submissions/{sid}",
        "/api/v1/submissions?limit=1",
        "/api/v1/submissions?limit=5",
    }
    assert {h["Authorization"] for _, h in upstream.requests} == {f"Bearer {ALICE}"}


async def test_the_services_errors_pass_through_with_their_status_and_body(
    fetch: Fetch, service: Any
) -> None:
    not_json = await fetch(*API, "submissions", method="POST", body="{oops")
    assert not_json.code == 400 and as_json(not_json)["error"]["code"] == "invalid_json"
    invalid = await fetch(*API, "submissions", method="POST", body={"run": "true", "args": 3})
    assert invalid.code == 422
    assert [d["field"] for d in as_json(invalid)["error"]["details"]] == ["args"]
    bad_query = await fetch(*API, "submissions", params={"limit": "0"})
    assert bad_query.code == 422
    assert [d["field"] for d in as_json(bad_query)["error"]["details"]] == ["limit"]
    unknown = await fetch(*API, "submissions", "nosuch")
    assert unknown.code == 404 and as_json(unknown)["error"]["code"] == "not_found"
    # Bob's submission is someone else's for alice: 404, exactly as an unknown id.
    bobs = as_json(await direct(service, "POST", "/api/v1/submissions", {"run": "true"}, BOB))
    assert (await fetch(*API, "submissions", bobs["id"])).code == 404
    # Admin-only endpoints: the extension's token is a client token.
    assert (await fetch(*API, "workers")).code == 403
    assert (await fetch(*API, "nosuch")).code == 404


async def test_post_with_wait_answers_the_finished_submission(fetch: Fetch, worker: Any) -> None:
    created = await fetch(
        *API, "submissions", method="POST", params={"wait": "true", "timeout": "30"},
        body={"run": 'echo "hello $1"', "args": ["proxy"]},
    )  # fmt: skip
    assert created.code == 201
    state = as_json(created)
    assert state["status"] == "finished" and state["worker"] == worker.worker_id
    assert state["stages"]["run"]["stdout"] == "hello proxy\n"


async def test_a_full_queue_answers_429_with_retry_after(fetch: Fetch, service: Any) -> None:
    # No executor: fill the service's queue (CELLBLOCK_QUEUE_SIZE, 50 in the tests) as bob.
    for _ in range(60):
        answer = await direct(service, "POST", "/api/v1/submissions", {"run": "true"}, BOB)
        if answer.code == 429:
            break
        assert answer.code == 201
    else:
        pytest.fail("the queue never filled up")
    full = await fetch(*API, "submissions", method="POST", body={"run": "true"})
    assert full.code == 429
    assert full.headers["Retry-After"] == answer.headers["Retry-After"]
    assert int(full.headers["Retry-After"]) > 0
    assert as_json(full)["error"]["code"] == as_json(answer)["error"]["code"]


async def test_a_package_prefetch_answers_202_with_a_location_the_browser_can_follow(
    fetch: Fetch, start_builder: Any, jp_base_url: str
) -> None:
    # Without a builder the service answers 503 itself, and that passes through as it is.
    early = await fetch(*API, "packages", method="POST", body={"names": ["hello"]})
    assert early.code == 503 and as_json(early)["error"]["code"] == "no_builder"
    builder = start_builder()
    await builder.started()
    # A package the channel does not have: the build is accepted, then fails in no time.
    accepted = await fetch(*API, "packages", method="POST", body={"names": ["nosuchpackage"]})
    assert accepted.code == 202
    build = as_json(accepted)["id"]
    # The service's Location (/api/v1/packages/builds/ID) names a path on the service; the
    # browser gets the same resource under the proxy.
    location = accepted.headers["Location"]
    assert location == f"{jp_base_url}cellblock/api/v1/packages/builds/{build}"
    followed = await fetch(location.removeprefix(f"{jp_base_url}cellblock/"))
    assert followed.code == 200 and as_json(followed)["id"] == build


# --- server-sent events --------------------------------------------------------------------


async def test_events_stream_through_the_proxy_live_to_finished(fetch: Fetch, launch: Any) -> None:
    sid = as_json(
        await fetch(*API, "submissions", method="POST", body={"run": "echo ran; echo err >&2"})
    )["id"]
    chunks: list[tuple[float, bytes]] = []
    stream = asyncio.ensure_future(
        fetch(
            *API, "submissions", sid, "events",
            streaming_callback=lambda data: chunks.append((time.monotonic(), data)),
        )
    )  # fmt: skip
    # The submission waits for an executor: its first events reach the browser while the
    # stream is still open, before anything could finish it.
    deadline = time.monotonic() + 10
    while not chunks and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert chunks, "no event reached the browser while the submission was queued"
    assert not stream.done()
    assert parse_sse(b"".join(c for _, c in chunks).decode())[0]["event"] == "status"
    executor = await launch()
    response = await asyncio.wait_for(stream, 30)
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    events = parse_sse(b"".join(c for _, c in chunks).decode())
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "finished"
    final = events[-1]["data"]["submission"]
    assert final["status"] == "finished" and final["worker"] == executor.worker_id
    assert final["stages"]["run"]["stdout"] == "ran\n"
    assert {"stage_started", "stage_finished"} <= {e["event"] for e in events}
    # ``since`` passes: a client resuming after the last-but-one event gets the last only.
    since = len(events) - 1
    resumed = await fetch(*API, "submissions", sid, "events", params={"since": str(since)})
    assert [e["event"] for e in parse_sse(resumed.body.decode())] == ["finished"]


async def test_events_resume_from_the_browsers_last_event_id(fetch: Fetch, worker: Any) -> None:
    # EventSource reconnects with a Last-Event-ID header, not a query argument.
    created = await fetch(
        *API, "submissions", method="POST", params={"wait": "true"}, body={"run": "true"}
    )
    sid = as_json(created)["id"]
    everything = parse_sse((await fetch(*API, "submissions", sid, "events")).body.decode())
    last = everything[-1]["id"]
    resumed = await fetch(
        *API, "submissions", sid, "events", headers={"Last-Event-ID": str(int(last) - 1)}
    )
    assert [e["id"] for e in parse_sse(resumed.body.decode())] == [last]


@pytest.mark.slow
async def test_a_browser_leaving_an_event_stream_ends_the_request_to_the_service(
    fetch: Fetch, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, until: Any
) -> None:
    ended: list[Any] = []
    real_on_finish = service_api.EventsHandler.on_finish

    def on_finish(handler: Any) -> None:
        ended.append(handler)
        real_on_finish(handler)

    monkeypatch.setattr(service_api.EventsHandler, "on_finish", on_finish)
    # Queued without an executor, the submission's stream would never end by itself.
    sid = as_json(await fetch(*API, "submissions", method="POST", body={"run": "true"}))["id"]
    with pytest.raises(HTTPClientError) as left:  # the browser gives up, closes the connection
        await fetch(
            *API, "submissions", sid, "events", request_timeout=1, streaming_callback=ignore
        )
    assert left.value.code == 599
    [stream] = [f for url, f in upstream.futures if url.endswith("/events")]
    await asyncio.wait_for(asyncio.wait([stream]), 2)  # the proxy's request ends at once
    # The service notices on its next keep-alive (every few seconds) and ends its side too.
    await until(lambda: ended, "the service's event stream to end", timeout=15)


# --- the WebSocket proxy -------------------------------------------------------------------


async def test_websocket_submit_answers_accepted_then_the_events_to_finished(
    connect: Connect, worker: Any, service_sockets: ServiceSockets
) -> None:
    ws = await connect()
    accepted = await ws.ask(
        {"type": "submit", "request_id": 7, "submission": {"run": "echo over the socket"}}
    )
    assert accepted["type"] == "accepted" and accepted["request_id"] == 7
    events = await ws.events_until_finished()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["id"] for e in events} == {accepted["id"]}
    final = events[-1]["submission"]
    assert final["status"] == "finished"
    assert final["stages"]["run"]["stdout"] == "over the socket\n"
    # The proxy spoke to the service with the extension's token, on the service's path.
    [upstream] = service_sockets.opened
    assert upstream.request.path == "/api/v1/ws" and upstream.request.query == ""
    assert upstream.request.headers["Authorization"] == f"Bearer {ALICE}"
    await ws.close()


async def test_websocket_malformed_messages_answer_errors_and_the_socket_stays_open(
    connect: Connect, service: Any
) -> None:
    ws = await connect()
    not_json = await ws.ask("this is not JSON")
    assert not_json["type"] == "error" and not_json["code"]
    unknown = await ws.ask({"type": "frobnicate", "request_id": "r1"})
    assert unknown["type"] == "error" and unknown["request_id"] == "r1"
    no_submission = await ws.ask({"type": "submit"})
    assert no_submission["type"] == "error"
    # Still open, and still alice's.
    assert await ws.ask({"type": "packages"}) == {"type": "packages", "packages": []}
    bobs = as_json(await direct(service, "POST", "/api/v1/submissions", {"run": "true"}, BOB))
    hidden = await ws.ask({"type": "status", "id": bobs["id"]})
    assert hidden["type"] == "error" and hidden["code"] == "not_found"
    await ws.close()


async def test_websocket_close_travels_both_ways(
    connect: Connect, service_sockets: ServiceSockets, until: Any
) -> None:
    # The browser closes: the proxy closes its connection to the service.
    ws = await connect()
    assert (await ws.ask({"type": "packages"}))["type"] == "packages"
    await ws.close()
    await until(lambda: service_sockets.live() == 0, "the service's side to close")
    # The service closes: the browser's socket closes.
    ws = await connect()
    assert (await ws.ask({"type": "packages"}))["type"] == "packages"
    [_, upstream] = service_sockets.opened
    upstream.close()
    assert await ws.ended(), "the browser's socket stayed open"


async def test_a_refused_websocket_upgrade_leaves_no_connection_to_the_service(
    fetch: Fetch, service_sockets: ServiceSockets, until: Any
) -> None:
    # A plain GET (no Upgrade): authenticated and authorized, so the proxy connects to the
    # service before tornado refuses the upgrade itself.
    refused = await fetch(*API, "ws")
    assert refused.code == 400
    await until(lambda: len(service_sockets.opened) == 1, "the proxy to reach the service")
    await until(lambda: service_sockets.live() == 0, "the connection to the service to close")


# --- the status page and its data ----------------------------------------------------------


async def test_status_json_shows_health_workers_this_tokens_submissions_and_packages(
    fetch: Fetch, service: Any, worker: Any
) -> None:
    created = await fetch(
        *API, "submissions", method="POST", params={"wait": "true"}, body={"run": "true"}
    )
    mine = as_json(created)
    await direct(service, "POST", "/api/v1/submissions", {"run": "true"}, BOB)
    response = await fetch("status.json")
    assert response.code == 200
    status = as_json(response)
    assert set(status) == {"service", "health", "workers", "submissions", "packages"}
    assert status["service"] == service.url
    assert status["health"]["status"] == "ok" and status["health"]["executors"] == 1
    assert [w["id"] for w in status["workers"]] == [worker.worker_id]
    assert {"id", "kind", "host", "slots", "busy", "last_seen"} <= set(status["workers"][0])
    assert [s["id"] for s in status["submissions"]] == [mine["id"]]
    assert status["submissions"][0]["status"] == "finished"
    assert status["packages"] == []


@pytest.mark.parametrize("cellblock_config", [{"admin_token": ""}], indirect=True)
async def test_status_json_without_an_admin_token_has_no_workers(fetch: Fetch) -> None:
    status = as_json(await fetch("status.json"))
    assert status["workers"] is None and status["health"]["status"] == "ok"


async def test_the_status_page_renders_with_its_refresh_script(
    fetch: Fetch, jp_base_url: str
) -> None:
    for path in ("", "/"):  # <base_url>cellblock and <base_url>cellblock/
        response = await fetch(path)
        assert response.code == 200, path
        assert response.headers["Content-Type"].startswith("text/html")
        html = response.body.decode()
        assert "<title>Cellblock</title>" in html
        assert f"const base = {json.dumps(jp_base_url)};" in html
        assert "fetch(`${base}cellblock/status.json`" in html
        assert "setInterval(refresh, 2000)" in html


# --- no service, or a dead one -------------------------------------------------------------


@pytest.mark.parametrize("cellblock_config", [{"url": "", "token": ""}], indirect=True)
async def test_without_a_configured_service_the_api_answers_503(
    fetch: Fetch, connect: Connect
) -> None:
    for method, body in (("GET", None), ("POST", {"run": "true"}), ("DELETE", None)):
        answer = await fetch(*API, "submissions", method=method, body=body)
        assert answer.code == 503, method
        assert b"not configured" in answer.body
    assert (await fetch("status.json")).code == 503
    with pytest.raises(HTTPClientError) as refused:
        await connect()
    assert refused.value.code == 503
    # The page itself renders; its script reports what status.json answers.
    assert (await fetch("")).code == 200


def dead_service_url() -> str:
    return f"http://127.0.0.1:{closed_port()}"


@pytest.mark.parametrize(
    "cellblock_config", [{"url": dead_service_url}], ids=["closed-port"], indirect=True
)
async def test_a_service_that_is_down_answers_502(
    fetch: Fetch, connect: Connect, jp_serverapp: Any
) -> None:
    for method, body in (("GET", None), ("POST", {"run": "true"}), ("DELETE", None)):
        answer = await fetch(*API, "submissions", method=method, body=body)
        assert answer.code == 502, method
        assert as_json(answer)["error"]["code"] == "bad_gateway"
    status = await fetch("status.json")
    assert status.code == 502 and as_json(status)["error"]["code"] == "bad_gateway"
    with pytest.raises(HTTPClientError) as refused:
        await connect()
    assert refused.value.code == 502
    assert (await fetch("")).code == 200


# --- the service's tokens ------------------------------------------------------------------


async def test_no_answer_of_any_kind_carries_the_services_tokens(
    fetch: Fetch, connect: Connect, worker: Any, service: Any
) -> None:
    """``fetch`` and ``connect`` check every answer; this walks through all kinds of them."""
    seen: list[HTTPResponse] = []
    sid = as_json(
        await fetch(*API, "submissions", method="POST", params={"wait": "true"},
                    body={"run": "env; echo $CELLBLOCK_TOKEN"})
    )["id"]  # fmt: skip
    for parts, kwargs in [
        (("",), {}),
        (("status.json",), {}),
        ((*API, "health"), {}),
        ((*API, "submissions"), {}),
        ((*API, "submissions", sid), {}),
        ((*API, "submissions", sid, "events"), {}),
        ((*API, "submissions", "nosuch"), {}),
        ((*API, "workers"), {}),
        ((*API, "submissions"), {"method": "POST", "body": {"run": 1}}),
        ((*API, "submissions"), {"method": "POST", "body": "{"}),
        ((*API, "submissions", sid), {"method": "DELETE"}),
        ((*API, "packages"), {"method": "POST", "body": {"names": ["x"]}}),
    ]:
        seen.append(await fetch(*parts, **kwargs))
    assert {r.code for r in seen} >= {200, 400, 403, 404, 409, 422, 503}
    ws = await connect()
    await ws.ask({"type": "submit", "submission": {"run": "true"}})
    await ws.events_until_finished()
    await ws.ask("garbage")
    await ws.close()
    everything = b"".join(browser_view(r) for r in seen)
    assert ALICE.encode() not in everything and ADMIN.encode() not in everything
