"""The WebSocket API (``/api/v1/ws``) against the real service, Redis and executors."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import tornado.websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from wsio import Socket

from cellblock.cachebuilder.environments import Environment, EnvironmentCache, Package

ALICE, BOB, ADMIN = "alice-token", "bob-token", "admin-token"


Connect = Callable[..., Awaitable[Socket]]  # the connect fixture of conftest.py


async def http(service: Any, method: str, path: str, body: Any = None, token: str = ALICE) -> Any:
    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(
            service.url + path,
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"Bearer {token}"},
            raise_error=False,
        )
    finally:
        client.close()
    return response.code, json.loads(response.body)


def check_events(events: list[dict[str, Any]], sid: str, first: int = 1) -> None:
    assert [e["seq"] for e in events] == list(range(first, first + len(events)))
    assert all(e["id"] == sid for e in events)
    assert [e["type"] for e in events].count("finished") == 1
    assert events[-1]["type"] == "finished"


# -- submit and events ------------------------------------------------------------------------


async def test_submit_is_accepted_then_streams_the_submissions_events(
    connect: Connect, launch: Any, service: Any
) -> None:
    executor = await launch()
    ws = await connect()
    accepted = await ws.ask(
        {
            "type": "submit",
            "request_id": "r-1",
            "submission": {"compile": "echo built", "run": 'echo "$@"', "args": ["a b", "c"]},
        }
    )
    assert accepted["type"] == "accepted" and accepted["request_id"] == "r-1"
    sid = accepted["id"]
    events = await ws.events_until_finished()
    check_events(events, sid)
    kinds = [(e["type"], e.get("stage") or e.get("status")) for e in events]
    assert kinds[:2] == [("status", "queued"), ("status", "running")]
    assert events[1]["worker"] == executor.worker_id
    assert kinds.index(("stage_finished", "compile")) < kinds.index(("stage_started", "run"))
    final = events[-1]["submission"]
    assert final["status"] == "finished" and final["stages"]["run"]["stdout"] == "a b c\n"
    code, state = await http(service, "GET", f"/api/v1/submissions/{sid}")
    assert code == 200 and state == final
    # Events carry no request_id; only the direct answer echoes it.
    assert all("request_id" not in e for e in events)


async def test_live_output_arrives_while_the_stage_still_runs(
    connect: Connect, launch: Any, service: Any
) -> None:
    await launch()
    ws = await connect()
    answer = await ws.ask(
        {"type": "submit", "submission": {"run": "echo first; sleep 2; echo second"}}
    )
    sid = answer["id"]
    events = []
    while not (events and events[-1]["type"] == "output"):
        events.append(await ws.receive())
    assert events[-1]["data"] == "first\n" and events[-1]["stream"] == "stdout"
    # The program is still sleeping: the output came live, not with the stage's result.
    _, state = await http(service, "GET", f"/api/v1/submissions/{sid}")
    assert state["status"] == "running" and state["stage"] == "run" and state["ran"] is None
    events += await ws.events_until_finished()
    check_events(events, sid)
    kinds = [e["type"] for e in events]
    outputs = [e["data"] for e in events if e["type"] == "output"]
    assert "".join(outputs) == "first\nsecond\n"
    last_output = max(i for i, k in enumerate(kinds) if k == "output")
    assert last_output < kinds.index("stage_finished") < kinds.index("finished")


@pytest.mark.timeout(60)
async def test_watch_since_resumes_exactly_after_a_disconnect(
    connect: Connect, launch: Any, service: Any
) -> None:
    await launch()
    code, answer = await http(
        service,
        "POST",
        "/api/v1/submissions",
        {"run": "for i in 1 2 3 4 5 6; do echo $i; sleep 0.2; done"},
    )
    assert code == 201
    sid = answer["id"]
    first = await connect()
    await first.send({"type": "watch", "id": sid, "since": 0, "request_id": 7})
    seen = []
    while sum(e["type"] == "output" for e in seen) < 2:
        seen.append(await first.receive())
    await first.close()

    second = await connect()
    await second.send({"type": "watch", "id": sid, "since": seen[-1]["seq"]})
    rest = await second.events_until_finished()
    check_events(seen + rest, sid)
    assert "".join(e["data"] for e in seen + rest if e["type"] == "output") == "1\n2\n3\n4\n5\n6\n"

    # Watching from the middle of an ended submission replays its tail and stops there.
    third = await connect()
    await third.send({"type": "watch", "id": sid, "since": 3})
    assert await third.events_until_finished() == (seen + rest)[3:]
    await third.send({"type": "watch", "id": sid, "since": len(seen + rest)})
    status = await third.ask({"type": "status", "id": sid})
    assert status["type"] == "submission"  # nothing after the last event, and no error


async def test_status_answers_the_submission_document(connect: Connect, service: Any) -> None:
    ws = await connect()
    accepted = await ws.ask({"type": "submit", "submission": {"run": "true"}, "request_id": "a"})
    sid = accepted["id"]
    queued = await ws.receive()
    assert queued["type"] == "status" and queued["status"] == "queued" and queued["seq"] == 1
    answer = await ws.ask({"type": "status", "id": sid, "request_id": {"n": 1}})
    assert answer["type"] == "submission" and answer["request_id"] == {"n": 1}
    _, state = await http(service, "GET", f"/api/v1/submissions/{sid}")
    assert answer["submission"] == state and state["status"] == "queued"
    missing = await ws.ask({"type": "status", "id": "nosuch", "request_id": 2})
    assert missing["type"] == "error" and missing["code"] == "not_found"
    assert missing["request_id"] == 2


async def test_cancel_cancels_once(connect: Connect, service: Any) -> None:
    ws = await connect()
    sid = (await ws.ask({"type": "submit", "submission": {"run": "sleep 30"}}))["id"]
    assert (await ws.receive())["status"] == "queued"
    await ws.send({"type": "cancel", "id": sid, "request_id": "c"})
    # The answer, and the submission's last events from its relay, in either order.
    messages = [await ws.receive() for _ in range(3)]
    [answer] = [m for m in messages if m["type"] == "cancelled"]
    assert answer == {"type": "cancelled", "id": sid, "request_id": "c"}
    events = [m for m in messages if m is not answer]
    assert [(e["type"], e["seq"]) for e in events] == [("status", 2), ("finished", 3)]
    assert events[0]["status"] == "cancelled"
    assert events[1]["submission"]["status"] == "cancelled"
    _, state = await http(service, "GET", f"/api/v1/submissions/{sid}")
    assert state["status"] == "cancelled"
    again = await ws.ask({"type": "cancel", "id": sid})
    assert again["type"] == "error" and again["code"] == "conflict"


# -- malformed messages -----------------------------------------------------------------------

MALFORMED: list[tuple[str, Any, str | None]] = [
    ("not json", "{type: submit", None),
    ("empty", "", None),
    ("array", "[1, 2]", None),
    ("string", '"submit"', None),
    ("number", "3", None),
    ("no type", {"id": "x"}, "type"),
    ("unknown type", {"type": "explode"}, "type"),
    ("type not a string", {"type": ["submit"]}, "type"),
    ("submit without submission", {"type": "submit"}, "submission"),
    ("submission not an object", {"type": "submit", "submission": "echo"}, "submission"),
    ("submission without run", {"type": "submit", "submission": {}}, "run"),
    ("submission with a bad file", {"type": "submit", "submission": {
        "run": "true", "files": [{"name": "../x", "content": ""}]}}, "files[0].name"),
    ("watch without id", {"type": "watch"}, "id"),
    ("watch with an empty id", {"type": "watch", "id": ""}, "id"),
    ("negative since", {"type": "watch", "id": "x", "since": -1}, "since"),
    ("string since", {"type": "watch", "id": "x", "since": "3"}, "since"),
    ("bool since", {"type": "watch", "id": "x", "since": True}, "since"),
    ("float since", {"type": "watch", "id": "x", "since": 1.5}, "since"),
    ("status without id", {"type": "status"}, "id"),
    ("cancel with a number id", {"type": "cancel", "id": 5}, "id"),
]  # fmt: skip


async def test_malformed_messages_answer_errors_and_keep_the_connection(
    connect: Connect,
) -> None:
    ws = await connect()
    for name, message, field in MALFORMED:
        if isinstance(message, dict):
            message = {**message, "request_id": name}
        answer = await ws.ask(message)
        assert answer["type"] == "error", (name, answer)
        assert answer["code"] in ("invalid_request", "limit_exceeded"), (name, answer)
        assert answer["message"], name
        if field is not None:
            assert answer["request_id"] == name
            assert field in [d["field"] for d in answer["details"]], (name, answer)
    # Still usable after all that.
    accepted = await ws.ask({"type": "submit", "submission": {"run": "true"}, "request_id": 1})
    assert accepted["type"] == "accepted" and accepted["request_id"] == 1


async def test_a_limit_above_the_maximum_is_an_error_naming_it(connect: Connect) -> None:
    ws = await connect()
    answer = await ws.ask(
        {"type": "submit", "submission": {"run": "true", "limits": {"run": {"cpu": 10**6}}}}
    )
    assert answer["type"] == "error" and answer["code"] == "limit_exceeded"
    assert [d["field"] for d in answer["details"]] == ["limits.run.cpu"]


async def test_a_full_queue_is_an_error_and_accepts_nothing(connect: Connect, service: Any) -> None:
    ws = await connect()
    for i in range(50):
        await ws.send({"type": "submit", "submission": {"run": "true"}, "request_id": i})
    answers, queued = [], []
    while len(answers) + len(queued) < 100:
        message = await ws.receive()
        (queued if message["type"] == "status" else answers).append(message)
    assert [a["type"] for a in answers] == ["accepted"] * 50
    full = await ws.ask({"type": "submit", "submission": {"run": "true"}, "request_id": "x"})
    assert full["type"] == "error" and full["code"] == "queue_full" and full["request_id"] == "x"
    assert full["retry_after"] == 5  # what REST says in Retry-After
    _, listed = await http(service, "GET", "/api/v1/submissions?limit=100")
    assert {s["id"] for s in listed["submissions"]} == {a["id"] for a in answers}


# -- authentication and ownership -------------------------------------------------------------


async def test_a_bad_token_is_refused_with_401_before_the_upgrade(service: Any) -> None:
    for token in (None, "wrong", "alice-token-but-longer", ""):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        with pytest.raises(HTTPClientError) as raised:
            await tornado.websocket.websocket_connect(HTTPRequest(service.ws_url, headers=headers))
        assert raised.value.code == 401, token
        body = json.loads(raised.value.response.body)  # type: ignore[union-attr]
        assert body["error"]["code"] == "unauthorized"
        with pytest.raises(HTTPClientError) as raised:
            await tornado.websocket.websocket_connect(f"{service.ws_url}?token={token or ''}")
        assert raised.value.code == 401, token


async def test_a_request_that_is_no_websocket_upgrade_answers_the_error_body(
    service: Any,
) -> None:
    """Tornado's own answers were bare text, or empty (found by fuzzing)."""
    client = AsyncHTTPClient(force_instance=True)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "x"}
    try:
        for headers, code, error in (
            ({}, 400, "not_websocket"),
            ({**upgrade, "Connection": "keep-alive"}, 400, "not_websocket"),
            ({**upgrade, "Sec-WebSocket-Version": "12"}, 426, "websocket_version"),
        ):
            response = await client.fetch(
                f"{service.url}/api/v1/ws",
                headers={**headers, "Authorization": f"Bearer {ALICE}"},
                raise_error=False,
            )
            assert response.code == code, (headers, response.body)
            assert json.loads(response.body)["error"]["code"] == error
            if code == 426:
                assert response.headers["Sec-WebSocket-Version"] == "13"
    finally:
        client.close()


