"""A program's terminal output as a notebook cell shows it. Pure.

On a pseudo-terminal the line discipline turns every ``\\n`` the program writes into ``\\r\\n``
(ONLCR) and echoes what it is typed (ECHO). A cell wants plain ``\\n``; and the frontend already
shows what the user typed (JupyterLab keeps the answer as a ``stdin`` output, a console leaves
it where it was typed), so the terminal's echo of it would show every answer twice.
"""

from __future__ import annotations


class TerminalText:
    """Output chunks in, the text to show out: CRLF folded to LF (a ``\\r`` at a chunk's end is
    held until the next chunk says whether a ``\\n`` follows), the echo of ``typed`` text
    dropped. Output that does not start with the awaited echo (the program turned echo off,
    as a password prompt does) is shown whole, and the echo is no longer awaited."""

    def __init__(self) -> None:
        self._echo = ""
        self._held_cr = False

    def typed(self, text: str) -> None:
        """``text`` went to the program's stdin: its echo is about to come."""
        self._echo += text

    def feed(self, data: str) -> str:
        text = "\r" + data if self._held_cr else data
        self._held_cr = text.endswith("\r")
        text = text.removesuffix("\r") if self._held_cr else text
        return self._without_echo(text.replace("\r\n", "\n"))

    def flush(self) -> str:
        """What is still held, at the end of the output."""
        held, self._held_cr = self._held_cr, False
        return "\r" if held else ""

    def _without_echo(self, text: str) -> str:
        if not self._echo:
            return text
        common = 0
        for a, b in zip(text, self._echo, strict=False):
            if a != b:
                break
            common += 1
        if common == len(self._echo) or common == len(text):
            self._echo = self._echo[common:]
            return text[common:]
        self._echo = ""
        return text
