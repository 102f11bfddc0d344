"""`cellblock up`: the whole system on this machine, supervised.

Starts, as child processes: a private ``redis-server`` (unless ``--redis URL``), the service, and
the executors and builders that the desired counts ask for. Then it supervises them:

- every ``TICK`` it tells the store that a supervisor acts on scale requests (so ``POST
  /api/v1/admin/scale`` is accepted), reads the desired counts and starts or stops workers to
  reach them. Stopping is SIGTERM, which drains: running work finishes, then the worker exits.
  The newest workers are the ones stopped.
- a worker that dies unexpectedly (non-zero status, not asked to stop) is started again; after
  ``RESTART_BURST`` crashes within ``RESTART_WINDOW`` seconds further starts back off, so a crash
  loop does not spin. A worker that exits 0 without being asked (drained through ``DELETE
  /api/v1/workers/{id}`` or signalled by someone else) was stopped on purpose: the desired count
  is lowered by one instead. The service and the private Redis are restarted whenever they end.
- SIGINT or SIGTERM (or SIGHUP), or the end of the process that started it (``--stop-with``,
  a pipe: the Jupyter server's, see server_ext/deployment.py), stops everything in order: the
  workers drain (SIGKILL after ``DRAIN_TIMEOUT``), then the service, then Redis (``SHUTDOWN``,
  which flushes the AOF).
  A second signal kills everything at once.

No process is left behind (cellblock/processes.py says how far that goes): every child runs in a
session of its own (a Ctrl-C in the terminal reaches only the supervisor, which stops them in
order), gets SIGTERM should the supervisor itself die, and the supervisor is a child subreaper,
so the sandboxes of a killed executor are adopted by it and killed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, urlencode, urlsplit

import tornado.httpclient
from redis.exceptions import RedisError

from cellblock import processes
from cellblock.config import Config
from cellblock.errors import CellblockError
from cellblock.processes import Backoff, Child, Subreaper
from cellblock.service.auth import ensure_token_files, token_files
from cellblock.service.store import Store

log = logging.getLogger("cellblock.up")

#: Seconds between two rounds of supervision (reaping, scale, restarts).
TICK = 0.25
#: How long the supervisor's mark in the store lives without being renewed.
SUPERVISE_TTL = 5.0
#: Seconds a stopping worker may take to finish its running work at shutdown before SIGKILL.
DRAIN_TIMEOUT = 30.0
#: Seconds the service and Redis may take to stop before SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds to wait for Redis to answer PING and for the service to answer health.
START_TIMEOUT = 30.0
#: Unexpected exits restarted at once within a window; later ones back off (doubling, capped).
RESTART_BURST, RESTART_WINDOW, RESTART_MAX_DELAY = 3, 60.0, 30.0
#: Seconds the shutdown waits for orphans still being adopted (a killed executor's sandbox).
ORPHAN_TIMEOUT = 2.0
#: Executor i runs its slots as uids uid_base + i * UID_STRIDE + slot.
UID_STRIDE = 100
#: The API's bound on a scale request, applied to --executors and --builders too.
MAX_WORKERS = 64
#: Longest unix socket path (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


class StartFailed(CellblockError):
    """``cellblock up`` cannot run as asked: the command exits 3 with this message."""


@dataclass(frozen=True, kw_only=True)
class UpOptions:
    """What ``cellblock up`` is asked to run (its command line); constructing one checks it."""

    host: str
    port: int
    executors: int
    builders: int
    log_level: str
    #: A Redis to use instead of starting a private one.
    redis: str | None = None
    #: The tokens; one not given is generated once and kept in the state directory.
    token: str | None = None
    admin_token: str | None = None
    #: The configuration file named on the command line, which every child is given too.
    config_file: Path | None = None
    #: A pipe's read end whose writer is the process that started this one: its end of file
    #: (that process ended, however: SIGKILL and the OOM killer too) stops everything.
    stop_with: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise StartFailed(f"--port {self.port} is not a port the service can listen on")
        for key, count in self.counts().items():
            if not 0 <= count <= MAX_WORKERS:
                raise StartFailed(f"--{key} must be from 0 to {MAX_WORKERS}")

    def counts(self) -> dict[str, int]:
        """The desired count of each kind of worker, by its ``WorkerKind.scale_key``."""
        return {"executors": self.executors, "builders": self.builders}


@dataclass(frozen=True)
class WorkerKind:
    """A kind of worker that ``cellblock up`` runs N of."""

    #: The key in ``POST /api/v1/admin/scale`` and in ``Store.scale()``: ``executors``.
    scale_key: str
    #: The ``cellblock`` subcommand that runs one: ``executor``; its ids are ``<command>-HOST-i``.
    command: str
    #: Options of worker number i beyond --redis, --id, --state-dir, --config and --log-level.
    options: Callable[[int], list[str]] = lambda i: []


#: Adding a kind of worker is one line here (and its count in ``UpOptions``).
WORKER_KINDS = (
    WorkerKind("executors", "executor", lambda i: ["--uid-offset", str(i * UID_STRIDE)]),
    WorkerKind("builders", "builder"),
)


@dataclass
class Worker:
    """A worker that the supervisor started: number ``index`` of its kind."""

    kind: WorkerKind
    index: int
    child: Child


def redact(url: str | None) -> str:
    """``url`` without its password (``redis://:pw@host``, ``unix:///s?password=pw``)."""
    url = url or ""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not parts.password and all(key != "password" for key, _ in query):
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    hidden = urlencode([(k, "***" if k == "password" else v) for k, v in query], safe="*/")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{hidden}" if hidden else "")


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses to reach a service listening on ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _backoff() -> Backoff:
    return Backoff(RESTART_BURST, RESTART_WINDOW, RESTART_MAX_DELAY)


class Supervisor:
    def __init__(self, config: Config, options: UpOptions) -> None:
        self.config = config
        self.options = options
        # Absolute: children get it as an option and Redis's socket is named by it in a URL.
        self.state_dir: Path = config.state_dir.absolute()
        self.hostname = socket.gethostname()
        self.url = client_url(options.host, options.port)
        self.redis_url: str | None = options.redis
        self.store: Store | None = None
        self.redis: Child | None = None
        self.service: Child | None = None
        self.workers: list[Worker] = []
        self.desired = options.counts()
        self.backoff: dict[str, Backoff] = collections.defaultdict(_backoff)
        self.subreaper = Subreaper()
        self._backoff_told: dict[str, int] = {}  # crashes last logged, to log a change once
        self._store_failing = False
        self._lock: IO[bytes] | None = None
        self._stop = asyncio.Event()
        self._kill = asyncio.Event()  # a second signal: kill everything at once
        self._restart: dict[str, list[str]] = {}  # Redis or the service, to start again

    # -- the whole run -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.options.stop_with is not None:
            loop.add_reader(self.options.stop_with, self._on_parent_gone)
        work = asyncio.create_task(self._start_and_supervise())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            work.cancel()  # nothing when it ended (failed to start) by itself
            with contextlib.suppress(asyncio.CancelledError):
                await work  # raises what made it fail
        finally:
            stop.cancel()
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.options.stop_with is not None:
                loop.remove_reader(self.options.stop_with)
        if self._kill.is_set():
            log.warning("killed everything at once on a second signal")
            return 130
        return 0

    def _on_parent_gone(self) -> None:
        """The ``stop_with`` pipe is readable: its writer is gone (nothing is ever written)."""
        assert self.options.stop_with is not None
        asyncio.get_running_loop().remove_reader(self.options.stop_with)
        if not self._stop.is_set():
            log.info("stopping", extra={"reason": "the process that started it ended"})
            self._stop.set()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self._stop.is_set():
            log.info("stopping", extra={"signal": name})
            with contextlib.suppress(OSError):
                print("Stopping: running work finishes first (Ctrl-C again kills everything).",
                      flush=True)  # fmt: skip
            self._stop.set()
        elif not self._kill.is_set():
            log.warning("second signal: killing everything", extra={"signal": name})
            self._kill.set()
            for child in self._tracked():
                child.kill_group()

    async def _start_and_supervise(self) -> None:
        self._prepare_state_dir()
        if self.redis_url is None:
            self.redis_url = await self._start_redis()
            redis_note = f"private, AOF in {self.state_dir / 'redis'}"
        else:
            redis_note = "external"
        self.store = Store.connect(
            self.redis_url, retention=self.config.retention, queue_size=self.config.queue_size
        )
        await self._wait_for_redis()
        self._check_stop()
        ensure_token_files(self.state_dir, self.options.token, self.options.admin_token)
        self._write_url()
        await self.store.jobs.ensure_group()
        await self.store.set_scale(self.desired)
        await self.store.supervise(SUPERVISE_TTL)
        self._check_stop()
        self.service = self._spawn("service", self._service_argv())
        await self._wait_for_service()
        self._banner(redis_note)
        while True:
            self._check_stop()
            await self._tick()
            await asyncio.sleep(TICK)

    def _check_stop(self) -> None:
        """End the supervision once a stop is asked for. Loops check this, not only rely on
        being cancelled: Python 3.11's asyncio.wait_for, which redis-py uses, can lose a
        cancellation that lands while a command completes."""
        if self._stop.is_set():
            raise asyncio.CancelledError

    # -- start ---------------------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = (self.state_dir / "up.lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StartFailed(
                f"another `cellblock up` runs with the state directory {self.state_dir}"
            ) from None
        # Who holds it, for a later server that finds this deployment left running.
        lock.write(f"{os.getpid()}\n".encode())
        lock.flush()
        self._lock = lock
        if self.config.slots > UID_STRIDE:
            raise StartFailed(f"slots is {self.config.slots}; `cellblock up` allows {UID_STRIDE}")
        self.subreaper.become()

    async def _start_redis(self) -> str:
        server = shutil.which("redis-server")
        if server is None:
            raise StartFailed("redis-server is not installed: install it, or give --redis URL")
        sock = self.state_dir / "redis.sock"
        if len(str(sock)) > MAX_SOCKET_PATH:
            raise StartFailed(
                f"the Redis socket path {sock} is too long for a unix socket: use a shorter "
                "--state-dir, or give --redis URL"
            )
        data = self.state_dir / "redis"
        data.mkdir(mode=0o700, exist_ok=True)
        self.redis = self._spawn("redis", self._redis_argv(server, sock, data))
        return f"unix://{sock}"

    def _redis_argv(self, server: str, sock: Path, data: Path) -> list[str]:
        return [
            server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--dir", str(data), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--logfile", str(data / "redis.log"),
        ]  # fmt: skip

    async def _wait_for_redis(self) -> None:
        assert self.store is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_stop()
            if self.redis is not None and not self.redis.running():
                raise StartFailed(
                    f"redis-server ended ({self.redis.describe_exit()}): "
                    f"see {self.state_dir / 'redis' / 'redis.log'}"
                )
            try:
                await self.store.redis.ping()
                break
            except (RedisError, OSError) as exc:
                if time.monotonic() > deadline:
                    where = redact(self.redis_url)
                    raise StartFailed(f"Redis at {where} does not answer: {exc}") from None
            await asyncio.sleep(0.05)
        log.info(
            "redis ready", extra={"url": redact(self.redis_url), "private": self.redis is not None}
        )

    def _write_url(self) -> None:
        path = self.state_dir / "url"
        tmp = path.with_name("url.tmp")
        tmp.write_text(self.url + "\n")
        tmp.replace(path)

    def _common_options(self) -> list[str]:
        options = ["--state-dir", str(self.state_dir), "--log-level", self.options.log_level]
        if self.options.config_file is not None:
            options += ["--config", str(self.options.config_file)]
        return options

    def _redis_option(self) -> list[str]:
        """``--redis URL``; a URL with a password goes by $CELLBLOCK_REDIS_URL instead (see
        ``_spawn``), since every user can read a command line."""
        assert self.redis_url is not None
        secret = redact(self.redis_url) != self.redis_url
        return [] if secret else ["--redis", self.redis_url]

    def _service_argv(self) -> list[str]:
        host, port = self.options.host, str(self.options.port)
        return [
            sys.executable, "-m", "cellblock", "service", *self._redis_option(),
            "--host", host, "--port", port, *self._common_options(),
        ]  # fmt: skip

    def _worker_argv(self, kind: WorkerKind, index: int) -> list[str]:
        return [
            sys.executable, "-m", "cellblock", kind.command, *self._redis_option(),
            "--id", self._worker_id(kind, index), *kind.options(index), *self._common_options(),
        ]  # fmt: skip

    def _worker_id(self, kind: WorkerKind, index: int) -> str:
        return f"{kind.command}-{self.hostname}-{index}"

    def _spawn(self, name: str, argv: list[str]) -> Child:
        """Start a child that finds the Redis URL in its environment."""
        env = dict(os.environ)
        if self.redis_url is not None:
            env["CELLBLOCK_REDIS_URL"] = self.redis_url
        # Redis writes its own logfile; the others log JSON lines to the supervisor's stderr.
        stdout = subprocess.DEVNULL if name == "redis" else sys.stderr
        return processes.spawn(name, argv, env=env, stdout=stdout)

    async def _wait_for_service(self) -> None:
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                self._check_stop()
                assert self.service is not None
                if not self.service.running():
                    raise StartFailed(
                        f"the service ended ({self.service.describe_exit()}) "
                        f"before it answered on {self.url}; its log is above"
                    )
                with contextlib.suppress(Exception):
                    response = await client.fetch(
                        f"{self.url}/api/v1/health", raise_error=False, request_timeout=2
                    )
                    if response.code == 200:
                        break
                if time.monotonic() > deadline:
                    raise StartFailed(f"the service does not answer on {self.url}")
                await asyncio.sleep(0.1)
        finally:
            client.close()
        log.info("service ready", extra={"url": self.url})

    def _banner(self, redis_note: str) -> None:
        files = token_files(self.state_dir)
        counts = ", ".join(f"{key}: {n}" for key, n in self.desired.items())
        print(
            f"Cellblock is up at {self.url} ({counts}; Redis: {redact(self.redis_url)}, "
            f"{redis_note})\n"
            f"  client token: {files['client']}\n"
            f"  admin token:  {files['admin']}\n"
            f'  try: curl -H "Authorization: Bearer $(cat {files["client"]})" '
            f"{self.url}/api/v1/health\n"
            f"Stop with Ctrl-C (or kill -TERM {os.getpid()}): running work finishes first.",
            flush=True,
        )

    # -- supervision ---------------------------------------------------------------------------

    async def _tick(self) -> None:
        self.subreaper.reap(self._tracked_pids())  # what a killed executor left running
        await self._reap()
        await self._read_scale()
        self._restart_core()
        for kind in WORKER_KINDS:
            self._reconcile(kind)

    def _tracked(self) -> list[Child]:
        """Every child not reaped yet."""
        core = [c for c in (self.redis, self.service) if c is not None]
        return [*core, *(w.child for w in self.workers)]

    def _tracked_pids(self) -> set[int]:
        return {c.pid for c in self._tracked()}

    async def _read_scale(self) -> None:
        assert self.store is not None
        try:
            await self.store.supervise(SUPERVISE_TTL)
            scale = await self.store.scale()
        except (RedisError, OSError) as exc:
            if not self._store_failing:
                log.warning("cannot reach Redis; keeping the counts", extra={"error": str(exc)})
            self._store_failing = True
            return
        if self._store_failing:
            log.info("Redis answers again")
        self._store_failing = False
        for kind in WORKER_KINDS:
            if kind.scale_key in scale:
                want = max(0, min(MAX_WORKERS, scale[kind.scale_key]))
                was = self.desired[kind.scale_key]
                if want != was:
                    log.info("scaling", extra={"kind": kind.scale_key, "from": was, "to": want})
                self.desired[kind.scale_key] = want

    async def _reap(self) -> None:
        for core in (self.redis, self.service):
            if core is not None and not core.running():
                self._core_ended(core)
        for worker in [w for w in self.workers if not w.child.running()]:
            await self._worker_ended(worker)

    def _core_ended(self, child: Child) -> None:
        """Redis or the service ended: always wanted while supervising, so started again."""
        child.kill_group()  # whatever it left in its group
        fields = {"child": child.name, "pid": child.pid, "status": child.describe_exit()}
        log.warning("ended unexpectedly; starting it again", extra=fields)
        self.backoff[child.name].crashed()
        self._restart[child.name] = child.argv
        if child is self.redis:
            self.redis = None
        else:
            self.service = None

    async def _worker_ended(self, worker: Worker) -> None:
        child, key = worker.child, worker.kind.scale_key
        child.kill_group()  # whatever it left in its group
        fields = {"child": child.name, "pid": child.pid, "status": child.describe_exit()}
        self.workers.remove(worker)
        if child.stopping:
            log.info("worker stopped", extra=fields)
        elif child.proc.returncode == 0:
            self.desired[key] = max(0, self.desired[key] - 1)
            message = "worker stopped from outside (drained); lowering the desired count"
            log.info(message, extra={**fields, key: self.desired[key]})
            assert self.store is not None
            with contextlib.suppress(RedisError, OSError):
                await self.store.set_scale({key: self.desired[key]})
        else:
            self.backoff[key].crashed()
            log.warning("worker died; it will be started again", extra=fields)

    def _restart_core(self) -> None:
        for name, argv in list(self._restart.items()):
            if self._waiting(name):
                continue
            del self._restart[name]
            if name == "redis":
                self.redis = self._spawn(name, argv)
            else:
                self.service = self._spawn(name, argv)

    def _waiting(self, name: str) -> bool:
        """True while starting ``name`` again must wait for its crashes' backoff."""
        backoff = self.backoff[name]
        delay = backoff.delay()
        if delay <= 0:
            return False
        crashes = backoff.recent()
        if self._backoff_told.get(name) != crashes:
            self._backoff_told[name] = crashes
            log.warning(
                "crashing repeatedly; waiting before starting it again",
                extra={"child": name, "crashes": crashes, "window": backoff.window,
                       "delay": round(delay, 1)},
            )  # fmt: skip
        return True

    def _reconcile(self, kind: WorkerKind) -> None:
        want = self.desired[kind.scale_key]
        active = [w for w in self.workers if w.kind is kind and not w.child.stopping]
        if len(active) > want:
            newest = sorted(active, key=lambda w: w.child.started, reverse=True)
            for worker in newest[: len(active) - want]:
                child = worker.child
                log.info("stopping worker (drain)", extra={"worker": child.name, "pid": child.pid})
                child.stop()
        elif len(active) < want and not self._waiting(kind.scale_key):
            for _ in range(want - len(active)):
                self._start_worker(kind)

    def _start_worker(self, kind: WorkerKind) -> None:
        taken = {w.index for w in self.workers if w.kind is kind}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        child = self._spawn(self._worker_id(kind, index), self._worker_argv(kind, index))
        self.workers.append(Worker(kind, index, child))

    # -- stop ----------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        log.info("shutting down")
        await processes.stop([w.child for w in self.workers], DRAIN_TIMEOUT, self._kill)
        if self.service is not None:
            await processes.stop([self.service], STOP_TIMEOUT, self._kill)
        if self.redis is not None and self.redis.running() and not self._kill.is_set():
            log.info("redis: SHUTDOWN")
            assert self.store is not None
            with contextlib.suppress(RedisError, OSError):
                await self.store.redis.shutdown()
        if self.redis is not None:
            await processes.stop([self.redis], STOP_TIMEOUT, self._kill)
        if self.store is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.store.close()
        await self.subreaper.reap_remaining(self._tracked_pids(), ORPHAN_TIMEOUT)
        if self._lock is not None:
            self._lock.close()
        log.info("stopped")


async def run(config: Config, options: UpOptions) -> int:
    return await Supervisor(config, options).run()
