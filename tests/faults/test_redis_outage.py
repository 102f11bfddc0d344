"""Redis away for ten seconds under load, with an executor and a builder started outside
``cellblock up`` (nothing would restart them): they wait it out and go on, the service answers 503
with Retry-After meanwhile and its health says Redis is down, and every accepted submission
ends exactly once, finished, with its own output."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import tornado.websocket
from restio import ALICE, Rest
from wsio import Socket

from cellblock.service.client import Client

pytestmark = pytest.mark.timeout(180)

SUBMISSIONS = 50
OUTAGE = 10.0


async def test_workers_outside_cellblock_up_wait_out_a_redis_outage(
    service: Any, launch: Any, start_builder: Any, redis_server: Any, until: Any
) -> None:
    executor = await launch(slots=2)
    builder = start_builder()
    await builder.started()
    rest, ws_url = Rest(service.url), service.ws_url
    try:
        ids = []
        for i in range(SUBMISSIONS):
            answer = await rest.call(
                "POST", "/api/v1/submissions", {"run": f"sleep 0.2; echo {i}"}, expect=201
            )
            ids.append(answer["id"])
        await asyncio.sleep(1.0)  # some done, some running, most queued
        client = Client(service.url, ALICE, reconnect_attempts=30)
        stream = client.stream({"run": "sleep 3; echo across"})
        followed = asyncio.create_task(_follow(stream))
        await asyncio.sleep(0.5)

        redis_server.kill()
        response = await rest.request("GET", f"/api/v1/submissions/{ids[0]}")
        assert response.code == 503 and response.headers["Retry-After"] == "5", response.body
        error = json.loads(response.body)["error"]
        assert error["code"] == "unavailable" and "Redis" in error["message"]
        health = await rest.request("GET", "/api/v1/health", token=None)
        assert health.code == 503 and json.loads(health.body)["down"] == ["redis"]
        await asyncio.sleep(OUTAGE)
        for worker in (executor, builder):  # neither died of it
            assert worker.proc.poll() is None, worker.logs()
        redis_server.start()

        async def all_ended() -> bool:
            states = [await rest.call("GET", f"/api/v1/submissions/{sid}") for sid in ids]
            return all(s["status"] in ("finished", "error", "cancelled") for s in states)

        await until(all_ended, "every submission to end", timeout=120)
        for i, sid in enumerate(ids):
            state = await rest.call("GET", f"/api/v1/submissions/{sid}")
            assert state["status"] == "finished", state
            assert state["stages"]["run"]["stdout"] == f"{i}\n", state
            ws = Socket(await tornado.websocket.websocket_connect(f"{ws_url}?token={ALICE}"))
            try:
                await ws.send({"type": "watch", "id": sid, "since": 0})
                events = await ws.events_until_finished()
            finally:
                await ws.close()
            assert [e["type"] for e in events].count("finished") == 1
        # A client that followed a submission across it resumed where its events stopped.
        events = await asyncio.wait_for(followed, 60)
        assert [e["type"] for e in events].count("finished") == 1
        assert stream.submission is not None
        assert stream.submission["stages"]["run"]["stdout"] == "across\n"
        assert stream.reconnects >= 1
        await client.close()
        for worker in (executor, builder):
            assert worker.proc.poll() is None, worker.logs()
            assert "store unreachable" in worker.logs() and "store reachable again" in worker.logs()
    finally:
        rest.close()


async def _follow(stream: Any) -> list[dict[str, Any]]:
    async with stream:
        return [event async for event in stream]
