"""Service tests use the shared fixtures of tests/conftest.py (real redis, service, executors),
and ``connect``: WebSockets to the service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import tornado.websocket
from tornado.httpclient import HTTPRequest
from wsio import Socket

Connect = Callable[..., Awaitable[Socket]]


@pytest.fixture
async def connect(service: Any) -> AsyncIterator[Connect]:
    """Open WebSockets to the service (as alice unless a token is given; ``query``: the token
    as a query parameter); closed at the end of the test."""
    opened: list[Socket] = []

    async def open_socket(token: str | None = "alice-token", query: bool = False) -> Socket:
        url, headers = service.ws_url, {}
        if token is not None and query:
            url += f"?token={token}"
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn = await tornado.websocket.websocket_connect(HTTPRequest(url, headers=headers))
        ws = Socket(conn)
        opened.append(ws)
        return ws

    yield open_socket
    for ws in opened:
        if not ws.closed:
            await ws.close()
