"""``cellblock submit --interactive``: the real CLI, as a subprocess whose controlling terminal is
a real pseudo-terminal that the test types into and reads, against the real service (in this
test's event loop) and a real executor with nsjail.

The terminal is the program's: the CLI puts it in raw mode while the run stage runs (the
remote terminal echoes), hands on keystrokes as typed (Ctrl-C is SIGINT for the program, Ctrl-D
its end of file) and size changes, prints the program's output and nothing else, exits with the
program's status (128+N for signal N) and gives the terminal back in the mode it found it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cellblock.service.client import Client

CELLBLOCK = [sys.executable, "-m", "cellblock"]
HELLO_C = r"""
#include <stdio.h>
int main(void) {
    char name[64];
    printf("Your name? ");
    if (scanf("%63s", name) != 1) return 1;
    printf("Hello, %s!\n", name);
    return 0;
}
"""
LOOP_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    puts("looping");
    for (;;) pause();
}
"""


class Terminal:
    """A pseudo-terminal: the CLI gets its slave end, the test types into and reads from its
    master end (without blocking the event loop, where the service runs)."""

    def __init__(self, rows: int, cols: int) -> None:
        self.master, self.slave = os.openpty()
        self.resize(rows, cols)
        self.screen = b""
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        self.screen += os.read(self.master, 65536)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def mode(self) -> list[Any]:
        return termios.tcgetattr(self.slave)

    def raw(self) -> bool:
        lflag = self.mode()[3]
        return not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)

    async def shows(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            if time.monotonic() > deadline:
                pytest.fail(f"the terminal never showed {text!r}; it shows {self.screen!r}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
async def terminal() -> AsyncIterator[Terminal]:
    terminal = Terminal(30, 100)
    yield terminal
    terminal.close()


def environment() -> dict[str, str]:
    """This process's environment without the caller's CELLBLOCK_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}


async def interactive(
    service: Any, tmp_path: Path, request: dict[str, Any], *wrapper: str, **streams: Any
) -> asyncio.subprocess.Process:
    """``cellblock submit --interactive`` of ``request``, as alice, on ``streams``, run by
    ``wrapper``."""
    path = tmp_path / "submission.json"
    path.write_text(json.dumps(request))
    return await asyncio.create_subprocess_exec(
        *wrapper, *CELLBLOCK, "submit", "--interactive", str(path), "--url", service.url,
        "--token", "alice-token", env=environment(), **streams,
    )  # fmt: skip


async def on(terminal: Terminal, service: Any, tmp_path: Path, request: dict[str, Any]) -> Any:
    """The CLI with ``terminal`` as its controlling terminal (so that it gets SIGWINCH) and its
    standard input, output and error."""
    fd = terminal.slave
    return await interactive(
        service, tmp_path, request, "setsid", "--ctty", stdin=fd, stdout=fd, stderr=fd
    )


async def exit_status(cli: asyncio.subprocess.Process) -> int:
    return await asyncio.wait_for(cli.wait(), 30)


async def test_a_prompt_shows_before_the_answer_is_typed(
    terminal: Terminal, service: Any, launch: Any, tmp_path: Path
) -> None:
    await launch()
    before = terminal.mode()
    request = {"files": [{"name": "hello.c", "content": HELLO_C}],
               "compile": "gcc -o hello hello.c", "run": "./hello"}  # fmt: skip
    cli = await on(terminal, service, tmp_path, request)
    await terminal.shows(b"Your name? ")
    assert terminal.raw()
    terminal.type(b"Ada\r")
    await terminal.shows(b"Hello, Ada!")
    assert await exit_status(cli) == 0
    # The remote terminal echoed the name (the local one, raw, did not) and mapped Enter to a
    # newline; nothing but the program's output came.
    assert terminal.screen == b"Your name? Ada\r\nHello, Ada!\r\n"
    assert terminal.mode() == before


async def test_ctrl_c_interrupts_the_program(
    terminal: Terminal, service: Any, launch: Any, tmp_path: Path
) -> None:
    await launch()
    before = terminal.mode()
    request = {"files": [{"name": "loop.c", "content": LOOP_C}],
               "compile": "gcc -o loop loop.c", "run": "./loop"}  # fmt: skip
    cli = await on(terminal, service, tmp_path, request)
    await terminal.shows(b"looping\r\n")
    terminal.type(b"\x03")
    assert await exit_status(cli) == 130  # SIGINT, through the remote line discipline
    assert terminal.mode() == before


async def test_resize_and_ctrl_d(
    terminal: Terminal, service: Any, launch: Any, tmp_path: Path
) -> None:
    await launch()
    before = terminal.mode()
    cli = await on(terminal, service, tmp_path, {"run": "stty size; cat; stty size; exit 3"})
    await terminal.shows(b"30 100\r\n")
    terminal.type(b"abc\r")
    await terminal.shows(b"abc\r\nabc\r\n")  # the echo, then cat's line
    terminal.resize(40, 120)
    # The CLI hears of the resize (SIGWINCH) and of keystrokes by different ways: keystrokes
    # typed at once may overtake the resize.
    await asyncio.sleep(0.5)
    terminal.type(b"\x04")
    await terminal.shows(b"40 120\r\n")
    assert await exit_status(cli) == 3
    assert terminal.mode() == before


async def test_a_failed_compile_says_so_and_never_takes_the_terminal(
    terminal: Terminal, service: Any, launch: Any, tmp_path: Path
) -> None:
    await launch()
    before = terminal.mode()
    request = {"files": [{"name": "bad.c", "content": "int main(void) { return x; }"}],
               "compile": "gcc -o bad bad.c", "run": "./bad"}  # fmt: skip
    cli = await on(terminal, service, tmp_path, request)
    assert await exit_status(cli) == 1
    await terminal.shows(b"cellblock: the compile stage ended with status failed\r\n")
    assert b"bad.c:1:25: error: " in terminal.screen  # gcc's message, on stderr
    assert terminal.mode() == before


async def test_standard_input_that_is_no_terminal_is_refused(service: Any, tmp_path: Path) -> None:
    cli = await interactive(
        service, tmp_path, {"run": "cat"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), 30)
    assert cli.returncode == 2
    assert stdout == b""
    assert stderr == b"cellblock: --interactive needs a terminal: standard input is not one\n"
    async with Client(service.url, "alice-token") as alice:
        assert await alice.list() == []  # nothing was submitted
