"""Redis kept available by Sentinel: a master, a replica and three sentinels, with the master
killed (kill -9) under load. Every submission accepted before or during the failover ends
exactly once, finished, with its own output (admission waited until the replica had it); one
sent while no master answers is refused with 503 and Retry-After, never half-accepted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from loadio import all_ended, check_each_finished_once, submit_load
from restio import Rest

pytestmark = pytest.mark.timeout(240)
SERVICE = "cellblock"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sentinels:
    """A master, a replica of it and three sentinels watching them, on loopback TCP ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        for port, more in ((self.master, []), (self.replica, ["--replicaof", "127.0.0.1",
                                                                 str(self.master)])):  # fmt: skip
            data = self.directory / f"redis-{port}"
            data.mkdir()
            self.procs[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always", *more],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.sentinels:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            self.procs[port] = subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL
            )

    async def ready(self) -> None:
        """Until the replica is in sync and every sentinel knows it."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                async with aioredis.Redis(port=self.master) as master:
                    info = await master.info("replication")
                known = []
                for port in self.sentinels:
                    async with aioredis.Redis(port=port, decode_responses=True) as sentinel:
                        known.append(
                            await sentinel.execute_command("SENTINEL", "REPLICAS", SERVICE)
                        )
                if info.get("connected_slaves") == 1 and all(known):
                    return
            await asyncio.sleep(0.2)
        pytest.fail("the replica and the sentinels did not come up")

    async def master_port(self) -> int | None:
        sentinel = aioredis.Redis(port=self.sentinels[0], decode_responses=True)
        try:
            _, port = await sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return int(port)
        except (OSError, aioredis.ConnectionError, TypeError, ValueError):
            return None
        finally:
            await sentinel.aclose()

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


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
