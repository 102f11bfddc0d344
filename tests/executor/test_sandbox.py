"""The sandbox against real nsjail, real cgroups and real programs: statuses, limits, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cellblock import config
from cellblock.executor import host
from cellblock.executor.cgroups import CgroupsV1
from cellblock.executor.jail import StageStreams
from cellblock.executor.sandbox import (
    INIT_DEADLINE_SLACK,
    INIT_PATH,
    SANDBOX_UID,
    InitReport,
    Mount,
    Sandbox,
    StageOutcome,
    StageSpec,
    _Capture,
    classify,
    direct_argv,
    request,
)
from cellblock.service.protocol import LimitPolicy, parse_submission

MiB = 1024 * 1024
RunStage = Callable[..., Awaitable[StageOutcome]]  # the run_stage fixture
Until = Callable[..., Awaitable[Any]]  # the until fixture of tests/conftest.py


def compile_c(workdir: Path, name: str, source: str, *flags: str) -> None:
    """Compile with the host's gcc, as a teacher's harness would, into the working directory."""
    (workdir / f"{name}.c").write_text(source)
    subprocess.run(["gcc", "-O0", *flags, "-o", str(workdir / name), str(workdir / f"{name}.c")],
                   check=True)  # fmt: skip


def left_by_the_program(sandbox: Sandbox) -> list[int]:
    """Live processes of the sandbox's uid but its jail's init, which ``run`` does not wait for:
    it returns once init has reported, and init reports once it has killed and reaped the rest.
    (An exiting init has already lost its command line, a dead one is a zombie until reaped.)"""
    left = []
    for pid in processes_of(sandbox.uid):
        with contextlib.suppress(OSError):  # gone meanwhile
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            if state not in "ZX" and argv and not argv.startswith(INIT_PATH.encode()):
                left.append(pid)
    return left


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("Uid:") and int(line.split()[1]) == uid:
                    pids.append(int(entry.name))
    return pids


async def test_a_c_program_runs_with_stdin_and_args(run_stage: RunStage, workdir: Path) -> None:
    compile_c(workdir, "add", '#include <stdio.h>\nint main(int c, char **v) { int a, b;'
              ' scanf("%d %d", &a, &b); printf("%d %s\\n", a + b, v[1]); return 0; }')  # fmt: skip
    out = await run_stage('./add "$@"', stdin=b"3 4\n", args=("x y",))
    assert out.status == "ok", out
    assert out.stdout == b"7 x y\n"
    assert out.exit_code == 0 and out.signal is None
    assert 0 < out.wall_time < 2 and 0 <= out.cpu_time < 2
    assert out.memory > 0


SHOW_C = r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("[%s]", argv[i]);
    const char *names[] = {"PWD", "SHLVL", "_", "PATH"};
    for (int i = 0; i < 4; i++) printf(" %s=%s", names[i], getenv(names[i]) ?: "(unset)");
    printf("\n");
    return 0;
}
"""


@pytest.mark.parametrize("script", ['./show "$@"', "./show -x", "./nothing", "./script"])
async def test_a_simple_command_runs_as_bash_would_run_it(
    run_stage: RunStage, workdir: Path, script: str
) -> None:
    """Run by init directly (``direct_argv``), or through bash should the exec fail (no such
    file, a script without ``#!``): the same argv, environment, output and exit status as
    when bash runs it (a script of two commands always goes through bash)."""
    compile_c(workdir, "show", SHOW_C)
    (workdir / "script").write_text("echo from a script without a shebang $0\n")
    (workdir / "script").chmod(0o755)
    direct = await run_stage(script, args=("a b", "c"))
    shell = await run_stage(f"true; {script}", args=("a b", "c"))
    assert (direct.status, direct.exit_code, direct.stdout, direct.stderr) == (
        shell.status, shell.exit_code, shell.stdout, shell.stderr
    ), (direct, shell)  # fmt: skip
    assert direct.stdout or b"No such file" in direct.stderr


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("./sum", ["./sum"]),
        ("./sum\n", ["./sum"]),
        ('  ./prog --fast\t"$@"\n', ["./prog", "--fast", "a b", "c"]),
        ("/usr/bin/python3 main.py -O2", ["/usr/bin/python3", "main.py", "-O2"]),
        ("python3 main.py", None),  # found on PATH: could be a function, an alias, a builtin
        ("echo hi", None),
        ("./a; ./b", None),
        ("./a\n./b", None),
        ("./a > out", None),
        ("./a < in", None),
        ("./a | ./b", None),
        ("./a &", None),
        ("./a $HOME", None),
        ("X=1 ./a", None),
        ("./a X=1", None),
        ("./a '*'", None),
        ("./a *.c", None),
        ("./a ~", None),
        ("./a # no", None),
        ('./a "$@" x', None),
        ('"$@"', None),
        ("./a\\ b", None),
        ("", None),
    ],
)
def test_direct_argv_takes_only_one_plain_command(script: str, argv: list[str] | None) -> None:
    assert direct_argv(script, ("a b", "c")) == argv


