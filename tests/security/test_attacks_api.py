"""Attacks on the service's API, against the real service on a real Redis.

Each test is one attack class. Each asserts that the attack has no effect (nothing is queued,
cancelled, drained or scaled, nobody learns anything), that the attacker gets an honest answer
(the right status with the protocol's error body, never a 500), and that a normal request
still works afterwards.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import tornado.websocket
from restio import ADMIN, ALICE, BOB, Rest
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from wsio import Socket

from cellblock.service.store import Store

MAX_BODY = 1024 * 1024  # CELLBLOCK_MAX_BODY_SIZE of the service fixture
#: A body far above both the handler's limit and the HTTP server's own bound (limit + 1 MiB).
HUGE = 64 * 1024 * 1024
WRONG_TOKENS = ["", "alice-toke", "alice-token-", "ALICE-TOKEN", " admin-token x", "null"]
#: Every endpoint that needs a token, with a body where it takes one. ``{sid}`` is one of
#: Alice's submissions, ``{worker}`` a live worker.
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("POST", "/api/v1/submissions", {"run": "true"}),
    ("GET", "/api/v1/submissions", None),
    ("GET", "/api/v1/submissions/{sid}", None),
    ("DELETE", "/api/v1/submissions/{sid}", None),
    ("GET", "/api/v1/submissions/{sid}/events", None),
    ("GET", "/api/v1/workers", None),
    ("DELETE", "/api/v1/workers/{worker}", None),
    ("POST", "/api/v1/admin/scale", {"executors": 0}),
    ("GET", "/metrics", None),
    ("GET", "/api/v1/openapi.json", None),
    ("GET", "/api/v1/packages", None),
    ("POST", "/api/v1/packages", {"names": ["hello"]}),
    ("GET", "/api/v1/packages/builds/0123abcd", None),
]
ADMIN_ONLY = {"/api/v1/workers", "/api/v1/workers/{worker}", "/api/v1/admin/scale", "/metrics"}
WORKER = {"id": "executor-victim", "kind": "executor", "host": "h", "slots": 2, "busy": 0,
          "started_at": "2024-01-01T00:00:00Z", "last_seen": "2024-01-01T00:00:00Z"}  # fmt: skip


@pytest.fixture
async def api(service: Any) -> AsyncIterator[Rest]:
    client = Rest(service.url)
    yield client
    client.close()


def error_of(response: HTTPResponse, status: int) -> dict[str, Any]:
    """The protocol's error document of ``response``, after checking its status and shape."""
    assert response.code == status, (response.code, response.body[:500])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    error: dict[str, Any] = json.loads(response.body)["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)
    return error


async def still_serves(api: Rest) -> None:
    """A normal client is served as before: health, and a submission accepted and readable."""
    assert (await api.request("GET", "/api/v1/health", token=None)).code == 200
    answer = await api.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201)
    state = await api.call("GET", f"/api/v1/submissions/{answer['id']}")
    assert state["status"] == "queued"


async def alices_submission(api: Rest) -> str:
    sid: str = (await api.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201))["id"]
    return sid


async def open_socket(service: Any, token: str | None = ALICE, query: bool = False) -> Socket:
    url, headers = service.ws_url, {}
    if token is not None and query:
        url += f"?token={quote(token)}"
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return Socket(await tornado.websocket.websocket_connect(HTTPRequest(url, headers=headers)))


def address(service: Any) -> tuple[str, int]:
    parts = urlsplit(service.url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower-case), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


# -- authentication and authorization ---------------------------------------------------------


async def test_no_token_or_a_wrong_token_is_401_on_every_endpoint_and_does_nothing(
    api: Rest, store: Store
) -> None:
    """Attack: every endpoint that needs a token, called with none, with near-miss tokens in
    the header, in the query string, or as HTTP Basic. Must hold: 401 with the error body and
    a Bearer challenge, nothing submitted, cancelled, drained or scaled."""
    sid = await alices_submission(api)
    await store.register_worker(WORKER, ttl=60)
    await store.supervise(ttl=60)
    attempts: list[dict[str, Any]] = [{"token": None}]
    attempts += [{"token": t} for t in WRONG_TOKENS]
    headers = ("alice-token", "Basic YWxpY2U6YWxpY2UtdG9rZW4=", "Bearer", "Token x")
    attempts += [{"token": None, "headers": {"Authorization": h}} for h in headers]
    attempts += [{"token": None, "query": q} for q in ("?token=wrong", "?token=")]
    for method, template, body in ENDPOINTS:
        path = template.format(sid=sid, worker=WORKER["id"])
        for attempt in attempts:
            kwargs = {k: v for k, v in attempt.items() if k != "query"}
            response = await api.request(method, path + attempt.get("query", ""), body, **kwargs)
            error_of(response, 401)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), (path, attempt)
    assert await store.queued() == 1  # Alice's, still queued
    assert (await store.state(sid)).status == "queued"  # type: ignore[union-attr]
    assert not await store.drain_requested(WORKER["id"])
    assert await store.scale() == {}
    await still_serves(api)


