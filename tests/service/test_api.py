"""The REST API and its server-sent events, against the real service, Redis and executors.

Every test talks HTTP to the in-process service (tests/conftest.py) with Tornado's client; tests
that need a submission to run start real ``cellblock executor`` processes running real nsjail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
from restio import ADMIN, ALICE, BOB, Rest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from cellblock import config as config_module
from cellblock.service.auth import Principal, Tokens
from cellblock.service.protocol import FinishedEvent, StatusEvent, parse_submission
from cellblock.service.server import make_app
from cellblock.service.store import Rejected, Store

JSON_TYPE = "application/json; charset=utf-8"
MAX_BODY = 1024 * 1024  # CELLBLOCK_MAX_BODY_SIZE of the service fixture
QUEUE_SIZE = 50  # CELLBLOCK_QUEUE_SIZE of TEST_ENV
LIMITS = config_module.load(Path("/nonexistent"), environ={}).limits


# -- helpers ----------------------------------------------------------------------------------

Until = Callable[..., Awaitable[Any]]  # the until fixture of tests/conftest.py
Launch = Callable[..., Awaitable[Any]]  # the launch fixture of tests/conftest.py


class Api(Rest):
    """The REST client, with the waits these tests share."""

    content_type = JSON_TYPE

    def __init__(self, url: str, until: Until) -> None:
        super().__init__(url)
        self.until = until

    async def submit(self, request: dict[str, Any], token: str = ALICE) -> str:
        answer = await self.call("POST", "/api/v1/submissions", request, token=token, expect=201)
        assert answer["status"] == "queued"
        sid: str = answer["id"]
        return sid

    async def get(self, sid: str, token: str = ALICE) -> dict[str, Any]:
        state: dict[str, Any] = await self.call("GET", f"/api/v1/submissions/{sid}", token=token)
        return state

    async def wait_for(
        self, sid: str, what: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            state = await self.get(sid, token=ADMIN)
            return state if what(state) else None

        state: dict[str, Any] = await self.until(check, f"submission {sid} to change", timeout)
        return state

    async def running(self, sid: str, timeout: float = 20) -> dict[str, Any]:
        """Wait until the run stage of ``sid`` is running in a sandbox."""
        return await self.wait_for(
            sid, lambda s: s["status"] == "running" and s["stage"] == "run", timeout
        )

    async def ended(self, sid: str, timeout: float = 30) -> dict[str, Any]:
        return await self.wait_for(sid, lambda s: s["finished_at"] is not None, timeout)

    async def events(
        self, sid: str, query: str = "", token: str = ALICE, **kwargs: Any
    ) -> list[dict[str, Any]]:
        response = await self.request(
            "GET", f"/api/v1/submissions/{sid}/events{query}", token=token, **kwargs
        )
        assert response.code == 200, (response.code, response.body)
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return parse_sse(response.body.decode())

    async def executors(self) -> list[dict[str, Any]]:
        answer = await self.call("GET", "/api/v1/workers", token=ADMIN)
        return [w for w in answer["workers"] if w["kind"] == "executor"]


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Server-sent events as ``{"id", "event", "data"}`` (data decoded from JSON)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if fields:
            assert set(fields) == {"id", "event", "data"}, block
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def check_sequence(events: list[dict[str, Any]], sid: str, first: int = 1) -> None:
    """The protocol's guarantees on one submission's events, as the SSE stream carries them."""
    assert [int(e["id"]) for e in events] == list(range(first, first + len(events)))
    for e in events:
        assert e["data"]["seq"] == int(e["id"])
        assert e["data"]["type"] == e["event"]
        assert e["data"]["id"] == sid
    assert [e["event"] for e in events].count("finished") == 1
    assert events[-1]["event"] == "finished"


@pytest.fixture
async def api(service: Any, until: Until) -> AsyncIterator[Api]:
    client = Api(service.url, until)
    yield client
    client.close()


async def wait_exit(until: Until, proc: Any, timeout: float = 30) -> int:
    """The exit code of a process, waited for without blocking the event loop."""
    await until(lambda: proc.poll() is not None, f"process {proc.pid} to exit", timeout)
    code: int = proc.returncode
    return code


def sandboxed(argv: list[str]) -> list[int]:
    """Host pids of the processes whose command line is exactly ``argv``."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# -- submitting -------------------------------------------------------------------------------


async def test_post_answers_201_with_a_new_unguessable_id_and_queued(api: Api) -> None:
    response = await api.request("POST", "/api/v1/submissions", {"run": "true"})
    assert response.code == 201
    assert response.headers["Content-Type"] == JSON_TYPE
    first = json.loads(response.body)
    assert set(first) == {"id", "status"}
    assert first["status"] == "queued"
    second = await api.submit({"run": "true"})
    assert second != first["id"]
    for sid in (first["id"], second):
        # At least 128 random bits: 22 URL-safe base64 characters carry 132.
        assert len(sid) >= 22 and all(c.isalnum() or c in "-_" for c in sid)
    state = await api.get(first["id"])
    assert state["id"] == first["id"] and state["status"] == "queued"
    # No dependencies and no compile script: those are known at once; the rest is not.
    assert state["dependencies_installed"] is True and state["compiled"] is True
    assert state["picked_up"] is None and state["ran"] is None and state["worker"] is None
    assert state["stages"] == {"deps": None, "compile": None, "run": None}
    assert state["started_at"] is None and state["finished_at"] is None
    assert state["created_at"].endswith("Z") and state["error"] is None


