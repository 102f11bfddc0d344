"""Fixtures shared by every test folder. Factories start real servers and workers in
temporary state directories: a real redis-server, the real Tornado service, real executor
processes running real nsjail."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serviceio import TEST_ENV, Service, serving
from tornado.httpclient import AsyncHTTPClient

from cellblock import config as config_module
from cellblock.executor.disk import WorkDisk
from cellblock.service.store import Store

CELLBLOCK = [sys.executable, "-m", "cellblock"]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def config(state_dir: Path) -> config_module.Config:
    return config_module.load(state_dir, environ={})


@pytest.fixture(scope="session")
def sandbox_root() -> Iterator[Path]:
    """A sandbox root of this test session's own, searchable as nsjail needs it to be. The
    executors mount their working disk in it (executor/disk.py): unmounted at the end."""
    root = Path(tempfile.mkdtemp(prefix="cellblock-test-sandbox-"))
    root.chmod(0o711)
    yield root
    if os.path.ismount(root / "work"):
        WorkDisk(root / "work").detach()
    shutil.rmtree(root, ignore_errors=True)


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server of this test's own, on a unix socket."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    # The socket file appears a moment before redis-server listens on it: wait for a connection.
    deadline = time.monotonic() + 10
    while not _accepts(sock):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            pytest.fail("redis-server did not start")
        time.sleep(0.01)
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    store = Store.connect(redis_url, retention=3600, queue_size=50)
    await store.jobs.ensure_group()
    yield store
    await store.close()


@pytest.fixture
async def service(redis_url: str, state_dir: Path, sandbox_root: Path) -> AsyncIterator[Service]:
    """The real Tornado app, in this test's event loop, on a free loopback port."""
    async with serving(redis_url, state_dir, sandbox_root) as running:
        yield running


@pytest.fixture
async def second_service(
    service: Service, tmp_path: Path, sandbox_root: Path
) -> AsyncIterator[Service]:
    """Another service process's worth on the same Redis: what a second host would run."""
    state = tmp_path / "second-service"
    state.mkdir()
    async with serving(service.redis_url, state, sandbox_root) as running:
        yield running


Until = Callable[..., Awaitable[Any]]


async def until(
    check: Callable[[], Any], what: str, timeout: float = 20, every: float = 0.05
) -> Any:
    """Poll ``check`` (a function or a coroutine function) until it answers something truthy;
    that answer."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


@pytest.fixture(name="until")
def until_fixture() -> Until:
    """``await until(check, what, timeout=20, every=0.05)``: poll ``check`` (a function or a
    coroutine function) until it answers something truthy, and return that answer; after
    ``timeout`` seconds the test fails, saying it was waiting for ``what``. (A fixture because
    test modules cannot import from conftest.py, which pytest imports as plain ``conftest``.)"""
    return until


@dataclass
class WorkerProcess:
    """A real worker process (executor or builder) and the file its stderr goes to."""

    worker_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Kill it if it still runs (what every test's teardown does)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its stderr in the file ``log``."""
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


class ExecutorProcess(WorkerProcess):
    """A real ``cellblock executor`` process."""


StartExecutor = Callable[..., ExecutorProcess]


@pytest.fixture
def start_executor(redis_url: str, tmp_path: Path, sandbox_root: Path) -> Iterator[StartExecutor]:
    """Start real `cellblock executor` processes; each gets its own uid range."""
    started: list[ExecutorProcess] = []

    def start(slots: int = 2, **env: str) -> ExecutorProcess:
        index = len(started)
        worker_id = f"executor-test-{index}"
        state = tmp_path / f"executor-{index}"
        state.mkdir()
        log = tmp_path / f"{worker_id}.log"
        proc_env = {
            **os.environ, **TEST_ENV, "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"', **env,
        }  # fmt: skip
        proc = spawn(
            [*CELLBLOCK, "executor", "--redis", redis_url, "--state-dir", str(state),
             "--id", worker_id, "--slots", str(slots), "--uid-offset", str(100 + 10 * index),
             "--log-level", "info"],
            proc_env, log,
        )  # fmt: skip
        executor = ExecutorProcess(worker_id, proc, log)
        started.append(executor)
        return executor

    yield start
    for executor in started:
        executor.kill()


