"""Whether a program waits for its stdin (executor/waiting.py), asked of real processes of
this host, each blocked (or not) in the way a sandboxed program would be."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cellblock.executor.waiting import waiting_for_stdin

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
    info = os.fstat(write_end)
    assert waiting_for_stdin([proc.pid], (info.st_dev, info.st_ino)) is waits


def test_a_process_that_is_gone_waits_for_nothing() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert waiting_for_stdin([proc.pid, 999_999_999], (0, 0)) is False


@pytest.mark.parametrize(("polled", "seen"), [(10, True), (900, False)])
def test_a_check_looks_at_a_bounded_number_of_descriptors(polled: int, seen: bool) -> None:
    """Threads polling many descriptors, then one reading stdin: with a few, the check gets to
    the reader; with a thousand each, it stops at its budget (and takes the program as not
    waiting) rather than stat every one of them."""
    code = (
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
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=read_end)
    os.close(read_end)
    try:
        time.sleep(0.5)
        info = os.fstat(write_end)
        start = time.perf_counter()
        waiting = waiting_for_stdin([proc.pid], (info.st_dev, info.st_ino))
        took = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        os.close(write_end)
    assert waiting is seen
    assert took < 0.2