async def test_wait_true_answers_the_finished_submission_with_real_output(
    api: Api, launch: Launch
) -> None:
    executor = await launch()
    request = {
        "files": [
            {"name": "src/greet.sh", "content": 'printf "%s|" "$GREETING" "$@"\n'},
            {"name": "data.bin", "content": "68690a", "encoding": "hex"},
            {
                "name": "b64.txt",
                "content": base64.b64encode(b"b64!").decode(),
                "encoding": "base64",
            },
        ],
        "compile": "cp src/greet.sh built.sh && echo compiled",
        "run": 'sh built.sh "$@"; cat data.bin b64.txt; read line; echo "stdin=$line"',
        "args": ["x y", "--fast", "$HOME"],
        "env": {"GREETING": "hello"},
        "stdin": "3 4\n",
    }
    response = await api.request("POST", "/api/v1/submissions?wait=true", request)
    assert response.code == 201, response.body
    state = json.loads(response.body)
    assert state["status"] == "finished", state
    assert state["worker"] == executor.worker_id and state["attempts"] == 1
    assert state["picked_up"] is True and state["compiled"] is True and state["ran"] is True
    assert state["stages"]["compile"]["status"] == "ok"
    assert state["stages"]["compile"]["stdout"] == "compiled\n"
    run = state["stages"]["run"]
    assert run["status"] == "ok" and run["exit_code"] == 0, run
    # Arguments arrive verbatim, never re-parsed by a shell ("$HOME" stays literal).
    assert run["stdout"] == "hello|x y|--fast|$HOME|hi\nb64!stdin=3 4\n"
    assert run["stdout_encoding"] == "utf8" and run["stderr"] == ""
    assert state["finished_at"] is not None
    # The answer is the submission exactly as GET answers it.
    assert await api.get(state["id"]) == state


async def test_wait_with_a_short_timeout_answers_the_unfinished_state(
    api: Api, launch: Launch
) -> None:
    await launch()
    started = time.monotonic()
    response = await api.request(
        "POST", "/api/v1/submissions?wait=true&timeout=0.5", {"run": "sleep 30"}
    )
    assert time.monotonic() - started < 10
    assert response.code == 201, response.body
    state = json.loads(response.body)
    assert state["status"] in ("queued", "running")
    assert state["finished_at"] is None and state["ran"] is None
    await api.call("DELETE", f"/api/v1/submissions/{state['id']}")


async def test_wait_without_an_executor_times_out_queued(api: Api) -> None:
    response = await api.request("POST", "/api/v1/submissions?wait=1&timeout=0", {"run": "true"})
    assert response.code == 201
    state = json.loads(response.body)
    assert state["status"] == "queued" and "stages" in state


async def test_a_bad_wait_timeout_is_422_and_accepts_nothing(api: Api, store: Store) -> None:
    for timeout in ("abc", "-1", "3601", "nan", "inf", ""):
        path = f"/api/v1/submissions?wait=true&timeout={timeout}"
        answer = await api.call("POST", path, {"run": "true"}, expect=422)
        assert answer["error"]["code"] == "invalid_request", timeout
        assert [d["field"] for d in answer["error"]["details"]] == ["timeout"], timeout
    # Checked before the submission is stored: nothing is left behind the 422s.
    assert (await api.call("GET", "/api/v1/submissions"))["submissions"] == []
    assert await store.queued() == 0


# -- reading ----------------------------------------------------------------------------------


async def test_list_answers_the_callers_own_newest_first_up_to_limit(api: Api) -> None:
    alice = [await api.submit({"run": f"echo {i}"}) for i in range(3)]
    bob = await api.submit({"run": "echo bob"}, token=BOB)

    listed = (await api.call("GET", "/api/v1/submissions"))["submissions"]
    assert [s["id"] for s in listed] == alice[::-1]
    assert listed[0] == await api.get(alice[-1])
    two = (await api.call("GET", "/api/v1/submissions?limit=2"))["submissions"]
    assert [s["id"] for s in two] == alice[:0:-1]
    mine = (await api.call("GET", "/api/v1/submissions", token=BOB))["submissions"]
    assert [s["id"] for s in mine] == [bob]
    # An admin lists its own by default, and everyone's on request.
    assert (await api.call("GET", "/api/v1/submissions", token=ADMIN))["submissions"] == []
    everyone = await api.call("GET", "/api/v1/submissions?all=true&limit=10", token=ADMIN)
    assert {s["id"] for s in everyone["submissions"]} == {*alice, bob}


async def test_a_bad_list_limit_is_422_naming_limit(api: Api) -> None:
    for limit in ("0", "1001", "abc", "-1", "2.5", ""):
        answer = await api.call("GET", f"/api/v1/submissions?limit={limit}", expect=422)
        assert [d["field"] for d in answer["error"]["details"]] == ["limit"], limit


async def test_get_of_an_unknown_id_is_404(api: Api) -> None:
    answer = await api.call("GET", "/api/v1/submissions/nosuchid", expect=404)
    assert answer["error"]["code"] == "not_found"


# -- cancelling -------------------------------------------------------------------------------


async def test_delete_cancels_a_queued_submission_once(api: Api, store: Store) -> None:
    sid = await api.submit({"run": "true"})
    assert await store.queued() == 1
    answer = await api.call("DELETE", f"/api/v1/submissions/{sid}")
    assert answer == {"id": sid, "status": "cancelled"}
    state = await api.get(sid)
    assert state["status"] == "cancelled" and state["finished_at"] is not None
    assert state["picked_up"] is None and state["ran"] is None
    assert await store.queued() == 0
    events = await api.events(sid)
    check_sequence(events, sid)
    assert [e["event"] for e in events] == ["status", "status", "finished"]
    assert events[1]["data"]["status"] == "cancelled"
    assert events[-1]["data"]["submission"] == state
    again = await api.call("DELETE", f"/api/v1/submissions/{sid}", expect=409)
    assert again["error"]["code"] == "conflict"
    # The refused cancel changed nothing.
    assert await api.get(sid) == state and len(await api.events(sid)) == 3


