"""`cellblock up`: the real supervisor, as a subprocess, with a real Redis, service, executors and
nsjail. Every test checks that stopping leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from upio import free_port

from cellblock import cli, up
from cellblock import config as config_module

if os.geteuid() != 0:
    pytest.skip("cellblock up runs executors, which need root", allow_module_level=True)

CELLBLOCK = [sys.executable, "-m", "cellblock"]
HOST = socket.gethostname()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            children.setdefault(info[0], []).append((int(entry), info[1]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            found[pid] = started
            todo.append(pid)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def mentioning(path: Path) -> dict[int, str]:
    """Live processes whose command line names ``path`` (Redis names its socket there)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _stat(int(entry)) is not None:
            line = cmdline(int(entry))
            if str(path) in line:
                found[int(entry)] = line
    return found


def sandboxed(processes: dict[int, int]) -> list[str]:
    """The command lines of nsjail and of the sandboxed programs among ``processes``."""
    lines = [cmdline(pid) for pid in processes]
    return [line for line in lines if "nsjail" in line or "sleep 100" in line]


def still_alive(snapshot: dict[int, int]) -> dict[int, str]:
    """The processes of a ``descendants`` snapshot that still live (same pid and start time)."""
    return {
        pid: cmdline(pid)
        for pid, started in snapshot.items()
        if (info := _stat(pid)) is not None and info[1] == started
    }


