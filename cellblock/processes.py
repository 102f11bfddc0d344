"""Child processes of a supervisor: start them, back off their restarts, stop them, reap orphans.

What this module guarantees, and what it does not:

- ``spawn`` starts a child as the leader of a session (and so of a process group) of its own. A
  Ctrl-C in the terminal reaches the supervisor only, which stops the children in its own order;
  and the child's group is one unit to kill: ``Child.kill_group`` SIGKILLs the child and every
  descendant still in its group. A descendant that moved to a group of its own escapes that.
- A spawned child gets SIGTERM when the supervisor dies, by any signal, SIGKILL included
  (``PR_SET_PDEATHSIG``, set by ``setpriv --pdeathsig`` between fork and exec; where ``setpriv``
  is not installed, children outlive the supervisor). SIGTERM is a request: what survives the
  supervisor's death is whatever a child does before it exits (a worker drains its running work)
  and whatever it leaves running after; the death signal reaches children, not grandchildren.
- ``stop`` sends SIGTERM, then SIGKILLs the group of each child still running after its timeout
  (or at once when asked to); it returns once every child is reaped, and kills what a child that
  exited left in its group.
- A ``Subreaper`` (``PR_SET_CHILD_SUBREAPER``) inherits the orphans of its descendants, as init
  would: a killed executor's sandboxes become its children. ``reap`` kills and reaps every such
  child that the supervisor did not start; this lasts only as long as the supervisor does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("cellblock.processes")

_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Backoff:
    """Restarts after unexpected exits: the first ``burst`` within ``window`` seconds go at once,
    each later one waits twice as long as the one before, at most ``max_delay`` seconds."""

    burst: int
    window: float
    max_delay: float
    clock: Callable[[], float] = time.monotonic
    crashes: collections.deque[float] = field(default_factory=collections.deque, init=False)

    def crashed(self) -> None:
        self.crashes.append(self.clock())

    def recent(self) -> int:
        """How many crashes the window holds."""
        horizon = self.clock() - self.window
        while self.crashes and self.crashes[0] < horizon:
            self.crashes.popleft()
        return len(self.crashes)

    def delay(self) -> float:
        """Seconds from now until the next start may happen (0: now)."""
        count = self.recent()
        if count < self.burst:
            return 0.0
        wait = min(self.max_delay, 2.0 ** (count - self.burst))
        return max(0.0, self.crashes[-1] + wait - self.clock())


@dataclass
class Child:
    """One process that ``spawn`` started."""

    name: str
    #: What it runs, without the ``setpriv`` that started it: what starting it again runs.
    argv: list[str]
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    #: Asked to stop: its exit, whatever its status, is expected.
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self) -> None:
        """Ask it to stop (SIGTERM: a worker drains first)."""
        self.stopping = True
        self.send(signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL the child's process group (it leads one), the child included."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def describe_exit(self) -> str:
        """How it ended, for people: ``exit status 1``, ``killed by SIGKILL``."""
        status = self.proc.returncode
        if status >= 0:
            return f"exit status {status}"
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[Any] | None = None,
) -> Child:
    """Start ``argv`` in a session of its own, with SIGTERM as its parent-death signal; its
    standard input is /dev/null (the terminal is the supervisor's). The kernel sends that signal
    when the spawning thread ends: call this from the thread that lives as long as the process."""
    setpriv = shutil.which("setpriv")
    prefix = [] if setpriv is None else [setpriv, "--pdeathsig", "TERM", "--"]
    proc = subprocess.Popen(
        [*prefix, *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        start_new_session=True,
    )
    log.info("started", extra={"child": name, "pid": proc.pid})
    return Child(name, list(argv), proc)


async def stop(
    children: Collection[Child], timeout: float, kill_now: asyncio.Event | None = None
) -> None:
    """Stop ``children`` and reap them: SIGTERM, and SIGKILL to the groups of those still
    running after ``timeout`` seconds or once ``kill_now`` is set."""
    for child in children:
        child.stop()
    deadline = time.monotonic() + timeout
    while any(c.running() for c in children):
        if (kill_now is not None and kill_now.is_set()) or time.monotonic() > deadline:
            for child in children:
                if child.running():
                    log.warning("did not stop in time: SIGKILL", extra={"child": child.name})
                    child.kill_group()
            break
        await asyncio.sleep(0.05)
    for child in children:
        child.proc.wait()  # SIGKILLed or ended: no wait to speak of
        child.kill_group()  # what it left in its group
        log.info("ended", extra={"child": child.name, "status": child.describe_exit()})


class Subreaper:
    """This process as the reaper of its descendants' orphans (``PR_SET_CHILD_SUBREAPER``)."""

    def __init__(self) -> None:
        self.active = False

    def become(self) -> bool:
        """Adopt orphans from now on; False where the kernel does not let this process."""
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            self.active = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        return self.active

    def reap(self, known: Collection[int]) -> None:
        """SIGKILL and reap every child but the ``known`` ones: orphans adopted from below."""
        if not self.active:
            return
        for pid in children():
            if pid in known:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] != 0:
                    log.info("reaped an orphan a worker left", extra={"pid": pid})

    async def reap_remaining(self, known: Collection[int], timeout: float) -> None:
        """``reap`` until no child but the ``known`` ones is left, for at most ``timeout``
        seconds: orphans are adopted a moment after their parent dies."""
        deadline = time.monotonic() + timeout
        while self.active and set(children()) - set(known) and time.monotonic() < deadline:
            self.reap(known)
            await asyncio.sleep(0.02)


def children() -> list[int]:
    """This process's children (those it started and those it adopted)."""
    found: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split()]
    return found