@pytest.mark.timeout(60)
async def test_delete_stops_a_running_stage(api: Api, launch: Launch, until: Until) -> None:
    executor = await launch(slots=1)
    # A command line no other test (or concurrent run) uses, to find the sandboxed process.
    duration = f"30.{uuid.uuid4().int % 10**9:09d}"
    sid = await api.submit({"run": f"sleep {duration}"})
    await api.running(sid)
    await until(lambda: sandboxed(["sleep", duration]), "the sandboxed sleep to start")

    answer = await api.call("DELETE", f"/api/v1/submissions/{sid}")
    assert answer == {"id": sid, "status": "cancelled"}
    state = await api.get(sid)
    assert state["status"] == "cancelled" and state["finished_at"] is not None
    # The executor notices, kills the stage and frees its only slot.
    await until(lambda: not sandboxed(["sleep", duration]), "the sleep to be killed", 10)
    await until(lambda: '"job cancelled"' in executor.logs(), "the executor to log it", 10)
    response = await api.request("POST", "/api/v1/submissions?wait=true", {"run": "echo next"})
    assert json.loads(response.body)["stages"]["run"]["stdout"] == "next\n"

    events = await api.events(sid)
    check_sequence(events, sid)
    kinds = [e["event"] for e in events]
    assert kinds[-2:] == ["status", "finished"] and events[-2]["data"]["status"] == "cancelled"
    # Nothing of the killed stage was published after the cancellation.
    assert "stage_finished" not in kinds
    assert events[-1]["data"]["submission"]["status"] == "cancelled"
    again = await api.call("DELETE", f"/api/v1/submissions/{sid}", expect=409)
    assert again["error"]["code"] == "conflict"


async def test_a_finished_event_after_a_cancel_is_refused(api: Api, store: Store) -> None:
    """The race of an executor that publishes its run's end just as a cancel lands, replayed
    step by step against the store the executor writes to."""
    sid = await api.submit({"run": "true"})
    await store.append(sid, StatusEvent(status="running", worker="w"))
    await api.call("DELETE", f"/api/v1/submissions/{sid}")
    with pytest.raises(Rejected):
        await store.append(sid, FinishedEvent(), attempt=1)
    assert [e["event"] for e in await api.events(sid)].count("finished") == 1


# -- server-sent events -----------------------------------------------------------------------


async def test_events_stream_a_whole_run_live_then_resume_with_since(
    api: Api, launch: Launch
) -> None:
    sid = await api.submit({"compile": "echo building", "run": "echo ran; echo oops >&2"})
    # The stream opens while the submission waits and follows it to its end.
    stream = asyncio.ensure_future(api.events(sid))
    await asyncio.sleep(0.2)
    assert not stream.done()
    executor = await launch()
    events = await asyncio.wait_for(stream, 30)
    check_sequence(events, sid)
    state = await api.get(sid)
    assert events[-1]["data"]["submission"] == state
    assert state["status"] == "finished" and state["worker"] == executor.worker_id

    kinds = [(e["event"], e["data"].get("stage") or e["data"].get("status")) for e in events]
    assert kinds[:2] == [("status", "queued"), ("status", "running")]
    compile_at = kinds.index(("stage_started", "compile"))
    run_at = kinds.index(("stage_started", "run"))
    assert compile_at < kinds.index(("stage_finished", "compile")) < run_at
    assert run_at < kinds.index(("stage_finished", "run")) < len(kinds) - 1
    output = {
        (e["data"]["stage"], e["data"]["stream"]): e["data"]["data"]
        for e in events
        if e["event"] == "output"
    }
    assert output == {("compile", "stdout"): "building\n", ("run", "stdout"): "ran\n",
                      ("run", "stderr"): "oops\n"}  # fmt: skip

    # Resuming: exactly the events after `since`, by query or by Last-Event-ID.
    assert await api.events(sid, "?since=3") == events[3:]
    assert await api.events(sid, headers={"Last-Event-ID": "3"}) == events[3:]
    assert await api.events(sid, "?since=5", headers={"Last-Event-ID": "1"}) == events[5:]
    assert await api.events(sid, "?since=0") == events
    assert await api.events(sid, f"?since={len(events) - 1}") == events[-1:]
    # Resuming after the last event (as a browser's EventSource does when the stream closes)
    # or beyond it: nothing more will ever come, so the stream ends, empty.
    after_last = await asyncio.gather(
        api.events(sid, f"?since={len(events)}", timeout=10),
        api.events(sid, headers={"Last-Event-ID": "1000"}, timeout=10),
    )
    assert after_last == [[], []]


async def test_events_with_a_bad_since_is_422(api: Api) -> None:
    sid = await api.submit({"run": "true"})
    for since in ("-1", "abc", "1.5"):
        path = f"/api/v1/submissions/{sid}/events"
        answer = await api.call("GET", f"{path}?since={since}", expect=422)
        assert [d["field"] for d in answer["error"]["details"]] == ["since"], since
        response = await api.request("GET", path, headers={"Last-Event-ID": since})
        assert response.code == 422 and response.headers["Content-Type"] == JSON_TYPE


async def test_events_since_beyond_any_stream_id_end_empty(api: Api, store: Store) -> None:
    """A ``since`` above the 64 bits of a Redis stream id answered 500 (found by fuzzing)."""
    sid = await api.submit({"run": "true"})
    await api.call("DELETE", f"/api/v1/submissions/{sid}")
    for since in (2**64 - 1, 10**40):
        assert await api.events(sid, f"?since={since}", timeout=10) == []
        assert await store.events(sid, since) == []


async def test_events_of_an_unknown_id_answer_404_as_json(api: Api) -> None:
    answer = await api.call("GET", "/api/v1/submissions/nosuch/events", expect=404)
    assert answer["error"]["code"] == "not_found"