@pytest.fixture
def executor(start_executor: StartExecutor) -> ExecutorProcess:
    """One real executor (two slots), for tests that only need one to be there."""
    return start_executor()


Launch = Callable[..., Awaitable[ExecutorProcess]]


@pytest.fixture
async def launch(service: Service, start_executor: StartExecutor) -> AsyncIterator[Launch]:
    """Start a real executor (``start_executor``'s arguments) and wait until the service lists
    it among its workers, so that it takes work."""
    http = AsyncHTTPClient(force_instance=True)

    async def start(**kwargs: Any) -> ExecutorProcess:
        executor = start_executor(**kwargs)

        async def registered() -> bool:
            assert executor.proc.poll() is None, executor.logs()
            response = await http.fetch(
                f"{service.url}/api/v1/workers", headers={"Authorization": "Bearer admin-token"}
            )
            return any(w["id"] == executor.worker_id for w in json.loads(response.body)["workers"])

        await until(registered, f"{executor.worker_id} to register")
        return executor

    yield start
    http.close()


class BuilderProcess(WorkerProcess):
    """A real ``cellblock builder`` process."""

    def events(self, name: str) -> list[dict[str, object]]:
        """This builder's structured log lines whose event is ``name`` (e.g. "build started")."""
        found = []
        for line in self.logs().splitlines():
            if line.startswith("{") and f'"event": "{name}"' in line:
                found.append(json.loads(line))
        return found

    async def started(self, timeout: float = 20) -> None:
        """Wait (without blocking the event loop) until the builder has published its channel."""
        deadline = time.monotonic() + timeout
        while not self.events("builder started"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"builder {self.worker_id} did not start:\n{self.logs()}")
            await asyncio.sleep(0.05)


StartBuilder = Callable[..., BuilderProcess]


@pytest.fixture
def start_builder(redis_url: str, tmp_path: Path) -> Iterator[StartBuilder]:
    """Start real `cellblock builder` processes (real nix-build against the bundled offline
    channel). Keyword arguments are extra environment variables (``CELLBLOCK_*`` settings)."""
    started: list[BuilderProcess] = []

    def start(**env: str) -> BuilderProcess:
        index = len(started)
        worker_id = f"builder-test-{index}"
        state = tmp_path / f"builder-{index}"
        state.mkdir()
        log = tmp_path / f"{worker_id}.log"
        proc = spawn(
            [*CELLBLOCK, "builder", "--redis", redis_url, "--state-dir", str(state),
             "--id", worker_id, "--log-level", "info"],
            {**os.environ, **TEST_ENV, **env}, log,
        )  # fmt: skip
        builder = BuilderProcess(worker_id, proc, log)
        started.append(builder)
        return builder

    yield start
    for builder in started:
        builder.kill()


class PopenSpy:
    """Records every process this test's own process starts, then lets it start for real
    (``subprocess.run`` and ``asyncio.create_subprocess_exec`` both go through
    ``subprocess.Popen``): a spy, not a fake."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []
        self.pids: list[int] = []

    def nix(self) -> list[list[str]]:
        """The Nix commands among them."""
        return [argv for argv in self.argvs if os.path.basename(argv[0]).startswith("nix")]


@pytest.fixture
def popen_spy(monkeypatch: pytest.MonkeyPatch) -> PopenSpy:
    spy = PopenSpy()
    real = subprocess.Popen

    class Spying(real):  # type: ignore[valid-type,misc]
        def __init__(self, args: object, *rest: object, **kwargs: object) -> None:
            argv = args if isinstance(args, list | tuple) else [args]
            spy.argvs.append([str(a) for a in argv])
            super().__init__(args, *rest, **kwargs)
            spy.pids.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", Spying)
    return spy