def test_a_direct_request_carries_bash_as_its_fallback(workdir: Path) -> None:
    fields = request(stage(workdir, "./sum")).split(b"\0")
    assert b"./sum" in fields and b"_=./sum" in fields and b"PWD=/box" in fields
    assert fields[-6:] == [b"4", b"/bin/bash", b"-c", b"./sum", b"bash", b""]
    plain = request(stage(workdir, "./sum; true")).split(b"\0")
    assert plain[-7:] == [b"4", b"/bin/bash", b"-c", b"./sum; true", b"bash", b"0", b""]
    assert b"_=./sum" not in plain


async def test_failed_exit_code(run_stage: RunStage) -> None:
    out = await run_stage("echo oops >&2; exit 3")
    assert (out.status, out.exit_code, out.stderr) == ("failed", 3, b"oops\n")


async def test_segfault_is_signaled(run_stage: RunStage, workdir: Path) -> None:
    compile_c(workdir, "segv", "int main(void) { volatile int *p = 0; return *p; }")
    out = await run_stage("./segv")
    assert out.status == "signaled"
    assert out.signal == 11
    assert out.result(parse_submission({"run": "x"}, _policy()).limits.run).signal_name == "SIGSEGV"


async def test_infinite_loop_hits_the_cpu_limit(run_stage: RunStage) -> None:
    out = await run_stage("while :; do :; done", cpu=1, wall_time=10)
    assert out.status == "time_limit"
    assert 0.9 <= out.cpu_time < 2.5
    assert out.wall_time < 5


async def test_sleeper_hits_the_wall_time_limit(run_stage: RunStage) -> None:
    out = await run_stage("sleep 30", wall_time=0.5)
    assert out.status == "time_limit"
    assert 0.45 <= out.wall_time < 2
    assert out.cpu_time < 0.5
    assert "wall time" in (out.error or "")


async def test_python_memory_bomb_hits_the_memory_limit(run_stage: RunStage) -> None:
    bomb = "x = []\nwhile True:\n    x.append(b'.' * 10_000_000)\n"
    out = await run_stage(f'python3 -c "{bomb}"', memory=64 * MiB, wall_time=20)
    assert out.status == "memory_limit", out
    assert 56 * MiB <= out.memory <= 64 * MiB


async def test_peak_memory_of_a_program_touching_100_mib(
    run_stage: RunStage, workdir: Path
) -> None:
    compile_c(workdir, "touch", "#include <stdlib.h>\n#include <string.h>\n"
              "int main(void) { size_t n = 100u << 20; char *p = malloc(n);"
              " memset(p, 1, n); return p[n - 1] - 1; }")  # fmt: skip
    out = await run_stage("./touch")
    assert out.status == "ok"
    assert abs(out.memory - 100 * MiB) <= 10 * MiB, out.memory


