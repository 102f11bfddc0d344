"""An interactive stage's standard streams: stdin comes from the client as the program runs,
on a pseudo-terminal or a pipe, and ``input_wanted`` says when the program waits for it.

On a terminal (``tty_size`` given), the jail's stdin, stdout and stderr are one pty's slave,
made the controlling terminal of the stage's session by init (jailinit.c): programs then see
a terminal, line-buffer their output (so prompts show), and the line discipline turns a typed
Ctrl-C into SIGINT for the foreground process group. The host keeps the master: what the
program writes is read from it as stdout (the output cap holds as for a pipe: past it, output
is read and dropped, so the program never blocks on it), and input is written to it. A pipe
console is three pipes, stdin's write end kept open for the input.

The input (``inputs``, a ``StageInputs`` of the service's store) is applied in order: bytes
to stdin; its end (a pipe is closed; a terminal is sent its end-of-file character, which ends
a read at the start of a line as at a real terminal); a signal to every process of the stage
but its init; a terminal's new size (the kernel sends SIGWINCH).

``input_wanted`` (``on_wanted``): checked (waiting.py) once input and output have been quiet
for a moment, then less and less often while the program runs; once announced, not again
until input has come: an idle stage that waits for input costs no CPU here, and each read
that waits is announced once. The output the program wrote before it blocked goes first.

A console serves one stage; ``Jail.serve`` drives it (``StageStreams``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
from collections.abc import Callable, Sequence
from typing import Protocol

from cellblock.executor.cgroups import StageCgroup
from cellblock.executor.jail import Reader, StageStreams, feed
from cellblock.executor.waiting import waiting_for_stdin
from cellblock.service.protocol.interactive import (
    Input,
    Resize,
    SignalInput,
    StdinData,
    StdinEnd,
)

#: Seconds after an input or output before the first check that the program waits, and the
#: longest time between checks while it runs.
FIRST_CHECK = 0.002
LAST_CHECK = 0.25
#: Seconds one wait for input lasts before the loop looks again (it is cancelled at the end).
INPUT_POLL = 30.0
TIOCGPTPEER = 0x5441


class InputSource(Protocol):
    """Where a stage's input comes from (``StageInputs``)."""

    async def take(self, timeout: float) -> Sequence[Input]: ...

    async def discard(self) -> None: ...


class Console(StageStreams):
    """The streams of one interactive stage: a terminal of ``tty_size`` (rows, columns), or
    pipes when it is ``None``."""

    def __init__(
        self,
        inputs: InputSource,
        tty_size: tuple[int, int] | None,
        on_wanted: Callable[[], None],
    ) -> None:
        super().__init__()
        self.inputs, self.tty_size, self.on_wanted = inputs, tty_size, on_wanted
        self._input = -1  # a terminal's master, or stdin's write end
        self._stdin: tuple[int, int] = (0, 0)  # device and inode the program reads
        self._stirred = asyncio.Event()  # input or output came
        self._fed = asyncio.Event()  # input came

    def open(self) -> tuple[tuple[int, int, int], int, int]:
        if self.tty_size is None:
            ends, stdout_r, stderr_r = super().open()
            self._input, self._stdin_w = self._stdin_w, -1
            info = os.fstat(self._input)
            self._stdin = (info.st_dev, info.st_ino)
            return ends, stdout_r, stderr_r
        master, slave = os.openpty()
        try:
            rows, cols = self.tty_size
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            info = os.fstat(slave)
            self._stdin = (info.st_dev, info.st_ino)
            # The master is read as stdout, and also written to: a second descriptor for it.
            self._input = os.dup(master)
            stderr_r, stderr_w = os.pipe()  # all output comes on the terminal: none here
            os.close(stderr_w)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        return (slave, slave, slave), master, stderr_r

    async def attend(self, stdout: Reader, cgroup: StageCgroup) -> None:
        """Apply the input as it comes and watch for the program to wait, until cancelled."""
        consume = stdout.consume

        def on_output(chunk: bytes) -> None:
            consume(chunk)
            self._stirred.set()

        stdout.consume = on_output
        watch = asyncio.ensure_future(self._watch(stdout, cgroup))
        try:
            while True:
                for item in await self.inputs.take(INPUT_POLL):
                    await self._apply(item, cgroup)
                    self._stirred.set()
                    self._fed.set()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _apply(self, item: Input, cgroup: StageCgroup) -> None:
        if isinstance(item, StdinData):
            if self._input >= 0:
                with contextlib.suppress(OSError):  # a terminal whose programs are gone: EIO
                    await feed(self._input, item.data)
        elif isinstance(item, StdinEnd):
            if self.tty_size is None:
                self._input = _close(self._input)
            elif self._input >= 0:
                with contextlib.suppress(OSError):
                    await feed(self._input, termios.tcgetattr(self._input)[6][termios.VEOF])
        elif isinstance(item, SignalInput):
            signal_stage(cgroup, signal.Signals[item.signal])
        elif isinstance(item, Resize) and self.tty_size is not None and self._input >= 0:
            size = struct.pack("HHHH", item.rows, item.cols, 0, 0)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._input, termios.TIOCSWINSZ, size)

    async def _watch(self, stdout: Reader, cgroup: StageCgroup) -> None:
        """Announce each wait for input once: the next is only looked for after input came."""
        while True:
            await self._until_waiting(cgroup)
            stdout.flush()  # what it wrote before it blocked goes first
            self._fed.clear()
            self.on_wanted()
            await self._fed.wait()

    async def _until_waiting(self, cgroup: StageCgroup) -> None:
        """Return once the program waits for input, nothing buffered: checked when input and
        output have been quiet for ``FIRST_CHECK``, then at growing intervals."""
        delay = FIRST_CHECK
        while True:
            try:
                await asyncio.wait_for(self._stirred.wait(), delay)
            except TimeoutError:
                if waiting_for_stdin(cgroup.procs(), self._stdin) and not self._buffered():
                    return
                delay = min(delay * 2, LAST_CHECK)
            else:
                self._stirred.clear()
                delay = FIRST_CHECK

    def _buffered(self) -> bool:
        """Whether input is waiting to be read: then the program is only about to read it."""
        if self._input < 0:
            return False
        try:
            if self.tty_size is None:
                return _unread(self._input) > 0
            peer = fcntl.ioctl(self._input, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
            try:
                return _unread(peer) > 0
            finally:
                os.close(peer)
        except OSError:
            return False

    def close(self) -> None:
        super().close()
        self._input = _close(self._input)


def _unread(fd: int) -> int:
    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    return count


def _close(fd: int) -> int:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


def signal_stage(cgroup: StageCgroup, sig: signal.Signals) -> None:
    """Send ``sig`` to every process of the stage but its init (pid 1 of the jail's namespace:
    it must live to report how the program ended)."""
    for pid in cgroup.procs():
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as status:
                nspid = next(line for line in status if line.startswith("NSpid:")).split()
            if nspid[-1] != "1":
                os.kill(pid, sig)
