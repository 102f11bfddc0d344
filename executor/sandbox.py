"""One stage of a submission, run in nsjail under its limits, measured.

The jail: new user, PID, mount, network (loopback only), IPC, UTS and cgroup namespaces; an
unprivileged uid of the executor slot; a tmpfs root holding a read-only base (the host's system
directories in ``host`` mode, nothing in ``pure`` mode), the dependency closures read-only at
their own paths, the working directory read-write at ``/box`` (a subvolume of
the working disk, capped at the stage's ``disk`` limit: see disk.py), a size-capped ``/tmp``, a
minimal ``/dev`` and a fresh ``/proc``; a seccomp policy (seccomp.py); only the environment we
pass.

Inside, ``cellblock-init`` (jailinit.c) is pid 1: it waits for its stage on a control socket,
so that the jail can be started before the stage is known (see ``Sandbox``), then applies the
stage's sixteen rlimits to the program, reaps the namespace and reports the program's exact wait
status and CPU time. Outside, the stage's cgroup caps memory and pids and measures peak memory;
a wall-clock timer kills the cgroup. Output is read from pipes, never from files the sandbox
could have planted.

Cancellation: if the task running ``Sandbox.run`` is cancelled, every process of the stage is
killed and its cgroup removed before the ``CancelledError`` propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import secrets
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellblock.executor import seccomp
from cellblock.executor.cgroups import NSJAIL_LOOSE_MEMORY, NSJAIL_LOOSE_PIDS, Cgroups
from cellblock.executor.console import Console
from cellblock.executor.disk import WorkDisk
from cellblock.executor.jail import READY, Jail, JailFds, StageStreams
from cellblock.service.protocol import (
    RLIMITS,
    STREAMS,
    SandboxResult,
    SandboxStatus,
    StageLimits,
    Stream,
    encode_output,
    now,
)

#: Where things are inside the jail.
WORKDIR = "/box"
INIT_PATH = "/.cellblock/init"
#: Where init finds its jail's own user.max_user_namespaces, to seal it (see jailinit.c).
USERNS_LIMIT_PATH = "/.cellblock/userns"
USERNS_LIMIT_SYSCTL = "/proc/sys/user/max_user_namespaces"
SANDBOX_UID = 1000
#: Seconds past a stage's wall-time limit before our timer kills it.
WALL_GRACE = 0.05
#: Seconds past the wall-time limit at which init kills the stage itself: the last resort,
#: when the executor died mid-stage.
INIT_DEADLINE_SLACK = 5
HOSTNAME = "cellblock"
BASE_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr")
BASE_ETC = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime")
#: ``tty`` is the opener's own controlling terminal (an interactive stage's, see console.py),
#: and no device at all (ENXIO) to a stage without one.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)

OutputSink = Callable[[Stream, bytes], None]


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class StageSpec:
    """What one run of the sandbox needs."""

    script: str
    limits: StageLimits
    workdir: Path
    env: Mapping[str, str]
    args: Sequence[str] = ()
    stdin: bytes = b""
    mounts: Sequence[Mount] = ()
    shell: str = "/bin/bash"
    #: Interactive stdin (then ``stdin`` is not used): one stage's, never reused.
    console: Console | None = None


@dataclass
class StageOutcome:
    status: SandboxStatus
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time: float = 0.0
    cpu_time: float = 0.0
    memory: int = 0
    error: str | None = None
    started_at: str = field(default_factory=now)
    finished_at: str = ""

    def result(self, limits: StageLimits) -> SandboxResult:
        """The stage result of the protocol."""
        stdout, stdout_encoding = encode_output(self.stdout)
        stderr, stderr_encoding = encode_output(self.stderr)
        return SandboxResult(
            status=self.status,
            exit_code=self.exit_code,
            signal=self.signal,
            signal_name=signal.Signals(self.signal).name if self.signal else None,
            stdout=stdout,
            stderr=stderr,
            stdout_encoding=stdout_encoding,
            stderr_encoding=stderr_encoding,
            stdout_truncated=self.stdout_truncated,
            stderr_truncated=self.stderr_truncated,
            wall_time=round(self.wall_time, 6),
            cpu_time=round(self.cpu_time, 6),
            memory=self.memory,
            limits=limits.as_json(),
            message=self.error,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )


@dataclass(frozen=True)
class InitReport:
    """The line cellblock-init writes when the program has ended."""

    kind: str
    code: int
    cpu_time: float
    wall_time: float
    detail: str = ""

    @classmethod
    def parse(cls, text: str) -> InitReport | None:
        lines = text.splitlines()
        if not lines:
            return None
        words = lines[0].split()
        if words[0] in ("exited", "signaled") and len(words) == 5:
            code, utime, stime, wall = (int(w) for w in words[1:])
            return cls(words[0], code, (utime + stime) / 1e6, wall / 1e6)
        if words[0] == "wrong-box":
            return cls(words[0], 0, 0.0, 0.0)
        if words[0] in ("exec-failed", "seal-failed"):
            return cls(words[0], 0, 0.0, 0.0, os.strerror(int(words[1])))
        if words[0] == "rlimit-failed":
            return cls(words[0], 0, 0.0, 0.0, f"{words[1]}: {os.strerror(int(words[2]))}")
        return None


def classify(
    report: InitReport | None,
    *,
    wall_killed: bool,
    out_of_memory: bool,
    disk_full: bool,
    cpu_time: float,
    limits: StageLimits,
) -> tuple[SandboxStatus, str | None]:
    """The stage status from what was observed, most specific cause first. Pure."""
    if wall_killed:
        return "time_limit", f"wall time limit of {limits.wall_time:g} s exceeded"
    if report is None:
        return "error", "the sandbox ended without reporting the program's status"
    if report.kind == "exec-failed":
        return "error", f"the sandbox could not start the stage's shell: {report.detail}"
    if report.kind == "seal-failed":
        return "error", f"the sandbox could not seal its user namespace: {report.detail}"
    if report.kind == "wrong-box":
        return "error", "the sandbox's jail was not made for this stage's working directory"
    if report.kind == "rlimit-failed":
        return "error", f"the sandbox could not apply the limit {report.detail}"
    if report.kind == "exited" and report.code == 0:
        return "ok", None
    if out_of_memory:
        return "memory_limit", f"memory limit of {limits.memory} bytes exceeded"
    cpu_soft = limits.rlimits["cpu"][0]
    # The kernel enforces RLIMIT_CPU on tick-sampled time, so the measured total can fall a
    # little short of the limit that killed the program.
    cpu_hard = limits.rlimits["cpu"][1]
    killed = (report.kind == "signaled" and report.code == signal.SIGKILL) or (
        report.kind == "exited" and report.code == 128 + signal.SIGKILL
    )
    cpu_exhausted = (cpu_soft is not None and cpu_time >= cpu_soft * 0.95) or (
        # At the hard limit the kernel sends SIGKILL, and the tree's measured time may fall
        # further short of it (seen: 0.92 s for 1 s); no other cause here kills with SIGKILL.
        killed and cpu_hard is not None and cpu_time >= cpu_hard * 0.8
    )
    if (report.kind == "signaled" and report.code == signal.SIGXCPU) or cpu_exhausted:
        return "time_limit", f"CPU time limit of {cpu_soft} s exceeded"
    # A shell reports a child killed by signal N as exit status 128+N.
    if (report.kind == "signaled" and report.code == signal.SIGXFSZ) or (
        report.kind == "exited" and report.code == 128 + signal.SIGXFSZ
    ):
        return "output_limit", f"file size limit of {limits.rlimits['fsize'][0]} bytes exceeded"
    if disk_full:
        return "disk_limit", f"disk limit of {limits.disk} bytes for the working directory reached"
    if report.kind == "signaled":
        return "signaled", None
    return "failed", None


class _Capture:
    """Keeps the first ``limit`` bytes of one stream and counts the rest."""

    def __init__(self, name: Stream, limit: int, sink: OutputSink | None) -> None:
        self.name, self.limit, self.sink = name, limit, sink
        self.data = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        kept = chunk[: max(room, 0)]
        if len(chunk) > len(kept):
            self.truncated = True
        if kept:
            self.data += kept
            if self.sink is not None:
                self.sink(self.name, bytes(kept))


#: The resource numbers of <sys/resource.h> (Python's ``resource`` lacks RLIMIT_LOCKS).
LINUX_RLIMIT_NUMBERS = {
    "cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5, "nproc": 6, "nofile": 7,
    "memlock": 8, "as": 9, "locks": 10, "sigpending": 11, "msgqueue": 12, "nice": 13,
    "rtprio": 14, "rttime": 15,
}  # fmt: skip


def raise_hard_limits() -> None:
    """Lift this process's hard rlimits, which the jail inherits, so a stage may be given any
    value up to the policy's maxima (only a privileged process may raise a hard limit)."""
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    for name in RLIMITS:
        res = LINUX_RLIMIT_NUMBERS[name]
        soft, _ = resource.getrlimit(res)
        hard = nr_open if name == "nofile" else resource.RLIM_INFINITY
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (soft, hard))


