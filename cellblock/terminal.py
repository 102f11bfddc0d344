"""The local terminal lent to a remote program, as ``docker run -it`` lends it: in raw mode
while lent, so that every keystroke (Ctrl-C and Ctrl-D too) goes to the program as typed and
the remote terminal's line discipline does the echo, line editing and signals; its size, and
each change of it.

``Lent`` is used in the event loop's thread (the main one: SIGWINCH has a handler there).
Leaving it restores the terminal's mode however the block ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import termios
import tty
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

#: Rows and columns.
Size = tuple[int, int]
#: What the terminal brings: keystrokes' bytes, or its new size.
Input = bytes | Size


def size(fd: int) -> Size | None:
    """The terminal's rows and columns; ``None`` when it has none set (a pty nobody sized)."""
    columns, lines = os.get_terminal_size(fd)
    return (lines, columns) if lines and columns else None


class Lent:
    """The terminal on ``fd`` in raw mode, and what it brings as an async iterator of
    ``Input``, which ends when the terminal hangs up."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._inputs: asyncio.Queue[Input | None] = asyncio.Queue()
        self._saved: list[Any] | None = None

    def __enter__(self) -> Lent:
        loop = asyncio.get_running_loop()
        self._saved = termios.tcgetattr(self.fd)
        try:
            # TCSADRAIN, not setraw's TCSAFLUSH: what was typed ahead is kept for the program.
            tty.setraw(self.fd, termios.TCSADRAIN)
            loop.add_reader(self.fd, self._read)
            loop.add_signal_handler(signal.SIGWINCH, self._resized)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGWINCH)
        loop.remove_reader(self.fd)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def __aiter__(self) -> AsyncIterator[Input]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[Input]:
        while (item := await self._inputs.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the terminal hung up
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._inputs.put_nowait(None)
            return
        self._inputs.put_nowait(data)

    def _resized(self) -> None:
        if (now := size(self.fd)) is not None:
            self._inputs.put_nowait(now)