@dataclass
class Up:
    """A running `cellblock up`."""

    proc: subprocess.Popen[bytes]
    state: Path
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, role: str = "client") -> str:
        return (self.state / ("token" if role == "client" else "admin-token")).read_text().strip()

    def request(
        self, method: str, path: str, body: Any = None, role: str = "client", timeout: float = 30
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token(role)}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read() or b"null")

    def workers(self, kind: str = "executor") -> dict[str, dict[str, Any]]:
        status, body = self.request("GET", "/api/v1/workers", role="admin")
        assert status == 200, body
        return {w["id"]: w for w in body["workers"] if w["kind"] == kind}

    def scale(self, **counts: int) -> None:
        status, body = self.request("POST", "/api/v1/admin/scale", counts, role="admin")
        assert status == 202, body

    def logs(self) -> list[dict[str, Any]]:
        lines = self.err.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line["event"] == name]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Signal the supervisor and check that it ends in time and leaves nothing behind."""
        started = descendants(self.proc.pid)
        assert started, "the supervisor has no children"
        self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`cellblock up` did not stop within {timeout} s:\n{self.err.read_text()}")
        self.assert_nothing_left(started)
        return status

    def assert_nothing_left(self, snapshot: dict[int, int]) -> None:
        # Orphans are reparented and reaped asynchronously: allow them a moment.
        wait_for("no process left", lambda: not still_alive(snapshot), timeout=5)
        assert mentioning(self.state) == {}


@pytest.fixture
def start_up(tmp_path: Path, sandbox_root: Path) -> Iterator[Callable[..., Up]]:
    """Start `cellblock up` and wait until it says it is up; teardown kills what is left."""
    started: list[Up] = []

    def start(
        *options: str, state: Path | None = None, env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Up:  # fmt: skip
        state = state or tmp_path / "state"
        port = free_port()
        out = tmp_path / f"up-{len(started)}.out"
        err = tmp_path / f"up-{len(started)}.err"
        proc_env = {
            **os.environ,
            "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
            "CELLBLOCK_LEASE_TIMEOUT": "1.5",
            **(env or {}),
        }
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [*CELLBLOCK, "up", "--state-dir", str(state), "--port", str(port),
                 "--log-level", "info", *options],
                env=proc_env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            )  # fmt: skip
        instance = Up(proc, state, port, out, err)
        started.append(instance)
        if wait:

            def is_up() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"`cellblock up` ended ({proc.returncode}):\n{err.read_text()}")
                return "Cellblock is up" in out.read_text()

            wait_for("`cellblock up`", is_up)
        return instance

    yield start
    for instance in started:
        snapshot = descendants(instance.proc.pid)
        if instance.proc.poll() is None:
            instance.proc.kill()
            instance.proc.wait()
        for pid in [*still_alive(snapshot), *mentioning(instance.state)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def submit(instance: Up, run: str, wait: bool, **extra: Any) -> dict[str, Any]:
    query = "?wait=true&timeout=30" if wait else ""
    status, body = instance.request("POST", f"/api/v1/submissions{query}", {"run": run, **extra})
    assert status == 201, body
    result: dict[str, Any] = body
    return result


def submission(instance: Up, sid: str) -> dict[str, Any]:
    status, body = instance.request("GET", f"/api/v1/submissions/{sid}")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


# -- units ---------------------------------------------------------------------------------------


def test_redis_passwords_stay_out_of_logs_and_command_lines() -> None:
    assert up.redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert up.redact("rediss://me:s3cret@db/1") == "rediss://me:***@db/1"
    assert up.redact("unix:///state/redis.sock") == "unix:///state/redis.sock"
    assert up.redact("unix:///s/redis.sock?db=2") == "unix:///s/redis.sock?db=2"
    assert up.redact("unix:///s.sock?password=s3cret&db=1") == "unix:///s.sock?password=***&db=1"


def test_client_url_reaches_a_wildcard_listener_on_loopback() -> None:
    assert up.client_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    assert up.client_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert up.client_url("::", 80) == "http://[::1]:80"
    assert up.client_url("fe80::1", 80) == "http://[fe80::1]:80"


# -- the real thing ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_up_runs_submissions_and_stops_leaving_nothing(start_up: Callable[..., Up]) -> None:
    instance = start_up("--executors", "2", "--builders", "0")
    state = instance.state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("token", "admin-token"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
        assert len((state / name).read_text().strip()) >= 32
    assert instance.token() != instance.token("admin")
    assert (state / "url").read_text().strip() == instance.url
    banner = instance.out.read_text()
    assert instance.url in banner and str(state / "token") in banner and "Ctrl-C" in banner
    assert (state / "redis.sock").is_socket()
    assert all(line.startswith("{") for line in instance.err.read_text().splitlines())

    wait_for("two executors", lambda: len(instance.workers()) == 2)
    assert set(instance.workers()) == {f"executor-{HOST}-0", f"executor-{HOST}-1"}
    status, body = instance.request("GET", "/api/v1/workers")  # the client token is no admin
    assert status == 403, body

    done = submit(instance, "echo hello from cellblock; python3 -c 'print(6 * 7)'", wait=True)
    assert done["status"] == "finished", done
    assert done["stages"]["run"]["stdout"] == "hello from cellblock\n42\n"

    aof = [p for p in (state / "redis").rglob("*.aof") if p.stat().st_size > 0]
    assert aof, "Redis keeps no AOF in the state directory"
    assert done["id"].encode() in b"".join(p.read_bytes() for p in aof)

    assert instance.stop(signal.SIGINT) == 0
    assert not (state / "redis.sock").exists()
    assert any(e["child"] == "redis" for e in instance.events("ended"))


@pytest.mark.timeout(120)
def test_up_scales_restarts_and_lets_a_worker_be_drained(start_up: Callable[..., Up]) -> None:
    instance = start_up("--executors", "2", "--builders", "0")
    wait_for("two executors", lambda: len(instance.workers()) == 2)

    instance.scale(executors=3)
    wait_for("three executors", lambda: len(instance.workers()) == 3)
    instance.scale(executors=1)
    wait_for("one executor", lambda: len(instance.workers()) == 1, timeout=20)
    [(survivor, info)] = instance.workers().items()
    assert survivor == f"executor-{HOST}-0"  # the newest were stopped
    assert {e["worker"] for e in instance.events("stopping worker (drain)")} == {
        f"executor-{HOST}-1", f"executor-{HOST}-2",
    }  # fmt: skip

    os.kill(info["pid"], signal.SIGKILL)
    restarted = wait_for(
        "the killed executor to be started again",
        lambda: (w := instance.workers().get(survivor)) and w["pid"] != info["pid"] and w,
    )
    assert restarted["pid"] != info["pid"]
    died = instance.events("worker died; it will be started again")
    assert [e["status"] for e in died] == ["killed by SIGKILL"]
    done = submit(instance, "echo still here", wait=True)
    assert done["stages"]["run"]["stdout"] == "still here\n"

    # A worker drained through the API is not started again: the desired count goes down.
    status, body = instance.request("DELETE", f"/api/v1/workers/{survivor}", role="admin")
    assert status == 202, body
    wait_for("no executor", lambda: not instance.workers(), timeout=20)
    time.sleep(1)
    assert not instance.workers()
    status, health = instance.request("GET", "/api/v1/health")
    assert health["executors"] == 0

    assert instance.stop(signal.SIGTERM) == 0


@pytest.mark.timeout(120)
def test_up_with_external_redis_starts_none_of_its_own(
    start_up: Callable[..., Up], redis_url: str
) -> None:
    instance = start_up("--redis", redis_url, "--executors", "1", "--builders", "1")
    wait_for("one executor", lambda: len(instance.workers()) == 1)
    children = [cmdline(pid) for pid in descendants(instance.proc.pid)]
    assert not any("redis-server" in line for line in children), children
    assert not (instance.state / "redis.sock").exists()
    assert not (instance.state / "redis").exists()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.exists(f"cb:worker:executor-{HOST}-0")
    finally:
        client.close()

    wait_for("one builder", lambda: len(instance.workers("builder")) == 1)

    # One state directory, one supervisor.
    second = start_up("--redis", redis_url, state=instance.state, wait=False)
    assert second.proc.wait(timeout=30) == 3
    assert "another `cellblock up`" in second.err.read_text()

    done = submit(instance, "echo external", wait=True)
    assert done["stages"]["run"]["stdout"] == "external\n"
    assert instance.stop(signal.SIGINT) == 0
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()  # the external Redis is left alone
    finally:
        client.close()


def test_a_redis_password_is_on_no_command_line(
    start_up: Callable[..., Up], tmp_path: Path
) -> None:
    sock = tmp_path / "secret-redis.sock"
    with subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no", "--requirepass", "s3cret-pw"],
        stdout=subprocess.DEVNULL,
    ) as server:  # fmt: skip
        try:
            wait_for("redis", sock.exists)
            url = f"unix://{sock}?password=s3cret-pw"
            instance = start_up("--redis", url, "--executors", "1", "--builders", "0")
            wait_for("one executor", lambda: len(instance.workers()) == 1)
            lines = [cmdline(pid) for pid in descendants(instance.proc.pid)]
            assert not any("s3cret-pw" in line for line in lines), lines
            # The service and the executor; the rest are the jails its slots armed.
            assert len([line for line in lines if " -m cellblock " in line]) == 2, lines
            assert "s3cret-pw" not in instance.out.read_text() + instance.err.read_text()
            assert instance.stop(signal.SIGINT) == 0
        finally:
            server.terminate()


@pytest.mark.timeout(120)
def test_running_work_finishes_on_stop_and_is_kept_across_restarts(
    start_up: Callable[..., Up],
) -> None:
    instance = start_up("--executors", "1", "--builders", "0")
    tokens = instance.token(), instance.token("admin")
    sid = submit(instance, "sleep 2; echo done", wait=False)["id"]
    wait_for("running", lambda: submission(instance, sid)["status"] == "running")
    assert instance.stop(signal.SIGINT) == 0  # drains: the submission finishes first

    again = start_up("--executors", "1", "--builders", "0", state=instance.state)
    assert (again.token(), again.token("admin")) == tokens  # kept, not generated anew
    result = submission(again, sid)
    assert result["status"] == "finished", result
    assert result["stages"]["run"]["stdout"] == "done\n"
    assert again.stop(signal.SIGINT) == 0


@pytest.mark.timeout(120)
def test_a_second_sigint_kills_everything_at_once(start_up: Callable[..., Up]) -> None:
    instance = start_up("--executors", "1", "--builders", "0")
    limits = {"run": {"wall_time": 120}}
    sid = submit(instance, "sleep 100", wait=False, limits=limits)["id"]
    wait_for("running", lambda: submission(instance, sid)["status"] == "running")
    wait_for("the sandbox", lambda: sandboxed(descendants(instance.proc.pid)))
    snapshot = descendants(instance.proc.pid)
    assert len(sandboxed(snapshot)) >= 2  # nsjail and what it runs
    instance.proc.send_signal(signal.SIGINT)
    time.sleep(1)
    assert instance.proc.poll() is None  # draining: the submission still runs
    began = time.monotonic()
    instance.proc.send_signal(signal.SIGINT)
    assert instance.proc.wait(timeout=20) == 130
    assert time.monotonic() - began < 10
    instance.assert_nothing_left(snapshot)  # nsjail and the sandboxed sleep included


@pytest.mark.timeout(120)
def test_children_stop_when_the_supervisor_is_killed(start_up: Callable[..., Up]) -> None:
    instance = start_up("--executors", "2", "--builders", "0")
    wait_for("two executors", lambda: len(instance.workers()) == 2)
    snapshot = descendants(instance.proc.pid)
    instance.proc.kill()
    instance.proc.wait()
    wait_for("the children to stop", lambda: not still_alive(snapshot), timeout=30)
    assert mentioning(instance.state) == {}


@pytest.mark.timeout(120)
def test_a_crash_loop_backs_off(start_up: Callable[..., Up], tmp_path: Path) -> None:
    # Executors refuse a sandbox root that other users cannot reach (tmp_path is 0700).
    unusable = tmp_path / "unsearchable" / "root"
    instance = start_up(
        "--executors", "1", "--builders", "0", env={"CELLBLOCK_SANDBOX__ROOT": f'"{unusable}"'}
    )

    def executor_starts() -> int:
        return sum(e["child"].startswith("executor-") for e in instance.events("started"))

    backoff = "crashing repeatedly; waiting before starting it again"
    wait_for("the back-off", lambda: instance.events(backoff))
    time.sleep(5)
    # 3 at once, then after 1, 2 and 4 s: never a spin.
    assert 4 <= executor_starts() <= 7, executor_starts()
    status, health = instance.request("GET", "/api/v1/health")
    assert status == 200 and health["executors"] == 0
    assert instance.stop(signal.SIGINT) == 0


def test_up_that_cannot_listen_stops_what_it_started(
    start_up: Callable[..., Up], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        instance = start_up("--port", str(port), "--executors", "1", wait=False)
        assert instance.proc.wait(timeout=40) == 3
    assert "the service ended" in instance.err.read_text()
    assert mentioning(instance.state) == {}
    assert not (instance.state / "redis.sock").exists()


def test_every_worker_command_line_parses_as_its_cellblock_command(
    config: config_module.Config,
) -> None:
    options = up.UpOptions(
        host="::", port=1, executors=0, builders=0, log_level="info", config_file=Path("c.toml")
    )
    assert {kind.scale_key for kind in up.WORKER_KINDS} == set(options.counts())
    supervisor = up.Supervisor(config, options)
    supervisor.redis_url = "unix:///state/redis.sock"
    for kind in up.WORKER_KINDS:
        argv = supervisor._worker_argv(kind, 1)
        assert argv[:3] == [sys.executable, "-m", "cellblock"]
        args = cli.build_parser().parse_args(argv[3:])
        assert (args.command, args.id) == (kind.command, f"{kind.command}-{HOST}-1")
        assert (args.redis, args.config) == ("unix:///state/redis.sock", Path("c.toml"))
    assert [kind.command for kind in up.WORKER_KINDS] == ["executor", "builder"]
