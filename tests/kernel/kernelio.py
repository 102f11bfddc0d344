"""Talking to a real kernel process in the kernel tests: run a cell, collect what it sent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

ALICE = "alice-token"
ADMIN = "admin-token"
Message = dict[str, Any]
Kernel = tuple[AsyncKernelManager, AsyncKernelClient]
StartKernel = Callable[[dict[str, str]], Awaitable[Kernel]]


def kernel_env(url: str, token: str = ALICE, admin_token: str = ADMIN) -> dict[str, str]:
    """The environment of a kernel that talks to the service at ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    return {**env, "CELLBLOCK_URL": url, "CELLBLOCK_TOKEN": token,
            "CELLBLOCK_ADMIN_TOKEN": admin_token}  # fmt: skip


def accepts(path: Path | str) -> bool:
    """Whether something listens on the unix socket ``path`` (a server binds, creating the
    file, a moment before it listens)."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Outcome:
    """What one execute request brought: the reply and the cell's iopub messages."""

    reply: Message
    messages: list[Message] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.reply["status"])

    @property
    def error(self) -> tuple[str, str]:
        return self.reply["ename"], self.reply["evalue"]

    def of(self, *types: str) -> list[Message]:
        return [m for m in self.messages if m["msg_type"] in types]

    def stream(self, name: str = "stdout") -> str:
        streams = [m["content"] for m in self.of("stream")]
        return "".join(s["text"] for s in streams if s["name"] == name)

    @property
    def displays(self) -> list[Message]:
        """display_data and update_display_data, in order."""
        return self.of("display_data", "update_display_data")

    def status_lines(self) -> list[str]:
        """The text of the live status display, as it was first shown and then updated."""
        [first] = [m for m in self.of("display_data") if m["content"].get("transient")]
        display_id = first["content"]["transient"]["display_id"]
        return [
            m["content"]["data"]["text/plain"]
            for m in self.displays
            if m["content"].get("transient", {}).get("display_id") == display_id
        ]

    @property
    def summary(self) -> str:
        """The text of the summary table: the last display without a display id."""
        plain = [m for m in self.of("display_data") if not m["content"].get("transient")]
        return str(plain[-1]["content"]["data"]["text/plain"]) if plain else ""


async def execute(
    kc: AsyncKernelClient,
    code: str,
    timeout: float = 45,
    on_message: Callable[[Message], Awaitable[None]] | None = None,
) -> Outcome:
    """Run ``code``; collect its iopub messages until the kernel is idle again."""
    msg_id = kc.execute(code)
    outcome = Outcome(reply={})
    while True:
        message = await kc.get_iopub_msg(timeout=timeout)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind = message["msg_type"]
        if kind == "status" and message["content"]["execution_state"] == "idle":
            break
        if kind not in ("status", "execute_input"):
            outcome.messages.append(message)
            if on_message is not None:
                await on_message(message)
    while True:
        reply = await kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            outcome.reply = reply["content"]
            return outcome


class ServiceProcesses:
    """redis-server, ``cellblock service`` and one ``cellblock executor``, each a subprocess of
    its own, in a temporary folder: for tests that cannot use the async fixtures (unittest
    classes such as jupyter_kernel_test's)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="cellblock-kernel-test-"))
        self.folder.chmod(0o711)  # the sandbox root below must be searchable for nsjail
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = f"http://127.0.0.1:{closed_port()}"

    def start(self) -> ServiceProcesses:
        redis_sock = self.folder / "redis.sock"
        redis_url = f"unix://{redis_sock}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
        env.update(
            CELLBLOCK_TOKEN=ALICE,
            CELLBLOCK_ADMIN_TOKEN=ADMIN,
            CELLBLOCK_SANDBOX__ROOT=f'"{self.folder / "sandbox"}"',
            CELLBLOCK_LEASE_TIMEOUT="1.5",
        )
        (self.folder / "sandbox").mkdir(mode=0o711)
        self._spawn("redis", [shutil.which("redis-server") or "redis-server", "--port", "0",
                              "--unixsocket", str(redis_sock), "--dir", str(self.folder),
                              "--save", "", "--appendonly", "no"], env)  # fmt: skip
        self._wait(lambda: accepts(redis_sock), "redis-server")
        port = self.url.rsplit(":", 1)[1]
        cellblock = [sys.executable, "-m", "cellblock"]
        self._spawn("service", [*cellblock, "service", "--redis", redis_url, "--state-dir",
                                str(self._dir("service")), "--host", "127.0.0.1",
                                "--port", port], env)  # fmt: skip
        self._spawn("executor", [*cellblock, "executor", "--redis", redis_url, "--state-dir",
                                 str(self._dir("executor")), "--id", "executor-conformance",
                                 "--slots", "2", "--uid-offset", "700"], env)  # fmt: skip
        self._wait(self._executor_ready, "the service and its executor")
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in self.folder.glob("*.log"))

    def _dir(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir()
        return path

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with (self.folder / f"{name}.log").open("wb") as log:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    def _executor_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/health", timeout=1) as response:
                health = json.load(response)
        except OSError:
            return False
        return bool(health.get("executors"))

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = self.logs()
                self.stop()
                raise RuntimeError(f"{what} did not start:\n{logs}")
            time.sleep(0.05)
