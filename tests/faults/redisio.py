"""A redis-server the fault tests can kill and start again on the same socket, with its data
kept (an append-only file synced at every write, as a production Redis that must not lose an
accepted submission keeps it); on request also on TCP at given addresses, where simulated hosts
reach it. (A module of its own because test modules cannot import conftest.py.)"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from upio import free_port


class RedisServer:
    """One redis-server on a unix socket in ``directory``, stopped and started at will."""

    def __init__(self, directory: Path, addresses: Sequence[str] = ()) -> None:
        self.directory, self.addresses = directory, tuple(addresses)
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port() if addresses else 0

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def url_at(self, address: str) -> str:
        """Its URL on TCP at ``address`` (one of ``addresses``)."""
        return f"redis://{address}:{self.port}"

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--unixsocket", str(self.socket), "--dir",
             str(self.directory), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
             *(["--bind", *self.addresses, "--protected-mode", "no"] if self.addresses else [])],
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True
