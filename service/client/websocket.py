"""The client's WebSockets to the service (``/api/v1/ws``): opening one, keeping the one a
finished stream leaves for the next stream, closing them; JSON messages on them.

Built on the asyncio client of the ``websockets`` library, which pings the service every
``PING_INTERVAL`` seconds and drops a connection whose pong does not come within
``PING_TIMEOUT`` (a dead peer is noticed, also on an idle connection); closes with a close
handshake; and stops reading from the socket while unread messages pile up (flow control).
asyncio sets TCP_NODELAY on every TCP connection, so a small message goes out at once.

**Concurrency.** One ``WebSockets`` per ``Client``, on the client's event loop. A connection it
hands out belongs to one stream until that stream gives it back (``keep``) or drops it
(``discard``); at most ``IDLE_WEBSOCKETS`` are kept, each for ``IDLE_REUSE`` seconds.

**Cancellation.** Cancelling ``take`` during the TCP or WebSocket handshake aborts the socket
it was opening: nothing is left behind. ``discard`` closes in the background; ``close`` waits
for every close handshake, each bounded by ``CLOSE_GRACE`` seconds, after which the TCP
connection is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import ssl
import time
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from cellblock.service.client.errors import (
    ServiceUnavailable,
    http_error,
    protocol_error,
)
from cellblock.service.protocol.messages import ClientMessage, encode_message

if TYPE_CHECKING:
    from cellblock.service.client.rest import Client

API = "/api/v1"
PING_INTERVAL = 15.0
PING_TIMEOUT = 15.0
MAX_MESSAGE_SIZE = 256 * 1024 * 1024
#: Seconds a closing WebSocket waits for the service's close frame before dropping the socket.
CLOSE_GRACE = 1.0
#: The WebSocket of a finished stream is kept this many seconds for the next stream, which then
#: skips the TCP and WebSocket handshakes; at most IDLE_WEBSOCKETS of them are kept.
IDLE_REUSE = 30.0
IDLE_WEBSOCKETS = 4


class Dropped(Exception):
    """The connection broke (or brought a gap in the events): reconnect and resume."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WebSockets:
    """The WebSockets of one client: ``open`` holds every one not yet closed (in use or idle),
    ``idle`` the kept ones with the time each was kept."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.open: set[ClientConnection] = set()
        self.idle: list[tuple[ClientConnection, float]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._request_ids = itertools.count(1)

    async def take(self) -> ClientConnection:
        """A WebSocket to the service: the last one a finished stream kept, else a new one.
        ``ServiceUnavailable`` when the service cannot be reached, an ``ApiError`` when it
        refuses the handshake (e.g. ``Unauthorized`` for a bad token)."""
        self.client._check_open()
        while self.idle:
            websocket, since = self.idle.pop()
            if time.monotonic() - since < IDLE_REUSE and websocket.state is State.OPEN:
                return websocket
            self.discard(websocket)
        websocket = await self._connect()
        if self.client.closed:  # closed while this one was connecting
            await websocket.close()
            self.client._check_open()
        self.open.add(websocket)
        return websocket

    def keep(self, websocket: ClientConnection) -> None:
        """Keep the WebSocket of a finished stream for the next one, if it is still open and
        there is room; else close it. (The service relays nothing more on it: the stream's
        submission has finished.)"""
        if (
            websocket.state is State.OPEN
            and len(self.idle) < IDLE_WEBSOCKETS
            and not self.client.closed
        ):
            self.idle.append((websocket, time.monotonic()))
        else:
            self.discard(websocket)

    def discard(self, websocket: ClientConnection) -> None:
        """Close a WebSocket without keeping the caller waiting for the close handshake."""
        self.open.discard(websocket)
        if websocket.state is State.CLOSED:
            return
        task = asyncio.ensure_future(websocket.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every WebSocket, each with its close handshake (bounded by CLOSE_GRACE)."""
        self.idle.clear()
        websockets, self.open = self.open, set()
        await asyncio.gather(*(ws.close() for ws in websockets), *self._closing)

    def request_id(self) -> str:
        """A ``request_id`` not used before on this client's WebSockets."""
        return f"r{next(self._request_ids)}"

    async def _connect(self) -> ClientConnection:
        client = self.client
        try:
            return await _Connect(
                "ws" + client.url.removeprefix("http") + API + "/ws",
                additional_headers={"Authorization": f"Bearer {client.token}"},
                # The REST calls take no proxy either: both go where the URL says.
                proxy=None,
                # The service offers no compression; not asking saves a header.
                compression=None,
                open_timeout=client.timeout,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_GRACE,
                max_size=MAX_MESSAGE_SIZE,
            )
        except InvalidStatus as exc:
            response = exc.response
            body = bytes(response.body or b"")
            raise http_error(client.url, response.status_code, response.headers, body) from None
        except (OSError, InvalidHandshake) as exc:  # TimeoutError is an OSError
            raise ServiceUnavailable(client.url, _reason(exc, client.timeout)) from None


class _Connect(connect):
    """``connect`` that does not follow redirects: an answer 3xx is an error, as on REST."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


async def send(websocket: ClientConnection, message: ClientMessage) -> None:
    try:
        await websocket.send(encode_message(message))
    except ConnectionClosed as exc:
        raise Dropped(_closed(exc)) from None


async def receive(websocket: ClientConnection) -> dict[str, Any]:
    try:
        text = await websocket.recv()
    except ConnectionClosed as exc:
        raise Dropped(_closed(exc)) from None
    try:
        message = json.loads(text)
    except ValueError:
        raise protocol_error(None, f"a message that is not JSON: {text[:200]!r}") from None
    if not isinstance(message, dict):
        raise protocol_error(None, f"a message that is not a JSON object: {text[:200]!r}")
    return message


def _closed(exc: ConnectionClosed) -> str:
    return f"the connection closed ({exc})"


def _reason(exc: Exception, timeout: float) -> str:
    """Why a connection could not be opened, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError):
        # asyncio words a refused connection "Connect call failed (address)": give the
        # system's words, as the REST calls do. (The numbers of TLS and getaddrinfo errors are
        # not errnos: their own words are right.)
        if exc.errno and exc.errno > 0 and not isinstance(exc, ssl.SSLError):
            return os.strerror(exc.errno)
        if exc.strerror:
            return exc.strerror
    return str(exc) or type(exc).__name__
