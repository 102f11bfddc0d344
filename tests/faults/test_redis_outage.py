"""Redis away for ten seconds under load, with an executor and a builder started outside
``cellblock up`` (nothing would restart them): they wait it out and go on, the service answers 503
with Retry-After meanwhile and its health says Redis is down, and every accepted submission
ends exactly once, finished, with its own output."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from loadio import all_ended, check_each_finished_once, submit_load
from restio import ALICE, Rest

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
        ids = await submit_load(rest, SUBMISSIONS)
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

        await until(lambda: all_ended(rest, ids), "every submission to end", timeout=120)
        await check_each_finished_once(rest, ws_url, ids)
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
