"""The embedded deployment: a ``cellblock up`` that lives and dies with the Jupyter server.

Started as a child process in its own session, so stopping it (SIGINT: ``cellblock up`` then
drains its workers and stops Redis) reaches everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from cellblock.errors import CellblockError


@dataclass(frozen=True)
class Backend:
    """Where the Cellblock service is and the tokens the extension uses there."""

    url: str
    token: str
    admin_token: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalDeployment:
    """``admin_token``: the one ``cellblock up`` is to use, handed over in its environment
    (a command line is world-readable); else ``cellblock up`` reads or makes its own."""

    def __init__(
        self,
        state_dir: Path,
        *,
        executors: int,
        builders: int,
        log: Path,
        admin_token: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.executors = executors
        self.builders = builders
        self.log_path = log
        self.admin_token = admin_token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def kernel_dir(self) -> Path:
        """The state directory kernels are pointed at: the URL and the client token only, never
        the admin token that ``cellblock up`` writes beside them in ``state_dir``."""
        return self.state_dir / "kernels"

    async def start(self, timeout: float = 120) -> Backend:
        """Start ``cellblock up`` and wait until its service answers and an executor lives."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A kernel must not take a previous run's URL and token for this one's.
        for name in ("url", "token"):
            (self.kernel_dir / name).unlink(missing_ok=True)
        env = dict(os.environ)
        if self.admin_token:
            env["CELLBLOCK_ADMIN_TOKEN"] = self.admin_token
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cellblock",
                    "up",
                    "--state-dir",
                    str(self.state_dir),
                    "--port",
                    str(self.port),
                    "--executors",
                    str(self.executors),
                    "--builders",
                    str(self.builders),
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        deadline = time.monotonic() + timeout
        client = AsyncHTTPClient()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CellblockError(
                    f"`cellblock up` exited ({self.proc.returncode}); see {self.log_path}"
                )
            with contextlib.suppress(HTTPClientError, OSError, ValueError, KeyError):
                response = await client.fetch(f"{self.url}/api/v1/health", request_timeout=2)
                # Ready when an executor can take work; with none asked for (they may be
                # scaled up later), when the service answers: waiting for one would time out.
                if json.loads(response.body)["executors"] >= min(self.executors, 1):
                    backend = self.backend()
                    self._write_kernel_settings(backend)
                    return backend
            await asyncio.sleep(0.2)
        await self.stop()
        raise CellblockError(
            f"`cellblock up` did not come up within {timeout:g} s; see {self.log_path}"
        )

    def backend(self) -> Backend:
        token = (self.state_dir / "token").read_text().strip()
        admin = self.state_dir / "admin-token"
        return Backend(self.url, token, admin.read_text().strip() if admin.exists() else None)

    def _write_kernel_settings(self, backend: Backend) -> None:
        self.kernel_dir.mkdir(mode=0o700, exist_ok=True)
        for name, value in (("url", backend.url), ("token", backend.token)):
            # Whole or not at all: a kernel may read it at any moment.
            tmp = self.kernel_dir / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value + "\n")
            tmp.replace(self.kernel_dir / name)

    async def stop(self, timeout: float = 60) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
