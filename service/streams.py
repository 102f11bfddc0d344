"""The WebSockets and event streams a service process holds open, so that it can end them when
it stops, before it closes its store.

A stopping service that only cut its HTTP connections would leave each WebSocket to drop with no
close frame when the process exits, and each event stream blocked in a read from a store about
to close, which then fails and is logged as an error. Ended here instead, a WebSocket gets
``1001 going away`` and an event stream a clean end: either client reconnects (to another
service of the deployment) and resumes where its events stopped.

Concurrency: used from the event loop's thread only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import tornado.websocket

#: The close reason a WebSocket gets when its service stops.
GOING_AWAY = "the service is stopping: reconnect and resume"


class LiveStreams:
    def __init__(self) -> None:
        self._sockets: set[tornado.websocket.WebSocketHandler] = set()
        self._relays: set[asyncio.Task[Any]] = set()

    def opened(self, socket: tornado.websocket.WebSocketHandler) -> None:
        self._sockets.add(socket)

    def closed(self, socket: tornado.websocket.WebSocketHandler) -> None:
        self._sockets.discard(socket)

    def relaying(self, relay: asyncio.Task[Any]) -> None:
        """An event stream's relay task, cancelled by ``end``; forgotten once done."""
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)

    async def end(self, timeout: float = 2.0) -> None:
        """Close every WebSocket with 1001 and cancel every event stream's relay; return once
        each is gone, or after ``timeout`` seconds (a client that never answers the close
        frame is cut when the process exits)."""
        for socket in list(self._sockets):
            socket.close(1001, GOING_AWAY)
        for relay in list(self._relays):
            relay.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._sockets or self._relays) and loop.time() < deadline:
            await asyncio.sleep(0.01)