async def test_peak_memory_covers_the_whole_process_tree(
    run_stage: RunStage, workdir: Path
) -> None:
    compile_c(workdir, "hold", "#include <stdlib.h>\n#include <string.h>\n#include <unistd.h>\n"
              "int main(void) { size_t n = 40u << 20; char *p = malloc(n);"
              " memset(p, 1, n); sleep(1); return p[0] - 1; }")  # fmt: skip
    out = await run_stage("./hold & ./hold & ./hold & wait")
    assert out.status == "ok"
    assert out.memory >= 3 * 40 * MiB


async def test_fork_bomb_is_contained(run_stage: RunStage, sandbox: Sandbox) -> None:
    out = await run_stage(":(){ :|:& };:; sleep 2", pids=64, wall_time=3)
    assert out.status in ("ok", "failed", "time_limit")
    assert left_by_the_program(sandbox) == []
    await sandbox.aclose()
    assert processes_of(sandbox.uid) == []


async def test_pids_cap_stops_forks(run_stage: RunStage) -> None:
    script = (
        "import os, time\nn = 0\nfor i in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
        "        os._exit(0)\n    n += 1\nprint(n)\n"
    )
    out = await run_stage(f"python3 -c '{script}'", pids=20)
    assert out.status == "ok", out
    assert 1 <= int(out.stdout) < 20


async def test_output_flood_is_truncated(run_stage: RunStage) -> None:
    out = await run_stage("yes | head -c 200000; yes | head -c 5000 >&2", output=1000)
    assert out.status == "ok", (out.error, out.wall_time, out.cpu_time)
    assert out.stdout == b"y\n" * 500
    assert out.stdout_truncated and out.stderr_truncated
    assert len(out.stderr) == 1000


async def test_endless_output_ends_at_the_wall_time(run_stage: RunStage) -> None:
    out = await run_stage("yes", output=100, wall_time=1)
    assert out.status == "time_limit"
    assert len(out.stdout) == 100 and out.stdout_truncated


async def test_file_size_limit_is_output_limit(run_stage: RunStage) -> None:
    out = await run_stage("head -c 5000 /dev/zero > big", fsize=1000)
    assert out.status == "output_limit"
    assert out.signal == 25 or out.exit_code == 128 + 25  # SIGXFSZ, seen directly or by bash


async def test_all_sixteen_prlimits_are_visible_inside(run_stage: RunStage) -> None:
    limits = {
        "as": [512 * MiB, 1024 * MiB], "core": 0, "cpu": [3, 4], "data": 1024 * MiB,
        "fsize": MiB, "locks": 100, "memlock": 65536, "msgqueue": 8192, "nice": 0,
        "nofile": [64, 128], "nproc": 50, "rss": 1024 * MiB, "rtprio": 0,
        "rttime": 1_000_000, "sigpending": 100, "stack": 4 * MiB,
    }  # fmt: skip
    out = await run_stage("cat /proc/self/limits", **limits)
    assert out.status == "ok"
    rows = {
        "Max cpu time": "cpu", "Max file size": "fsize", "Max data size": "data",
        "Max stack size": "stack", "Max core file size": "core", "Max resident set": "rss",
        "Max processes": "nproc", "Max open files": "nofile", "Max locked memory": "memlock",
        "Max address space": "as", "Max file locks": "locks", "Max pending signals": "sigpending",
        "Max msgqueue size": "msgqueue", "Max nice priority": "nice",
        "Max realtime priority": "rtprio", "Max realtime timeout": "rttime",
    }  # fmt: skip
    seen = {}
    for line in out.stdout.decode().splitlines()[1:]:
        for label, name in rows.items():
            if line.startswith(label):
                soft, hard = line[len(label) :].split()[:2]
                seen[name] = [int(soft), int(hard)]
    expected = {k: v if isinstance(v, list) else [v, v] for k, v in limits.items()}
    assert seen == expected


async def test_no_network_but_loopback(run_stage: RunStage) -> None:
    out = await run_stage(
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; "
        "python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=2)'"
    )
    assert out.stdout.split() == [b"lo"]
    assert out.status == "failed"
    assert b"unreachable" in out.stderr


