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

``input_wanted`` (``on_wanted``): checked (waiting.py, in a thread) once input and output
have been quiet for a moment, then less and less often while the program runs; once
announced, not looked for again until input has come, and not announced again while the
same task is still in the same wait (keystrokes of a line not yet ended, say): an idle stage
that waits for input costs no CPU here, and each wait is announced once. The output the
program wrote before it blocked goes first.

A console serves one stage; ``Jail.serve`` drives it (``StageStreams``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import struct
import termios
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.exceptions import RedisError

from cellblock.executor.cgroups import StageCgroup
from cellblock.executor.jail import Reader, StageStreams, close_fd, feed
from cellblock.executor.waiting import Exhausted, Stdin, Wait, waiting_reader
from cellblock.service.protocol.interactive import (
    Input,
    SignalInput,
    StdinData,
    StdinEnd,
)

#: Seconds after an input or output before the first check that the program waits, the
#: longest time between checks while it runs, and the time after a check that ran out of
#: looks (waiting.py) before the next.
FIRST_CHECK = 0.002
LAST_CHECK = 0.25
EXHAUSTED_CHECK = 2.0
#: Seconds one wait for input lasts before the loop looks again (it is cancelled at the end),
#: and the pause after the input's store failed.
INPUT_POLL = 30.0
INPUT_RETRY = 1.0
TIOCGPTPEER = 0x5441

log = logging.getLogger("cellblock.executor")


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
        self._stdin = Stdin(0, 0)
        self._stirred = asyncio.Event()  # input or output came
        self._fed = asyncio.Event()  # bytes (or the end) came for the program to read
        self._writes: asyncio.Queue[bytes | None] = asyncio.Queue()

    def open(self) -> tuple[tuple[int, int, int], int, int]:
        if self.tty_size is None:
            ends, stdout_r, stderr_r = super().open()
            self._input, self._stdin_w = self._stdin_w, -1
            self._stdin = Stdin.of(self._input, terminal=False)
            return ends, stdout_r, stderr_r
        master, slave = os.openpty()
        try:
            rows, cols = self.tty_size
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            self._stdin = Stdin.of(slave, terminal=True)
            # The master is read as stdout, and also written to: a second descriptor for it.
            self._input = os.dup(master)
            stderr_r, stderr_w = os.pipe()  # all output comes on the terminal: none here
            os.close(stderr_w)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        return (slave, slave, slave), master, stderr_r

    def watched(self, consume: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        def on_output(chunk: bytes) -> Any:
            self._stirred.set()
            return consume(chunk)

        return on_output

    async def attend(self, outputs: Sequence[Reader], cgroup: StageCgroup) -> None:
        """Apply the input as it comes and watch for the program to wait, until cancelled.
        Bytes go through a writer of their own, so that a signal or a resize never waits
        behind a write the program does not read."""
        helpers = [
            asyncio.ensure_future(self._write()),
            asyncio.ensure_future(self._watch(outputs, cgroup)),
        ]
        try:
            while True:
                try:
                    items = await self.inputs.take(INPUT_POLL)
                except (OSError, RedisError) as exc:  # the store is away: input waits for it
                    log.warning("stage input unavailable", extra={"error": str(exc)})
                    await asyncio.sleep(INPUT_RETRY)
                    continue
                for item in items:
                    self._apply(item, cgroup)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers)

    def _apply(self, item: Input, cgroup: StageCgroup) -> None:
        if isinstance(item, StdinData | StdinEnd):
            self._writes.put_nowait(item.data if isinstance(item, StdinData) else None)
        elif isinstance(item, SignalInput):
            signal_stage(cgroup, signal.Signals[item.signal])
        elif self.tty_size is not None and self._input >= 0:
            size = struct.pack("HHHH", item.rows, item.cols, 0, 0)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._input, termios.TIOCSWINSZ, size)

    async def _write(self) -> None:
        """Write the program's input in order: bytes, and ``None`` for its end (a pipe is
        closed; a terminal is sent its end-of-file character, which ends a read at the start
        of a line, and only hands over the line typed so far elsewhere, as at a terminal)."""
        while True:
            data = await self._writes.get()
            if self._input < 0:
                continue
            with contextlib.suppress(OSError, termios.error):  # a terminal gone quiet: EIO
                if data is not None:
                    await feed(self._input, data)
                elif self.tty_size is None:
                    self._input = close_fd(self._input)
                else:
                    await feed(self._input, termios.tcgetattr(self._input)[6][termios.VEOF])
            self._stirred.set()
            self._fed.set()

    async def _watch(self, outputs: Sequence[Reader], cgroup: StageCgroup) -> None:
        """Announce each wait for input once: the same task still in the same wait (it has
        not run since) is not announced again, and nothing is looked for until input came."""
        announced: Wait | None = None
        while True:
            wait = await self._until_waiting(cgroup)
            self._fed.clear()
            if wait != announced:
                for reader in outputs:
                    reader.flush()  # what it wrote before it blocked goes first
                self.on_wanted()
                announced = wait
            await self._fed.wait()

    async def _until_waiting(self, cgroup: StageCgroup) -> Wait:
        """The program's wait for input, once it waits with nothing buffered: checked when
        input and output have been quiet for ``FIRST_CHECK``, then at growing intervals."""
        delay = FIRST_CHECK
        while True:
            try:
                await asyncio.wait_for(self._stirred.wait(), delay)
            except TimeoutError:
                try:
                    wait = await asyncio.to_thread(waiting_reader, cgroup.procs(), self._stdin)
                except Exhausted:
                    delay = EXHAUSTED_CHECK
                    continue
                if wait is not None and not self._buffered():
                    return wait
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
        self._input = close_fd(self._input)


def _unread(fd: int) -> int:
    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    return count


def signal_stage(cgroup: StageCgroup, sig: signal.Signals) -> None:
    """Send ``sig`` to every process of the stage but its init (pid 1 of the jail's namespace:
    it must live to report how the program ended)."""
    for pid in cgroup.procs():
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as status:
                nspid = next(line for line in status if line.startswith("NSpid:")).split()
            if nspid[-1] != "1":
                os.kill(pid, sig)
