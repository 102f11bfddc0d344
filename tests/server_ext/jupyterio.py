"""Talking to the Jupyter server in the server extension tests: the service tokens that must
never reach the browser, and a JSON WebSocket through the proxy. (A module of its own because
test modules cannot import conftest.py, which pytest imports as a plain ``conftest``.)"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.websocket
from tornado.httpclient import HTTPResponse

ALICE, BOB, ADMIN = "alice-token", "bob-token", "admin-token"
#: The service tokens the extension holds: none may ever reach the browser.
SECRETS = (ALICE.encode(), ADMIN.encode())


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_no_secret(data: bytes, where: str) -> None:
    for secret in SECRETS:
        assert secret not in data, f"{secret.decode()} reached the browser in {where}"


def browser_view(response: HTTPResponse) -> bytes:
    """Everything a browser gets of a response: its status line, headers and body."""
    head = f"{response.code} {response.reason}\r\n".encode()
    head += "".join(f"{k}: {v}\r\n" for k, v in response.headers.get_all()).encode()
    return head + (response.body or b"")


Fetch = Callable[..., Awaitable[HTTPResponse]]


class Socket:
    """One WebSocket connection through the proxy that speaks JSON messages; every message it
    receives is checked for the service's tokens."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.closed = False

    async def send(self, message: Any) -> None:
        await self.conn.write_message(message if isinstance(message, str) else json.dumps(message))

    async def receive(self, timeout: float = 20) -> dict[str, Any]:
        text = await asyncio.wait_for(self.conn.read_message(), timeout)
        assert text is not None, "the proxy closed the connection"
        assert_no_secret(text.encode() if isinstance(text, str) else text, "a WebSocket message")
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
        assert await self.ended(), "the proxy did not complete the closing handshake"


Connect = Callable[..., Awaitable[Socket]]
