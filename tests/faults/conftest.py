"""Fault tests run the real parts under load and break one of them: here, a Redis that can be
killed and started again on the same socket, with its data kept (an append-only file synced
at every write, as a production Redis that must not lose an accepted submission keeps it).
It replaces the shared ``redis_url`` fixture, so the service and executors of tests/conftest.py
use it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class RedisServer:
    """One redis-server on a unix socket in ``directory``, stopped and started at will."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(
            [server, "--port", "0", "--unixsocket", str(self.socket), "--dir",
             str(self.directory), "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._accepts():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.01)

    def kill(self) -> None:
        """kill -9: what it had written to its append-only file is what it comes back with."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.socket.unlink(missing_ok=True)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
