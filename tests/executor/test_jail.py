"""One jail (executor/jail.py) against real nsjail, the real cellblock-init and real cgroups.

A jail starts before its stage is known and waits; ``serve`` hands it the stage over its
control socket and watches it to its end (its report, nsjail ending without one, or the
timeout); ``dismiss`` lets the reported stage's init go; ``end`` lets the jail go and ``kill``
ends it at once. A rerun jail serves stages one after another, each in a fresh jail. Whatever
way it ends, nothing may stay behind: no process of its uid, no cgroup, no descriptor of ours.
The jails run as a uid of this test session's own, so that concurrent sessions on the host
never count each other's processes.
"""

from __future__ import annotations

import array
import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cellblock import config
from cellblock.executor import host
from cellblock.executor import jail as jail_module
from cellblock.executor.jail import Jail, JailFds, Seen, StageStreams, feed, wait_exit
from cellblock.executor.sandbox import Mount, Sandbox, StageSpec
from cellblock.executor.sandbox import request as control_request
from cellblock.service.protocol import parse_submission

Until = Callable[..., Awaitable[Any]]  # the until fixture of tests/conftest.py
#: Far from the slots of the other executor tests (7, 8) and of the executors the tests start.
SLOT = 60_000 + os.getpid() % 4096 * 4
LIMITS = config.load(Path("/nonexistent"), environ={}).limits


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def box(sandbox_host: host.SandboxHost) -> Sandbox:
    """The sandbox whose nsjail command lines the jails run: the real mounts, uid and seccomp."""
    return sandbox_host.sandbox(slot=SLOT)


@pytest.fixture
def box_dir(sandbox_host: host.SandboxHost, box: Sandbox) -> Iterator[Path]:
    """A working directory of the jails' uid, on the working disk."""
    path = sandbox_host.disk.create(f"jail-{secrets.token_hex(6)}", box.uid)
    yield path
    sandbox_host.disk.remove(path)


#: The working directory each jail was started for, as init checks it against the stage's.
BOXES: dict[Jail, os.stat_result] = {}


@dataclass
class Jails:
    """Starts jails as the sandbox would, and kills what a test leaves running."""

    box: Sandbox
    started: list[Jail] = field(default_factory=list)

    def start(self, workdir: Path, mounts: Sequence[Mount] = (), *, rerun: bool = False) -> Jail:
        cgroup = self.box.cgroups.create(f"{self.box.uid}-{secrets.token_hex(6)}")
        try:
            jail = Jail.start(
                lambda fds: self.box.command(
                    workdir, mounts, fds, cgroup.nsjail_args(), rerun=rerun
                ),
                cgroup,
                rerun=rerun,
            )
        except BaseException:
            cgroup.close()
            cgroup.remove()
            raise
        self.started.append(jail)
        BOXES[jail] = os.stat(workdir)
        return jail


@pytest.fixture
def jails(box: Sandbox) -> Iterator[Jails]:
    jails = Jails(box)
    yield jails
    for jail in jails.started:
        if jail.log >= 0:  # not released yet (released twice, a cgroup would close twice)
            jail.kill()


def stage(workdir: Path, script: str, **limits: Any) -> bytes:
    """The request init reads from its control socket for ``script`` as a run stage."""
    resolved = parse_submission({"run": script, "limits": {"run": limits}}, LIMITS).limits.run
    spec = StageSpec(script=script, limits=resolved, workdir=workdir, env={"PATH": "/usr/bin:/bin"})
    return control_request(spec)


@dataclass
class Outputs:
    """The consumers ``serve`` hands the stage's stdout and stderr to."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    def consumers(self) -> dict[str, Callable[[bytes], Any]]:
        return {"stdout": self.stdout.extend, "stderr": self.stderr.extend}


async def serve(
    jail: Jail, control: bytes, stdin: bytes = b"", timeout: float = 10
) -> tuple[Seen, Outputs]:
    outputs = Outputs()
    seen = await jail.serve(control, BOXES[jail], StageStreams(stdin), outputs.consumers(), timeout)
    return seen, outputs


@dataclass
class Ends:
    """The host's ends of a stage handed over by ``hand_over``: the test closes them."""

    stdin: int
    stdout: int
    stderr: int
    status: int

    def close(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr, self.status):
            os.close(fd)


