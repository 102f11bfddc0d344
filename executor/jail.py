"""One jail: an nsjail process, its control socket and its cgroup, from its start to its end.

A jail is started before its stage is known (``Jail.start``); ``serve`` then hands a stage to
its init over the control socket (see jailinit.c), with fresh pipes for the stage's standard
streams and a socket for its status, and watches it to its end; ``dismiss`` lets that init go
once the stage is measured. A one-shot jail (nsjail's ``--mode o``) serves one stage; a rerun
jail (``--mode r``) starts a fresh jail (new namespaces, mounts and init) on the same control
socket each time its init ends, so it serves stages one after another without nsjail being
loaded again. ``end`` lets nsjail finish and releases everything, ``kill`` does it at once.
What a stage is, and what its end means, is the sandbox's business (sandbox.py).

Not thread-safe; one stage at a time, served from one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cellblock.executor.cgroups import StageCgroup

logger = logging.getLogger("cellblock.executor")
#: Seconds nsjail gets to end after its jail before it is killed.
END_TIMEOUT = 5.0
#: The header of a stage on the control socket (jailinit.c): magic, the fields' length, and
#: the device and inode of the working directory it is for.
HEADER = struct.Struct("=IIQQ")
MAGIC = 0x43425231
#: What init writes on the control socket once its jail is made and it waits for a stage.
READY = b"R"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
#: Seconds a jail may take to be ready for its stage (not counted in the stage's wall time).
READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class JailFds:
    """The jail's ends of what nsjail passes on, by number in nsjail's process."""

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
    #: Peak memory measured before the stage was killed or found dead (else None: measured
    #: after the report, while init waits).
    memory: int | None = None


class Jail:
    """One nsjail process, its control socket, its log pipe and its cgroup."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        cgroup: StageCgroup,
        control: socket.socket,
        log: int,
        rerun: bool,
    ) -> None:
        self.proc, self.cgroup, self.control, self.log = proc, cgroup, control, log
        self.rerun = rerun
        #: Our end of the status socket of the stage served last, until it is dismissed.
        self.status = -1
        self._exit: asyncio.Task[float] | None = None
        #: The read of the next init's ready byte, if started before its stage (``ready``).
        self._ready: asyncio.Future[bytes] | None = None
        self._released = False

    @classmethod
    def start(
        cls, command: Callable[[JailFds], list[str]], cgroup: StageCgroup, *, rerun: bool = False
    ) -> Jail:
        """Start nsjail with ``command(fds)`` (in ``--mode r`` if ``rerun``, else ``o``: the
        command says which); the jail's ends are closed here once nsjail holds them."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        try:
            argv = command(JailFds(control=theirs.fileno(), log=log_w))
            if rerun:
                # A one-shot jail ends with its init; a rerun one would make jails forever if
                # the executor died: nsjail is told to end when its parent does.
                argv = [SETPRIV, "--pdeathsig", "TERM", "--", *argv]
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), log_w),
                start_new_session=True,
                env={},
            )
        except BaseException:
            ours.close()
            os.close(log_r)
            raise
        finally:
            theirs.close()
            os.close(log_w)
        ours.setblocking(False)
        os.set_blocking(log_r, False)
        return cls(proc, cgroup, ours, log_r, rerun)

    def running(self) -> bool:
        """Whether nsjail is still running (it is not reaped here: ``end`` does that)."""
        if self.proc.returncode is not None:
            return False
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_PID, self.proc.pid, flags) is None

    def exited(self) -> asyncio.Task[float]:
        """nsjail's exit: the CPU time of nsjail and of the jails it reaped."""
        if self._exit is None:
            self._exit = asyncio.ensure_future(wait_exit(self.proc))
        return self._exit

    async def serve(
        self,
        request: bytes,
        box: os.stat_result,
        streams: StageStreams,
        outputs: Mapping[str, Callable[[bytes], Any]],
        timeout: float,
        on_ready: Callable[[], None] | None = None,
    ) -> Seen:
        """Give the jail's waiting init its stage, for the working directory ``box`` (init
        refuses it if its /box is another), and wait until init reports that the stage's
        processes are gone, or init or nsjail ends without a report, or ``timeout`` seconds
        pass from the hand-over (then the stage is killed). ``on_ready`` is called once init is
        known to be waiting, before the stage is sent: its jail's mounts are made by then.

        After a report, init waits for ``dismiss``; after none, a rerun jail is terminated
        (its next jail must not be served: the stage's end is unknown)."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        exited = self.exited()
        recv, self._ready = self.ready(), None
        try:
            await _any(recv, exited, deadline=loop.time() + READY_TIMEOUT)
        finally:
            if not recv.done():
                recv.cancel()  # else its reader stays registered on a descriptor reused later
        ready = not recv.cancelled() and recv.exception() is None and recv.result() == READY
        # nsjail's exit counts the CPU time of every jail it ran, earlier stages' included.
        earlier_cpu = self._cpu_so_far() if self.rerun else 0.0
        if ready and on_ready is not None:
            on_ready()
        status = bytearray()
        reported = loop.create_future()

        def on_status(chunk: bytes) -> None:
            status.extend(chunk)
            if b"\n" in chunk and not reported.done():
                reported.set_result(None)

        # Each stage's own streams: their ends of file are this stage's, whatever came before.
        jail_ends, stdout_r, stderr_r = streams.open()
        status_host, status_jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.status = status_host.detach()
        readers = [
            Reader(stdout_r, streams.watched(outputs["stdout"])),
            Reader(stderr_r, streams.watched(outputs["stderr"])),
            Reader(self.status, on_status),
        ]
        writers: list[asyncio.Future[None]] = []
        try:
            if ready:
                theirs = (*jail_ends, status_jail.fileno())
                with contextlib.suppress(OSError):  # init gone: seen as no report below
                    send_header(self.control, len(request), box, theirs)
                    writers.append(asyncio.ensure_future(feed(self.control.fileno(), request)))
        finally:
            for fd in set(jail_ends):  # a terminal is all three
                os.close(fd)
            status_jail.close()
        attending = asyncio.ensure_future(streams.attend(readers[:2], self.cgroup))
        log = bytearray()
        cpu_time, memory = 0.0, None
        wall_killed = False
        try:
            if ready:
                deadline = loop.time() + timeout
                ended = await _any(reported, readers[2].eof, exited, deadline=deadline)
                wall_killed = not ended
            if reported.done() and not wall_killed:
                # Init reports once every process of the stage is gone, so all they wrote
                # is in the pipes already; nsjail, which holds the pipes too, ends later.
                for reader in readers:
                    reader.flush()
                if self.rerun:
                    self._drain_log()
            else:
                # Measured now, while the stage's own cgroup of nsjail's is still there.
                memory = self.cgroup.peak_memory()
                if self.rerun:
                    # nsjail first: killed under it, a jail would only be made again.
                    self.terminate()
                    await _any(exited, deadline=loop.time() + END_TIMEOUT)
                if wall_killed or not exited.done():
                    self.cgroup.kill_all()
                cpu_time = await exited - earlier_cpu  # nsjail ends once its jail has
                log_reader = Reader(self.log, log.extend)
                readers.append(log_reader)
                await asyncio.gather(readers[0].eof, readers[1].eof, log_reader.eof)
            await asyncio.gather(*writers)
        finally:
            for reader in readers:
                reader.stop()
            for writer in [*writers, attending]:
                writer.cancel()
            # Waited for, not awaited: neither its cancellation nor its failure is the stage's
            # outcome (a cancel of this task meanwhile still propagates).
            await asyncio.wait([attending])
            if not attending.cancelled() and attending.exception() is not None:
                logger.warning("stage streams failed", exc_info=attending.exception())
            streams.close()
            os.close(stdout_r)
            os.close(stderr_r)
        for reader in readers:
            reader.check()
        return Seen(
            status=status.decode(errors="replace"),
            wall_killed=wall_killed,
            wall_time=time.monotonic() - started,
            cpu_time=cpu_time,
            log=log.decode(errors="replace"),
            memory=memory,
        )

    def _drain_log(self) -> None:
        """Drop what nsjail logged about jails that went well: a rerun jail's log pipe must
        not fill up over many stages (nsjail would block writing to it). Non-blocking since
        the start."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.log, 65536):
                pass

    def _cpu_so_far(self) -> float:
        """The CPU seconds of nsjail and of the jails it has reaped, from /proc (in ticks)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            return 0.0
        # utime, stime, cutime, cstime: fields 14 to 17, counted from the pid.
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def dismiss(self) -> None:
        """Let the init of the stage served last end: the stage is measured."""
        self.status = close_fd(self.status)

    def ready(self) -> asyncio.Future[bytes]:
        """The ready byte of the jail's waiting (or next) init, read once: ``serve`` takes it
        from here if it was asked for before the stage (a series lets its last working
        directory go once the next jail has made its mounts, see sandbox.py)."""
        if self._ready is None:
            loop = asyncio.get_running_loop()
            self._ready = asyncio.ensure_future(loop.sock_recv(self.control, 1))
        return self._ready

    def _stop_reading(self) -> None:
        # On the loop's thread: a read left registered would watch a descriptor reused later.
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    def terminate(self) -> None:
        """Ask nsjail to end now: it kills its jail and exits."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    async def end(self) -> None:
        """Wait for nsjail to end after its jail, then release everything: a one-shot jail's
        init ends when its status or, unused, its control socket closes; a rerun jail is
        terminated."""
        if self._released:  # killed already
            return
        self._stop_reading()
        if self.rerun:
            # It kills the waiting init. Dismissed, or its control socket closed, the init
            # would end and nsjail make another before it sees the signal.
            self.terminate()
        else:
            self.dismiss()
            self.control.close()
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
        self._stop_reading()
        self._free()

    def _free(self) -> None:
        self.dismiss()
        self.control.close()
        self.log = close_fd(self.log)
        self.cgroup.close()
        self.cgroup.remove()

    def kill(self) -> None:
        """Kill the jail now, and nsjail after it; release everything."""
        if self._exit is not None and not self._exit.done():
            self._exit.cancel()  # reaped below, not by the task
        if self.proc.returncode is None:
            if self.rerun:
                # nsjail first: it kills its jail and exits; killed under it, a jail would
                # only be made again.
                self.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=2)
            # Kill the jail, not nsjail: nsjail then reaps its child and exits by itself.
            # Killed first, nsjail would orphan the jail's init to the host's pid 1.
            self.cgroup.kill_all()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.release()


