"""The embedded deployment: a ``cellblock up`` that lives and dies with the Jupyter server.

Started as a child process in its own session, so stopping it (SIGINT: ``cellblock up`` then
drains its workers and stops Redis) reaches everything it started. It also ends when the
server ends without stopping it (SIGKILL, the OOM killer, a closed terminal's SIGHUP): it
holds the read end of a pipe whose only writer is the server (``--stop-with``), and the
pipe's end of file, which the kernel gives however the server died, stops it in order.

A deployment found still running in the state directory (left by a server that died before
this arrangement, or started by hand) holds its lock: it is stopped, and this one started
in its place, and the server's log says so (``replaced``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
        #: The pid of a deployment found running in the state directory and stopped.
        self.replaced: int | None = None
        self._lifeline = -1  # the pipe's write end: open as long as this process lives
        self._stopped = False

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
        if left_running(self.state_dir):
            self.replaced = await asyncio.to_thread(stop_left_running, self.state_dir)
            if self._stopped:  # the server stopped meanwhile: nothing is to be started
                raise CellblockError("the server stopped before its deployment started")
        env = dict(os.environ)
        if self.admin_token:
            env["CELLBLOCK_ADMIN_TOKEN"] = self.admin_token
        # Not inheritable (os.pipe's default): kernels and terminals the server starts must
        # not hold the writer, or the deployment would outlive the server through them.
        reader, self._lifeline = os.pipe()
        try:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable, "-m", "cellblock", "up",
                        "--state-dir", str(self.state_dir), "--port", str(self.port),
                        "--executors", str(self.executors), "--builders", str(self.builders),
                        "--stop-with", str(reader),
                    ],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=env, pass_fds=(reader,),
                )  # fmt: skip
        finally:
            os.close(reader)
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
        self._stopped = True
        proc = self.proc
        if self._lifeline >= 0:
            os.close(self._lifeline)  # which alone would stop it, a moment later
            self._lifeline = -1
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


def left_running(state_dir: Path) -> bool:
    """Whether a ``cellblock up`` holds ``state_dir``'s lock (asked without waiting)."""
    path = state_dir / "up.lock"
    return path.exists() and not _lock_free(path)


def stop_left_running(state_dir: Path, timeout: float = 60) -> int | None:
    """Stop the ``cellblock up`` that holds ``state_dir``'s lock, if one does; its pid. It
    gets SIGTERM (it drains and stops in order), and its session SIGKILL if the lock is still
    held after ``timeout`` seconds."""
    path = state_dir / "up.lock"
    if not left_running(state_dir):
        return None
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # an older `cellblock up`, which did not say: it is left to the error
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _lock_free(path):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        time.sleep(0.1)
    return pid


def _lock_free(path: Path) -> bool:
    with path.open("rb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
    return True