async def test_a_client_token_on_every_admin_endpoint_is_403_and_does_nothing(
    api: Rest, store: Store
) -> None:
    """Attack: a client token on the admin endpoints (workers, DELETE worker, scale, metrics)
    and on the admin-only `all=true` of the submissions list. Must hold: 403 with the error
    body (the list answers the client's own submissions only), no worker drained, no scale
    set, no other client's submission listed."""
    await store.register_worker(WORKER, ttl=60)
    await store.supervise(ttl=60)
    bobs = await api.call("POST", "/api/v1/submissions", {"run": "true"}, token=BOB, expect=201)
    for method, template, body in ENDPOINTS:
        if template in ADMIN_ONLY:
            path = template.format(worker=WORKER["id"])
            error = error_of(await api.request(method, path, body, token=ALICE), 403)
            assert error["code"] == "forbidden", (path, error)
    listed = await api.call("GET", "/api/v1/submissions?all=true&limit=1000", token=ALICE)
    assert bobs["id"] not in [s["id"] for s in listed["submissions"]]
    assert not await store.drain_requested(WORKER["id"])
    assert await store.scale() == {}
    # The admin still sees and drains the worker: the refusals changed nothing.
    workers = await api.call("GET", "/api/v1/workers", token=ADMIN)
    assert [w["id"] for w in workers["workers"]] == [WORKER["id"]]
    await api.call("DELETE", f"/api/v1/workers/{WORKER['id']}", token=ADMIN, expect=202)
    await still_serves(api)


