"""Two service processes behind one Redis, as on two hosts: each sees every submission's events
whichever took it, and a client that loses the one it followed a submission on resumes on the
other where its events stopped. (A service keeps no state of its own: everything is in Redis.)"""

from __future__ import annotations

from typing import Any

import pytest
import tornado.websocket
from loadio import all_ended, check_each_finished_once
from restio import ALICE, Rest
from wsio import Socket

pytestmark = pytest.mark.timeout(120)


async def test_each_service_sees_every_submission_and_a_client_resumes_on_the_other(
    service: Any, second_service: Any, launch: Any, until: Any
) -> None:
    await launch(slots=2)
    first, second = Rest(service.url), Rest(second_service.url)
    try:
        ids = []
        for i in range(50):
            to = first if i % 2 else second
            body = {"run": f"sleep 0.1; echo {i}"}
            ids.append((await to.call("POST", "/api/v1/submissions", body, expect=201))["id"])
        await until(lambda: all_ended(first, ids), "every submission to end", timeout=90)
        # Each service answers for every submission, and relays every one's events.
        await check_each_finished_once(first, service.ws_url, ids)
        await check_each_finished_once(second, second_service.ws_url, ids)

        # Followed on the first, which goes away mid-way; resumed on the second.
        ws = Socket(await tornado.websocket.websocket_connect(f"{service.ws_url}?token={ALICE}"))
        answer = await ws.ask({"type": "submit", "submission": {
            "run": "for i in 1 2 3 4 5 6; do echo $i; sleep 0.2; done"}})  # fmt: skip
        sid, seen = answer["id"], []
        while sum(e.get("type") == "output" for e in seen) < 2:
            message = await ws.receive()
            if "seq" in message:
                seen.append(message)
        await ws.close()
        other = Socket(
            await tornado.websocket.websocket_connect(f"{second_service.ws_url}?token={ALICE}")
        )
        try:
            await other.send({"type": "watch", "id": sid, "since": seen[-1]["seq"]})
            rest = await other.events_until_finished()
        finally:
            await other.close()
        events = seen + rest
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert "".join(e["data"] for e in events if e["type"] == "output") == "1\n2\n3\n4\n5\n6\n"
    finally:
        first.close()
        second.close()
