"""LiveStreams: what a stopping service ends before it closes its store. (The real WebSockets
and event streams of a stopping service are in test_server.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cellblock.service.streams import GOING_AWAY, LiveStreams


class Unanswering:
    """A WebSocket whose client never answers the close frame (it stays open)."""

    def __init__(self) -> None:
        self.closes: list[tuple[int, str]] = []

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


async def test_end_cancels_the_relays_and_closes_the_sockets_with_going_away() -> None:
    streams = LiveStreams()
    relay = asyncio.create_task(asyncio.sleep(3600))
    streams.relaying(relay)
    socket: Any = Unanswering()
    streams.opened(socket)
    started = time.monotonic()
    await streams.end(timeout=0.3)
    assert relay.cancelled()
    assert socket.closes == [(1001, GOING_AWAY)]
    assert 0.3 <= time.monotonic() - started < 2  # the socket that never closed: up to timeout


async def test_end_returns_as_soon_as_everything_is_gone() -> None:
    streams = LiveStreams()
    streams.relaying(asyncio.create_task(asyncio.sleep(3600)))
    socket: Any = Unanswering()
    streams.opened(socket)
    streams.closed(socket)
    started = time.monotonic()
    await streams.end(timeout=30)
    assert time.monotonic() - started < 1