def _rlimit_arg(name: str, value: tuple[int | None, int | None]) -> str:
    soft, hard = ("inf" if v is None else str(v) for v in value)
    return f"{name}={soft}:{hard}"


JailKey = tuple[Path, tuple[Mount, ...]]


def request(spec: StageSpec) -> bytes:
    """The stage's fields as cellblock-init reads them from its control socket (jailinit.c)."""
    limits = [_rlimit_arg(name, spec.limits.rlimits[name]) for name in RLIMITS]
    # `-c` rather than a script file: bash then execs the script's last command itself, so
    # a program that dies of a signal is seen dying of it, not as the shell's exit status.
    shell = [spec.shell, "-c", spec.script, os.path.basename(spec.shell), *spec.args]
    variables = dict(spec.env)
    direct = direct_argv(spec.script, spec.args) if spec.shell.endswith("/bash") else None
    if direct is None:
        argv, fallback = shell, []
    else:
        # What bash itself would add before it execs the command.
        variables |= {"PWD": WORKDIR, "SHLVL": variables.get("SHLVL", "0"), "_": direct[0]}
        argv, fallback = direct, shell
    env = [f"{key}={value}" for key, value in variables.items()]
    deadline = math.ceil(spec.limits.wall_time) + INIT_DEADLINE_SLACK
    fields = [str(deadline), str(len(limits)), *limits, str(len(env)), *env,
              str(len(argv)), *argv, str(len(fallback)), *fallback]  # fmt: skip
    encoded = [os.fsencode(f) for f in fields]
    if any(b"\0" in f for f in encoded):
        raise ValueError("a stage's script, arguments and environment cannot hold NUL bytes")
    return b"".join(f + b"\0" for f in encoded)


