"""Talking to the Jupyter server in the server extension tests: the service tokens that must
never reach the browser, and a JSON WebSocket through the proxy. (A module of its own because
test modules cannot import conftest.py, which pytest imports as a plain ``conftest``.)"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import wsio
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


class Socket(wsio.Socket):
    """One WebSocket connection through the proxy that speaks JSON messages; every message it
    receives is checked for the service's tokens."""

    peer = "the proxy"

    def check(self, data: str | bytes) -> None:
        assert_no_secret(data.encode() if isinstance(data, str) else data, "a WebSocket message")


Connect = Callable[..., Awaitable[Socket]]
