"""The service process killed with SIGKILL under load, and another started in its place (as a
load balancer sends the clients to a second host's): every accepted submission ends exactly
once, finished, with its own output, and a client that followed one on the dead service
resumes on the new one. Nothing lived in the service: it was all in Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loadio import all_ended, check_each_finished_once, submit_load
from restio import ALICE, Rest

from cellblock.service.client import Client

pytestmark = pytest.mark.timeout(180)
StartService = Callable[[], tuple[subprocess.Popen[bytes], str]]


@pytest.fixture
def start_service(redis_url: str, tmp_path: Path) -> Iterator[StartService]:
    """``cellblock service`` processes on ``redis_url``, each on a port of its own."""
    started: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    env |= {"CELLBLOCK_TOKEN": ALICE, "CELLBLOCK_ADMIN_TOKEN": "admin-token"}

    def start() -> tuple[subprocess.Popen[bytes], str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        state = tmp_path / f"service-{len(started)}"
        state.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellblock", "service", "--redis", redis_url,
             "--port", str(port), "--state-dir", str(state)],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return proc, url
            assert proc.poll() is None and time.monotonic() < deadline, "no service came up"
            time.sleep(0.05)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_killed_service_loses_nothing_and_a_client_resumes_on_another(
    start_service: StartService, start_executor: Any, until: Any
) -> None:
    doomed, url = start_service()
    start_executor(slots=2)
    rest = Rest(url)
    ids = await submit_load(rest, 50)
    client = Client(url, ALICE, reconnect_attempts=30)
    stream = client.stream({"run": "for i in 1 2 3 4 5; do echo $i; sleep 0.4; done"})
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        async with stream:
            async for event in stream:
                seen.append(event)

    followed = asyncio.create_task(follow())
    await until(lambda: any(e["type"] == "output" for e in seen), "the stream's first output")
    doomed.kill()
    doomed.wait()
    rest.close()
    _, url = start_service()
    client.url = url  # the load balancer now sends this client to the other service
    rest = Rest(url)
    try:
        await asyncio.wait_for(followed, 60)
        assert stream.reconnects >= 1
        assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
        assert "".join(e["data"] for e in seen if e["type"] == "output") == "1\n2\n3\n4\n5\n"
        await until(lambda: all_ended(rest, ids), "every submission to end", timeout=120)
        await check_each_finished_once(rest, url.replace("http://", "ws://") + "/api/v1/ws", ids)
    finally:
        rest.close()
        await client.close()
