"""Redis kept available by Sentinel: a master, a replica and three sentinels, with the master
killed (kill -9) under load. Every submission accepted before or during the failover ends
exactly once, finished, with its own output (admission waited until the replica had it); one
sent while no master answers is refused with 503 and Retry-After, never half-accepted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loadio import all_ended, check_each_finished_once, submit_load
from restio import Rest
from sentinelio import Sentinels

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    deployment = Sentinels(tmp_path)
    deployment.start()
    yield deployment
    deployment.stop()


@pytest.fixture
async def redis_url(sentinels: Sentinels) -> str:
    await sentinels.ready()
    return sentinels.url


async def test_a_master_killed_under_load_fails_over_and_loses_nothing(
    service: Any, launch: Any, sentinels: Sentinels, until: Any
) -> None:
    executor = await launch(slots=2)
    rest = Rest(service.url)
    try:
        ids = await submit_load(rest, 50)
        await asyncio.sleep(1.0)
        sentinels.kill(sentinels.master)
        killed = time.monotonic()
        # Submissions keep coming meanwhile: each is accepted, or refused and told to retry.
        codes: list[int] = []
        during: list[str] = []

        async def keep_submitting() -> None:
            while await sentinels.master_port() != sentinels.replica:
                answer = await rest.request(
                    "POST", "/api/v1/submissions", {"run": f"echo {len(ids) + len(during)}"}
                )
                codes.append(answer.code)
                if answer.code == 201:
                    during.append(json.loads(answer.body)["id"])
                else:
                    assert answer.code == 503 and answer.headers["Retry-After"], answer.body
                await asyncio.sleep(0.1)

        await asyncio.wait_for(keep_submitting(), 60)
        gap = time.monotonic() - killed
        every = ids + during
        await until(lambda: all_ended(rest, every), "every submission to end", timeout=150)
        await check_each_finished_once(rest, service.ws_url, every)
        assert executor.proc.poll() is None, executor.logs()
        print(f"failover: a new master after {gap:.1f} s; {codes.count(503)} refused, "
              f"{codes.count(201)} accepted meanwhile")  # fmt: skip
    finally:
        rest.close()