@pytest.mark.timeout(60)
async def test_a_submission_quiet_for_longer_than_redis_reads_last_still_streams(
    api: Api, launch: Launch, service: Any
) -> None:
    """Six seconds without an event: longer than the Redis client's five-second read timeout,
    which once broke every blocking read of events (SSE, WebSocket relays, ?wait=true)."""
    await launch(slots=3)
    quiet = {"run": "echo early; sleep 6; echo late"}
    sid = await api.submit(quiet)
    ws = await websocket_connect(
        HTTPRequest(service.ws_url, headers={"Authorization": f"Bearer {ALICE}"})
    )

    async def over_websocket() -> list[dict[str, Any]]:
        await ws.write_message(json.dumps({"type": "submit", "submission": quiet}))
        messages = [json.loads(await ws.read_message())]  # type: ignore[arg-type]
        while messages[-1]["type"] != "finished":
            messages.append(json.loads(await ws.read_message()))  # type: ignore[arg-type]
        return messages

    try:
        sse, waited, relayed = await asyncio.wait_for(
            asyncio.gather(
                api.events(sid),
                api.request("POST", "/api/v1/submissions?wait=true", quiet),
                over_websocket(),
            ),
            40,
        )
    finally:
        ws.close()
    check_sequence(sse, sid)
    assert sse[-1]["data"]["submission"]["stages"]["run"]["stdout"] == "early\nlate\n"
    assert waited.code == 201, waited.body
    assert json.loads(waited.body)["stages"]["run"]["stdout"] == "early\nlate\n"
    assert relayed[0]["type"] == "accepted"
    assert relayed[-1]["submission"]["stages"]["run"]["stdout"] == "early\nlate\n"
    assert [m["seq"] for m in relayed[1:]] == list(range(1, len(relayed)))


async def test_a_client_leaving_an_event_stream_ends_it_quietly(
    api: Api, caplog: pytest.LogCaptureFixture, until: Until
) -> None:
    caplog.set_level(logging.INFO, logger="tornado")
    sid = await api.submit({"run": "true"})  # no executor: nothing more happens
    received: list[bytes] = []
    with pytest.raises(HTTPClientError) as raised:
        await api.http.fetch(
            f"{api.url}/api/v1/submissions/{sid}/events",
            headers={"Authorization": f"Bearer {ALICE}"},
            streaming_callback=received.append,
            request_timeout=0.5,
        )
    assert raised.value.code == 599 and b"event: status" in b"".join(received)

    def answered() -> list[logging.LogRecord]:
        return [
            r for r in caplog.records if f"GET /api/v1/submissions/{sid}/events" in r.getMessage()
        ]

    # The handler notices at its next keep-alive and ends, without an error.
    await until(answered, "the event stream's handler to end", 15)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_blocking_read_longer_than_five_seconds_answers_nothing(store: Store) -> None:
    sid = "quiet"
    await store.submit(sid, parse_submission({"run": "true"}, LIMITS), "alice")
    assert await store.events(sid, 1, block=5.5) == []


# -- health, workers and administration -------------------------------------------------------


async def test_health_needs_no_token_and_counts_executors_and_queue(
    api: Api, launch: Launch, until: Until
) -> None:
    health = await api.call("GET", "/api/v1/health", token=None)
    assert health == {"status": "ok", "executors": 0, "builders": 0, "queued": 0}
    await api.submit({"run": "true"})
    await api.submit({"run": "true"}, token=BOB)
    assert (await api.call("GET", "/api/v1/health", token=None))["queued"] == 2
    executor = await launch()
    health = await api.call("GET", "/api/v1/health", token=None)
    assert health["executors"] == 1
    await until(lambda: _health_queued_is(api, 0), "the executor to take the queued submissions")
    # An executor that stops unregisters at once.
    executor.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(until, executor.proc) == 0
    assert (await api.call("GET", "/api/v1/health", token=None))["executors"] == 0


async def _health_queued_is(api: Api, count: int) -> bool:
    return bool((await api.call("GET", "/api/v1/health", token=None))["queued"] == count)


async def test_workers_lists_live_executors_for_admins_only(
    api: Api, launch: Launch, until: Until
) -> None:
    assert await api.executors() == []
    executor = await launch(slots=2)
    [worker] = await api.executors()
    assert worker["id"] == executor.worker_id and worker["kind"] == "executor"
    assert worker["slots"] == 2 and worker["busy"] == 0
    assert worker["host"] and worker["started_at"].endswith("Z")
    assert worker["last_seen"].endswith("Z")
    sid = await api.submit({"run": "sleep 30"})
    await api.running(sid)

    async def busy() -> bool:
        return [w["busy"] for w in await api.executors()] == [1]

    await until(busy, "the executor to report a busy slot")
    await api.call("DELETE", f"/api/v1/submissions/{sid}")
    for token, code in ((ALICE, 403), (None, 401), ("wrong", 401)):
        answer = await api.call("GET", "/api/v1/workers", token=token, expect=code)
        assert answer["error"]["code"] == ("forbidden" if code == 403 else "unauthorized")


@pytest.mark.timeout(60)
async def test_delete_worker_drains_it_after_its_running_job(
    api: Api, launch: Launch, until: Until
) -> None:
    executor = await launch(slots=2)
    sid = await api.submit({"run": "sleep 2; echo done"})
    await api.running(sid)

    for token, code in ((ALICE, 403), (None, 401)):
        await api.call("DELETE", f"/api/v1/workers/{executor.worker_id}", token=token, expect=code)
    missing = await api.call("DELETE", "/api/v1/workers/no-such-worker", token=ADMIN, expect=404)
    assert missing["error"]["code"] == "not_found"
    answer = await api.call(
        "DELETE", f"/api/v1/workers/{executor.worker_id}", token=ADMIN, expect=202
    )
    assert answer == {"id": executor.worker_id, "status": "draining"}
    await until(lambda: '"draining"' in executor.logs(), "the executor to drain")
    later = await api.submit({"run": "echo later"})

    assert await wait_exit(until, executor.proc) == 0, executor.logs()
    # Its job finished before it exited: by this executor, in one attempt.
    state = await api.get(sid)
    assert state["status"] == "finished", state
    assert state["worker"] == executor.worker_id and state["attempts"] == 1
    assert state["stages"]["run"]["stdout"] == "done\n"
    # Work submitted while it drains is never stranded: a slot blocked on the queue as the
    # drain began may still take and run it; otherwise it waits for another executor.
    assert (await api.get(later))["status"] in ("queued", "finished")
    assert await api.executors() == []