async def hand_over(jail: Jail, request: bytes, *, magic: int = jail_module.MAGIC) -> Ends:
    """Give the jail its stage behind serve's back, as a dead executor's last act would, with
    the handshake done here by hand: init's ready byte, then the header with the stage's four
    descriptors attached, then the request. Init starts the stage, and nothing watches it."""
    loop = asyncio.get_running_loop()
    ready = await asyncio.wait_for(loop.sock_recv(jail.control, 1), 10)
    assert ready == jail_module.READY
    (stdin_r, stdin_w), (stdout_r, stdout_w), (stderr_r, stderr_w) = (os.pipe() for _ in "012")
    status_host, status_jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs = array.array("i", [stdin_r, stdout_w, stderr_w, status_jail.fileno()])
        box = BOXES[jail]
        header = jail_module.HEADER.pack(magic, len(request), box.st_dev, box.st_ino)
        # A few bytes into an empty socket buffer: a non-blocking sendmsg takes them at once.
        sent = jail.control.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, theirs)])
        assert sent == len(header)
        await loop.sock_sendall(jail.control, request)
    finally:
        for fd in (stdin_r, stdout_w, stderr_w):  # init holds its own copies now
            os.close(fd)
        status_jail.close()
    return Ends(stdin=stdin_w, stdout=stdout_r, stderr=stderr_r, status=status_host.detach())


def nsjail_cgroups(jail: Jail) -> list[Path]:
    """The child cgroups nsjail made for its jails under the stage's memory cgroup."""
    return sorted(jail.cgroup.memory_dir.glob("NSJAIL.*"))


def processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes of ``uid``: the jail's init and what it runs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[1]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


def open_descriptors() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def assert_released(jail: Jail) -> None:
    """Every descriptor of ours closed, nsjail reaped, the stage's cgroup gone."""
    assert (jail.control.fileno(), jail.log, jail.status) == (-1, -1, -1)
    assert jail.proc.returncode is not None
    assert not Path(f"/proc/{jail.proc.pid}").exists(), "nsjail is not reaped"
    assert [d for d in jail.cgroup._dirs() if d.exists()] == []


# -- a jail waits, then serves one stage ------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_started_jail_waits_then_serves_the_stage_it_is_given(
    jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    jail = jails.start(box_dir)
    [init] = await until(lambda: processes_of(box.uid), "the jail's init")
    await asyncio.sleep(0.2)
    assert jail.running() and processes_of(box.uid) == [init]  # it waits, running nothing
    assert list(box_dir.iterdir()) == []

    script = "echo out; echo err >&2; cat; touch made-here"
    seen, outputs = await serve(jail, stage(box_dir, script), stdin=b"from stdin\n")

    assert seen.status.startswith("exited 0 "), seen
    assert not seen.wall_killed and 0 < seen.wall_time < 5
    assert (outputs.stdout, outputs.stderr) == (b"out\nfrom stdin\n", b"err\n")
    assert (box_dir / "made-here").exists()  # the stage ran in the working directory
    await jail.end()
    assert_released(jail)
    assert processes_of(box.uid) == []


@pytest.mark.timeout(30)
async def test_the_consumers_get_output_while_the_stage_runs(jails: Jails, box_dir: Path) -> None:
    jail = jails.start(box_dir)
    arrived: list[tuple[float, bytes]] = []
    consumers = {"stdout": lambda b: arrived.append((time.monotonic(), b)), "stderr": bytes}
    script = stage(box_dir, "echo first; sleep 1; echo second")
    seen = await jail.serve(script, BOXES[jail], StageStreams(), consumers, 10)
    assert seen.status.startswith("exited 0 ")
    assert b"".join(chunk for _, chunk in arrived) == b"first\nsecond\n"
    (first_at, first), (last_at, _) = arrived[0], arrived[-1]
    assert first == b"first\n" and last_at - first_at >= 0.9  # not held back until the end
    await jail.end()


@pytest.mark.timeout(30)
async def test_all_output_written_before_the_report_is_there_when_serve_returns(
    jails: Jails, box_dir: Path
) -> None:
    # Init reports once the stage's processes are gone; what they wrote is in the pipes by
    # then, and serve reads it all before it returns, nsjail's end or not.
    jail = jails.start(box_dir)
    # More than a pipe holds, from the program and from a child it waits for.
    script = "head -c 300000 /dev/zero & head -c 100000 /dev/zero >&2; wait"
    seen, outputs = await serve(jail, stage(box_dir, script))
    assert seen.status.startswith("exited 0 ")
    assert (len(outputs.stdout), len(outputs.stderr)) == (300_000, 100_000)
    await jail.end()
    assert_released(jail)