async def test_the_token_query_parameter_authenticates(connect: Connect, service: Any) -> None:
    ws = await connect(BOB, query=True)
    sid = (await ws.ask({"type": "submit", "submission": {"run": "true"}}))["id"]
    _, state = await http(service, "GET", f"/api/v1/submissions/{sid}", token=BOB)
    assert state["id"] == sid  # owned by bob, whose token was in the URL
    code, _ = await http(service, "GET", f"/api/v1/submissions/{sid}", token=ALICE)
    assert code == 404


async def test_others_submissions_look_unknown_over_the_socket(
    connect: Connect, service: Any
) -> None:
    _, answer = await http(service, "POST", "/api/v1/submissions", {"run": "true"})
    sid = answer["id"]
    bob = await connect(BOB)
    for kind in ("status", "watch", "cancel"):
        theirs = await bob.ask({"type": kind, "id": sid, "since": 0})
        unknown = await bob.ask({"type": kind, "id": "x" * len(sid), "since": 0})
        assert theirs["type"] == "error" and theirs["code"] == "not_found", kind
        unknown_message = unknown["message"].replace("x" * len(sid), "ID")
        assert theirs["message"].replace(sid, "ID") == unknown_message
    _, state = await http(service, "GET", f"/api/v1/submissions/{sid}")
    assert state["status"] == "queued"  # bob's cancel did nothing
    admin = await connect(ADMIN)
    answer = await admin.ask({"type": "status", "id": sid})
    assert answer["type"] == "submission" and answer["submission"]["id"] == sid
    await admin.send({"type": "watch", "id": sid, "since": 0})
    assert (await admin.receive())["seq"] == 1
    await admin.send({"type": "cancel", "id": sid})
    kinds = [(await admin.receive())["type"] for _ in range(3)]
    assert sorted(kinds) == ["cancelled", "finished", "status"]


# -- packages ---------------------------------------------------------------------------------


async def test_packages_answers_what_the_cache_holds(
    connect: Connect, service: Any, store: Any
) -> None:
    ws = await connect()
    assert await ws.ask({"type": "packages", "request_id": 1}) == {
        "type": "packages", "packages": [], "request_id": 1}  # fmt: skip
    hello = Package("hello", "2.12", "/nix/store/0000-hello-2.12")
    await EnvironmentCache(store).put(
        Environment(
            key="k1", names=("hello",), variables={}, closure=(hello.store_path,),
            packages=(hello,), store_path="/nix/store/1111-env",
            closure_sizes={hello.store_path: 4096},
        )
    )  # fmt: skip
    answer = await ws.ask({"type": "packages"})
    assert answer["type"] == "packages"
    [package] = answer["packages"]
    assert package["name"] == "hello" and package["version"] == "2.12"
    assert package["store_path"] == hello.store_path and package["size"] == 4096
    assert {"cached_at", "last_used", "uses"} <= package.keys()
    _, listed = await http(service, "GET", "/api/v1/packages")
    assert answer["packages"] == listed["packages"]