async def test_runs_as_an_unprivileged_uid(
    run_stage: RunStage, workdir: Path, sandbox: Sandbox
) -> None:
    out = await run_stage("id -u; id -g; touch made-here")
    assert out.stdout.split() == [b"1000", b"1000"]
    made = (workdir / "made-here").stat()
    assert (made.st_uid, made.st_gid) == (sandbox.uid, sandbox.uid)
    assert sandbox.uid != 0


async def test_filesystem_is_read_only_except_box_and_tmp(run_stage: RunStage) -> None:
    out = await run_stage(
        "ls -A /; touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1; touch /dev/x 2>&1; "
        "echo ok > /tmp/t && cat /tmp/t > /dev/null && cat /tmp/t; "
        "test -e /etc/shadow || echo no-shadow; ls /dev"
    )
    lines = out.stdout.decode().splitlines()
    assert set(lines[: lines.index("ok") - 4]) <= {
        ".cellblock", "bin", "box", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc",
        "sbin", "tmp", "usr",
    }  # fmt: skip
    assert out.stdout.decode().count("Read-only file system") == 3  # /usr, /etc, /
    assert "touch: cannot touch '/dev/x': Permission denied" in lines
    assert "no-shadow" in lines
    devices = set(lines[lines.index("no-shadow") + 1 :])
    assert devices == {"null", "zero", "full", "random", "urandom", "tty", "fd", "shm", "stdin",
                       "stdout", "stderr"}  # fmt: skip


async def test_tmp_is_size_capped(run_stage: RunStage) -> None:
    out = await run_stage("head -c 100M /dev/zero > /tmp/fill", memory=1024 * MiB, fsize=1024 * MiB)
    assert out.status == "failed"
    assert b"No space left" in out.stderr