@pytest.mark.timeout(30)
async def test_a_program_that_never_reads_its_stdin_does_not_hold_the_stage(
    jails: Jails, box_dir: Path
) -> None:
    jail = jails.start(box_dir)
    big = b"x" * (4 * 1024 * 1024)  # far more than a pipe holds
    seen, outputs = await serve(jail, stage(box_dir, "echo done"), stdin=big, timeout=10)
    assert seen.status.startswith("exited 0 ") and not seen.wall_killed
    assert outputs.stdout == b"done\n"
    await jail.end()
    assert_released(jail)


@pytest.mark.timeout(30)
async def test_a_failing_program_is_reported_with_its_status(jails: Jails, box_dir: Path) -> None:
    jail = jails.start(box_dir)
    seen, _ = await serve(jail, stage(box_dir, "kill -SEGV $$"))
    assert seen.status.split()[:2] == ["signaled", str(int(signal.SIGSEGV))]
    await jail.end()


# -- the ways a stage ends without a report ---------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_stage_past_the_timeout_is_killed_and_seen_as_wall_killed(
    jails: Jails, box: Sandbox, box_dir: Path
) -> None:
    jail = jails.start(box_dir)
    seen, outputs = await serve(jail, stage(box_dir, "echo started; sleep 60"), timeout=0.5)
    assert seen.wall_killed
    assert seen.status == ""  # init died with the stage: no report
    assert 0.5 <= seen.wall_time < 3
    assert seen.cpu_time >= 0  # nsjail's and the jail's, the fallback when init cannot report
    assert outputs.stdout == b"started\n"
    assert not jail.running()  # serve waited for nsjail, which ends with its jail
    assert processes_of(box.uid) == []
    await jail.end()
    assert_released(jail)


@pytest.mark.timeout(30)
async def test_a_request_init_cannot_read_ends_the_jail_without_a_report(
    jails: Jails, box: Sandbox, box_dir: Path
) -> None:
    jail = jails.start(box_dir)
    seen, outputs = await serve(jail, b"not\0a\0request\0")
    assert (seen.status, seen.wall_killed) == ("", False)
    # Init holds the stage's streams by the time it reads the fields: it says why there.
    assert b"cellblock-init: bad request" in outputs.stderr
    assert outputs.stdout == b""
    await jail.end()
    assert_released(jail)
    assert processes_of(box.uid) == []


@pytest.mark.timeout(30)
async def test_a_header_init_cannot_read_ends_the_jail_without_a_report(
    jails: Jails, box: Sandbox, box_dir: Path
) -> None:
    jail = jails.start(box_dir)
    ends = await hand_over(jail, stage(box_dir, "touch ran"), magic=0x0BADF00D)
    await asyncio.wait_for(jail.exited(), 10)  # init refuses it and exits, so does nsjail
    assert os.read(ends.status, 64) == b""  # no report, and nothing waits for the host
    assert os.read(ends.stdout, 1) == b""
    assert list(box_dir.iterdir()) == []  # the stage never ran
    ends.close()
    await jail.end()
    assert_released(jail)
    assert processes_of(box.uid) == []


@pytest.mark.timeout(30)
async def test_nsjail_failing_to_make_the_jail_is_seen_in_its_log(
    jails: Jails, box: Sandbox, box_dir: Path, sandbox_root: Path
) -> None:
    missing = sandbox_root / f"missing-{secrets.token_hex(4)}"
    jail = jails.start(box_dir, [Mount(missing, "/opt/missing")])
    seen, outputs = await serve(jail, stage(box_dir, "echo never"))
    assert (seen.status, seen.wall_killed) == ("", False)
    assert str(missing) in seen.log, seen.log  # nsjail says which mount it could not make
    assert outputs.stdout == b""
    await jail.end()
    assert_released(jail)
    assert processes_of(box.uid) == []


@pytest.mark.timeout(30)
async def test_a_consumer_that_fails_is_reported_once_the_stage_has_ended(
    jails: Jails, box: Sandbox, box_dir: Path
) -> None:
    jail = jails.start(box_dir)

    def refuse(chunk: bytes) -> None:
        raise ValueError(f"cannot take {chunk!r}")

    consumers = {"stdout": refuse, "stderr": lambda _: None}
    with pytest.raises(ValueError, match="cannot take"):
        await jail.serve(stage(box_dir, "echo out"), BOXES[jail], StageStreams(), consumers, 10)
    await jail.end()  # the stage had ended: the jail ends as after any other stage
    assert_released(jail)
    assert processes_of(box.uid) == []