async def test_scale_with_a_bad_body_is_422(api: Api) -> None:
    bad: list[tuple[Any, str]] = [
        ([], ""),
        ({}, ""),
        ("executors", ""),
        ({"executors": -1}, "executors"),
        ({"executors": 65}, "executors"),
        ({"executors": True}, "executors"),
        ({"executors": "2"}, "executors"),
        ({"executors": 1.5}, "executors"),
        ({"builders": None}, "builders"),
        ({"workers": 1}, "workers"),
    ]
    for body, field in bad:
        answer = await api.call("POST", "/api/v1/admin/scale", body, token=ADMIN, expect=422)
        assert answer["error"]["code"] == "invalid_request", body
        assert [d["field"] for d in answer["error"]["details"]] == [field], body


async def test_scale_needs_a_supervised_deployment_and_an_admin(api: Api) -> None:
    answer = await api.call(
        "POST", "/api/v1/admin/scale", {"executors": 2, "builders": 1}, token=ADMIN, expect=409
    )
    assert answer["error"]["code"] == "not_supervised"
    answer = await api.call("POST", "/api/v1/admin/scale", {"executors": 2}, expect=403)
    assert answer["error"]["code"] == "forbidden"
    answer = await api.call(
        "POST", "/api/v1/admin/scale", raw=b"{executors", token=ADMIN, expect=400
    )
    assert answer["error"]["code"] == "invalid_json"


async def test_an_unknown_path_is_a_404_json_error(api: Api) -> None:
    for method, path in (
        ("GET", "/api/v1/nothing"),
        ("GET", "/"),
        ("POST", "/api/v2/submissions"),
        ("GET", "/api/v1/submissions/a/b"),
        ("DELETE", "/api/v1/health/x"),
    ):
        answer = await api.call(method, path, token=None, expect=404)
        assert answer["error"]["code"] == "not_found", path
        assert path in answer["error"]["message"]


async def test_a_method_an_endpoint_lacks_is_a_405_json_error(api: Api) -> None:
    answer = await api.call("PUT", "/api/v1/submissions", {"run": "true"}, expect=405)
    assert answer["error"]["message"]


# -- bad input --------------------------------------------------------------------------------


async def test_a_body_that_is_not_json_is_400(api: Api, store: Store) -> None:
    for raw in (b"{not json", b'{"run": "true"', b"\xff\xfe\x00", b'{"run": "true"} extra'):
        answer = await api.call("POST", "/api/v1/submissions", raw=raw, expect=400)
        assert answer["error"]["code"] == "invalid_json", raw
    assert await store.queued() == 0


async def test_a_body_over_the_limit_is_413_with_content_length(api: Api, store: Store) -> None:
    # Exactly at the limit is accepted; one byte more is refused before it is read.
    head = b'{"run": "true", "stdin": "'
    exact = head + b"x" * (MAX_BODY - len(head) - 2) + b'"}'
    assert len(exact) == MAX_BODY
    await api.call("POST", "/api/v1/submissions", raw=exact, expect=201)
    over = head + b"x" * (MAX_BODY - len(head) - 1) + b'"}'
    answer = await api.call("POST", "/api/v1/submissions", raw=over, expect=413)
    assert answer["error"]["code"] == "body_too_large"
    assert await store.queued() == 1


async def test_a_chunked_body_over_the_limit_is_413(api: Api, store: Store) -> None:
    body = json.dumps({"run": "true", "stdin": "x" * MAX_BODY}).encode()

    async def produce(write: Callable[[bytes], Awaitable[None]]) -> None:
        for start in range(0, len(body), 64 * 1024):
            await write(body[start : start + 64 * 1024])

    # Without a Content-Length header Tornado's client sends the body chunked.
    response = await api.request("POST", "/api/v1/submissions", body_producer=produce)
    assert response.code == 413, (response.code, response.body)
    assert json.loads(response.body)["error"]["code"] == "body_too_large"
    assert await store.queued() == 0

    small = json.dumps({"run": "true"}).encode()

    async def produce_small(write: Callable[[bytes], Awaitable[None]]) -> None:
        await write(small[:5])
        await write(small[5:])

    response = await api.request("POST", "/api/v1/submissions", body_producer=produce_small)
    assert response.code == 201, response.body


SCHEMA_PROBLEMS: list[tuple[str, dict[str, Any], str]] = [
    ("missing run", {}, "run"),
    ("blank run", {"run": "  "}, "run"),
    ("run not a string", {"run": ["ls"]}, "run"),
    ("unknown field", {"run": "true", "bogus": 1}, "bogus"),
    ("files not a list", {"run": "true", "files": "a.c"}, "files"),
    ("absolute name", {"run": "true", "files": [{"name": "/etc/passwd", "content": ""}]},
     "files[0].name"),
    ("dot-dot name", {"run": "true", "files": [{"name": "a/../../b", "content": ""}]},
     "files[0].name"),
    ("empty name", {"run": "true", "files": [{"name": "", "content": ""}]}, "files[0].name"),
    ("repeated name", {"run": "true", "files": [{"name": "a", "content": ""},
                                               {"name": "a", "content": "x"}]}, "files[1].name"),
    ("unknown encoding", {"run": "true", "files": [{"name": "a", "content": "",
                                                    "encoding": "rot13"}]}, "files[0].encoding"),
    ("bad hex", {"run": "true", "files": [{"name": "a", "content": "zz", "encoding": "hex"}]},
     "files[0].content"),
    ("bad base64", {"run": "true", "files": [{"name": "a", "content": "!!", "encoding": "base64"}]},
     "files[0].content"),
    ("executable not a bool", {"run": "true", "files": [{"name": "a", "content": "",
                                                         "executable": "yes"}]},
     "files[0].executable"),
    ("bad dependency", {"run": "true", "dependencies": ["gcc", "rm -rf /"]}, "dependencies[1]"),
    ("bad stdin", {"run": "true", "stdin": "zz", "stdin_encoding": "hex"}, "stdin"),
    ("bad env name", {"run": "true", "env": {"1X": "v"}}, "env"),
    ("arg not a string", {"run": "true", "args": ["a", 1]}, "args[1]"),
    ("negative limit", {"run": "true", "limits": {"run": {"cpu": -1}}}, "limits.run.cpu"),
    ("string limit", {"run": "true", "limits": {"run": {"nofile": "10"}}}, "limits.run.nofile"),
    ("float limit", {"run": "true", "limits": {"compile": {"as": 1.5}}}, "limits.compile.as"),
    ("zero wall time", {"run": "true", "limits": {"run": {"wall_time": 0}}},
     "limits.run.wall_time"),
    ("unknown limit", {"run": "true", "limits": {"run": {"bogus": 1}}}, "limits.run.bogus"),
    ("unknown stage", {"run": "true", "limits": {"deploy": {"cpu": 1}}}, "limits.deploy"),
    ("soft above hard", {"run": "true", "limits": {"run": {"nofile": [10, 5]}}},
     "limits.run.nofile"),
]  # fmt: skip