class StageStreams:
    """A stage's standard streams, the host's side: stdin given up front through a pipe, and
    pipes for stdout and stderr. A console (console.py) streams stdin as the stage runs.

    ``open`` makes them: the jail's ends (stdin, stdout, stderr; closed by the caller once
    sent) and the host's ends of stdout and stderr (read, through what ``watched`` makes of
    their consumers, and closed by the caller). ``attend`` runs from the hand-over until the
    stage's end, when it is cancelled; ``close`` then closes what the streams still hold.
    """

    def __init__(self, stdin: bytes = b"") -> None:
        self.stdin = stdin
        self._stdin_w = -1

    def open(self) -> tuple[tuple[int, int, int], int, int]:
        (stdin_r, self._stdin_w), (stdout_r, stdout_w), (stderr_r, stderr_w) = (
            os.pipe() for _ in "012"
        )
        return (stdin_r, stdout_w, stderr_w), stdout_r, stderr_r

    def watched(self, consume: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        return consume

    async def attend(self, outputs: Sequence[Reader], cgroup: StageCgroup) -> None:
        fd, self._stdin_w = self._stdin_w, -1
        await feed(fd, self.stdin, close=True)

    def close(self) -> None:
        self._stdin_w = close_fd(self._stdin_w)


def send_header(
    control: socket.socket, length: int, box: os.stat_result, fds: Sequence[int]
) -> None:
    """Send a stage's header on init's control socket (jailinit.c) with the stage's stdin,
    stdout, stderr and status descriptors attached; ``length`` bytes of fields follow it."""
    header = HEADER.pack(MAGIC, length, box.st_dev, box.st_ino)
    control.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", *fds))])


def close_fd(fd: int) -> int:
    """Close ``fd`` unless it is -1 already; -1, for the attribute that held it."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


async def _any(*futures: asyncio.Future[Any], deadline: float) -> bool:
    """Wait until one of ``futures`` is done (True) or the loop's clock passes ``deadline``
    (False); none is cancelled."""
    timeout = max(deadline - asyncio.get_running_loop().time(), 0)
    done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    return bool(done)


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
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            chunk = b""  # a terminal's end of file: its last program is gone
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


async def feed(fd: int, data: bytes, *, close: bool = False) -> None:
    """Write ``data`` to ``fd`` (a pipe or a socket); a reader that goes away early is not an
    error. With ``close``, the descriptor is closed whatever happens, cancellation included."""
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
            except (BrokenPipeError, ConnectionResetError):
                return
    finally:
        if close:
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
