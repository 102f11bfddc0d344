"""Workers killed or frozen under load, and a burst past the queue: every accepted submission
ends exactly once, finished, with its own output; every refused one was told when to retry."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from loadio import all_ended, check_each_finished_once, submit_load
from restio import ALICE, Rest
from serviceio import serving
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

pytestmark = pytest.mark.timeout(240)

SUBMISSIONS = 50


async def test_an_executor_killed_mid_work_loses_nothing(
    service: Any, launch: Any, until: Any
) -> None:
    doomed = await launch(slots=2)
    await launch(slots=2)
    rest = Rest(service.url)
    try:
        ids = await submit_load(rest, SUBMISSIONS, "sleep 0.3")
        await asyncio.sleep(1.5)  # both executors busy
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        await until(lambda: all_ended(rest, ids), "every submission to end", timeout=180)
        documents = await check_each_finished_once(rest, service.ws_url, ids)
        assert any(d["attempts"] > 1 for d in documents)  # some were reclaimed and run again
    finally:
        rest.close()


async def test_an_executor_frozen_past_its_lease_is_fenced_off_when_it_thaws(
    service: Any, launch: Any, until: Any
) -> None:
    """SIGSTOP while it holds jobs: after the lease (1.5 s) the other executor reclaims them;
    SIGCONT later, and the frozen one's late events are refused, its results never mixed in."""
    frozen = await launch(slots=1)
    rest = Rest(service.url)
    try:
        ids = await submit_load(rest, SUBMISSIONS, "sleep 1")
        await asyncio.sleep(1.2)  # it holds one
        frozen.proc.send_signal(signal.SIGSTOP)
        await launch(slots=2)
        await asyncio.sleep(6)
        frozen.proc.send_signal(signal.SIGCONT)
        await until(lambda: all_ended(rest, ids), "every submission to end", timeout=120)
        documents = await check_each_finished_once(rest, service.ws_url, ids)
        assert any(d["attempts"] > 1 for d in documents)
        await until(
            lambda: "events refused" in frozen.logs() or frozen.proc.poll() is not None,
            "the thawed executor to meet the fence", timeout=30,
        )  # fmt: skip
    finally:
        rest.close()


async def test_a_builder_killed_mid_build_hands_the_build_to_another(
    service: Any, launch: Any, start_builder: Any, until: Any
) -> None:
    doomed = start_builder()
    await doomed.started()
    await launch(slots=2)
    rest = Rest(service.url)
    try:
        body = {"dependencies": ["slow-example"], "run": "echo ran"}
        ids = [(await rest.call("POST", "/api/v1/submissions", body, expect=201))["id"]
               for _ in range(SUBMISSIONS)]  # fmt: skip
        await until(lambda: bool(doomed.events("build started")), "the build to start", timeout=60)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        other = start_builder()
        await other.started()
        await until(lambda: all_ended(rest, ids), "every submission to end", timeout=180)
        for sid in ids:
            state = await rest.call("GET", f"/api/v1/submissions/{sid}")
            assert state["status"] == "finished", state
            assert state["stages"]["deps"]["status"] == "ok", state
            assert state["stages"]["run"]["stdout"].endswith("ran\n"), state
        assert len(other.events("build ended")) == 1  # built once, for all of them
    finally:
        rest.close()


async def test_a_burst_past_the_queue_is_answered_201_or_429_with_retry_after(
    redis_url: str, tmp_path: Path, sandbox_root: Path
) -> None:
    """2,000 at once against a queue of 500 (no executor takes any): each answer is an
    acceptance or a refusal that says when to retry; exactly the queue's worth are accepted."""
    state = tmp_path / "burst"
    state.mkdir()
    async with serving(redis_url, state, sandbox_root, CELLBLOCK_QUEUE_SIZE="500") as service:
        http = AsyncHTTPClient(force_instance=True, max_clients=64)
        request = HTTPRequest(
            f"{service.url}/api/v1/submissions", method="POST", body='{"run": "true"}',
            headers={"Authorization": f"Bearer {ALICE}"}, request_timeout=120,
        )  # fmt: skip
        try:
            answers = await asyncio.gather(
                *(http.fetch(request, raise_error=False) for _ in range(2000))
            )
        finally:
            http.close()
    codes = [a.code for a in answers]
    assert set(codes) <= {201, 429}, sorted(set(codes))
    assert codes.count(201) == 500
    assert all(a.headers.get("Retry-After") for a in answers if a.code == 429)
