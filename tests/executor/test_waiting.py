"""Whether a program waits for its stdin (executor/waiting.py), asked of real processes of
this host, each blocked (or not) in the way a sandboxed program would be."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cellblock.executor.waiting import Exhausted, Stdin, waiting_reader

#: How each program waits: on its stdin, or on something else.
PROGRAMS = {
    "read": ("import sys; sys.stdin.buffer.raw.read(1)", True),
    "poll": ("import select, sys; p = select.poll(); p.register(0, select.POLLIN); p.poll()", True),
    "select": ("import select, sys; select.select([0], [], [])", True),
    "epoll": ("import select; e = select.epoll(); e.register(0, select.EPOLLIN); e.poll()", True),
    "sleeps": ("import time; time.sleep(60)", False),
    "computes": ("while True: pass", False),
    "reads another pipe": ("import os; r, w = os.pipe(); os.read(r, 1)", False),
    "polls another pipe": (
        "import os, select; r, w = os.pipe(); p = select.poll(); p.register(r, select.POLLIN);"
        " p.poll()",
        False,
    ),
}


@pytest.fixture(params=list(PROGRAMS))
def program(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[bytes], int, bool]]:
    code, waits = PROGRAMS[request.param]
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=read_end)
    os.close(read_end)
    time.sleep(0.3)  # into its wait
    yield proc, write_end, waits
    proc.kill()
    proc.wait()
    os.close(write_end)


def test_only_a_wait_on_stdin_is_a_wish_for_input(
    program: tuple[subprocess.Popen[bytes], int, bool],
) -> None:
    proc, write_end, waits = program
    wait = waiting_reader([proc.pid], Stdin.of(write_end, terminal=False))
    assert (wait is not None) is waits
    if wait is not None:  # the same task, in the same wait, when asked again
        assert waiting_reader([proc.pid], Stdin.of(write_end, terminal=False)) == wait


def test_a_process_that_is_gone_waits_for_nothing() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert waiting_reader([proc.pid, 999_999_999], Stdin(0, 0)) is None


def spawn(code: str) -> tuple[subprocess.Popen[bytes], int]:
    """A Python program reading a pipe as its stdin; the pipe's write end."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=read_end)
    os.close(read_end)
    time.sleep(0.5)  # into its waits
    return proc, write_end


@pytest.mark.parametrize(("polled", "seen"), [(10, True), (900, False)])
def test_a_check_looks_at_a_bounded_number_of_descriptors(polled: int, seen: bool) -> None:
    """Threads polling many descriptors, then one reading stdin: with a few, the check gets to
    the reader; with a thousand each, it stops at its budget rather than stat every one."""
    proc, write_end = spawn(
        "import os, select, threading, time\n"
        f"r, w = os.pipe(); fds = [os.dup(r) for _ in range({polled})]\n"
        "def wait():\n"
        "    p = select.poll()\n"
        "    for fd in fds: p.register(fd, select.POLLIN)\n"
        "    p.poll()\n"
        "for _ in range(5): threading.Thread(target=wait).start()\n"
        "time.sleep(0.1); threading.Thread(target=os.read, args=(0, 1)).start()\n"
        "time.sleep(60)\n"
    )
    try:
        start = time.perf_counter()
        try:
            waiting = waiting_reader([proc.pid], Stdin.of(write_end, terminal=False)) is not None
        except Exhausted:
            waiting = False
        took = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        os.close(write_end)
    assert waiting is seen
    assert took < 0.2


def test_epolls_watching_many_files_for_anything_but_input_cost_a_bounded_check() -> None:
    """A review's attack: 100 threads in epoll_wait, each epoll watching a thousand files for
    EPOLLPRI, which no poll entry counts for: every line of their fdinfo counts a look."""
    proc, write_end = spawn(
        "import os, select, threading, time\n"
        "r, w = os.pipe(); fds = [os.dup(r) for _ in range(900)]\n"
        "e = select.epoll()\n"
        "for fd in fds: e.register(fd, select.EPOLLPRI)\n"
        "for _ in range(100): threading.Thread(target=e.poll).start()\n"
        "time.sleep(60)\n"
    )
    try:
        start = time.perf_counter()
        with pytest.raises(Exhausted):
            waiting_reader([proc.pid], Stdin.of(write_end, terminal=False))
        took = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        os.close(write_end)
    assert took < 0.05


def test_a_read_of_dev_tty_is_a_read_of_the_terminal() -> None:
    """/dev/tty is the opener's controlling terminal: in a stage, the console's."""
    master, slave = os.openpty()
    code = "import os; os.read(os.open('/dev/tty', os.O_RDONLY), 1)"
    proc = subprocess.Popen(
        ["setsid", "--ctty", sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave
    )
    try:
        time.sleep(0.5)
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _child_of(int(p), proc.pid)]
        assert waiting_reader([proc.pid, *pids], Stdin.of(slave, terminal=True)) is not None
        assert waiting_reader([proc.pid, *pids], Stdin.of(slave, terminal=False)) is None
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)


def _child_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False
