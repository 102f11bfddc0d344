"""cellblock/processes.py with real processes: sessions, the parent-death signal, stopping with
SIGKILL after a timeout, orphans reaped as subreaper; and the restart back-off on a fake clock."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cellblock import processes


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(what: str, check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def spawned() -> Iterator[list[processes.Child]]:
    """Children a test spawns; what is left of them is killed at its end."""
    children: list[processes.Child] = []
    yield children
    for child in children:
        child.kill_group()
        with child.proc:  # closes its pipe, waits
            pass


def spawn_ready(children: list[processes.Child], script: str) -> processes.Child:
    """Spawn ``sh -c script`` and wait for the first line it prints (it is ready then)."""
    child = processes.spawn("test", ["sh", "-c", script], stdout=subprocess.PIPE)
    children.append(child)
    assert child.proc.stdout is not None
    assert child.proc.stdout.readline() == b"ready\n"
    return child


def test_backoff_restarts_a_burst_at_once_then_doubles_the_wait() -> None:
    now = [100.0]
    backoff = processes.Backoff(burst=3, window=60, max_delay=30, clock=lambda: now[0])
    for _ in range(3):
        assert backoff.delay() == 0
        backoff.crashed()
    assert backoff.delay() == 1  # the fourth crash within the window: wait
    now[0] += 1
    backoff.crashed()
    assert backoff.delay() == 2
    for _ in range(10):
        backoff.crashed()
    assert backoff.delay() == 30  # capped
    now[0] += 61  # the window forgets
    assert backoff.delay() == 0


def test_a_child_leads_a_session_of_its_own_with_no_terminal_input(
    spawned: list[processes.Child],
) -> None:
    child = spawn_ready(spawned, "echo ready; exec sleep 100")
    assert os.getsid(child.pid) == child.pid != os.getsid(0)
    assert os.getpgid(child.pid) == child.pid
    assert os.readlink(f"/proc/{child.pid}/fd/0") == "/dev/null"
    assert child.argv == ["sh", "-c", "echo ready; exec sleep 100"]  # without setpriv


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="the death signal needs setpriv")
def test_a_child_gets_sigterm_when_its_parent_is_killed(tmp_path: Path) -> None:
    got = tmp_path / "got"
    child = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(sig, frame):
            pathlib.Path({str(got)!r}).write_text(signal.Signals(sig).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(100)
    """)
    parent = textwrap.dedent(f"""
        import sys, time
        from cellblock import processes
        child = processes.spawn("child", [sys.executable, "-c", {child!r}])
        print(child.pid, flush=True)
        time.sleep(100)
    """)
    with subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        try:
            assert proc.stdout.readline() == b"ready\n"  # the child's: its handler is set
            proc.kill()
            proc.wait()
            wait_until("the orphan to end", lambda: not alive(pid))
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert got.read_text() == "SIGTERM"


async def test_stop_escalates_to_sigkill_of_the_group_after_its_timeout(
    spawned: list[processes.Child],
) -> None:
    # The shell and its background sleep ignore SIGTERM; the sleep shares the shell's group.
    child = spawn_ready(spawned, "trap '' TERM; sleep 100 & echo $! >&2; echo ready; wait")
    sleeper = int(Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()[0])
    began = time.monotonic()
    await processes.stop([child], timeout=0.5)
    assert 0.5 <= time.monotonic() - began < 3
    assert child.proc.returncode == -signal.SIGKILL
    assert child.describe_exit() == "killed by SIGKILL"
    assert child.stopping
    wait_until("the group's sleep to be killed", lambda: not alive(sleeper))


async def test_stop_takes_no_longer_than_the_child_needs(spawned: list[processes.Child]) -> None:
    child = spawn_ready(spawned, "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done")
    began = time.monotonic()
    await processes.stop([child], timeout=30)
    assert time.monotonic() - began < 5
    assert child.describe_exit() == "exit status 0"


async def test_kill_now_cuts_a_stop_short(spawned: list[processes.Child]) -> None:
    child = spawn_ready(spawned, "trap '' TERM; echo ready; exec sleep 100")
    kill_now = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, kill_now.set)
    began = time.monotonic()
    await processes.stop([child], timeout=30, kill_now=kill_now)
    assert time.monotonic() - began < 3
    assert child.describe_exit() == "killed by SIGKILL"


def test_a_subreaper_kills_and_reaps_adopted_orphans_only() -> None:
    # In a process of its own: this one, adopting orphans, would collect other tests' too.
    script = textwrap.dedent("""
        import asyncio, subprocess
        from cellblock import processes
        reaper = processes.Subreaper()
        assert reaper.become()
        started = subprocess.Popen(["sleep", "100"])
        shell = subprocess.run(
            ["sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True
        )
        orphan = int(shell.stdout)
        assert set(processes.children()) == {started.pid, orphan}
        asyncio.run(reaper.reap_remaining({started.pid}, timeout=5))
        assert processes.children() == [started.pid], processes.children()
        assert started.poll() is None
        started.kill()
        started.wait()
        print("ok")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.stdout == "ok\n", done.stderr