# -- end and kill ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_end_lets_an_unused_jail_go_without_running_anything(
    jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    jail = jails.start(box_dir)
    await until(lambda: processes_of(box.uid), "the jail's init")
    started = time.monotonic()
    await jail.end()  # its control socket closes unused: init exits quietly, so does nsjail
    assert time.monotonic() - started < jail_module.END_TIMEOUT
    assert jail.proc.returncode == 0
    assert_released(jail)
    assert processes_of(box.uid) == [] and list(box_dir.iterdir()) == []


@pytest.mark.timeout(30)
async def test_end_kills_a_jail_that_does_not_end_in_time(
    jails: Jails,
    box: Sandbox,
    box_dir: Path,
    until: Until,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jail = jails.start(box_dir)
    ends = await hand_over(jail, stage(box_dir, "sleep 60", wall_time=30))
    await until(lambda: len(processes_of(box.uid)) > 1, "the stage to start")
    monkeypatch.setattr(jail_module, "END_TIMEOUT", 0.5)
    started = time.monotonic()
    await jail.end()
    assert time.monotonic() - started < 5
    assert_released(jail)
    assert processes_of(box.uid) == []
    assert os.read(ends.stdout, 1) == b""  # nothing in the jail holds the stage's stdout
    ends.close()


@pytest.mark.timeout(30)
async def test_kill_ends_a_running_stage_and_nsjail_at_once(
    jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    jail = jails.start(box_dir)
    exited = jail.exited()  # a waiter on nsjail's exit, which kill must not leave pending
    ends = await hand_over(jail, stage(box_dir, "sleep 60 & sleep 60", wall_time=30))
    await until(lambda: len(processes_of(box.uid)) > 2, "the stage's processes")
    started = time.monotonic()
    jail.kill()
    assert time.monotonic() - started < 3
    assert_released(jail)
    assert processes_of(box.uid) == []
    await asyncio.wait([exited], timeout=2)
    assert exited.cancelled()
    assert os.read(ends.stdout, 1) == b""  # nothing in the jail holds the stage's stdout
    ends.close()


@pytest.mark.timeout(30)
async def test_running_sees_a_dead_nsjail_without_reaping_it(
    jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    jail = jails.start(box_dir)
    await until(lambda: processes_of(box.uid), "the jail's init")
    assert jail.running()
    os.kill(jail.proc.pid, signal.SIGKILL)
    await until(lambda: not jail.running(), "running() to see nsjail dead")
    # Still a zombie: end() reaps it, and gets its CPU time.
    assert Path(f"/proc/{jail.proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    assert jail.proc.returncode is None
    await jail.end()
    assert_released(jail)
    # The killed nsjail's init, orphaned, saw its control socket close with the end: gone.
    await until(lambda: not processes_of(box.uid), "the orphaned init to end")


# -- a rerun jail serves stages one after another --------------------------------------------


async def waiting_init(box: Sandbox, until: Until, not_: int = 0) -> int:
    """The pid of the jail's init once it is the only process of the uid, other than ``not_``:
    a jail made and waiting for its stage."""

    def one() -> int | None:
        pids = processes_of(box.uid)
        return pids[0] if len(pids) == 1 and pids[0] != not_ else None

    return await until(one, "a fresh init waiting for its stage")


@pytest.mark.timeout(30)
async def test_a_rerun_jail_serves_stages_one_after_another_each_in_a_fresh_jail(
    jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    jail = jails.start(box_dir, rerun=True)
    script = "echo {word}; readlink /proc/self/ns/pid; echo $$; exit {code}"
    seen_stages: list[tuple[Seen, Outputs]] = []
    inits: list[tuple[int, str]] = []
    for word, code in (("one", 0), ("two", 3)):
        init = await waiting_init(box, until, not_=inits[-1][0] if inits else 0)
        inits.append((init, os.readlink(f"/proc/{init}/ns/pid")))
        seen_stages.append(await serve(jail, stage(box_dir, script.format(word=word, code=code))))
        jail.dismiss()  # measured: its init may go, and nsjail makes the next jail
    (first, out1), (second, out2) = seen_stages
    # Each stage has its own report and its own streams: nothing of the first in the second.
    assert first.status.startswith("exited 0 ") and second.status.startswith("exited 3 ")
    assert not first.wall_killed and not second.wall_killed
    word1, ns1, pid1 = out1.stdout.decode().split()
    word2, ns2, pid2 = out2.stdout.decode().split()
    assert (word1, word2) == ("one", "two") and out1.stderr == out2.stderr == b""
    # A fresh PID namespace each time, with the program as the first child of a fresh pid 1.
    assert ns1 != ns2 and (pid1, pid2) == ("2", "2")
    (init1, host_ns1), (init2, host_ns2) = inits
    # The init seen waiting on the host is pid 1 of the namespace its stage then ran in.
    assert init1 != init2 and (host_ns1, host_ns2) == (ns1, ns2)
    assert not Path(f"/proc/{init1}").exists()  # the first stage's init is gone
    assert jail.running()  # one nsjail for both
    await jail.end()
    assert_released(jail)
    assert processes_of(box.uid) == []


async def served(
    jails: Jails, box: Sandbox, box_dir: Path, until: Until, script: str, *, rerun: bool
) -> tuple[Jail, int]:
    """A jail started, its init seen waiting, then ``script`` served to a clean exit: the
    jail (its init waiting to be dismissed) and that init's pid."""
    jail = jails.start(box_dir, rerun=rerun)
    init = await waiting_init(box, until)
    seen, _ = await serve(jail, stage(box_dir, script))
    assert seen.status.startswith("exited 0 ")
    return jail, init


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rerun", [False, True], ids=["one-shot", "rerun"])
async def test_a_reported_stage_keeps_its_jail_and_cgroup_until_dismissed(
    rerun: bool, jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    # The host measures the stage on nsjail's child cgroup of its jail, which nsjail removes
    # once init has gone: init must not go before the host says so.
    jail, init = await served(
        jails, box, box_dir, until, "head -c 20000000 /dev/zero | tail -c 1", rerun=rerun
    )
    assert jail.status >= 0
    [child] = nsjail_cgroups(jail)
    await asyncio.sleep(0.3)  # however long the host takes
    assert child.exists() and processes_of(box.uid) == [init]
    assert jail.cgroup.peak_memory() > 0  # what the host measures meanwhile
    jail.dismiss()
    assert jail.status == -1
    await until(lambda: not child.exists(), "nsjail to remove the stage's cgroup")
    if rerun:  # a fresh init in a fresh jail, in a cgroup of its own
        await waiting_init(box, until, not_=init)
        [next_child] = nsjail_cgroups(jail)
        assert jail.running() and next_child != child
    else:  # its only jail gone, nsjail ends
        await asyncio.wait_for(jail.exited(), 10)
    await jail.end()
    assert_released(jail)
    assert processes_of(box.uid) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dismissed", [False, True], ids=["reported", "dismissed"])
async def test_end_terminates_a_rerun_jail_and_releases_everything(
    dismissed: bool, jails: Jails, box: Sandbox, box_dir: Path, until: Until
) -> None:
    # A rerun jail never ends by itself: dismissed, its init is followed by another one.
    jail, init = await served(jails, box, box_dir, until, "echo served", rerun=True)
    if dismissed:
        jail.dismiss()
        await waiting_init(box, until, not_=init)
    started = time.monotonic()
    await jail.end()
    assert time.monotonic() - started < jail_module.END_TIMEOUT  # ended, not killed
    assert not jail.running()
    assert_released(jail)
    assert processes_of(box.uid) == [] and nsjail_cgroups(jail) == []


@pytest.mark.timeout(30)
async def test_a_rerun_jail_whose_stage_is_wall_killed_serves_no_other(
    jails: Jails, box: Sandbox, box_dir: Path
) -> None:
    # The stage's end is unknown: nsjail is terminated rather than let make its next jail.
    jail = jails.start(box_dir, rerun=True)
    seen, outputs = await serve(jail, stage(box_dir, "echo started; sleep 60"), timeout=0.5)
    assert seen.wall_killed and seen.status == ""
    assert 0.5 <= seen.wall_time < 3 and seen.cpu_time >= 0
    assert outputs.stdout == b"started\n"
    assert not jail.running()
    assert processes_of(box.uid) == []
    await jail.end()
    assert_released(jail)


# -- start: what nsjail gets, and what a failed start leaves ---------------------------------


@pytest.mark.timeout(30)
async def test_start_hands_nsjail_its_ends_and_keeps_only_ours(jails: Jails, box_dir: Path) -> None:
    before = open_descriptors()
    jail = jails.start(box_dir)
    assert jail.status == -1  # a stage's status socket is made when it is served
    assert jail.control.gettimeout() == 0.0  # non-blocking: serve waits on the loop
    ours = {jail.control.fileno(), jail.log}
    # Our end of the control socket and of the log pipe kept (plus what the cgroup holds
    # open, on v1), none of nsjail's ends.
    assert len(ours) == 2 and ours <= open_descriptors() - before
    cgroup_fds = open_descriptors() - before - ours
    assert len(cgroup_fds) <= 2
    pid = jail.proc.pid
    assert os.getsid(pid) == pid  # a session of its own, which kill() can signal as a group
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""  # none of the executor's variables
    await jail.end()
    assert open_descriptors() == before


def test_a_start_that_fails_leaves_no_descriptor_open(box: Sandbox) -> None:
    cgroup = box.cgroups.create(f"{box.uid}-{secrets.token_hex(6)}")
    try:
        before = open_descriptors()

        def command(fds: JailFds) -> list[str]:
            assert len({fds.control, fds.log}) == 2
            return ["/nonexistent/nsjail"]

        with pytest.raises(FileNotFoundError):
            Jail.start(command, cgroup)
        assert open_descriptors() == before

        def refuse(fds: JailFds) -> list[str]:
            raise RuntimeError("no command")

        with pytest.raises(RuntimeError):
            Jail.start(refuse, cgroup)
        assert open_descriptors() == before
    finally:
        cgroup.close()
        cgroup.remove()


# -- the pipe helpers, on plain pipes ---------------------------------------------------------


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep-open"])
async def test_feed_writes_everything_and_closes_the_pipe_only_when_asked(close: bool) -> None:
    r, w = os.pipe()
    data = os.urandom(1024 * 1024)  # more than the pipe holds: feed waits for the reader
    writer = asyncio.ensure_future(feed(w, data, close=close))
    received = bytearray()
    os.set_blocking(r, False)
    while len(received) < len(data):
        await asyncio.sleep(0.001)
        try:
            chunk = os.read(r, 1 << 20)
        except BlockingIOError:
            continue
        assert chunk, "the pipe closed before all of it came"
        received += chunk
    await writer
    assert received == data
    assert is_open(w) is not close
    if close:
        assert os.read(r, 1) == b""  # feed's close is the reader's end of file
    else:
        with pytest.raises(BlockingIOError):  # open, with nothing more in it
            os.read(r, 1)
        os.close(w)
    os.close(r)


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep-open"])
async def test_feed_stops_quietly_when_the_reader_goes_away(close: bool) -> None:
    r, w = os.pipe()
    writer = asyncio.ensure_future(feed(w, b"x" * (1024 * 1024), close=close))
    await asyncio.sleep(0.05)  # the pipe is full, feed waits
    os.close(r)
    await asyncio.wait_for(writer, 5)  # no BrokenPipeError
    assert is_open(w) is not close
    if not close:
        os.close(w)


@pytest.mark.parametrize("close", [True, False], ids=["close", "keep-open"])
async def test_feed_closes_the_pipe_when_cancelled_only_when_asked(close: bool) -> None:
    r, w = os.pipe()
    writer = asyncio.ensure_future(feed(w, b"x" * (1024 * 1024), close=close))
    await asyncio.sleep(0.05)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    assert is_open(w) is not close
    if not close:
        os.close(w)
    os.close(r)


async def test_wait_exit_reaps_the_process_and_answers_its_cpu_time() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    proc = subprocess.Popen([sys.executable, "-c", burn])
    cpu = await asyncio.wait_for(wait_exit(proc), 20)
    assert 0.25 <= cpu < 5
    assert proc.returncode == 0
    assert not Path(f"/proc/{proc.pid}").exists()  # reaped here, not by Popen


async def test_a_jail_refuses_a_stage_for_another_working_directory(
    jails: Jails, box_dir: Path, sandbox_host: host.SandboxHost, box: Sandbox
) -> None:
    """A series points its link at the next test's snapshot once a jail is ready; should that
    jail die and nsjail make the next one before the stage arrives, the stage must not run in
    the next test's directory: init compares its /box with the one the stage is for."""
    other = sandbox_host.disk.create(f"jail-{secrets.token_hex(6)}", box.uid)
    try:
        jail = jails.start(box_dir, rerun=True)
        outputs = Outputs()
        seen = await jail.serve(
            stage(box_dir, "touch ran"), os.stat(other), StageStreams(), outputs.consumers(), 10
        )
        assert seen.status == "wrong-box\n" and not seen.wall_killed
        assert not (box_dir / "ran").exists() and not (other / "ran").exists()
        await jail.end()
        assert_released(jail)
    finally:
        sandbox_host.disk.remove(other)
