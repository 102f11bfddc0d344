"""One jail: an nsjail process, its pipes and its stage's cgroup, from its start to its end.

A jail is started before its stage is known (``Jail.start``); ``serve`` then hands the stage to
its init over the control pipe (see jailinit.c) and watches it to its end; ``end`` lets nsjail
finish and releases everything, ``kill`` does it at once. What the stage is, and what its end
means, is the sandbox's business (sandbox.py).

Not thread-safe; one ``Jail`` serves one stage, from one task at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cellblock.executor.cgroups import StageCgroup

#: Seconds nsjail gets to end after its jail before it is killed.
END_TIMEOUT = 5.0


@dataclass(frozen=True)
class JailFds:
    """The jail's ends of the pipes nsjail passes on, by number in nsjail's process."""

    status: int
    control: int
    log: int


@dataclass(frozen=True)
class Seen:
    """What the host saw of one stage, before interpreting it."""

    status: str
    wall_killed: bool
    wall_time: float
    cpu_time: float
    log: str


class Jail:
    """One nsjail process, its pipes and its cgroup. It serves one stage, never two."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        cgroup: StageCgroup,
        stdin: int,
        stdout: int,
        stderr: int,
        status: int,
        control: int,
        log: int,
    ) -> None:
        self.proc, self.cgroup = proc, cgroup
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.status, self.control, self.log = status, control, log
        self._exit: asyncio.Task[float] | None = None
        self._released = False

    @classmethod
    def start(cls, command: Callable[[JailFds], list[str]], cgroup: StageCgroup) -> Jail:
        """Start nsjail with ``command(fds)``, its stdio and the jail's three pipes made here;
        the jail's ends are closed here once nsjail holds them."""
        ours: list[int] = []  # our ends, kept
        theirs: list[int] = []
        try:
            for jail_reads in (True, False, False, False, True, False):
                r, w = os.pipe()
                ours.append(w if jail_reads else r)
                theirs.append(r if jail_reads else w)
            stdin_r, stdout_w, stderr_w, status_w, control_r, log_w = theirs
            proc = subprocess.Popen(
                command(JailFds(status=status_w, control=control_r, log=log_w)),
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=stderr_w,
                pass_fds=(status_w, control_r, log_w),
                start_new_session=True,
                env={},
            )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return cls(proc, cgroup, *ours)

    def running(self) -> bool:
        """Whether nsjail is still running (it is not reaped here: ``end`` does that)."""
        if self.proc.returncode is not None:
            return False
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.proc.pid, flags) is None

    def exited(self) -> asyncio.Task[float]:
        """nsjail's exit: the CPU time of nsjail and of the jail it reaped."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(wait_exit(self.proc))
        return self._exit

    async def serve(
        self,
        request: bytes,
        stdin: bytes,
        outputs: Mapping[str, Callable[[bytes], Any]],
        timeout: float,
    ) -> Seen:
        """Give the jail its stage and wait until init reports that the stage's processes
        are gone, or nsjail ends without a report, or ``timeout`` seconds pass (then the
        stage is killed)."""
        loop = asyncio.get_running_loop()
        status = bytearray()
        reported = loop.create_future()

        def on_status(chunk: bytes) -> None:
            status.extend(chunk)
            if b"\n" in chunk and not reported.done():
                reported.set_result(None)

        started = time.monotonic()
        readers = [
            Reader(self.stdout, outputs["stdout"]),
            Reader(self.stderr, outputs["stderr"]),
            Reader(self.status, on_status),
        ]
        log = bytearray()
        writers = [
            asyncio.ensure_future(feed(self.control, request)),
            asyncio.ensure_future(feed(self.stdin, stdin)),
        ]
        self.control = self.stdin = -1  # closed by feed
        exited = self.exited()
        try:
            done, _ = await asyncio.wait(
                [reported, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            wall_killed = not done
            if wall_killed:
                self.cgroup.kill_all()
            cpu_time = 0.0
            if reported.done() and not wall_killed:
                # Init reports once every process of the stage is gone, so all they wrote
                # is in the pipes already; nsjail, which holds the pipes too, ends later.
                for reader in readers:
                    reader.flush()
            else:
                cpu_time = await exited  # nsjail ends once its jail has
                log_reader = Reader(self.log, log.extend)
                await asyncio.gather(*(r.eof for r in (*readers, log_reader)))
            await asyncio.gather(*writers)
        finally:
            for reader in readers:
                reader.stop()
            for writer in writers:
                writer.cancel()
        for reader in readers:
            reader.check()
        return Seen(
            status=status.decode(errors="replace"),
            wall_killed=wall_killed,
            wall_time=time.monotonic() - started,
            cpu_time=cpu_time,
            log=log.decode(errors="replace"),
        )

    async def end(self) -> None:
        """Wait for nsjail to end after its jail (an armed jail's init ends when its control
        pipe closes unused), then release everything."""
        with contextlib.suppress(OSError):
            if self.control >= 0:
                os.close(self.control)
        self.control = -1
        try:
            await asyncio.wait_for(asyncio.shield(self.exited()), timeout=END_TIMEOUT)
        except TimeoutError:
            self.kill()  # which releases it
        finally:
            if not self._released:
                self._released = True
                # In a thread: closing a v1 cgroup's OOM eventfd and removing its folders wait
                # on the kernel for milliseconds, which the next stage's start should not.
                await asyncio.to_thread(self._free)

    def release(self) -> None:
        """Close every descriptor of the jail and remove its cgroup; once, however often it is
        called (``end`` and ``kill`` both release). Called on the event loop's thread only, so
        that the flag is never raced."""
        if self._released:
            return
        self._released = True
        self._free()

    def _free(self) -> None:
        for name in ("stdin", "stdout", "stderr", "status", "control", "log"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        self.cgroup.close()
        self.cgroup.remove()

    def kill(self) -> None:
        """Kill the jail now, and nsjail after it; release everything."""
        if self._exit is not None and not self._exit.done():
            self._exit.cancel()  # reaped below, not by the task
        if self.proc.returncode is None:
            # Kill the jail, not nsjail: nsjail then reaps its child and exits by itself.
            # Killed first, nsjail would orphan the jail's init to the host's pid 1.
            self.cgroup.kill_all()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.release()


class Reader:
    """Hands what arrives on a pipe to ``consume``, one read per wake of the event loop."""

    def __init__(self, fd: int, consume: Callable[[bytes], Any]) -> None:
        self.fd, self.consume = fd, consume
        self.loop = asyncio.get_running_loop()
        self.eof: asyncio.Future[None] = self.loop.create_future()
        self.error: BaseException | None = None
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._read)
        self.reading = True

    def _read(self) -> bool:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        if chunk:
            try:
                self.consume(chunk)
                return True
            except Exception as exc:  # reported by check(), not lost in the event loop
                self.error = exc
        self.stop()
        if not self.eof.done():
            self.eof.set_result(None)
        return False

    def flush(self) -> None:
        """Consume what the pipe holds now, without waiting for more."""
        while self.reading and self._read():
            pass

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def check(self) -> None:
        if self.error is not None:
            raise self.error


async def feed(fd: int, data: bytes) -> None:
    """Write ``data`` to the pipe ``fd`` and close it; a reader that goes away early is not
    an error. The descriptor is closed whatever happens, cancellation included."""
    loop = asyncio.get_running_loop()
    # An Event, not a future: the loop may call the writer back again before this task runs.
    ready = asyncio.Event()
    try:
        os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                ready.clear()
                loop.add_writer(fd, ready.set)
                try:
                    await ready.wait()
                finally:
                    loop.remove_writer(fd)
            except BrokenPipeError:
                return
    finally:
        os.close(fd)


async def wait_exit(proc: subprocess.Popen[bytes]) -> float:
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