async def test_a_request_outside_the_schema_is_422_naming_the_field(api: Api, store: Store) -> None:
    wrong = []
    for name, body, field in SCHEMA_PROBLEMS:
        response = await api.request("POST", "/api/v1/submissions", body)
        error = json.loads(response.body)["error"] if response.code == 422 else {}
        if not (
            error.get("code") == "invalid_request"
            and field in [d["field"] for d in error["details"]]
            and all(d["message"] for d in error["details"])
            and error["message"]
        ):
            wrong.append(f"{name}: {response.code} {response.body!r}")
    assert wrong == []
    assert await store.queued() == 0


async def test_a_body_that_is_not_an_object_is_422(api: Api) -> None:
    for body in ([], "run", 3, None):
        raw = json.dumps(body).encode()
        answer = await api.call("POST", "/api/v1/submissions", raw=raw, expect=422)
        assert [d["field"] for d in answer["error"]["details"]] == [""], body


async def test_a_limit_above_the_maximum_is_422_naming_field_value_and_maximum(
    api: Api, store: Store
) -> None:
    for stage, name in (("run", "cpu"), ("compile", "nproc"), ("run", "wall_time"),
                        ("run", "memory"), ("compile", "output")):  # fmt: skip
        maxima = LIMITS.stage(stage).maxima
        maximum = maxima.rlimits[name][1] if name in maxima.rlimits else getattr(maxima, name)
        value = int(maximum) + 1
        request = {"run": "true", "limits": {stage: {name: value}}}
        answer = await api.call("POST", "/api/v1/submissions", request, expect=422)
        error = answer["error"]
        assert error["code"] == "limit_exceeded"
        [detail] = error["details"]
        assert detail["field"] == f"limits.{stage}.{name}"
        assert detail["message"].startswith(str(value))
        assert str(int(maximum)) in detail["message"].removeprefix(str(value))
        assert await store.queued() == 0
        # At the maximum itself it is accepted, never silently lowered.
        request = {"run": "true", "limits": {stage: {name: maximum}}}
        sid = await api.submit(request)
        await api.call("DELETE", f"/api/v1/submissions/{sid}")


async def test_a_full_queue_answers_429_with_retry_after_and_accepts_nothing(
    api: Api, store: Store
) -> None:
    ids = await asyncio.gather(*(api.submit({"run": "true"}) for _ in range(QUEUE_SIZE)))
    assert len(set(ids)) == QUEUE_SIZE
    response = await api.request("POST", "/api/v1/submissions", {"run": "echo one too many"})
    assert response.code == 429, response.body
    assert int(response.headers["Retry-After"]) > 0
    assert json.loads(response.body)["error"]["code"] == "queue_full"
    waited = await api.request("POST", "/api/v1/submissions?wait=true", {"run": "true"})
    assert waited.code == 429 and "Retry-After" in waited.headers

    listed = (await api.call("GET", "/api/v1/submissions?limit=100"))["submissions"]
    assert {s["id"] for s in listed} == set(ids)
    assert await store.queued() == QUEUE_SIZE
    assert (await store.counters())["submitted"] == QUEUE_SIZE
    assert (await api.call("GET", "/api/v1/health", token=None))["queued"] == QUEUE_SIZE
    # A place freed is a place taken.
    await api.call("DELETE", f"/api/v1/submissions/{ids[0]}")
    await api.submit({"run": "true"})
    assert await store.queued() == QUEUE_SIZE


# -- tests and output files (v1.1) -----------------------------------------------------------

SUM = {"files": [{"name": "sum.sh", "content": "read n; echo $((n * 2))\n"}], "run": "sh sum.sh"}


def graded(*tests: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**SUM, "tests": list(tests), **fields}


def case(name: str = "small", **fields: Any) -> dict[str, Any]:
    return {"name": name, "stdin": "3\n", "expected_output": "6\n", **fields}


#: Issue 12's "Bad input", and the rest that tests, checker and outputs can get wrong: each is
#: 422 naming its field.
GRADING_PROBLEMS: list[tuple[str, dict[str, Any], str]] = [
    ("duplicate test name", graded(case("a"), case("b"), case("a")), "tests[2].name"),
    ("more tests than the cap", graded(*(case(f"t{i}", limits={"wall_time": 1})
                                         for i in range(201))), "tests"),
    ("bad stdin_encoding with stdin", graded(case(stdin="3\n", stdin_encoding="rot13")),
     "tests[0].stdin_encoding"),
    ("stdin not of its encoding", graded(case(stdin="zz", stdin_encoding="hex")),
     "tests[0].stdin"),
    ("unknown compare", graded(case(compare="diff")), "tests[0].compare"),
    ("number without tolerance", graded(case(compare="number")), "tests[0].compare"),
    ("bad tolerance", graded(case(compare="number:abc")), "tests[0].compare"),
    ("negative tolerance", graded(case(compare="number:-1")), "tests[0].compare"),
    ("negative points", graded(case("a"), case("b", points=-1)), "tests[1].points"),
    ("absolute outputs pattern", {**SUM, "outputs": ["/etc/passwd"]}, "outputs[0]"),
    ("dot-dot outputs pattern", {**SUM, "outputs": ["ok.png", "../*.png"]}, "outputs[1]"),
    ("tests without run", {"tests": [case()]}, "run"),
    ("checker without tests", {**SUM, "checker": "./check"}, "checker"),
    ("empty tests", graded(), "tests"),
    ("test without a name", graded({"stdin": "3\n"}), "tests[0].name"),
    ("unknown test field", graded(case(timeout=3)), "tests[0].timeout"),
    ("malformed test limit", graded(case(limits={"cpu": -1})), "tests[0].limits.cpu"),
    ("unknown test limit", graded(case(limits={"bogus": 1})), "tests[0].limits.bogus"),
    ("tests' wall times over the cap",
     graded(*(case(f"t{i}", limits={"wall_time": 100}) for i in range(21))), "tests"),
]  # fmt: skip


