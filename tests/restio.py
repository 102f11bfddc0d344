"""A small client of the service's REST API for the tests: JSON bodies, a bearer token, and
whatever status the service answers (no exception for 4xx). A module of its own because test
modules cannot import conftest.py; tests/ is on sys.path as the folder of the root conftest.py.
The tokens are those of the service fixture in tests/conftest.py."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPResponse

ALICE, BOB, ADMIN = "alice-token", "bob-token", "admin-token"


class Rest:
    """REST calls to the service at ``url``, as ``ALICE`` unless a call names another token."""

    #: When set, ``call`` also checks that its answers come with this Content-Type.
    content_type: str | None = None

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = AsyncHTTPClient(force_instance=True)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ALICE,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = 30,
        **kwargs: Any,
    ) -> HTTPResponse:
        """The response, whatever its status. ``raw``: the body as is, instead of ``body``
        as JSON; ``token=None`` sends no Authorization header."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is None and method in ("POST", "PUT") and "body_producer" not in kwargs:
            data = b""
        return await self.http.fetch(
            self.url + path,
            method=method,
            body=data,
            headers=all_headers,
            raise_error=False,
            request_timeout=timeout,
            allow_nonstandard_methods=True,
            **kwargs,
        )

    async def call(
        self, method: str, path: str, body: Any = None, *, expect: int = 200, **kwargs: Any
    ) -> Any:
        """The JSON answer, after checking that its status is ``expect``."""
        response = await self.request(method, path, body, **kwargs)
        assert response.code == expect, (response.code, response.body)
        if self.content_type is not None:
            assert response.headers["Content-Type"] == self.content_type
        return json.loads(response.body)

    def close(self) -> None:
        self.http.close()
