"""Load for the fault tests: many submissions in flight, each with an output of its own, and
the check that every accepted one ended exactly once, finished, with that output. (A module of
its own because test modules cannot import conftest.py.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import tornado.websocket
from restio import ALICE, Rest
from wsio import Socket


async def submit_load(
    rest: Rest, count: int, script: str = "sleep 0.2", dependencies: Sequence[str] = ()
) -> list[str]:
    """``count`` submissions, the i-th printing ``i``; their ids."""
    ids = []
    for i in range(count):
        body: dict[str, Any] = {"run": f"{script}; echo {i}"}
        if dependencies:
            body["dependencies"] = list(dependencies)
        ids.append((await rest.call("POST", "/api/v1/submissions", body, expect=201))["id"])
    return ids


async def all_ended(rest: Rest, ids: list[str], token: str = ALICE) -> bool:
    """Whether every submission has ended (not yet, while the service answers 503: its store
    is coming back)."""
    for sid in ids:
        response = await rest.request("GET", f"/api/v1/submissions/{sid}", token=token)
        if response.code == 503:
            return False
        assert response.code == 200, (response.code, response.body)
        if json.loads(response.body)["status"] not in ("finished", "error", "cancelled"):
            return False
    return True


async def check_each_finished_once(
    rest: Rest, ws_url: str, ids: list[str], token: str = ALICE
) -> list[Any]:
    """Every submission finished with its own output, and its events hold one ``finished``;
    the documents."""
    documents = []
    for i, sid in enumerate(ids):
        state = await rest.call("GET", f"/api/v1/submissions/{sid}", token=token)
        assert state["status"] == "finished", state
        assert state["stages"]["run"]["stdout"] == f"{i}\n", state
        ws = Socket(await tornado.websocket.websocket_connect(f"{ws_url}?token={token}"))
        try:
            await ws.send({"type": "watch", "id": sid, "since": 0})
            events = await ws.events_until_finished()
        finally:
            await ws.close()
        assert [e["type"] for e in events].count("finished") == 1
        documents.append(state)
    return documents
