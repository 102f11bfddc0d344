"""``%%run --interactive``: the program's stdin typed in the notebook while it runs.

The service says when the program is really blocked reading its stdin (``input_wanted``, after
the output before it); only then does the kernel put up an input box (Jupyter's
``input_request``), and what is typed goes to the program with a newline. The box is awaited on
the kernel's event loop, not with ipykernel's ``raw_input``, which blocks the whole kernel until
the reply: the program's output must go on streaming in while the box is up, and the wait must
end when the program does. The messaging protocol cannot withdraw an input request: jupyter
_client's own stdin hook drops an answer when the execution finished meanwhile, and the kernel
just stops waiting; what removes JupyterLab's box is in replay.py.

An interrupt sends the program SIGINT (as Ctrl-C on its terminal would); if it has not ended
``INTERRUPT_GRACE`` seconds later, or at a second interrupt, the submission is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
from jupyter_client.session import Session

from cellblock.kernel.replay import OutputLog
from cellblock.kernel.terminal import TerminalText
from cellblock.service.client import ClientError, Stream

#: Seconds the program has to end after SIGINT before the submission is cancelled.
INTERRUPT_GRACE = 2.0
#: How often the kernel looks for the input reply (ipykernel's own raw_input polls at 10 ms).
REPLY_POLL = 0.02
#: What jupyter_client's stdin hook answers for end of file (Ctrl-D in a console).
EOF_REPLY = "\x04"


@dataclass(frozen=True)
class StdinChannel:
    """The kernel's stdin socket and the execute request an input request answers to."""

    session: Session
    socket: zmq.Socket[bytes]
    parent: dict[str, Any]
    ident: list[bytes] | bytes | None

    async def ask(self) -> str:
        """One input request (no prompt of its own: the program printed it); the answer."""
        while self.socket.poll(0):  # an answer to a box abandoned before: not for this one
            self.socket.recv_multipart()
        content = {"prompt": "", "password": False}
        sent = self.session.send(self.socket, "input_request", content, self.parent, self.ident)
        request_id = sent["header"]["msg_id"] if sent else None
        while True:
            if self.socket.poll(0):
                _, reply = self.session.recv(self.socket, mode=zmq.NOBLOCK)
                # A frontend names the request it answers (JupyterLab does, jupyter_client's
                # input() does not): another one's answer is stale.
                if reply is not None and reply["parent_header"].get("msg_id") in (None, request_id):
                    return str(reply["content"].get("value", ""))
            await asyncio.sleep(REPLY_POLL)


class Conversation:
    """One interactive run: input boxes on ``input_wanted``, answers to the program, its
    terminal output for the cell, the interrupt. ``log`` is what the cell has shown; ``close``
    at the end says whether a box was left up (the cell is then shown again without it)."""

    def __init__(self, stream: Stream, stdin: StdinChannel, log: OutputLog) -> None:
        self.stream = stream
        self.stdin = stdin
        self.log = log
        self.terminal = TerminalText()
        self._box: asyncio.Task[None] | None = None
        self._signalled = False
        self._deadline: asyncio.TimerHandle | None = None
        self._signal: asyncio.Task[None] | None = None

    def on_event(self, event: Mapping[str, Any]) -> None:
        # One box at a time: the program waits for one line.
        if event["type"] == "input_wanted" and (self._box is None or self._box.done()):
            self._box = asyncio.create_task(self._answer())

    async def _answer(self) -> None:
        value = await self.stdin.ask()
        line = value + "\n"
        try:
            if value == EOF_REPLY:
                await self.stream.close_stdin()
                return
            self.terminal.typed(line)
            await self.stream.send_stdin(line)
        except (ClientError, TimeoutError):
            return  # the connection is lost: if it does not come back, the stream says so
        # Where a terminal shows it, for when the cell's outputs are shown again.
        self.log.add("stream", {"name": "stdout", "text": line})

    def interrupt(self, cancel: Callable[[], object]) -> None:
        """SIGINT to the program, ``cancel`` if it goes on; ``cancel`` at once the second
        time or when the stream has no submission yet."""
        if self._signalled or self.stream.id is None:
            cancel()
            return
        self._signalled = True
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(INTERRUPT_GRACE, cancel)

        async def send() -> None:
            try:
                await self.stream.send_signal("SIGINT")
            except (ClientError, TimeoutError):
                cancel()

        self._signal = asyncio.create_task(send())

    async def close(self) -> bool:
        """Stop waiting for an answer; whether a box was still up."""
        if self._deadline is not None:
            self._deadline.cancel()
        box, self._box = self._box, None
        if box is None:
            return False
        left_up = box.cancel()  # False when it is done: answered
        with contextlib.suppress(asyncio.CancelledError):
            await box
        return left_up
