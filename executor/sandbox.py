"""One stage of a submission, run in nsjail under its limits, measured.

The jail: new user, PID, mount, network (loopback only), IPC, UTS and cgroup namespaces; an
unprivileged uid of the executor slot; a tmpfs root holding a read-only base (the host's system
directories in ``host`` mode, nothing in ``pure`` mode), the dependency closures read-only at
their own paths, the working directory read-write at ``/box``, a size-capped ``/tmp``, a minimal
``/dev`` and a fresh ``/proc``; a seccomp policy; only the environment we pass.

Inside, ``cellblock-init`` (jailinit.c) is pid 1: it applies the stage's sixteen rlimits to the
program, reaps the namespace and reports the program's exact wait status and CPU time. Outside,
the stage's cgroup caps memory and pids and measures peak memory; a wall-clock timer kills the
cgroup. Output is read from pipes, never from files the sandbox could have planted.

Cancellation: if the task running ``Sandbox.run`` is cancelled, every process of the stage is
killed and its cgroup removed before the ``CancelledError`` propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from cellblock.executor.cgroups import Cgroups
from cellblock.service.protocol import RLIMITS, StageLimits, encode_output, now

#: Where things are inside the jail.
WORKDIR = "/box"
INIT_PATH = "/.cellblock/init"
SANDBOX_UID = 1000
HOSTNAME = "cellblock"
BASE_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr")
BASE_ETC = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime")
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
#: System calls a program never needs and that widen the kernel's attack surface.
SECCOMP_POLICY = (
    "ERRNO(1) { "
    "mount, umount, pivot_root, chroot, setns, unshare, "
    "ptrace, process_vm_readv, process_vm_writev, kcmp, "
    "keyctl, add_key, request_key, bpf, perf_event_open, userfaultfd, "
    "kexec_load, kexec_file_load, init_module, finit_module, delete_module, "
    "reboot, swapon, swapoff, acct, quotactl, syslog, settimeofday, clock_settime, "
    "clock_adjtime, adjtimex, sethostname, setdomainname, iopl, ioperm, "
    "open_by_handle_at, name_to_handle_at, lookup_dcookie, vhangup, "
    "fsopen, fsmount, fsconfig, fspick, move_mount, open_tree, mount_setattr"
    " } DEFAULT ALLOW"
)

OutputSink = Callable[[str, bytes], None]
StageStatus = Literal[
    "ok", "failed", "signaled", "time_limit", "memory_limit", "output_limit", "error"
]


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


@dataclass
class StageOutcome:
    status: StageStatus
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

    def result(self, limits: StageLimits) -> dict[str, Any]:
        """The stage result of the protocol."""
        stdout, stdout_encoding = encode_output(self.stdout)
        stderr, stderr_encoding = encode_output(self.stderr)
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "signal_name": signal.Signals(self.signal).name if self.signal else None,
            "stdout": stdout,
            "stderr": stderr,
            "stdout_encoding": stdout_encoding,
            "stderr_encoding": stderr_encoding,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "wall_time": round(self.wall_time, 6),
            "cpu_time": round(self.cpu_time, 6),
            "memory": self.memory,
            "limits": limits.as_json(),
            # Why the sandbox ended the stage the way it did, in words (an extension field).
            "message": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


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
        if words[0] == "exec-failed":
            return cls(words[0], 0, 0.0, 0.0, os.strerror(int(words[1])))
        if words[0] == "rlimit-failed":
            return cls(words[0], 0, 0.0, 0.0, f"{words[1]}: {os.strerror(int(words[2]))}")
        return None


def classify(
    report: InitReport | None,
    *,
    wall_killed: bool,
    out_of_memory: bool,
    cpu_time: float,
    limits: StageLimits,
) -> tuple[StageStatus, str | None]:
    """The stage status from what was observed, most specific cause first. Pure."""
    if wall_killed:
        return "time_limit", f"wall time limit of {limits.wall_time:g} s exceeded"
    if report is None:
        return "error", "the sandbox ended without reporting the program's status"
    if report.kind == "exec-failed":
        return "error", f"the sandbox could not start the stage's shell: {report.detail}"
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
    if report.kind == "signaled":
        return "signaled", None
    return "failed", None


class _Capture:
    """Keeps the first ``limit`` bytes of one stream and counts the rest."""

    def __init__(self, name: str, limit: int, sink: OutputSink | None) -> None:
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


class Sandbox:
    """Runs stages in nsjail as one executor slot's unprivileged uid.

    A ``Sandbox`` runs one stage at a time; run slots in parallel with one ``Sandbox`` each.
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
        tmp_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.nsjail, self.init, self.cgroups = nsjail, init, cgroups
        self.uid, self.base, self.tmp_size = uid, base, tmp_size
        self.etc_dir = etc_dir
        write_etc(etc_dir)
        self._base_mounts = self._base_argv()

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
        self, spec: StageSpec, status_fd: int, log_fd: int, cgroup_args: list[str]
    ) -> list[str]:
        """The nsjail command line for ``spec``."""
        limits = spec.limits
        cmd = [
            str(self.nsjail), "--mode", "o", "--log_fd", str(log_fd), "--quiet",
            # Our init applies every rlimit exactly; nsjail's own (MB-granular) ones stay off.
            "--disable_rlimits",
            "--time_limit", str(math.ceil(limits.wall_time) + 5),
            "--user", f"{SANDBOX_UID}:{self.uid}:1", "--group", f"{SANDBOX_UID}:{self.uid}:1",
            "--hostname", HOSTNAME, "--cwd", WORKDIR,
            "--seccomp_string", SECCOMP_POLICY,
            "--pass_fd", str(status_fd),
        ]  # fmt: skip
        cmd += self._base_mounts
        for m in spec.mounts:
            cmd += ["--bindmount" if m.writable else "--bindmount_ro", f"{m.source}:{m.target}"]
        cmd += ["--bindmount", f"{spec.workdir}:{WORKDIR}"]
        cmd += ["--bindmount_ro", f"{self.init}:{INIT_PATH}"]
        cmd += cgroup_args
        for key, value in spec.env.items():
            cmd += ["--env", f"{key}={value}"]
        cmd += ["--", INIT_PATH, str(status_fd)]
        cmd += [_rlimit_arg(name, limits.rlimits[name]) for name in RLIMITS]
        shell = os.path.basename(spec.shell)
        # `-c` rather than a script file: bash then execs the script's last command itself, so
        # a program that dies of a signal is seen dying of it, not as the shell's exit status.
        cmd += ["--", spec.shell, "-c", spec.script, shell, *spec.args]
        return cmd

    async def run(self, spec: StageSpec, on_output: OutputSink | None = None) -> StageOutcome:
        """Run one stage to its end and measure it. See the module docstring on cancellation."""
        limits = spec.limits
        outcome = StageOutcome(status="error")
        name = f"{self.uid}-{secrets.token_hex(6)}"
        cgroup = self.cgroups.create(name, limits.memory, limits.pids)
        captures = {s: _Capture(s, limits.output, on_output) for s in ("stdout", "stderr")}
        status_r, status_w = os.pipe()
        log_r, log_w = os.pipe()
        proc: subprocess.Popen[bytes] | None = None
        tasks: list[asyncio.Future[Any]] = []
        wall_killed = False
        started = time.monotonic()
        try:
            cmd = self.command(
                spec, status_w, log_w, cgroup.nsjail_args(limits.memory, limits.pids)
            )
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w, log_w),
                start_new_session=True,
                env={},
            )
            os.close(status_w)
            os.close(log_w)
            status_w = log_w = -1
            assert proc.stdin and proc.stdout and proc.stderr
            readers = [
                asyncio.ensure_future(_drain(proc.stdout.fileno(), captures["stdout"].feed)),
                asyncio.ensure_future(_drain(proc.stderr.fileno(), captures["stderr"].feed)),
            ]
            status_text, log_text = bytearray(), bytearray()
            side = [
                asyncio.ensure_future(_drain(status_r, status_text.extend)),
                asyncio.ensure_future(_drain(log_r, log_text.extend)),
                asyncio.ensure_future(_feed(proc.stdin, spec.stdin)),
            ]
            exited = asyncio.ensure_future(_wait_exit(proc))
            tasks = [*readers, *side, exited]
            try:
                await asyncio.wait_for(asyncio.shield(exited), timeout=limits.wall_time + 0.05)
            except TimeoutError:
                wall_killed = True
                cgroup.kill_all()
            rusage_cpu = await exited
            # Every writer is dead now (init kills its namespace), so the pipes are at EOF.
            await asyncio.gather(*readers, *side)
            report = InitReport.parse(status_text.decode(errors="replace"))
            outcome.wall_time = report.wall_time if report else time.monotonic() - started
            outcome.cpu_time = (
                report.cpu_time if report and report.kind != "exec-failed" else rusage_cpu
            )
            outcome.memory = cgroup.peak_memory()
            status, message = classify(
                report,
                wall_killed=wall_killed,
                out_of_memory=cgroup.out_of_memory(),
                cpu_time=outcome.cpu_time,
                limits=limits,
            )
            if report is None and not wall_killed and log_text:
                message = f"{message}: {log_text.decode(errors='replace').strip()[-2000:]}"
            outcome.status, outcome.error = status, message
            if report and report.kind == "exited":
                outcome.exit_code = report.code
            elif report and report.kind == "signaled":
                outcome.signal = report.code
        finally:
            for task in tasks:
                task.cancel()
            # Let the cancelled readers unregister their fds before the fds are closed: a
            # number reused by another slot's stage must not lose that stage's reader.
            await asyncio.gather(*tasks, return_exceptions=True)
            if proc is not None and proc.returncode is None:
                # Kill the jail, not nsjail: nsjail then reaps its child and exits by itself.
                # Killed first, nsjail would orphan the jail's init to the host's pid 1.
                cgroup.kill_all()
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for fd in (status_r, status_w, log_r, log_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if proc is not None:
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
            cgroup.close()
            cgroup.remove()
        outcome.stdout, outcome.stderr = (
            bytes(captures["stdout"].data),
            bytes(captures["stderr"].data),
        )
        outcome.stdout_truncated = captures["stdout"].truncated
        outcome.stderr_truncated = captures["stderr"].truncated
        outcome.finished_at = now()
        return outcome


async def _drain(fd: int, consume: Callable[[bytes], Any]) -> None:
    """Read ``fd`` to EOF without blocking the event loop, handing each chunk to ``consume``."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                ready.clear()
                await ready.wait()
                continue
            if not chunk:
                return
            consume(chunk)
    finally:
        loop.remove_reader(fd)


async def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``pipe`` and close it; a reader that goes away early is not an error."""
    loop = asyncio.get_running_loop()
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data)
    ready = asyncio.Event()
    loop.add_writer(fd, ready.set)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                ready.clear()
                await ready.wait()
            except BrokenPipeError:
                return
    finally:
        loop.remove_writer(fd)
        with contextlib.suppress(OSError):
            pipe.close()


async def _wait_exit(proc: subprocess.Popen[bytes]) -> float:
    """Wait for ``proc`` to exit through a pidfd, reap it, and return its children's CPU time.

    The CPU time is nsjail's and that of the jail it reaped: the fallback when init could not
    report (it was killed by the wall-clock timer).
    """
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)
    done = asyncio.Event()
    loop.add_reader(pidfd, done.set)
    try:
        await done.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait
    return usage.ru_utime + usage.ru_stime


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