async def test_environment_is_an_allowlist(
    run_stage: RunStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELLBLOCK_TEST_SECRET", "leaked")
    out = await run_stage("env", env={"GREETING": "hello"})
    names = {line.split("=", 1)[0] for line in out.stdout.decode().splitlines()}
    assert "CELLBLOCK_TEST_SECRET" not in names
    assert b"GREETING=hello" in out.stdout
    assert names <= {"PATH", "HOME", "GREETING", "PWD", "SHLVL", "_"}


async def test_seccomp_refuses_dangerous_calls(run_stage: RunStage) -> None:
    out = await run_stage("unshare -r true; echo rc=$?; python3 -c 'import ctypes; "
                          "print(ctypes.CDLL(None).syscall(165, 0, 0, 0, 0, 0))'")  # fmt: skip
    assert b"rc=1" in out.stdout
    assert out.stdout.strip().endswith(b"-1")  # mount(2) is refused with EPERM
    assert b"Operation not permitted" in out.stderr


async def test_a_daemon_does_not_survive_its_stage(run_stage: RunStage, sandbox: Sandbox) -> None:
    out = await run_stage("( setsid sh -c 'sleep 1000 &' & ); setsid sleep 999 & echo started")
    assert out.stdout == b"started\n"
    assert left_by_the_program(sandbox) == []
    await sandbox.aclose()
    assert processes_of(sandbox.uid) == []


def cgroups_of(sandbox: Sandbox) -> list[Path]:
    cg = sandbox.cgroups
    bases = [cg.memory_base, cg.pids_base] if isinstance(cg, CgroupsV1) else [cg.base]  # type: ignore[attr-defined]
    return [p for base in bases for p in base.glob(f"{sandbox.uid}-*")]


def jails_of(sandbox: Sandbox) -> list[int]:
    """The nsjail processes (they run as root) of the sandbox's jails."""
    user = f"{SANDBOX_UID}:{sandbox.uid}:1".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if entry.name.isdigit() and argv[0].endswith(b"nsjail") and user in argv:
                pids.append(int(entry.name))
    return pids


async def test_no_cgroup_is_left_behind(run_stage: RunStage, sandbox: Sandbox) -> None:
    await run_stage("sleep 0.1 & echo hi")
    await sandbox.aclose()  # nsjail ends, and the cgroup goes, after the stage has returned
    assert cgroups_of(sandbox) == [] and jails_of(sandbox) == []


def stage(workdir: Path, script: str, **limits: Any) -> StageSpec:
    resolved = parse_submission({"run": "x", "limits": {"run": limits}}, _policy()).limits.run
    return StageSpec(script=script, limits=resolved, workdir=workdir, env={"PATH": "/bin"})


async def test_an_armed_jail_waits_then_runs_the_stage_it_is_given(
    sandbox: Sandbox, workdir: Path, until: Until
) -> None:
    sandbox.arm(workdir)
    sandbox.arm(workdir)  # once is enough
    [init] = await until(lambda: processes_of(sandbox.uid), "the armed jail's init")
    await asyncio.sleep(0.2)
    assert processes_of(sandbox.uid) == [init] and len(jails_of(sandbox)) == 1  # it waits
    spec = replace(stage(workdir, "sleep 0.3; echo $GREETING"), env={"GREETING": "hello"})
    running = asyncio.create_task(sandbox.run(spec))
    children = Path(f"/proc/{init}/task/{init}/children")
    await until(lambda: children.read_text().strip(), "the stage's shell, forked by that init")
    out = await running
    assert (out.status, out.stdout) == ("ok", b"hello\n")
    await sandbox.aclose()
    assert processes_of(sandbox.uid) == [] and jails_of(sandbox) == [] and cgroups_of(sandbox) == []


async def test_a_jail_given_up_ends_without_running_anything(
    sandbox: Sandbox, workdir: Path, until: Until
) -> None:
    (workdir / "untouched").write_text("")
    sandbox.arm(workdir)
    await until(lambda: processes_of(sandbox.uid), "the armed jail's init")
    await asyncio.sleep(0.2)
    assert [p.name for p in workdir.iterdir()] == ["untouched"]
    sandbox.retire(workdir)
    await sandbox.aclose()
    assert processes_of(sandbox.uid) == [] and jails_of(sandbox) == [] and cgroups_of(sandbox) == []
    assert not workdir.exists()


async def test_a_stage_does_not_take_an_armed_jail_that_was_killed_meanwhile(
    sandbox: Sandbox, workdir: Path, until: Until
) -> None:
    sandbox.arm(workdir)
    await until(lambda: processes_of(sandbox.uid), "the armed jail's init")
    [nsjail] = jails_of(sandbox)
    os.kill(nsjail, signal.SIGKILL)
    await until(lambda: Path(f"/proc/{nsjail}/stat").read_text().split()[2] == "Z", "nsjail dead")
    out = await sandbox.run(stage(workdir, "echo fresh"))
    assert (out.status, out.stdout) == ("ok", b"fresh\n")
    await sandbox.aclose()
    assert jails_of(sandbox) == [] and cgroups_of(sandbox) == []
    # The killed nsjail's init, orphaned to the host's pid 1, ended when given up.
    await until(lambda: not processes_of(sandbox.uid), "the orphaned init to be reaped")


async def test_a_jail_armed_with_other_mounts_is_left_for_a_stage_with_them(
    sandbox: Sandbox, workdir: Path, sandbox_root: Path
) -> None:
    extra = Path(tempfile.mkdtemp(dir=sandbox_root))
    extra.chmod(0o755)
    mounts = [Mount(extra, "/opt/extra")]
    sandbox.arm(workdir, mounts)
    probe = "test -d /opt/extra && echo mounted || echo absent"
    without = await sandbox.run(stage(workdir, probe))
    assert without.stdout == b"absent\n"  # started a jail of its own
    with_mounts = await sandbox.run(replace(stage(workdir, probe), mounts=mounts))
    assert with_mounts.stdout == b"mounted\n"


async def test_after_a_dead_executor_init_kills_the_stage_at_its_deadline(
    sandbox: Sandbox, workdir: Path, until: Until
) -> None:
    jail = sandbox._start((workdir, ()))
    spec = stage(workdir, "sleep 100", wall_time=1)
    ignore = {"stdout": lambda _: None, "stderr": lambda _: None}
    serving = asyncio.create_task(
        jail.serve(request(spec), os.stat(workdir), StageStreams(), ignore, timeout=100)
    )
    await until(lambda: left_by_the_program(sandbox), "the stage to start")
    # The executor dies: every descriptor it held closes, nothing watches the clock.
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    jail.control.close()
    for fd in (jail.status, jail.log):
        os.close(fd)
    started = time.monotonic()
    await until(lambda: not processes_of(sandbox.uid), "init's deadline", timeout=15)
    elapsed = time.monotonic() - started
    assert INIT_DEADLINE_SLACK - 1 < elapsed < 1 + INIT_DEADLINE_SLACK + 2
    jail.proc.wait(timeout=5)
    jail.cgroup.close()
    jail.cgroup.remove()


async def test_sees_only_its_own_processes(run_stage: RunStage) -> None:
    out = await run_stage("cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -E '^[0-9]+$'")
    first, *pids = out.stdout.decode().splitlines()
    assert first.startswith("/.cellblock/init ")
    assert all(int(pid) < 10 for pid in pids), pids  # a PID namespace of its own


async def test_cancelling_a_stage_kills_it(sandbox: Sandbox, workdir: Path) -> None:
    limits = parse_submission({"run": "x"}, _policy()).limits.run
    spec = StageSpec(script="sleep 100", limits=limits, workdir=workdir, env={"PATH": "/bin"})
    task = asyncio.create_task(sandbox.run(spec))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_of(sandbox.uid) == []


async def test_pure_mode_holds_only_its_mounts(
    sandbox_host: host.SandboxHost, sandbox_root: Path
) -> None:
    scratch = Path(tempfile.mkdtemp(dir=sandbox_root))
    scratch.chmod(0o755)
    busybox = scratch / "busybox" / "bin"
    busybox.mkdir(parents=True)
    shutil.copy("/bin/busybox", busybox / "busybox")
    for applet in ("sh", "ls", "cat", "echo"):
        (busybox / applet).symlink_to("busybox")
    uid = sandbox_host.config.sandbox.uid_base + 8
    work = sandbox_host.disk.create(f"pure-{os.getpid()}", uid)
    hello = '#include <stdio.h>\nint main(void) { puts("static hello"); return 0; }'
    compile_c(work, "hello", hello, "-static")
    pure = Sandbox(
        nsjail=sandbox_host.nsjail, init=sandbox_host.init, cgroups=sandbox_host.cgroups,
        uid=uid, etc_dir=sandbox_root / "etc", base="pure", disk=sandbox_host.disk,
    )  # fmt: skip
    spec = StageSpec(
        script="ls -A /; ./hello",
        limits=parse_submission({"run": "x"}, _policy()).limits.run,
        workdir=work,
        env={"PATH": "/opt/busybox/bin"},
        mounts=[Mount(busybox, "/opt/busybox/bin")],
        shell="/opt/busybox/bin/sh",
    )
    try:
        out = await pure.run(spec)
    finally:
        pure.retire(work)
        await pure.aclose()
    assert out.status == "ok", out.error
    listing = out.stdout.decode().split()
    assert listing[-2:] == ["static", "hello"]
    assert set(listing[:-2]) == {".cellblock", "box", "dev", "etc", "opt", "proc", "tmp"}


def _policy() -> LimitPolicy:
    return config.load(Path("/nonexistent"), environ={}).limits


# -- the pure parts: the init's report and the classification of a stage ----------------------


def test_init_report_parsing() -> None:
    assert InitReport.parse("exited 3 1500 500 20000\n") == InitReport("exited", 3, 0.002, 0.02)
    assert InitReport.parse("signaled 11 0 0 1000\n") == InitReport("signaled", 11, 0.0, 0.001)
    failed = InitReport.parse("exec-failed 2\n")
    assert failed is not None and failed.detail == "No such file or directory"
    rlimit = InitReport.parse("rlimit-failed nofile 1\nexited 126 0 0 1\n")
    assert rlimit is not None and rlimit.kind == "rlimit-failed" and "nofile" in rlimit.detail
    assert InitReport.parse("") is None
    assert InitReport.parse("garbage here\n") is None


@pytest.mark.parametrize(
    ("report", "wall_killed", "oom", "cpu", "expected"),
    [
        (InitReport("exited", 0, 0.1, 0.1), False, False, 0.1, "ok"),
        (
            InitReport("exited", 0, 0.1, 0.1),
            False,
            True,
            0.1,
            "ok",
        ),  # a child OOMed, the stage coped
        (InitReport("exited", 1, 0.1, 0.1), False, False, 0.1, "failed"),
        (InitReport("exited", 137, 0.1, 0.1), False, True, 0.1, "memory_limit"),
        (InitReport("signaled", 9, 0.1, 0.1), False, True, 0.1, "memory_limit"),
        (InitReport("signaled", 24, 2.0, 2.0), False, False, 2.0, "time_limit"),
        (InitReport("signaled", 9, 1.97, 2.0), False, False, 1.97, "time_limit"),
        (InitReport("exited", 152, 2.0, 2.0), False, False, 2.0, "time_limit"),
        (InitReport("signaled", 25, 0.0, 0.0), False, False, 0.0, "output_limit"),
        (InitReport("exited", 153, 0.0, 0.0), False, False, 0.0, "output_limit"),
        (InitReport("signaled", 11, 0.0, 0.0), False, False, 0.0, "signaled"),
        (None, True, False, 0.0, "time_limit"),
        (InitReport("exited", 0, 0.0, 0.0), True, False, 0.0, "time_limit"),
        (None, False, False, 0.0, "error"),
        (InitReport("exec-failed", 0, 0.0, 0.0, "No such file"), False, False, 0.0, "error"),
        (InitReport("rlimit-failed", 0, 0.0, 0.0, "nofile"), False, False, 0.0, "error"),
        (InitReport("seal-failed", 0, 0.0, 0.0, "Permission denied"), False, False, 0.0, "error"),
        (InitReport.parse("wrong-box\n"), False, False, 0.0, "error"),
    ],
)
def test_classify(
    report: InitReport | None, wall_killed: bool, oom: bool, cpu: float, expected: str
) -> None:
    limits = parse_submission({"run": "x", "limits": {"run": {"cpu": 2}}}, _policy()).limits.run
    status, message = classify(
        report, wall_killed=wall_killed, out_of_memory=oom, disk_full=False, cpu_time=cpu,
        limits=limits,
    )  # fmt: skip
    assert status == expected
    assert (message is None) == (expected in ("ok", "failed", "signaled"))


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (InitReport("exited", 1, 0.1, 0.1), "disk_limit"),
        (InitReport("signaled", 25, 0.0, 0.0), "output_limit"),  # fsize first: more specific
        (InitReport("exited", 137, 0.1, 0.1), "memory_limit"),
    ],
)
def test_classify_a_full_working_directory(report: InitReport, expected: str) -> None:
    limits = parse_submission({"run": "x"}, _policy()).limits.run
    status, message = classify(
        report, wall_killed=False, out_of_memory=expected == "memory_limit", disk_full=True,
        cpu_time=0.1, limits=limits,
    )  # fmt: skip
    assert status == expected
    if expected == "disk_limit":
        assert message == f"disk limit of {limits.disk} bytes for the working directory reached"


def test_output_capture_keeps_the_first_bytes_and_reports_them_live() -> None:
    seen: list[tuple[str, bytes]] = []
    capture = _Capture("stdout", 5, lambda stream, data: seen.append((stream, data)))
    for chunk in (b"abc", b"def", b"ghi"):
        capture.feed(chunk)
    assert bytes(capture.data) == b"abcde" and capture.truncated
    assert seen == [("stdout", b"abc"), ("stdout", b"de")]
