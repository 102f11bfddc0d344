"""Whether a stage's program is blocked reading its stdin: the kernel's own view, from /proc.

``input_wanted`` must mean that a person is really awaited, not that the program went quiet.
A task blocked in a system call shows it in ``/proc/PID/task/TID/syscall`` (number and
arguments; ``running`` otherwise). The program waits for input when one of its tasks is in

- a read (``read``, ``readv``, ``pread64``, ``preadv``, ``preadv2``) of a descriptor that is
  the stage's stdin (the same pipe, or the same terminal, by device and inode through
  ``/proc/PID/fd/N``; or /dev/tty, which is the stage's terminal);
- a ``poll``/``ppoll`` whose descriptors (read from the task's memory) include its stdin for
  reading, or a ``select``/``pselect6`` whose read set does (Python's readline waits so);
- an ``epoll_wait`` family call on an epoll descriptor that watches its stdin for reading
  (``/proc/PID/fdinfo/EPFD`` names each watched file by inode and device; Node.js waits so);

and nothing is buffered for it to read (the caller checks, with FIONREAD: a task just woken by
new input may not have left its read yet). The wait channel would not do: a task sleeping in a
pipe read and one sleeping in any other wait queue look alike there.

Everything read here was written by the sandbox's program, which is hostile: every number is
bounded, every failure (a process that ends meanwhile, a bad pointer) means "not waiting", and
one check looks at no more than ``MAX_LOOKS`` tasks, descriptors, poll entries and epoll
lines in all, and reads a bounded amount of each (a program of many threads each polling a
thousand descriptors would otherwise make every check cost the executor a large share of a
second). Past that, the check says so (``Exhausted``): the console then looks less often,
and the program may get no ``input_wanted``; nothing else changes. The console runs checks
in a thread, so that even a slow one never stalls the executor's other slots.
Reading /proc/PID/syscall and /proc/PID/mem takes ptrace access: the executor runs as root.
"""

from __future__ import annotations

import contextlib
import os
import platform
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

#: System call numbers, by machine (``None``: not known here, so nothing is ever seen waiting).
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
_NUMBERS = SYSCALLS.get(platform.machine())
#: The most descriptors of one poll or select looked at.
MAX_FDS = 1024
#: The most tasks, descriptors, poll entries and epoll lines one check looks at.
MAX_LOOKS = 512
#: The most of an epoll's fdinfo read.
MAX_FDINFO = 64 * 1024
POLLIN, EPOLLIN = 0x1, 0x1
POLLFD = struct.Struct("=ihh")
#: /dev/tty: whoever opens it gets their controlling terminal, in a stage the console's.
DEV_TTY = os.makedev(5, 0)


@dataclass(frozen=True)
class Stdin:
    """What the stage's program reads as stdin: the pipe or terminal, by device and inode,
    and a terminal's device number (also reached through /dev/tty)."""

    dev: int
    ino: int
    rdev: int | None = None

    @classmethod
    def of(cls, fd: int, terminal: bool) -> Stdin:
        info = os.fstat(fd)
        return cls(info.st_dev, info.st_ino, info.st_rdev if terminal else None)

    def matches(self, info: os.stat_result) -> bool:
        if self.rdev is not None and stat.S_ISCHR(info.st_mode):
            return info.st_rdev in (self.rdev, DEV_TTY)
        return (info.st_dev, info.st_ino) == (self.dev, self.ino)


@dataclass(frozen=True)
class Wait:
    """A task blocked reading stdin, with its context switches so far: the same task with the
    same count is still in the same wait."""

    tid: int
    switches: int


class Exhausted(Exception):
    """A check looked at ``MAX_LOOKS`` things without an answer."""


def waiting_reader(pids: Iterable[int], stdin: Stdin) -> Wait | None:
    """A task of the processes ``pids`` blocked reading ``stdin``, if there is one;
    ``Exhausted`` if the check ran out of looks first."""
    if _NUMBERS is None:
        return None
    check = _Check(stdin, _NUMBERS)
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                if check.task_reads(pid, int(tid)):
                    return Wait(int(tid), _switches(pid, int(tid)))
    return None


