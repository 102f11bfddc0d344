"""Whether a stage's program is blocked reading its stdin: the kernel's own view, from /proc.

``input_wanted`` must mean that a person is really awaited, not that the program went quiet.
A task blocked in a system call shows it in ``/proc/PID/task/TID/syscall`` (number and
arguments; ``running`` otherwise). The program waits for input when one of its tasks is in

- a read (``read``, ``readv``, ``pread64``, ``preadv``, ``preadv2``) of a descriptor that is
  the stage's stdin (the same pipe, or the same terminal, by device and inode through
  ``/proc/PID/fd/N``);
- a ``poll``/``ppoll`` whose descriptors (read from the task's memory) include its stdin for
  reading, or a ``select``/``pselect6`` whose read set does (Python's readline waits so);
- an ``epoll_wait`` family call on an epoll descriptor that watches its stdin for reading
  (``/proc/PID/fdinfo/EPFD`` lists the watched descriptors; Node.js waits so);

and nothing is buffered for it to read (the caller checks, with FIONREAD: a task just woken by
new input may not have left its read yet). The wait channel would not do: a task sleeping in a
pipe read and one sleeping in any other wait queue look alike there.

Everything read here was written by the sandbox's program, which is hostile: every number is
bounded, every failure (a process that ends meanwhile, a bad pointer) means "not waiting", and
one check looks at no more than ``MAX_LOOKS`` tasks and descriptors in all (a program of many
threads each polling a thousand descriptors would otherwise make every check cost the
executor, and the other slots it serves, a large share of a second). Past that, the program
is taken as not waiting: it gets no ``input_wanted``, and nothing else changes.
Reading /proc/PID/syscall and /proc/PID/mem takes ptrace access: the executor runs as root.
"""

from __future__ import annotations

import contextlib
import os
import platform
import struct
from collections.abc import Iterable

#: System call numbers, by machine.
SYSCALLS = {
    "x86_64": {
        "read": (0, 17, 19, 295, 327),
        "poll": (7, 271),
        "select": (23, 270),
        "epoll": (232, 281, 441),
    },
    "aarch64": {
        "read": (63, 67, 65, 69, 286),
        "poll": (73,),
        "select": (72,),
        "epoll": (22, 441),
    },
}
_NUMBERS = SYSCALLS.get(platform.machine(), SYSCALLS["x86_64"])
#: The most descriptors of one poll or select looked at.
MAX_FDS = 1024
#: The most tasks and descriptors one check looks at.
MAX_LOOKS = 512
POLLIN, EPOLLIN = 0x1, 0x1
POLLFD = struct.Struct("=ihh")


class _Exhausted(Exception):
    """The check looked at ``MAX_LOOKS`` things."""


class _Check:
    """One check of one stage, within its budget of looks."""

    def __init__(self, stdin: tuple[int, int]) -> None:
        self.stdin, self.looks = stdin, MAX_LOOKS

    def look(self) -> None:
        self.looks -= 1
        if self.looks < 0:
            raise _Exhausted

    def task_reads(self, pid: int, tid: int) -> bool:
        self.look()
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
            number, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
        except (OSError, ValueError, IndexError):  # "running", or gone
            return False
        if number in _NUMBERS["read"]:
            fds = [args[0]]
        elif number in _NUMBERS["poll"]:
            fds = _polled(pid, args[0], args[1])
        elif number in _NUMBERS["select"]:
            fds = _selected(pid, args[0], args[1])
        elif number in _NUMBERS["epoll"]:
            fds = _epolled(pid, args[0])
        else:
            return False
        return any(self.is_stdin(pid, fd) for fd in fds)

    def is_stdin(self, pid: int, fd: int) -> bool:
        self.look()
        if not 0 <= fd < 1 << 20:
            return False
        try:
            info = os.stat(f"/proc/{pid}/fd/{fd}")  # the open file itself, not a path it names
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.stdin


def waiting_for_stdin(pids: Iterable[int], stdin: tuple[int, int]) -> bool:
    """Whether a task of the processes ``pids`` is blocked reading the file whose device and
    inode are ``stdin``."""
    check = _Check(stdin)
    try:
        for pid in pids:
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    if check.task_reads(pid, int(tid)):
                        return True
    except _Exhausted:
        return False
    return False


def _memory(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        return os.pread(mem.fileno(), size, address)


def _polled(pid: int, address: int, count: int) -> list[int]:
    """The descriptors a ``poll`` waits to read."""
    if not 0 < count <= MAX_FDS:
        return []
    try:
        raw = _memory(pid, address, count * POLLFD.size)
    except (OSError, OverflowError, ValueError):
        return []
    fds = []
    for offset in range(0, len(raw) - POLLFD.size + 1, POLLFD.size):
        fd, events, _ = POLLFD.unpack_from(raw, offset)
        if events & POLLIN:
            fds.append(fd)
    return fds


def _selected(pid: int, nfds: int, address: int) -> list[int]:
    """The descriptors in a ``select``'s read set."""
    if not 0 < nfds <= MAX_FDS or address == 0:
        return []
    try:
        raw = _memory(pid, address, (nfds + 7) // 8)
    except (OSError, OverflowError, ValueError):
        return []
    return [fd for fd in range(min(nfds, len(raw) * 8)) if raw[fd // 8] >> (fd % 8) & 1]


def _epolled(pid: int, epfd: int) -> list[int]:
    """The descriptors an epoll descriptor watches for reading."""
    if not 0 <= epfd < 1 << 20:
        return []
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return []
    fds = []
    for line in lines:
        fields = line.split()
        # "tfd:        0 events:       19 data: ... pos:0 ino:... sdev:..."
        if len(fields) >= 4 and fields[0] == "tfd:" and fields[2] == "events:":
            with contextlib.suppress(ValueError):
                if int(fields[3], 16) & EPOLLIN:
                    fds.append(int(fields[1]))
    return fds
