"""The ``Client``: one service, one token. Its REST calls run on Tornado's ``AsyncHTTPClient``;
its streams (stream.py) on the WebSockets it keeps (websocket.py).

**Concurrency.** A ``Client`` belongs to the event loop that first uses it and is not
thread-safe, but for ``close``, which may be awaited on another thread's loop. Up to 64 REST
calls run at a time (more wait their turn), each on a connection of its own, alongside any
number of streams.

**Cancellation.** Cancelling a REST call closes its connection. A call cancelled after its
request left may still have taken effect on the service (a cancelled ``submit`` may have
queued the submission). ``close`` closes every connection, REST and WebSocket.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError

from cellblock.service.client.errors import (
    ClientError,
    ServiceUnavailable,
    http_error,
    protocol_error,
)
from cellblock.service.client.stream import Stream
from cellblock.service.client.websocket import API, WebSockets

#: Where ``cellblock up`` listens by default.
DEFAULT_URL = "http://127.0.0.1:8765"
DEFAULT_STATE_DIR = "~/.local/state/cellblock"
#: How long the service holds ``POST ?wait=true`` when no ``timeout`` is given.
SERVER_DEFAULT_WAIT = 60.0
MAX_REST_CALLS = 64

Document = dict[str, Any]
Documents = list[Document]
EventCallback = Callable[[Document], Awaitable[None] | None]


class Client:
    """A connection to one Cellblock service with one token. See the package docstring for the
    concurrency, cancellation and error guarantees.

    ``timeout`` bounds connecting and every REST call (a ``submit(wait=True)`` gets its wait on
    top). A stream that loses its connection reconnects up to ``reconnect_attempts`` times in a
    row, waiting ``reconnect_delay`` seconds, doubled after each failure (at most 5 s).
    ``closed`` is true once ``close`` was called.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30,
        reconnect_attempts: int = 5,
        reconnect_delay: float = 0.25,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"{url!r} is not an http:// or https:// URL of the service")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: AsyncHTTPClient | None = None
        self._websockets = WebSockets(self)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"  # never the token

    @classmethod
    def from_environment(
        cls,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        admin: bool = False,
        url: str | None = None,
        token: str | None = None,
        environ: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> Client:
        """A client for the service this environment points at.

        The URL: ``url``, else ``$CELLBLOCK_URL``, else the file ``<state-dir>/url`` that
        ``cellblock up`` writes, else ``http://127.0.0.1:8765``. The token: ``token``, else
        ``$CELLBLOCK_TOKEN``, else ``<state-dir>/token``; with ``admin=True``
        ``$CELLBLOCK_ADMIN_TOKEN``, else ``<state-dir>/admin-token``. The state directory:
        ``state_dir``, else ``$CELLBLOCK_STATE_DIR``, else ``~/.local/state/cellblock``.
        """
        env = os.environ if environ is None else environ
        directory = Path(
            state_dir
            if state_dir is not None
            else env.get("CELLBLOCK_STATE_DIR") or DEFAULT_STATE_DIR
        ).expanduser()
        url = url or env.get("CELLBLOCK_URL") or _read_setting(directory / "url") or DEFAULT_URL
        variable, name = (
            ("CELLBLOCK_ADMIN_TOKEN", "admin-token") if admin else ("CELLBLOCK_TOKEN", "token")
        )
        token = token or env.get(variable) or _read_setting(directory / name)
        if not token:
            kind = "admin token" if admin else "token"
            raise ClientError(
                f"no {kind} for the service at {url}: set {variable}, or start the service with "
                f"`cellblock up`, which writes {directory / name}"
            )
        return cls(url, token, timeout=timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection of this client; streams still being read end with a
        ``ClientError``. Submissions are not affected. Closing twice is harmless.

        ``close`` may be awaited on another thread's event loop (ipykernel shuts a kernel down
        on its control thread): the connections are then closed on the loop they belong to,
        as long as that loop runs."""
        self.closed = True
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop():
            await self._close()
        elif loop.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), loop))

    async def _close(self) -> None:
        await self._websockets.close()
        if self._http is not None:
            self._http.close()
            self._http = None

    # -- REST ------------------------------------------------------------------------------------

    async def health(self) -> Document:
        """``GET /health``: ``{"status", "executors", "builders", "queued"}``."""
        return _object(await self._call("GET", "/health"))

    async def submit(
        self, request: Mapping[str, Any], wait: bool = False, timeout: float | None = None
    ) -> Document:
        """Submit a request over REST. Answers ``{"id", "status"}``; with ``wait=True`` the
        service holds the call until the submission ends (or ``timeout`` seconds, 60 by default,
        pass) and answers the submission document, which may then still be running."""
        query: dict[str, object] | None = None
        call_timeout = self.timeout
        if wait:
            query = {"wait": True, "timeout": timeout}
            call_timeout += SERVER_DEFAULT_WAIT if timeout is None else timeout
        answer = await self._call(
            "POST", "/submissions", query=query, body=dict(request), timeout=call_timeout
        )
        return _object(answer)

    async def get(self, id: str) -> Document:
        """The submission document (``NotFound`` for an unknown id or someone else's)."""
        return _object(await self._call("GET", f"/submissions/{_quote(id)}"))

    async def list(self, limit: int = 20, *, everyone: bool = False) -> Documents:
        """The caller's newest submissions, newest first; ``everyone=True`` (admin) lists every
        owner's."""
        query: dict[str, object] = {"limit": limit, "all": True if everyone else None}
        answer = _object(await self._call("GET", "/submissions", query=query))
        return _objects(answer.get("submissions"))

    async def cancel(self, id: str) -> Document:
        """Cancel a queued or running submission (a running stage is killed); answers
        ``{"id", "status"}``. ``Conflict`` when it has ended already."""
        return _object(await self._call("DELETE", f"/submissions/{_quote(id)}"))

    async def capacity(self) -> Document:
        """``GET /capacity``, for any token: ``{"executors", "builders", "slots", "busy",
        "queued"}``, where slots and busy count the executors' sandboxes."""
        return _object(await self._call("GET", "/capacity"))

    async def workers(self) -> Documents:
        """Every live executor and builder (admin)."""
        return _objects(_object(await self._call("GET", "/workers")).get("workers"))

    async def drain(self, worker_id: str) -> Document:
        """Drain and stop one worker (admin): its running work finishes first."""
        return _object(await self._call("DELETE", f"/workers/{_quote(worker_id)}"))

    async def scale(self, executors: int | None = None, builders: int | None = None) -> Document:
        """Ask a ``cellblock up`` deployment for these worker counts (admin); a count left
        ``None`` stays as it is. ``Conflict`` when the service is not supervised by
        ``cellblock up``."""
        body = {
            k: v for k, v in (("executors", executors), ("builders", builders)) if v is not None
        }
        return _object(await self._call("POST", "/admin/scale", body=body))

    async def packages(self) -> Documents:
        """The packages the cache holds: ``name``, ``version``, ``store_path``, ``size``,
        ``cached_at``, ``last_used``, ``uses``."""
        return _objects(_object(await self._call("GET", "/packages")).get("packages"))

    async def prefetch(self, names: Iterable[str]) -> Document:
        """Build packages into the cache ahead of use. The answer has an ``id`` to watch when
        building started (202); without one every package was cached already (200)."""
        body = {"names": [names] if isinstance(names, str) else [*names]}
        return _object(await self._call("POST", "/packages", body=body))

    async def build(self, id: str) -> Document:
        """A prefetch build's state: ``status`` (building, ok, failed), ``message``, ``log``."""
        return _object(await self._call("GET", f"/packages/builds/{urllib.parse.quote(id)}"))

    async def openapi(self) -> Document:
        """The service's OpenAPI document."""
        return _object(await self._call("GET", "/openapi.json"))

    # -- the WebSocket ----------------------------------------------------------------------------

    def stream(self, request: Mapping[str, Any]) -> Stream:
        """Submit ``request`` over the WebSocket and iterate over its events until ``finished``:

            async with client.stream(request) as stream:
                async for event in stream:
                    ...
            stream.submission  # the finished submission

        See ``Stream`` for what is guaranteed. Nothing is sent before the iteration starts.
        """
        return Stream(self, request=dict(request))

    def watch(self, id: str, since: int = 0) -> Stream:
        """Follow an existing submission over the WebSocket, from the event after ``since``.

        ``since`` must lie before the ``finished`` event: past it the service sends nothing
        more, not even a word that nothing will come."""
        return Stream(self, id=id, since=since)

    async def run(
        self, request: Mapping[str, Any], *, on_event: EventCallback | None = None
    ) -> Document:
        """Submit over the WebSocket, hand every event to ``on_event`` (a function or a
        coroutine function) and answer the finished submission document. Cancelling the caller,
        or an exception from ``on_event``, ends the run here and leaves the submission running:
        ``cancel(id)`` stops it, the id being in every event."""
        async with self.stream(request) as stream:
            async for event in stream:
                if on_event is not None:
                    result = on_event(event)
                    if inspect.isawaitable(result):
                        await result
        assert stream.submission is not None
        return stream.submission

    # -- plumbing ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        """``ClientError`` once closed. The first call, before the first connection, notes the
        event loop that the client's connections belong to."""
        if self.closed:
            raise ClientError("this Cellblock client is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    def _endpoint(self, path: str, query: Mapping[str, object] | None = None) -> str:
        url = self.url + API + path
        params = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        return f"{url}?{urllib.parse.urlencode(params)}" if params else url

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, object] | None = None,
        body: object = None,
        timeout: float | None = None,
    ) -> Any:
        self._check_open()
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_clients=MAX_REST_CALLS)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if method == "POST":
            data = json.dumps(body if body is not None else {})
            headers["Content-Type"] = "application/json"
        request = HTTPRequest(
            self._endpoint(path, query),
            method=method,
            headers=headers,
            body=data,
            connect_timeout=self.timeout,
            request_timeout=timeout or self.timeout,
            follow_redirects=False,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except (OSError, HTTPClientError, StreamClosedError) as exc:
            raise ServiceUnavailable(self.url, _reason(exc, request.request_timeout)) from None
        if not 200 <= response.code < 300:
            raise http_error(self.url, response.code, response.headers, response.body)
        try:
            return json.loads(response.body) if response.body else None
        except ValueError:
            raise protocol_error(
                response.code, "the service answered something other than JSON"
            ) from None


def _reason(exc: BaseException, timeout: float | None) -> str:
    """Why a REST call failed to get an answer, in a few words."""
    if isinstance(exc, StreamClosedError) and exc.real_error is not None:
        exc = exc.real_error
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, HTTPClientError) and exc.code == 599 and "Timeout" in str(exc)
    ):
        return f"no answer within {timeout or 0:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, StreamClosedError):
        return "the connection closed"
    if isinstance(exc, HTTPClientError):
        return exc.message or "the connection failed"
    return str(exc) or type(exc).__name__


def _read_setting(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}") from None


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _query_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _object(value: object) -> Document:
    if not isinstance(value, dict):
        raise protocol_error(None, f"the service answered {value!r}, not a JSON object")
    return value


def _objects(value: object) -> Documents:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise protocol_error(None, f"the service answered {value!r}, not a list of objects")
    return value