async def test_each_bad_grading_input_is_422_naming_the_field(api: Api, store: Store) -> None:
    wrong = []
    for name, body, field in GRADING_PROBLEMS:
        response = await api.request("POST", "/api/v1/submissions", body)
        error = json.loads(response.body)["error"] if response.code == 422 else {}
        if not (
            error.get("code") == "invalid_request"
            and [d["field"] for d in error["details"]] == [field]
            and all(d["message"] for d in error["details"])
            and error["message"].startswith(f"{field}: ")
        ):
            wrong.append(f"{name}: {response.code} {response.body!r}")
    assert wrong == []
    assert await store.queued() == 0
    assert (await api.call("GET", "/api/v1/submissions"))["submissions"] == []


async def test_a_tests_limit_over_the_maximum_is_422_naming_it(api: Api, store: Store) -> None:
    ceiling = LIMITS.run.maxima.rlimits["cpu"][1]
    assert ceiling is not None
    body = graded(case("a"), case("b", limits={"cpu": ceiling + 1}))
    answer = await api.call("POST", "/api/v1/submissions", body, expect=422)
    assert answer["error"]["code"] == "limit_exceeded"
    assert answer["error"]["details"] == [
        {"field": "tests[1].limits.cpu", "message": f"{ceiling + 1} exceeds the maximum {ceiling}"}
    ]
    assert await store.queued() == 0


async def test_a_submission_with_tests_is_accepted_and_shows_its_tests_while_queued(
    api: Api,
) -> None:
    body = graded(
        case("small", points=2),
        case("mean", stdin="2\n", args=["--mean"], expected_output="4", compare="tokens"),
        case("big", limits={"cpu": 1, "wall_time": 2}, compare="number:1e-6"),
        {"name": "no stdin"},
        checker='test "$(cat "$CB_ACTUAL")" = "$(cat "$CB_EXPECTED")"',
        outputs=["plot.png", "results/*.csv"],
    )
    response = await api.request("POST", "/api/v1/submissions", body)
    assert response.code == 201, response.body
    answer = json.loads(response.body)
    assert set(answer) == {"id", "status"} and answer["status"] == "queued"
    state = await api.get(answer["id"])
    assert state["status"] == "queued"
    assert state["stages"] == {"deps": None, "compile": None, "run": None,
                               "tests": [None, None, None, None]}  # fmt: skip
    assert state["score"] == {"passed": 0, "total": 4, "points": 0.0, "max_points": 5.0}
    # The list answers the same document.
    [listed] = (await api.call("GET", "/api/v1/submissions"))["submissions"]
    assert listed == state
    # A cancel while queued gives every test its result: skipped.
    await api.call("DELETE", f"/api/v1/submissions/{answer['id']}")
    cancelled = await api.get(answer["id"])
    assert [t["verdict"] for t in cancelled["stages"]["tests"]] == ["skipped"] * 4
    assert [t["name"] for t in cancelled["stages"]["tests"]] == [
        "small", "mean", "big", "no stdin"]  # fmt: skip
    assert cancelled["score"] == state["score"]
    events = await api.events(answer["id"])
    assert events[-1]["data"]["submission"] == cancelled


async def test_a_submission_without_tests_has_no_score(api: Api) -> None:
    state = await api.get(await api.submit({"run": "true", "outputs": ["out.txt"]}))
    assert "score" not in state and "tests" not in state["stages"]


@pytest.fixture
async def small_caps(
    redis_url: str, tmp_path: Path, sandbox_root: Path, until: Until
) -> AsyncIterator[Api]:
    """The real service configured with small grading caps, as an administrator would
    (``CELLBLOCK_GRADING__*``): its client."""
    env = {
        "CELLBLOCK_GRADING__MAX_TESTS": "3",
        "CELLBLOCK_GRADING__MAX_TESTS_WALL_TIME": "5",
        "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
    }
    state = tmp_path / "capped-state"
    state.mkdir()
    cfg = config_module.load(state, environ=env)
    assert (cfg.limits.grading.max_tests, cfg.limits.grading.max_tests_wall_time) == (3, 5.0)
    store = Store.connect(redis_url, retention=cfg.retention, queue_size=cfg.queue_size)
    await store.jobs.ensure_group()
    tokens = Tokens({ALICE: Principal("alice", "client"), ADMIN: Principal("admin", "admin")})
    server = tornado.httpserver.HTTPServer(make_app(store, cfg, tokens))
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets([sock])
    client = Api(f"http://127.0.0.1:{sock.getsockname()[1]}", until)
    yield client
    client.close()
    server.stop()
    await server.close_all_connections()
    await store.close()


