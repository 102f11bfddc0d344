"""Interactive standard input (PROTOCOL.md, "Interactive standard input"): what a client sends
a running stage, as the service hands it on to the executor, one JSON line per input.

The service validates each client message (messages.py) and queues its input; the executor
takes the queue in order and applies each: bytes to the program's stdin, its end, a signal
to the stage's processes, a new terminal size.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

#: The signals a client may send a stage.
SIGNALS = ("SIGINT", "SIGTERM", "SIGQUIT", "SIGKILL")
#: The largest terminal, in rows and in columns (``tty_size``).
MAX_TTY_SIDE = 1000
#: What a ``tty_size`` must be, in the words of its error.
TTY_SIZE_RULE = f"must be [rows, cols], each a whole number from 1 to {MAX_TTY_SIDE}"
#: A terminal's size when the request names none: the classic one.
DEFAULT_TTY_SIZE = (24, 80)


@dataclass(frozen=True)
class StdinData:
    data: bytes


@dataclass(frozen=True)
class StdinEnd:
    """The end of stdin: the program reads end of file once it has read what came before."""


@dataclass(frozen=True)
class SignalInput:
    signal: str


@dataclass(frozen=True)
class Resize:
    rows: int
    cols: int


Input = StdinData | StdinEnd | SignalInput | Resize


def encode_input(item: Input) -> str:
    """The queued form of one input."""
    if isinstance(item, StdinData):
        return json.dumps({"data": base64.b64encode(item.data).decode()})
    if isinstance(item, StdinEnd):
        return json.dumps({"eof": True})
    if isinstance(item, SignalInput):
        return json.dumps({"signal": item.signal})
    return json.dumps({"resize": [item.rows, item.cols]})


def decode_input(raw: str) -> Input:
    """One queued input; ``ValueError`` if it is none (the queue is the service's own)."""
    data = json.loads(raw)
    if "data" in data:
        return StdinData(base64.b64decode(data["data"], validate=True))
    if data.get("eof") is True:
        return StdinEnd()
    if data.get("signal") in SIGNALS:
        return SignalInput(data["signal"])
    rows, cols = data["resize"]
    return Resize(int(rows), int(cols))


def tty_size_problem(size: object) -> str | None:
    """What is wrong with a ``tty_size`` (``[rows, cols]``), or ``None``."""
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(type(side) is int and 1 <= side <= MAX_TTY_SIDE for side in size)
    ):
        return TTY_SIZE_RULE
    return None
