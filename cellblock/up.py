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
- SIGINT or SIGTERM (or SIGHUP) stops everything in order: the workers drain (SIGKILL after
  ``DRAIN_TIMEOUT``), then the service, then Redis (``SHUTDOWN``, which flushes the AOF).
  A second signal kills everything at once.

No process is left behind: every child runs in a session of its own (a Ctrl-C in the terminal
reaches only the supervisor, which stops them in order), gets SIGTERM should the supervisor
itself die (``PR_SET_PDEATHSIG`` through ``setpriv``), and the supervisor is a child subreaper,
so the sandboxes of a killed executor are adopted by it and killed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, urlencode, urlsplit

import tornado.httpclient
from redis.exceptions import RedisError

from cellblock.config import Config
from cellblock.errors import CellblockError
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
#: Executor i runs its slots as uids uid_base + i * UID_STRIDE + slot.
UID_STRIDE = 100
#: The API's bound on a scale request, applied to --executors and --builders too.
MAX_WORKERS = 64
#: Longest unix socket path (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107

_PR_SET_CHILD_SUBREAPER = 36


class StartFailed(CellblockError):
    pass


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


class Backoff:
    """Restarts after unexpected exits: the first ``burst`` within ``window`` seconds go at once,
    each later one waits twice as long as the one before, at most ``max_delay`` seconds."""

    def __init__(
        self,
        burst: int = RESTART_BURST,
        window: float = RESTART_WINDOW,
        max_delay: float = RESTART_MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.window, self.max_delay, self.clock = burst, window, max_delay, clock
        self.crashes: collections.deque[float] = collections.deque()

    def crashed(self) -> None:
        self.crashes.append(self.clock())

    def recent(self) -> int:
        horizon = self.clock() - self.window
        while self.crashes and self.crashes[0] < horizon:
            self.crashes.popleft()
        return len(self.crashes)

    def delay(self) -> float:
        """Seconds from now until the next start may happen (0: now)."""
        count = self.recent()
        if count < self.burst:
            return 0.0
        wait = min(self.max_delay, 2.0 ** (count - self.burst))
        return max(0.0, self.crashes[-1] + wait - self.clock())


@dataclass
class Child:
    """One process that ``cellblock up`` started."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    kind: WorkerKind | None = None
    index: int = 0
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the child's whole session (it leads its own), the child included."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


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
        self.workers: list[Child] = []
        self.desired = options.counts()
        self.backoff: dict[str, Backoff] = collections.defaultdict(Backoff)
        self._backoff_told: dict[str, int] = {}  # crashes last logged, to log a change once
        self._store_failing = False
        self._lock: IO[bytes] | None = None
        self._stop = asyncio.Event()
        self._forced = False
        self._subreaper = False
        self._setpriv = shutil.which("setpriv")
        self._restart: dict[str, list[str]] = {}  # Redis or the service, to start again

    # -- the whole run -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
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
        if self._forced:
            log.warning("killed everything at once on a second signal")
            return 130
        return 0

    def _on_signal(self, sig: int) -> None:
        if not self._stop.is_set():
            log.info("stopping", extra={"signal": signal.Signals(sig).name})
            with contextlib.suppress(OSError):
                print("Stopping: running work finishes first (Ctrl-C again kills everything).",
                      flush=True)  # fmt: skip
            self._stop.set()
        elif not self._forced:
            log.warning("second signal: killing everything", extra={"signal": sig})
            self._forced = True
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
        self._lock = lock
        if self.config.slots > UID_STRIDE:
            raise StartFailed(f"slots is {self.config.slots}; `cellblock up` allows {UID_STRIDE}")
        try:
            self._subreaper = (
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
            )
        except (OSError, AttributeError):
            self._subreaper = False

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
                    f"redis-server ended ({describe_exit(self.redis.proc.returncode)}): "
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

    def _spawn(
        self, name: str, argv: list[str], kind: WorkerKind | None = None, index: int = 0
    ) -> Child:
        """Start a child in a session of its own that gets SIGTERM should this process die."""
        prefix = [] if self._setpriv is None else [self._setpriv, "--pdeathsig", "TERM", "--"]
        env = dict(os.environ)
        if self.redis_url is not None:
            env["CELLBLOCK_REDIS_URL"] = self.redis_url
        proc = subprocess.Popen(
            [*prefix, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if name == "redis" else sys.stderr,
            start_new_session=True,
        )
        child = Child(name, argv, proc, kind, index)
        log.info("started", extra={"child": name, "pid": proc.pid})
        return child

    async def _wait_for_service(self) -> None:
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                self._check_stop()
                assert self.service is not None
                if not self.service.running():
                    raise StartFailed(
                        f"the service ended ({describe_exit(self.service.proc.returncode)}) "
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
        self._reap_adopted()
        await self._reap()
        await self._read_scale()
        self._restart_core()
        for kind in WORKER_KINDS:
            self._reconcile(kind)

    def _tracked(self) -> list[Child]:
        """Every child not reaped yet."""
        return [c for c in (self.redis, self.service, *self.workers) if c is not None]

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
        for child in self._tracked():
            if child.running():
                continue
            child.kill_group()  # whatever it left in its session
            status = child.proc.returncode
            fields = {"child": child.name, "pid": child.pid, "status": describe_exit(status)}
            if child.kind is None:  # Redis or the service: always wanted while supervising
                log.warning("ended unexpectedly; starting it again", extra=fields)
                self.backoff[child.name].crashed()
                self._restart[child.name] = child.argv
                if child is self.redis:
                    self.redis = None
                else:
                    self.service = None
                continue
            self.workers.remove(child)
            key = child.kind.scale_key
            if child.stopping:
                log.info("worker stopped", extra=fields)
            elif status == 0:
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
        delay = self.backoff[name].delay()
        if delay <= 0:
            return False
        crashes = self.backoff[name].recent()
        if self._backoff_told.get(name) != crashes:
            self._backoff_told[name] = crashes
            log.warning(
                "crashing repeatedly; waiting before starting it again",
                extra={"child": name, "crashes": crashes, "window": RESTART_WINDOW,
                       "delay": round(delay, 1)},
            )  # fmt: skip
        return True

    def _reconcile(self, kind: WorkerKind) -> None:
        want = self.desired[kind.scale_key]
        active = [c for c in self.workers if c.kind is kind and not c.stopping]
        if len(active) > want:
            newest = sorted(active, key=lambda c: c.started, reverse=True)
            for child in newest[: len(active) - want]:
                log.info("stopping worker (drain)", extra={"worker": child.name, "pid": child.pid})
                child.stopping = True
                child.signal(signal.SIGTERM)
        elif len(active) < want and not self._waiting(kind.scale_key):
            for _ in range(want - len(active)):
                self._start_worker(kind)

    def _start_worker(self, kind: WorkerKind) -> None:
        taken = {c.index for c in self.workers if c.kind is kind}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        argv = self._worker_argv(kind, index)
        self.workers.append(self._spawn(self._worker_id(kind, index), argv, kind, index))

    def _reap_adopted(self) -> None:
        """Kill and reap orphans adopted as subreaper: what a killed executor left running."""
        if not self._subreaper:
            return
        known = {c.pid for c in self._tracked()}
        for pid in _children():
            if pid in known:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] != 0:
                    log.info("reaped an orphan a worker left", extra={"pid": pid})

    # -- stop ----------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        log.info("shutting down")
        for child in self.workers:
            child.stopping = True
        await self._wait_ended(self.workers, DRAIN_TIMEOUT, signal.SIGTERM)
        if self.service is not None:
            await self._wait_ended([self.service], STOP_TIMEOUT, signal.SIGTERM)
        if self.redis is not None and self.redis.running() and not self._forced:
            log.info("redis: SHUTDOWN")
            assert self.store is not None
            with contextlib.suppress(RedisError, OSError):
                await self.store.redis.shutdown()
        if self.redis is not None:
            await self._wait_ended([self.redis], STOP_TIMEOUT, signal.SIGTERM)
        if self.store is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.store.close()
        deadline = time.monotonic() + 2  # orphans adopted meanwhile (a killed executor's sandbox)
        while self._subreaper and _children() and time.monotonic() < deadline:
            self._reap_adopted()
            await asyncio.sleep(0.02)
        if self._lock is not None:
            self._lock.close()
        log.info("stopped")

    async def _wait_ended(
        self, children: list[Child], timeout: float, sig: int | None = None
    ) -> None:
        """Wait until ``children`` end (sending ``sig`` first, if given); SIGKILL them after
        ``timeout`` or on a second signal."""
        if sig is not None:
            for child in children:
                child.signal(sig)
        deadline = time.monotonic() + timeout
        while any(c.running() for c in children):
            if self._forced or time.monotonic() > deadline:
                for child in children:
                    if child.running():
                        log.warning("did not stop in time: SIGKILL", extra={"child": child.name})
                        child.kill_group()
                break
            await asyncio.sleep(0.05)
        for child in children:
            status = child.proc.wait()
            child.kill_group()
            log.info("ended", extra={"child": child.name, "status": describe_exit(status)})


def _children() -> list[int]:
    """This process's children (those it started and those it adopted)."""
    found: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split()]
    return found


async def run(config: Config, options: UpOptions) -> int:
    return await Supervisor(config, options).run()