async def test_the_configured_caps_on_tests_take_effect(small_caps: Api) -> None:
    api = small_caps
    tiny = {"wall_time": 1}
    four = graded(*(case(f"t{i}", limits=tiny) for i in range(4)))
    answer = await api.call("POST", "/api/v1/submissions", four, expect=422)
    [detail] = answer["error"]["details"]
    assert detail["field"] == "tests"
    assert "4 tests are more than the 3" in detail["message"]
    # At the cap it is accepted.
    sid = await api.submit(graded(*(case(f"t{i}", limits=tiny) for i in range(3))))
    assert len((await api.get(sid))["stages"]["tests"]) == 3
    # The wall-time cap too: the run stage's default (10 s) alone is over 5 s.
    answer = await api.call("POST", "/api/v1/submissions", graded(case()), expect=422)
    [detail] = answer["error"]["details"]
    assert detail["field"] == "tests"
    assert "over the 5 s" in detail["message"]
    await api.submit(graded(case("a", limits={"wall_time": 2}), case("b", limits={"wall_time": 3})))


# -- executors failing and stopping -----------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_killed_executors_job_is_finished_by_another_once(api: Api, launch: Launch) -> None:
    first = await launch(slots=1)
    sid = await api.submit({"run": "sleep 3; echo done"})
    await api.running(sid)
    second = await launch(slots=1)
    holder, spare = (first, second)
    state = await api.get(sid)
    assert state["worker"] == holder.worker_id and state["attempts"] == 1

    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=10)
    state = await api.ended(sid, timeout=40)
    assert state["status"] == "finished", state
    assert state["attempts"] == 2 and state["worker"] == spare.worker_id
    assert state["stages"]["run"]["stdout"] == "done\n"

    events = await api.events(sid)
    check_sequence(events, sid)
    running = [e["data"] for e in events if e["data"].get("status") == "running"]
    assert [e["worker"] for e in running] == [holder.worker_id, spare.worker_id]
    assert events[-1]["data"]["submission"] == state


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue  # gone meanwhile
        if fields.get("PPid", "").strip() == str(pid) and fields["State"][0] not in "ZX":
            children.append(int(status.parent.name))
    return children


@pytest.mark.timeout(90)
async def test_a_killed_executor_leaves_no_jail_behind(
    api: Api, launch: Launch, until: Until
) -> None:
    """A submission's tests run in nsjail processes that make jail after jail: were they to
    outlive their executor, they would go on doing so for nobody. Killed mid-test, the executor
    takes them all with it (nsjail is told to end with its parent)."""
    holder = await launch(slots=1)
    tests = [{"name": f"t{i}", "stdin": "", "limits": {"wall_time": 5}} for i in range(6)]
    sid = await api.submit({"run": "sleep 2", "tests": tests})
    await api.running(sid)
    await until(lambda: len(children_of(holder.proc.pid)) >= 2, "the tests' series of jails")
    jails = children_of(holder.proc.pid)
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=10)
    await until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in jails),
        "every nsjail of the killed executor to end",
        timeout=10,
    )


@pytest.mark.timeout(60)
async def test_sigterm_drains_an_executor_after_its_running_job(
    api: Api, launch: Launch, until: Until
) -> None:
    executor = await launch(slots=1)
    sid = await api.submit({"run": "sleep 1.5; echo done"})
    await api.running(sid)
    executor.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(until, executor.proc) == 0, executor.logs()
    state = await api.get(sid)
    assert state["status"] == "finished" and state["attempts"] == 1
    assert state["worker"] == executor.worker_id
    assert state["stages"]["run"]["stdout"] == "done\n"
    assert await api.executors() == []


@pytest.mark.timeout(60)
async def test_a_job_over_the_attempts_cap_ends_in_error(api: Api, launch: Launch) -> None:
    first = await launch(slots=1, CELLBLOCK_MAX_ATTEMPTS="1")
    sid = await api.submit({"run": "sleep 10; echo never"})
    await api.running(sid)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    await launch(slots=1, CELLBLOCK_MAX_ATTEMPTS="1")
    state = await api.ended(sid, timeout=30)
    assert state["status"] == "error", state
    assert "attempts" in state["error"]
    assert state["stages"]["run"] is None and state["attempts"] == 1
    events = await api.events(sid)
    check_sequence(events, sid)
    assert events[-2]["data"]["status"] == "error"


def test_helpers_detect_a_bad_event_sequence() -> None:
    """check_sequence is what most event tests rest on: it must be able to fail."""
    event = {"id": "2", "event": "finished", "data": {"seq": 2, "type": "finished", "id": "s"}}
    with pytest.raises(AssertionError):
        check_sequence([event], "s")  # starts at 2: a gap
    with pytest.raises(AssertionError):
        check_sequence([{**event, "id": "1", "data": {**event["data"], "seq": 1}}] * 2, "s")


@pytest.mark.timeout(60)
async def test_cancelling_during_a_test_marks_the_tests_that_did_not_run_skipped(
    api: Api, launch: Launch, until: Until
) -> None:
    await launch(slots=1)
    duration = f"30.{uuid.uuid4().int % 10**9:09d}"
    sid = await api.submit({
        "run": f'read how; if [ "$how" = slow ]; then sleep {duration}; fi; echo ok',
        "tests": [{"name": "quick", "stdin": "quick\n", "expected_output": "ok\n", "points": 2},
                  {"name": "slow", "stdin": "slow\n"}, {"name": "never", "stdin": "x\n"}],
    })  # fmt: skip
    await until(lambda: sandboxed(["sleep", duration]), "the slow test to start")
    await api.call("DELETE", f"/api/v1/submissions/{sid}")
    await until(lambda: not sandboxed(["sleep", duration]), "the slow test to be killed", 10)
    state = await api.get(sid)
    assert state["status"] == "cancelled"
    assert [(t["name"], t["verdict"]) for t in state["stages"]["tests"]] == [
        ("quick", "passed"), ("slow", "skipped"), ("never", "skipped")
    ]  # fmt: skip
    assert "cancelled" in state["stages"]["tests"][2]["message"]
    assert state["score"] == {"passed": 1, "total": 3, "points": 2.0, "max_points": 4.0}
    events = await api.events(sid)
    assert events[-1]["data"]["submission"]["stages"]["tests"] == state["stages"]["tests"]