#: A word of a script that bash would pass on as it is: nothing to quote, expand or assign.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./+-]+")


def direct_argv(script: str, args: Sequence[str]) -> list[str] | None:
    """The program and arguments bash would exec for ``script`` with positional parameters
    ``args``, if the script is one simple command of plain words naming its program by a path
    (``./prog``, ``./prog "$@"``, ``/usr/bin/python3 main.py``); else ``None``.

    Such a script is run by init directly: bash would only start, parse it and exec the same
    argv, which costs a short test more CPU than its program. Should the exec fail (no such
    file, a script without ``#!``), init runs the script with bash after all, which reports or
    runs it as it always would. A word with a ``/`` is never a builtin, function or alias.
    """
    words = re.split(r"[ \t]+", script.strip(" \t\n"))
    tail: list[str] = []
    if words[-1] == '"$@"':
        words, tail = words[:-1], list(args)
    if not words or "/" not in words[0] or not all(_PLAIN_WORD.fullmatch(w) for w in words):
        return None
    return [*words, *tail]


class Sandbox:
    """Runs stages in nsjail as one executor slot's unprivileged uid.

    A ``Sandbox`` runs one stage at a time; run slots in parallel with one ``Sandbox`` each.

    Starting nsjail (loading it, making the namespaces and the mounts) is most of a short
    stage's time, and depends only on the stage's working directory and mounts, not on its
    script, environment or limits. So a jail can be started ahead (``arm``) and handed its
    stage when it comes; ``run`` takes the armed jail of the stage's working directory and
    mounts if there is one, else starts one. A jail serves one stage and is never reused: an
    armed jail is exactly as fresh as one started on demand.

    Stages that come one after another with the same mounts, each in its own working
    directory (a submission's tests), share a series: one nsjail in rerun mode, which makes a
    fresh jail each time the last one's init ends, with ``/box`` bound from a link that only
    the host can change. When a stage's jail is ready (its mounts made), the link is pointed
    at the next stage's directory, so the next jail is made with that. Each stage still gets
    new namespaces, mounts, init and pipes; nsjail is only loaded once (``run``'s ``then``).
    """

    def __init__(
        self,
        *,
        nsjail: Path,
        init: Path,
        cgroups: Cgroups,
        uid: int,
        etc_dir: Path,
        base: Literal["host", "pure"] = "host",
        disk: WorkDisk,
        tmp_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.nsjail, self.init, self.cgroups, self.disk = nsjail, init, cgroups, disk
        self.uid, self.base, self.tmp_size = uid, base, tmp_size
        self.etc_dir = etc_dir
        write_etc(etc_dir)
        self._base_mounts = self._base_argv()
        self._armed: dict[JailKey, Jail] = {}
        #: Series by the working directory their waiting (or next) jail holds.
        self._series: dict[Path, _Series] = {}
        #: Every series not yet ended, serving or not.
        self._live: set[_Series] = set()
        self._ending: set[asyncio.Task[None]] = set()

    def _base_argv(self) -> list[str]:
        """The mounts every stage of this sandbox shares: the base system and /dev."""
        cmd: list[str] = []
        if self.base == "host":
            for d in BASE_DIRS:
                if os.path.islink(d):  # merged /usr: keep the same symlink
                    cmd += ["--symlink", f"{os.readlink(d)}:{d}"]
                elif os.path.isdir(d):
                    cmd += ["--bindmount_ro", d]
            for name in BASE_ETC:
                if os.path.exists(f"/etc/{name}"):
                    cmd += ["--bindmount_ro", f"/etc/{name}"]
        for name in ("passwd", "group", "hosts"):
            cmd += ["--bindmount_ro", f"{self.etc_dir / name}:/etc/{name}"]
        # /dev read-only and not sticky: a sticky world-writable /dev makes the kernel refuse
        # O_CREAT opens of the device nodes bound into it (as `> /dev/null` does).
        cmd += ["--mount", "none:/dev:tmpfs:mode=555,size=65536"]
        cmd += ["--mount", f"none:/tmp:tmpfs:size={self.tmp_size}"]
        cmd += ["--mount", f"none:/dev/shm:tmpfs:size={self.tmp_size}"]
        for dev in DEVICES:
            cmd += ["--bindmount", f"/dev/{dev}"]
        for link, target in DEV_LINKS:
            cmd += ["--symlink", f"{target}:/dev/{link}"]
        return cmd

    def command(
        self,
        workdir: Path,
        mounts: Sequence[Mount],
        fds: JailFds,
        cgroup_args: list[str],
        *,
        rerun: bool = False,
    ) -> list[str]:
        """The nsjail command line of a jail for stages in ``workdir`` with ``mounts``; with
        ``rerun``, a jail made afresh each time its init ends (see ``Jail``)."""
        cmd = [
            str(self.nsjail), "--mode", "r" if rerun else "o", "--log_fd", str(fds.log), "--quiet",
            # Our init applies every rlimit exactly; nsjail's own (MB-granular) ones stay off.
            "--disable_rlimits",
            # No time limit of nsjail's: it would count from the start of an armed jail. The
            # wall-clock timer is ours, with init's deadline behind it.
            "--time_limit", "0",
            "--user", f"{SANDBOX_UID}:{self.uid}:1", "--group", f"{SANDBOX_UID}:{self.uid}:1",
            "--hostname", HOSTNAME, "--cwd", WORKDIR,
            "--seccomp_string", seccomp.POLICY,
            # For init alone, to seal the user namespace; it drops it before the stage.
            "--cap", "CAP_SYS_RESOURCE",
            "--pass_fd", str(fds.control),
        ]  # fmt: skip
        cmd += self._base_mounts
        for m in mounts:
            cmd += ["--bindmount" if m.writable else "--bindmount_ro", f"{m.source}:{m.target}"]
        cmd += ["--bindmount", f"{workdir}:{WORKDIR}"]
        cmd += ["--bindmount_ro", f"{self.init}:{INIT_PATH}"]
        # Resolved by nsjail inside the jail's user namespace, so this is that namespace's own
        # limit, not the host's.
        cmd += ["--bindmount", f"{USERNS_LIMIT_SYSCTL}:{USERNS_LIMIT_PATH}"]
        cmd += cgroup_args
        cmd += ["--", INIT_PATH, str(fds.control)]
        return cmd

    def arm(self, workdir: Path, mounts: Sequence[Mount] = ()) -> None:
        """Start now the jail of a coming stage in ``workdir`` with ``mounts``, unless one is
        armed already. Until it is given a stage, its init waits and runs nothing."""
        key = (workdir, tuple(mounts))
        if key not in self._armed:
            self._armed[key] = self._start(key)

    def retire(self, workdir: Path) -> None:
        """Give up the armed jails of ``workdir``, and remove it once no jail uses it any more:
        in the background, off the path of the stage's result."""
        for key in [key for key in self._armed if key[0] == workdir]:
            self._later(self._armed.pop(key).end())
        if workdir in self._series:
            self._end_series(self._series.pop(workdir))
        held = [series.held[workdir] for series in self._live if workdir in series.held]
        self._later(self._remove_after(workdir, [*self._ending, *held]))

    async def aclose(self) -> None:
        """Give up every armed jail and series and wait until every jail of this sandbox has
        ended and every retired working directory is gone."""
        for key in list(self._armed):
            self._later(self._armed.pop(key).end())
        for workdir in list(self._series):
            self._end_series(self._series.pop(workdir))
        while self._ending:
            await asyncio.gather(*self._ending)

    def _start(self, key: JailKey, *, rerun: bool = False) -> Jail:
        workdir, mounts = key
        cgroup = self.cgroups.create(f"{self.uid}-{secrets.token_hex(6)}")
        try:
            return Jail.start(
                lambda fds: self.command(workdir, mounts, fds, cgroup.nsjail_args(), rerun=rerun),
                cgroup,
                rerun=rerun,
            )
        except BaseException:
            cgroup.close()
            cgroup.remove()
            raise

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _remove_after(self, workdir: Path, jails: Sequence[asyncio.Future[None]]) -> None:
        # Once its jails are gone it is no mount point any more: a subvolume still mounted in
        # a jail that is ending cannot be deleted.
        await asyncio.gather(*jails, return_exceptions=True)
        await asyncio.to_thread(self.disk.remove, workdir)  # a btrfs commit: not on the loop

    def arm_series(self, workdir: Path, mounts: Sequence[Mount] = ()) -> None:
        """Start now a series whose first jail holds ``workdir`` (see ``run``'s ``then``),
        unless one does already."""
        standing = self._series.get(workdir)
        if standing is not None and not standing.jail.running():
            self._end_series(self._series.pop(workdir))
            standing = None
        if standing is None:
            self._series[workdir] = self._start_series(workdir, tuple(mounts))

    def _start_series(self, workdir: Path, mounts: tuple[Mount, ...]) -> _Series:
        link = self.disk.root / f"{self.uid}-{secrets.token_hex(6)}.box"
        link.symlink_to(workdir)
        try:
            jail = self._start((link, mounts), rerun=True)
        except BaseException:
            link.unlink()
            raise
        series = _Series(jail, link, mounts, {workdir: asyncio.get_running_loop().create_future()})
        self._live.add(series)
        return series

    def _end_series(self, series: _Series) -> None:
        self._later(self._after_series(series))

    async def _after_series(self, series: _Series) -> None:
        try:
            await series.jail.end()
        finally:
            series.link.unlink(missing_ok=True)
            series.let_go(None)
            self._live.discard(series)

    def _series_jail(
        self, spec: StageSpec, then: Path | None
    ) -> tuple[_Series | None, Callable[[], None] | None]:
        """The series that serves ``spec`` (None: a one-shot jail does), and what to do once its
        jail is ready: point the link at ``then``, so that its next jail is made there."""
        series = self._series.pop(spec.workdir, None)
        if series is not None and (
            series.mounts != tuple(spec.mounts) or not series.jail.running()
        ):
            self._end_series(series)
            series = None
        if series is None and then is not None:
            armed = self._armed.get((spec.workdir, tuple(spec.mounts)))
            if armed is not None and armed.running():
                return None, None  # the jail armed for it serves it (and a series is armed later)
            series = self._start_series(spec.workdir, tuple(spec.mounts))
        if series is None:
            return None, None
        current = series

        def on_ready() -> None:
            # This jail holds spec.workdir, so the one before it has ended.
            current.let_go(spec.workdir)
            if then is not None:
                flip = current.link.with_name(current.link.name + ".new")
                try:
                    flip.unlink(missing_ok=True)
                    flip.symlink_to(then)
                    os.replace(flip, current.link)
                finally:
                    flip.unlink(missing_ok=True)
                current.held[then] = asyncio.get_running_loop().create_future()

        return series, on_ready

    async def run(
        self,
        spec: StageSpec,
        on_output: OutputSink | None = None,
        *,
        arm_next: bool = False,
        then: Path | None = None,
    ) -> StageOutcome:
        """Run one stage to its end and measure it; with ``arm_next``, arm the jail of a next
        stage in the same working directory with the same mounts meanwhile; with ``then``, the
        working directory of the next stage with the same mounts, serve this stage from a
        series (see the class) and make the next stage's jail in ``then`` right after it.

        It returns once the stage's processes are gone and measured; nsjail's own exit and the
        removal of the stage's cgroup follow in the background (``aclose`` waits for them). If
        the task running it is cancelled, every process of the stage is killed and its cgroup
        removed before the ``CancelledError`` propagates.
        """
        limits = spec.limits
        key = (spec.workdir, tuple(spec.mounts))
        series, on_ready = self._series_jail(spec, then)
        if series is not None:
            jail = series.jail
        else:
            armed = self._armed.pop(key, None)
            if armed is not None and not armed.running():  # killed while it waited: afresh
                self._later(armed.end())
                armed = None
            jail = armed or self._start(key)
        outcome = StageOutcome(status="error")
        captures = {s: _Capture(s, limits.output, on_output) for s in STREAMS}
        try:
            if arm_next:
                self.arm(spec.workdir, spec.mounts)
            jail.cgroup.begin(limits.memory, limits.pids)
            self.disk.limit(spec.workdir, limits.disk)
            outputs: dict[str, Callable[[bytes], None]] = {
                stream: capture.feed for stream, capture in captures.items()
            }
            box = os.stat(spec.workdir)
            streams = spec.console or StageStreams(spec.stdin)
            seen = await jail.serve(
                request(spec), box, streams, outputs, limits.wall_time + WALL_GRACE, on_ready
            )
            report = InitReport.parse(seen.status)
            outcome.memory = jail.cgroup.peak_memory() if seen.memory is None else seen.memory
            out_of_memory = jail.cgroup.out_of_memory()
            # The working directory the series' next jail holds, if the series goes on.
            following = (
                then
                if series is not None
                and report is not None
                and report.kind in ("exited", "signaled")
                and then in series.held
                else None
            )
            if following is not None:
                # Loose again until the next stage's own caps: the next jail is made meanwhile.
                jail.cgroup.limit(NSJAIL_LOOSE_MEMORY, NSJAIL_LOOSE_PIDS)
        except BaseException:
            try:
                jail.kill()
            finally:
                if series is not None:
                    self._end_series(series)
            raise
        if series is None:
            self._later(jail.end())
        elif following is None:
            self._end_series(series)  # its next jail is not known to hold ``then``
        else:
            self._series[following] = series
            jail.dismiss()
            # This stage's working directory is free once the next jail holds ``following``:
            # at once, not when a next stage comes (which, between submissions, may be late).
            jail.ready().add_done_callback(_let_go_when_ready(series, following))
        outcome.wall_time = report.wall_time if report else seen.wall_time
        outcome.cpu_time = report.cpu_time if report else seen.cpu_time
        status, message = classify(
            report,
            wall_killed=seen.wall_killed,
            out_of_memory=out_of_memory,
            # Asked only of a stage that failed: a stage that ended well was not stopped.
            disk_full=bool(report and report.code) and self.disk.full(spec.workdir),
            cpu_time=outcome.cpu_time,
            limits=limits,
        )
        if report is None and not seen.wall_killed and seen.log:
            message = f"{message}: {seen.log.strip()[-2000:]}"
        outcome.status, outcome.error = status, message
        if report and report.kind == "exited":
            outcome.exit_code = report.code
        elif report and report.kind == "signaled":
            outcome.signal = report.code
        stdout, stderr = captures["stdout"], captures["stderr"]
        outcome.stdout, outcome.stdout_truncated = bytes(stdout.data), stdout.truncated
        outcome.stderr, outcome.stderr_truncated = bytes(stderr.data), stderr.truncated
        outcome.finished_at = now()
        return outcome


@dataclass(eq=False)
class _Series:
    """A rerun jail and the link its jails bind ``/box`` from."""

    jail: Jail
    link: Path
    mounts: tuple[Mount, ...]
    #: Working directories this series' jails hold or may still hold, oldest first (the last
    #: is the one its waiting, or next, jail holds), each with what is done once none does.
    held: dict[Path, asyncio.Future[None]]

    def let_go(self, kept: Path | None) -> None:
        """The working directories held before ``kept`` (all, if None) are free now."""
        for workdir in list(self.held):
            if workdir == kept:
                return
            done = self.held.pop(workdir)
            if not done.done():
                done.set_result(None)


def _let_go_when_ready(series: _Series, kept: Path) -> Callable[[asyncio.Future[bytes]], None]:
    def done(ready: asyncio.Future[bytes]) -> None:
        if not ready.cancelled() and ready.exception() is None and ready.result() == READY:
            series.let_go(kept)

    return done


def write_etc(etc_dir: Path) -> None:
    """The few /etc files a program expects, describing the sandbox rather than the host."""
    etc_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "passwd": f"root:x:0:0:root:/root:/bin/sh\n"
        f"runner:x:{SANDBOX_UID}:{SANDBOX_UID}:Cellblock:{WORKDIR}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "group": f"root:x:0:\nrunner:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost\n",
    }
    for name, text in files.items():
        path = etc_dir / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o644)