class _Check:
    """One check of one stage, within its budget of looks."""

    def __init__(self, stdin: Stdin, numbers: dict[str, tuple[int, ...]]) -> None:
        self.stdin, self.numbers, self.looks = stdin, numbers, MAX_LOOKS

    def look(self, count: int = 1) -> None:
        self.looks -= count
        if self.looks < 0:
            raise Exhausted

    def task_reads(self, pid: int, tid: int) -> bool:
        self.look()
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read(512).split()
            number, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
        except (OSError, ValueError, IndexError):  # "running", or gone
            return False
        numbers = self.numbers
        if number in numbers["read"]:
            return self.is_stdin(pid, args[0])
        if number in numbers["poll"]:
            return any(self.is_stdin(pid, fd) for fd in self.polled(pid, args[0], args[1]))
        if number in numbers["select"]:
            return any(self.is_stdin(pid, fd) for fd in self.selected(pid, args[0], args[1]))
        if number in numbers["epoll"]:
            return self.epolls_stdin(pid, args[0])
        return False

    def is_stdin(self, pid: int, fd: int) -> bool:
        self.look()
        if not 0 <= fd < 1 << 20:
            return False
        try:
            info = os.stat(f"/proc/{pid}/fd/{fd}")  # the open file itself, not a path it names
        except OSError:
            return False
        return self.stdin.matches(info)

    def polled(self, pid: int, address: int, count: int) -> list[int]:
        """The descriptors a ``poll`` waits to read."""
        if not 0 < count <= MAX_FDS:
            return []
        self.look(count)
        try:
            raw = _memory(pid, address, count * POLLFD.size)
        except (OSError, OverflowError, ValueError):
            return []
        entries = (POLLFD.unpack_from(raw, o) for o in range(0, len(raw) - 7, POLLFD.size))
        return list(dict.fromkeys(fd for fd, events, _ in entries if events & POLLIN))

    def selected(self, pid: int, nfds: int, address: int) -> list[int]:
        """The descriptors in a ``select``'s read set."""
        if not 0 < nfds <= MAX_FDS or address == 0:
            return []
        self.look(nfds // 8)
        try:
            raw = _memory(pid, address, (nfds + 7) // 8)
        except (OSError, OverflowError, ValueError):
            return []
        return [fd for fd in range(min(nfds, len(raw) * 8)) if raw[fd // 8] >> (fd % 8) & 1]

    def epolls_stdin(self, pid: int, epfd: int) -> bool:
        """Whether the epoll descriptor ``epfd`` watches stdin for reading: fdinfo names each
        watched file by inode and device (the kernel's dev_t), so nothing is opened."""
        if not 0 <= epfd < 1 << 20:
            return False
        try:
            with open(f"/proc/{pid}/fdinfo/{epfd}") as f:
                lines = f.read(MAX_FDINFO).splitlines()
        except OSError:
            return False
        for line in lines:
            self.look()
            fields = dict(_pairs(line))
            with contextlib.suppress(KeyError, ValueError):
                if int(fields["events"], 16) & EPOLLIN:
                    dev, ino = int(fields["sdev"], 16), int(fields["ino"], 16)
                    watched = (os.makedev(dev >> 20, dev & 0xFFFFF), ino)
                    if watched == (self.stdin.dev, self.stdin.ino):
                        return True
        return False


def _pairs(line: str) -> Iterator[tuple[str, str]]:
    """``tfd:  0 events: 19 data: 0 pos:0 ino:3 sdev:d`` as (name, value) pairs."""
    words = line.replace(":", ": ").split()
    for name, value in zip(words[::2], words[1::2], strict=False):
        yield name.rstrip(":"), value


def _switches(pid: int, tid: int) -> int:
    """The task's context switches, voluntary and not: they grow whenever it runs."""
    total = 0
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def _memory(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        return os.pread(mem.fileno(), size, address)
