"""A WebSocket connection that speaks JSON messages, for the tests of the service's WebSocket
API and of the server extension's proxy of it. (A module of its own because test modules
cannot import conftest.py; tests/ is on sys.path as the folder of the root conftest.py.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import tornado.websocket


class Socket:
    """One WebSocket connection that speaks JSON messages."""

    #: Who is at the other end, as the failed assertions name it.
    peer = "the server"

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.closed = False

    def check(self, data: str | bytes) -> None:
        """Called with every message received, before it is parsed: nothing to check here."""

    async def send(self, message: Any) -> None:
        await self.conn.write_message(message if isinstance(message, str) else json.dumps(message))

    async def receive(self, timeout: float = 20) -> dict[str, Any]:
        text = await asyncio.wait_for(self.conn.read_message(), timeout)
        assert text is not None, f"{self.peer} closed the connection"
        self.check(text)
        message: dict[str, Any] = json.loads(text)
        return message

    async def ask(self, message: Any, timeout: float = 20) -> dict[str, Any]:
        await self.send(message)
        return await self.receive(timeout)

    async def events_until_finished(self, timeout: float = 30) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "finished":
            events.append(await self.receive(timeout))
        return events

    async def ended(self, timeout: float = 10) -> bool:
        """Whether the other side closes the connection within ``timeout`` (anything it
        still sends before that is read and dropped)."""
        try:
            while await asyncio.wait_for(self.conn.read_message(), timeout) is not None:
                pass
        except TimeoutError:
            return False
        self.closed = True
        self.conn.close()  # releases the client's side too (else a ResourceWarning when collected)
        return True

    async def close(self) -> None:
        self.conn.close()
        # Wait for the closing handshake, so that no socket outlives the test.
        assert await self.ended(), f"{self.peer} did not complete the closing handshake"


class Conversation:
    """One submission followed over one WebSocket (``ws``), as an interactive client follows
    it: its events as they come, input typed, answers read past the events."""

    def __init__(self, ws: Socket, sid: str) -> None:
        self.ws, self.sid = ws, sid
        self.events: list[dict[str, Any]] = []

    async def next(self, timeout: float = 30) -> dict[str, Any]:
        while True:
            message = await self.ws.receive(timeout)
            if "seq" in message:
                self.events.append(message)
                return message

    async def until(self, kind: str, timeout: float = 30) -> list[dict[str, Any]]:
        """The events up to and including the next one of type ``kind``."""
        seen = []
        while not seen or seen[-1]["type"] != kind:
            seen.append(await self.next(timeout))
        return seen

    async def answer(self, message: dict[str, Any], request_id: int = 9) -> dict[str, Any]:
        """The answer to ``message``, whatever events come meanwhile."""
        await self.ws.send({**message, "request_id": request_id})
        while True:
            received = await self.ws.receive()
            if received.get("request_id") == request_id:
                return received
            if "seq" in received:
                self.events.append(received)

    async def type(self, data: str) -> None:
        await self.ws.send({"type": "stdin", "id": self.sid, "data": data})

    def output(self, events: list[dict[str, Any]] | None = None) -> str:
        return "".join(e["data"] for e in events or self.events if e["type"] == "output")
