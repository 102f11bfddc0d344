"""Redis kept available by Sentinel, as an operator would run it: a master, a replica of it and
three sentinels, on loopback TCP ports, each process killable on its own. Used by
tests/faults/test_sentinel.py and by bench/load.py's failover gap. (A module of its own
because test modules cannot import conftest.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path

import redis.asyncio as aioredis
from redisio import free_port

#: The name the sentinels know the master by: the path of a ``redis+sentinel://`` URL.
SERVICE = "cellblock"


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
        """Until the replica is in sync (online, not still loading the master's snapshot) and
        every sentinel knows it."""
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
                online = info.get("slave0", {}).get("state") == "online"
                if info.get("connected_slaves") == 1 and online and all(known):
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError("the replica and the sentinels did not come up")

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