async def test_another_clients_ids_answer_404_exactly_as_unknown_ids(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: Bob probes Alice's submission id over GET, DELETE, the event stream and the
    WebSocket's watch, status and cancel. Must hold: each answers byte for byte what an
    unknown id of the same length answers, Alice's submission is not cancelled, and Bob's
    socket carries none of its events."""
    sid = await alices_submission(api)
    unknown = secrets.token_urlsafe(18)
    assert len(unknown) == len(sid)

    def same(response: HTTPResponse, probe: str) -> tuple[int, bytes, dict[str, str]]:
        ignored = {"Date"}
        headers = {k: v for k, v in response.headers.get_all() if k not in ignored}
        return response.code, response.body.replace(probe.encode(), b"ID"), headers

    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events"),
                           ("GET", "/events?since=0")):  # fmt: skip
        answers = []
        for probe in (sid, unknown):
            response = await api.request(method, f"/api/v1/submissions/{probe}{suffix}", token=BOB)
            error_of(response, 404)
            answers.append(same(response, probe))
        assert answers[0] == answers[1], (method, suffix)

    bob = await open_socket(service, BOB)
    try:
        for kind in ("watch", "status", "cancel"):
            answers = []
            for probe in (sid, unknown):
                answer = await bob.ask({"type": kind, "id": probe, "request_id": 1})
                assert answer["type"] == "error" and answer["code"] == "not_found", answer
                answers.append(json.dumps(answer).replace(probe, "ID"))
            assert answers[0] == answers[1], kind
        assert (await store.state(sid)).status == "queued"  # type: ignore[union-attr]
        # Alice cancels her own: had Bob's watch subscribed him, its events would now come
        # before the answer to his next request.
        await api.call("DELETE", f"/api/v1/submissions/{sid}")
        await asyncio.sleep(0.5)
        answer = await bob.ask({"type": "status", "id": unknown, "request_id": "marker"})
        assert answer["request_id"] == "marker", answer
    finally:
        await bob.close()
    # Alice herself still sees her submission, cancelled by her alone.
    assert (await api.call("GET", f"/api/v1/submissions/{sid}"))["status"] == "cancelled"
    await still_serves(api)


async def test_the_websocket_without_a_token_or_with_a_wrong_one_is_refused(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: opening the WebSocket with no token, near-miss tokens in the header or the
    query string. Must hold: 401 before the upgrade (no socket to send on), and a socket with
    a good token still works."""
    attempts: list[tuple[str | None, bool]] = [(None, False)]
    attempts += [(t, q) for t in WRONG_TOKENS if t for q in (False, True)]
    attempts.append(("", True))
    for token, query in attempts:
        with pytest.raises(HTTPClientError) as raised:
            await open_socket(service, token, query)
        assert raised.value.code == 401, (token, query)
    ws = await open_socket(service, ALICE, query=True)
    try:
        answer = await ws.ask({"type": "submit", "submission": {"run": "true"}})
        assert answer["type"] == "accepted", answer
    finally:
        await ws.close()
    assert await store.queued() == 1
    await still_serves(api)


# -- bodies -----------------------------------------------------------------------------------


async def test_an_oversize_body_answers_413_to_a_careful_client(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: bodies far over the limit, announced by Content-Length, sent by a client that
    waits for the answer before it sends the body (Expect: 100-continue, or reading first).
    Must hold: 413 with the error body before any of the body is read, nothing queued."""
    huge = b'{"run": "true", "stdin": "' + b"x" * HUGE + b'"}'
    response = await api.request(
        "POST", "/api/v1/submissions", raw=huge, expect_100_continue=True, timeout=20
    )
    assert error_of(response, 413)["code"] == "body_too_large"
    host, port = address(service)
    for expect in ("Expect: 100-continue\r\n", ""):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"POST /api/v1/submissions HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {ALICE}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(huge)}\r\n{expect}\r\n".encode()
            )
            status, _, body = await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()
        assert status == 413, (status, body)
        assert json.loads(body)["error"]["code"] == "body_too_large"
    assert await store.queued() == 0
    await still_serves(api)


async def test_an_oversize_body_answers_413_to_a_client_that_sends_all_first(
    service: Any, store: Store
) -> None:
    """Attack: a body far over the limit, sent whole before the client reads, as urllib and
    requests send. Must hold: the client reads the 413 (the body is read and dropped, up to
    a bound), and nothing is queued."""
    host, port = address(service)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"POST /api/v1/submissions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {ALICE}\r\nContent-Length: {HUGE}\r\n\r\n".encode()
        )
        chunk = b"x" * (1024 * 1024)
        for _ in range(HUGE // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        status, _, body = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert await store.queued() == 0


async def test_an_oversize_websocket_message_closes_that_socket_only(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: one WebSocket message over the body limit. Must hold: that socket is closed
    with 1009 (message too big), nothing is queued, and other sockets go on."""
    bystander = await open_socket(service)
    attacker = await open_socket(service)
    message = json.dumps({"type": "submit", "submission": {"run": "true", "stdin": "x" * MAX_BODY}})
    await attacker.send(message)
    assert await attacker.ended(), "the server kept a socket that sent an oversize message"
    assert attacker.conn.close_code == 1009, attacker.conn.close_code
    try:
        answer = await bystander.ask({"type": "submit", "submission": {"run": "true"}})
        assert answer["type"] == "accepted", answer
    finally:
        await bystander.close()
    assert await store.queued() == 1
    await still_serves(api)


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


async def test_deeply_nested_json_is_refused_with_the_error_body(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: JSON nested 100000 levels deep ([[[...]]] and {"a":{"a":...}}), as the whole
    body, and nested just below what the parser takes inside fields the schema reads (limits,
    env, files, dependencies, WebSocket request_id). Must hold: 400 or 422 with the error
    body, never a 500 or a RecursionError; on the WebSocket an error message, and the socket
    stays open; nothing queued."""
    deep = 100_000
    bodies = [nested(deep), '{"a":' * deep + "1" + "}" * deep, '{"run": "true", "limits": '
              + nested(deep) + "}"]  # fmt: skip
    # Deep enough to hit Python's recursion limit in anything recursive after parsing.
    shallow = nested(900)
    bodies += [
        f'{{"run": "true", "limits": {{"run": {{"cpu": {shallow}}}}}}}',
        f'{{"run": "true", "limits": {{"run": {{"cpu": [{shallow}, {shallow}]}}}}}}',
        f'{{"run": "true", "env": {{"A": {shallow}}}}}',
        f'{{"run": "true", "files": {shallow}}}',
        f'{{"run": "true", "dependencies": [{shallow}]}}',
        f'{{"run": {shallow}}}',
    ]
    for body in bodies:
        response = await api.request("POST", "/api/v1/submissions", raw=body.encode())
        assert response.code in (400, 422), (body[:60], response.code, response.body[:300])
        error_of(response, response.code)
        response = await api.request("POST", "/api/v1/packages", raw=body.encode())
        assert response.code in (400, 422), (body[:60], response.code, response.body[:300])
    ws = await open_socket(service)
    try:
        for message in [*bodies, f'{{"type": "status", "id": "x", "request_id": {shallow}}}',
                        '{"type": "submit", "submission": ' + bodies[3] + "}"]:  # fmt: skip
            answer = await ws.ask(message)
            assert answer["type"] == "error" and answer["message"], (message[:60], answer)
        assert (await ws.ask({"type": "submit", "submission": {"run": "true"}}))["type"] == (
            "accepted"
        )
    finally:
        await ws.close()
    assert await store.queued() == 1
    await still_serves(api)


MALFORMED: list[bytes] = [
    b"", b"null", b"[]", b'"run"', b"1", b"true", b"{", b'{"run": "true",}', b"{'run': 'true'}",
    b'{"run": NaN}', b'{"run": "true", "limits": {"run": {"cpu": Infinity}}}',
    b'{"run": "true", "limits": {"run": {"cpu": NaN}}}',
    b'{"run": "true", "limits": {"run": {"wall_time": 1e999}}}',
    b'{"run": "true", "limits": {"run": {"cpu": ' + b"9" * 5000 + b"}}}",
    b'{"run": "true", "stdin": ' + b"1" * 5000 + b"}",
    b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b'{"run": "\xc3\x28"}', b'{"run": "\\ud800"}',
    b'{"run": "\\u0000"}', b'{"run": "true", "\\ud800": 1}', b'{"run": "true", "run": 5}',
    b'{"run": true}', b'{"run": ["true"]}', b'{"run": {"cmd": "true"}}', b'{"run": null}',
    b'{"run": "true", "files": {"a": "b"}}', b'{"run": "true", "files": [null]}',
    b'{"run": "true", "files": [{"name": 1, "content": 2}]}',
    b'{"run": "true", "files": [{"name": "a", "content": "", "executable": 1}]}',
    b'{"run": "true", "args": "a b"}', b'{"run": "true", "args": [null]}',
    b'{"run": "true", "env": ["A=1"]}', b'{"run": "true", "env": {"A": 1}}',
    b'{"run": "true", "env": {"A": null}}', b'{"run": "true", "stdin": 5}',
    b'{"run": "true", "stdin_encoding": ["hex"]}', b'{"run": "true", "limits": []}',
    b'{"run": "true", "limits": {"run": 5}}', b'{"run": "true", "limits": {"run": [1]}}',
    b'{"run": "true", "dependencies": "gcc"}', b'{"run": "true", "dependencies": [1]}',
    b'{"run": "true", "compile": 0}', b'{"__proto__": {"run": "true"}}',
]  # fmt: skip


async def test_malformed_json_and_wrong_types_are_400_or_422_with_the_error_body(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: bodies that are not JSON, not UTF-8, JSON that is not an object, numbers no
    parser should take (NaN, Infinity, 5000 digits), lone surrogates, NUL, repeated keys and
    every field with the wrong type; over REST and the WebSocket. Must hold: 400 or 422 with
    the error body (a WebSocket error message, the socket still open), nothing queued."""
    wrong = []
    for raw in MALFORMED:
        response = await api.request("POST", "/api/v1/submissions", raw=raw)
        if response.code not in (400, 422):
            wrong.append(f"{raw[:60]!r}: {response.code} {response.body[:200]!r}")
            continue
        error_of(response, response.code)
    assert wrong == []
    ws = await open_socket(service)
    try:
        for raw in MALFORMED:
            message = b'{"type": "submit", "submission": ' + raw + b"}"
            for sent in (raw, message):
                # Text frames must be UTF-8: anything else goes as a binary frame.
                try:
                    await ws.send(sent.decode())
                except UnicodeDecodeError:
                    await ws.conn.write_message(sent, binary=True)
                answer = await ws.receive()
                assert answer["type"] == "error" and answer["message"], (sent[:60], answer)
    finally:
        await ws.close()
    assert await store.queued() == 0
    await still_serves(api)


async def test_huge_numbers_of_files_fields_and_items_are_422_promptly(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack: bodies just under the size limit holding tens of thousands of files, unknown
    fields, env variables, args, dependencies or limits. Must hold: 422 with the error body
    naming the field, each within a few seconds, nothing queued, others still served."""
    many = 30_000
    bogus = [f"bogus{i}" for i in range(many)]
    bodies: dict[str, dict[str, Any]] = {
        "files": {"run": "true", "files": [{"name": f"f{i}", "content": ""} for i in range(many)]},
        "bogus0": {"run": "true", **dict.fromkeys(bogus, 0)},
        "env": {"run": "true", "env": {f"E{i}": "" for i in range(many)}},
        "args": {"run": "true", "args": [""] * 200_000},
        "dependencies": {"run": "true", "dependencies": ["gcc"] * 100_000},
        "limits.run.bogus0": {"run": "true", "limits": {"run": dict.fromkeys(bogus, 1)}},
    }  # fmt: skip
    for field, body in bodies.items():
        raw = json.dumps(body).encode()
        assert len(raw) <= MAX_BODY, (field, len(raw))
        started = time.monotonic()
        response = await api.request("POST", "/api/v1/submissions", raw=raw)
        took = time.monotonic() - started
        error = error_of(response, 422)
        assert field in [d["field"] for d in error["details"]], (field, error["details"][:3])
        assert took < 5, (field, took)
    packages = {"names": ["gcc"] * 100_000}
    error = error_of(await api.request("POST", "/api/v1/packages", packages), 422)
    assert "names" in [d["field"] for d in error["details"]]
    assert await store.queued() == 0
    await still_serves(api)


# -- slow clients -----------------------------------------------------------------------------


async def test_slow_clients_do_not_starve_a_normal_client(
    api: Rest, service: Any, store: Store
) -> None:
    """Attack (slowloris): 200 loopback connections send their request headers one byte at a
    time, and 40 more a POST body one byte at a time, over 2.5 s, while 150 more hold event
    streams open without reading them. Must hold: a normal client's requests meanwhile each
    answer within 2 s, and the slow requests, once complete, get honest answers."""
    host, port = address(service)
    head = (f"GET /api/v1/health HTTP/1.1\r\nHost: {host}\r\nX-Padding: "
            + "a" * 40 + "\r\n\r\n").encode()  # fmt: skip
    body = json.dumps({"run": "true"}).encode()
    post = (f"POST /api/v1/submissions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {ALICE}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sid = await alices_submission(api)
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(240):
        connections.append(await asyncio.open_connection(host, port))
    # Each event stream holds a Redis connection through its blocking read.
    events = (f"GET /api/v1/submissions/{sid}/events HTTP/1.1\r\nHost: {host}\r\n"
              f"Authorization: Bearer {ALICE}\r\n\r\n").encode()  # fmt: skip
    streams = [await asyncio.open_connection(host, port) for _ in range(150)]
    for _, writer in streams:
        writer.write(events)
    spread = 2.5  # seconds over which each slow client sends its bytes

    async def trickle(writer: asyncio.StreamWriter, data: bytes, start: int) -> None:
        writer.write(data[:start])
        for i in range(start, len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(spread / (len(data) - start))

    tasks = [asyncio.create_task(trickle(w, head, 0)) for _, w in connections[:200]]
    tasks += [asyncio.create_task(trickle(w, post + body, len(post))) for _, w in connections[200:]]
    latencies = []
    try:
        while not all(task.done() for task in tasks):
            started = time.monotonic()
            assert (await api.request("GET", "/api/v1/health", token=None)).code == 200
            await api.call("GET", f"/api/v1/submissions/{sid}")
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
        await asyncio.gather(*tasks)
        # The slow requests are whole now: they get their answers.
        for reader, _ in connections[:5] + connections[200:205]:
            status, _, _ = await asyncio.wait_for(read_response(reader), 10)
            assert status in (200, 201), status
        for reader, _ in streams[:5]:
            head_line = await asyncio.wait_for(reader.readline(), 10)
            assert head_line.startswith(b"HTTP/1.1 200"), head_line
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in connections + streams:
            writer.close()
    assert len(latencies) >= 10, latencies
    # Tens of milliseconds on an idle machine; the bound leaves room for a busy one, while
    # a starved client would wait for as long as the slow ones hold their connections.
    assert max(latencies) < 2.0, latencies
    await still_serves(api)
