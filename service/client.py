"""The Python client of the Cellblock service (shared/PROTOCOL.md): what the CLI, the Jupyter
kernel and the tests use to talk to it.

    async with Client.from_environment() as client:
        submission = await client.run({"run": "echo hi"}, on_event=print)

Everything is asynchronous and built on Tornado: REST calls on ``AsyncHTTPClient``, server-sent
events on a Tornado HTTP/1.1 connection of their own, and the WebSocket on ``websocket_connect``.

**Concurrency.** A ``Client`` belongs to the event loop that first uses it and is not
thread-safe. Within that loop any number of calls, ``events`` iterators and streams may run at
once: up to 64 REST calls run at a time (more wait their turn), and every ``events`` iterator
and every ``Stream`` has a connection of its own while it runs. A stream that ends with its
``finished`` event leaves its WebSocket open for the next stream to submit on (a few, for
``IDLE_REUSE`` seconds), which then skips the TCP and WebSocket handshakes. One ``Stream`` (or
``events`` iterator) is meant for one consuming task at a time.

**Cancellation.** Nothing this client does on its own ever cancels a submission: cancelling the
task that awaits a call or consumes a stream, breaking out of the loop, or closing the client only
closes connections, and the submission goes on running on the service. Only ``Client.cancel(id)``
(``DELETE /api/v1/submissions/{id}``) stops a submission; the kernel calls it on interrupt.
A call cancelled after its request left may still have taken effect on the service (a cancelled
``submit`` may have queued the submission).

**Errors.** Everything raised about the service is a ``ClientError`` (a ``CellblockError``):
``ServiceUnavailable`` when the service cannot be reached (its message names the URL), else an
``ApiError`` carrying the protocol's error document: ``Unauthorized`` (401; ``Forbidden``, 403, is
one), ``NotFound`` (404), ``Conflict`` (409), ``QueueFull`` (429, or 503 with ``Retry-After``)
with ``retry_after``, and ``InvalidRequest`` (400, 413, 422), which is also a
``cellblock.errors.InvalidRequest`` whose ``problems`` are the document's ``details``.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import itertools
import json
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient
from tornado.websocket import (
    WebSocketClientConnection,
    WebSocketClosedError,
    WebSocketError,
    websocket_connect,
)

from cellblock import errors

log = logging.getLogger("cellblock.client")

#: Where ``cellblock up`` listens by default.
DEFAULT_URL = "http://127.0.0.1:8765"
DEFAULT_STATE_DIR = "~/.local/state/cellblock"
API = "/api/v1"
#: How long the service holds ``POST ?wait=true`` when no ``timeout`` is given.
SERVER_DEFAULT_WAIT = 60.0
#: The service's keep-alive period on server-sent events; a stream silent for longer than that
#: plus the client's timeout is taken for dead.
SERVER_KEEPALIVE = 15.0
PING_INTERVAL = 15.0
MAX_BACKOFF = 5.0
MAX_MESSAGE_SIZE = 256 * 1024 * 1024
#: Seconds a closing WebSocket waits for the service's close frame before dropping the socket.
CLOSE_GRACE = 1.0
#: The WebSocket of a finished stream is kept this many seconds for the next stream, which then
#: skips the TCP and WebSocket handshakes; at most IDLE_WEBSOCKETS of them are kept.
IDLE_REUSE = 30.0
IDLE_WEBSOCKETS = 4

Document = dict[str, Any]
Documents = list[Document]
EventCallback = Callable[[Document], Awaitable[None] | None]

# -- errors -------------------------------------------------------------------------------------


class ClientError(errors.CellblockError):
    """Base of every error this client raises about the service."""

    code: str = errors.ErrorCode.CLIENT


class ServiceUnavailable(ClientError):
    """The service cannot be reached (refused, unresolvable, silent, or the connection broke)."""

    code: str = errors.ErrorCode.UNAVAILABLE

    def __init__(self, url: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"cannot reach the Cellblock service at {url}: {reason}")
        self.url = url
        self.reason = reason


class StreamInterrupted(ServiceUnavailable):
    """Following a submission's events failed after every reconnection attempt. The submission
    itself goes on: ``watch(submission_id, since=last_seq)`` picks up where this left off."""

    def __init__(self, url: str, reason: str, submission_id: str, last_seq: int) -> None:
        super().__init__(
            url,
            reason,
            f"lost the connection to the Cellblock service at {url} while following submission "
            f"{submission_id} ({reason}); it goes on running: watch it again or cancel it",
        )
        self.submission_id = submission_id
        self.last_seq = last_seq


class ApiError(ClientError):
    """The service answered with an error document. ``status`` is the HTTP status (``None`` for
    an ``error`` message on the WebSocket), ``code`` and ``message`` come from the document."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        # Not super(): InvalidRequest below also derives from cellblock.errors.InvalidRequest,
        # whose constructor takes other arguments.
        errors.CellblockError.__init__(self, message)
        self.status = status
        self.code = code
        self.details = [dict(d) for d in details]

    def as_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class Unauthorized(ApiError):
    """401: no token, or one the service does not know."""


class Forbidden(Unauthorized):
    """403: the token is valid but its role may not do this (an admin token is needed)."""


class NotFound(ApiError):
    """404: no such submission (or someone else's: ids cannot be probed), worker or endpoint."""


class Conflict(ApiError):
    """409: e.g. cancelling a submission that has ended, or scaling without ``cellblock up``."""


class QueueFull(ApiError):
    """429 (or 503): the queue is full and nothing was accepted; retry after ``retry_after``
    seconds (``None`` when the service did not say)."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, details)
        self.retry_after = retry_after


class InvalidRequest(ApiError, errors.InvalidRequest):
    """400, 413 or 422: the request does not fit the protocol. ``details`` is the protocol's list
    of ``{"field", "message"}``; ``problems`` holds the same as ``FieldProblem`` values."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(status, code, message, details)
        self.problems = [
            errors.FieldProblem(str(d.get("field", "")), str(d.get("message", "")))
            for d in self.details
        ]


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: InvalidRequest, 422: InvalidRequest, 429: QueueFull,
}  # fmt: skip
_BY_CODE: dict[str, type[ApiError]] = {
    "invalid_request": InvalidRequest, "limit_exceeded": InvalidRequest,
    "invalid_json": InvalidRequest, "body_too_large": InvalidRequest,
    "unauthorized": Unauthorized, "forbidden": Forbidden, "not_found": NotFound,
    "conflict": Conflict, "queue_full": QueueFull,
}  # fmt: skip


def api_error(status: int | None, document: object, retry_after: float | None = None) -> ApiError:
    """The error for an error document ``{"error": {"code", "message", "details"}}`` (or the
    fields of a WebSocket ``error`` message), chosen by HTTP status, else by code."""
    fields = document.get("error", document) if isinstance(document, dict) else None
    if not isinstance(fields, dict):
        fields = {}
    code = str(fields.get("code") or "http")
    message = str(fields.get("message") or f"the service answered HTTP {status}")
    raw_details = fields.get("details")
    details = (
        [d for d in raw_details if isinstance(d, dict)] if isinstance(raw_details, list) else []
    )
    cls = _BY_STATUS.get(status or 0) or _BY_CODE.get(code, ApiError)
    if status == 503 and (retry_after is not None or code == "queue_full"):
        cls = QueueFull
    if cls is QueueFull:
        return QueueFull(status, code, message, details, retry_after=retry_after)
    return cls(status, code, message, details)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reason(exc: BaseException | None, timeout: float | None) -> str:
    """Why a connection failed, in a few words."""
    if isinstance(exc, StreamClosedError) and exc.real_error is not None:
        exc = exc.real_error
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, HTTPClientError) and exc.code == 599 and "Timeout" in str(exc)
    ):
        return f"no answer within {timeout or 0:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, StreamClosedError | WebSocketClosedError):
        return "the connection closed"
    if isinstance(exc, HTTPClientError):
        return exc.message or "the connection failed"
    return str(exc) or type(exc).__name__


# -- the client ---------------------------------------------------------------------------------


class Client:
    """A connection to one Cellblock service with one token. See the module docstring for the
    concurrency, cancellation and error guarantees.

    ``timeout`` bounds connecting and every REST call (a ``submit(wait=True)`` gets its wait on
    top). A stream that loses its connection reconnects up to ``reconnect_attempts`` times in a
    row, waiting ``reconnect_delay`` seconds, doubled after each failure (at most 5 s).
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
        self._http: AsyncHTTPClient | None = None
        self._tcp: TCPClient | None = None
        self._websockets: set[WebSocketClientConnection] = set()
        self._idle: list[tuple[WebSocketClientConnection, float]] = []  # and since when
        self._closing: set[asyncio.Future[None]] = set()
        self._responses: set[_StreamingResponse] = set()
        self._request_ids = itertools.count(1)
        self._closed = False

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
        ``ClientError``. Submissions are not affected. Closing twice is harmless."""
        self._closed = True
        self._idle.clear()
        await asyncio.gather(*(self._forget(ws) for ws in list(self._websockets)))
        await asyncio.gather(*self._closing)
        for response in list(self._responses):
            await response.close()
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

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

    # -- events -----------------------------------------------------------------------------------

    async def events(self, id: str, since: int = 0) -> AsyncGenerator[Document, None]:
        """The submission's events after sequence number ``since``, over server-sent events,
        as they happen; the iterator ends after the ``finished`` event.

        Every event comes exactly once, in ``seq`` order without gaps: a connection that breaks
        is reopened (``reconnect_attempts`` in a row, with backoff) from the last ``seq`` seen;
        then ``StreamInterrupted``. Failing to connect at all raises ``ServiceUnavailable``.
        """
        path = f"/submissions/{_quote(id)}/events"
        sequence = _Sequence(id, since)
        backoff = _Backoff(self)
        connected = False
        while True:
            try:
                response = await self._open_events(path, sequence.last)
            except ServiceUnavailable as exc:
                if not connected:
                    raise
                await backoff.pause(exc.reason, sequence)
                continue
            connected = True
            try:
                async for event in self._read_events(response):
                    backoff.reset()
                    if sequence.take(event):
                        yield event
                        if event.get("type") == "finished":
                            return
                if response.complete:
                    return  # the service ended the stream: the submission expired
                reason = "the connection closed"
            except _Dropped as exc:
                reason = exc.reason
            finally:
                await response.close()
            await backoff.pause(reason, sequence)

    async def _open_events(self, path: str, since: int) -> _StreamingResponse:
        response = await self._open_stream(self._endpoint(path, {"since": since}))
        if response.code != 200:
            try:
                body = await response.body(self._idle_timeout)
            finally:
                await response.close()
            raise self._http_error(response.code, response.headers, body)
        return response

    async def _read_events(self, response: _StreamingResponse) -> AsyncGenerator[Document, None]:
        parser = _EventParser()
        async for chunk in response.chunks(self._idle_timeout):
            for data in parser.feed(chunk):
                try:
                    event = json.loads(data)
                except ValueError:
                    raise ApiError(
                        200, "protocol", f"an event that is not JSON: {data!r}"
                    ) from None
                yield _object(event)

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
        more, not even a word that nothing will come (``events`` over SSE does end then)."""
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

    async def _websocket(self) -> WebSocketClientConnection:
        """A WebSocket to the service: one a finished stream left open, else a new one."""
        self._check_open()
        while self._idle:
            websocket, since = self._idle.pop()
            if time.monotonic() - since < IDLE_REUSE and _is_open(websocket):
                return websocket
            self._forget_later(websocket)
        ws_url = "ws" + self.url.removeprefix("http") + API + "/ws"
        request = HTTPRequest(
            ws_url,
            headers={"Authorization": f"Bearer {self.token}"},
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        connecting = websocket_connect(
            request, ping_interval=PING_INTERVAL, max_message_size=MAX_MESSAGE_SIZE
        )
        try:
            websocket = await asyncio.shield(connecting)
        except asyncio.CancelledError:  # the handshake goes on: close what it brings
            asyncio.ensure_future(connecting).add_done_callback(_close_connected)
            raise
        except HTTPClientError as exc:
            if exc.code == 599 or exc.response is None:
                raise self._unavailable(exc) from None
            raise self._http_error(exc.code, exc.response.headers, exc.response.body) from None
        except (OSError, StreamClosedError, TimeoutError, WebSocketError) as exc:
            raise self._unavailable(exc) from None
        self._websockets.add(websocket)
        return websocket

    async def _forget(self, websocket: WebSocketClientConnection) -> None:
        """Close a WebSocket for good: a close frame, a moment for the service's answer, then the
        TCP connection itself (which ``close`` alone leaves to that answer: an event loop that
        ends first would leak the socket)."""
        self._websockets.discard(websocket)
        protocol = websocket.protocol
        websocket.close()
        stream = protocol.stream if protocol is not None else None
        if stream is None:
            return
        deadline = time.monotonic() + CLOSE_GRACE
        try:
            while not stream.closed() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            stream.close()

    def _keep(self, websocket: WebSocketClientConnection) -> None:
        """Keep the WebSocket of a finished stream for the next stream, if it is still open
        and there is room; else close it. (The service relays nothing more on it: the stream's
        submission has finished.)"""
        if _is_open(websocket) and len(self._idle) < IDLE_WEBSOCKETS and not self._closed:
            self._idle.append((websocket, time.monotonic()))
        else:
            self._forget_later(websocket)

    def _forget_later(self, websocket: WebSocketClientConnection) -> None:
        """``_forget`` without keeping the caller waiting for the service's close frame (a
        finished stream has its answer already); ``close`` waits for it."""
        self._websockets.discard(websocket)
        task = asyncio.ensure_future(self._forget(websocket))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _request_id(self) -> str:
        return f"r{next(self._request_ids)}"

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def _idle_timeout(self) -> float:
        return self.timeout + SERVER_KEEPALIVE

    def _check_open(self) -> None:
        if self._closed:
            raise ClientError("this Cellblock client is closed")

    def _endpoint(self, path: str, query: Mapping[str, object] | None = None) -> str:
        url = self.url + API + path
        params = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        return f"{url}?{urllib.parse.urlencode(params)}" if params else url

    def _unavailable(self, exc: BaseException | None) -> ServiceUnavailable:
        return ServiceUnavailable(self.url, _reason(exc, self.timeout))

    def _http_error(self, status: int, headers: httputil.HTTPHeaders, body: bytes) -> ClientError:
        if status in (502, 504) or (status == 503 and not _is_json(body)):
            return ServiceUnavailable(self.url, f"HTTP {status} from a gateway")
        if 300 <= status < 400:
            where = headers.get("Location", "elsewhere")
            return ApiError(status, "redirect", f"the service at {self.url} redirects to {where}")
        try:
            document = json.loads(body)
        except ValueError:
            text = body[:200].decode("utf-8", "replace")
            document = {"error": {"code": "http", "message": f"HTTP {status}: {text}"}}
        return api_error(status, document, _retry_after(headers.get("Retry-After")))

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
            self._http = AsyncHTTPClient(force_instance=True, max_clients=64)
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
        except (OSError, HTTPClientError, StreamClosedError, TimeoutError) as exc:
            raise ServiceUnavailable(self.url, _reason(exc, request.request_timeout)) from None
        if not 200 <= response.code < 300:
            raise self._http_error(response.code, response.headers, response.body)
        try:
            return json.loads(response.body) if response.body else None
        except ValueError:
            raise ApiError(
                response.code, "protocol", "the service answered something other than JSON"
            ) from None

    async def _open_stream(self, url: str) -> _StreamingResponse:
        """``GET url`` on a connection of its own, answered once the headers arrive.

        ``AsyncHTTPClient`` cannot abort a streaming response when its reader stops, so a stream
        runs on a Tornado HTTP/1.1 connection that ``_StreamingResponse.close`` closes."""
        self._check_open()
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        if self._tcp is None:
            self._tcp = TCPClient()
        try:
            stream = await self._tcp.connect(
                host,
                parts.port or (443 if https else 80),
                ssl_options=ssl.create_default_context() if https else None,
                timeout=self.timeout,
            )
        except (OSError, StreamClosedError, TimeoutError) as exc:
            raise self._unavailable(exc) from None
        response = _StreamingResponse(stream)
        self._responses.add(response)
        response.on_close = self._responses.discard
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Host": parts.netloc,
            "Authorization": f"Bearer {self.token}",
            "Accept": "text/event-stream",
            "Connection": "close",
        }
        try:
            await response.send(target, headers, self._idle_timeout)
        except (StreamClosedError, TimeoutError) as exc:
            await response.close()
            raise self._unavailable(exc) from None
        except BaseException:  # cancelled: leave no connection behind
            await response.close()
            raise
        return response


# -- the stream over the WebSocket --------------------------------------------------------------


class Stream:
    """One submission's events over the WebSocket: an async iterator, best used as an async
    context manager (which closes its connection however the block ends).

    - Every event comes exactly once, in ``seq`` order without gaps (from ``since + 1``), and the
      iteration ends after the ``finished`` event; ``submission`` is then its document.
    - When the WebSocket drops, the stream reconnects (``reconnect_attempts`` in a row, with
      backoff) and resumes with ``{"type": "watch", "id", "since": last_seq}``; events seen
      before are dropped by ``seq``. After the last failed attempt: ``StreamInterrupted``.
    - ``id`` is set once the service has accepted the submission (before the first event).
      Losing the connection before that raises ``ServiceUnavailable``: the submission may or
      may not have been queued. Failing to connect at all raises ``ServiceUnavailable`` at once.
    - Cancelling the consuming task, leaving the loop or ``aclose()`` closes the WebSocket and
      nothing else: the submission goes on. ``Client.cancel(stream.id)`` stops it.
    - ``connection`` is the current WebSocket (``None`` between connections), ``reconnects``
      how many reconnection attempts the stream has made.
    """

    def __init__(
        self,
        client: Client,
        *,
        request: Document | None = None,
        id: str | None = None,
        since: int = 0,
    ) -> None:
        self.client = client
        self.request = request
        self.id = id
        self.submission: Document | None = None
        self.connection: WebSocketClientConnection | None = None
        self.reconnects = 0
        self._sequence = _Sequence(id or "", since)
        self._events = self._follow()

    @property
    def last_seq(self) -> int:
        """The sequence number of the last event handed out."""
        return self._sequence.last

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Document:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop following: close the connection. The submission goes on."""
        await self._events.aclose()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _follow(self) -> AsyncGenerator[Document, None]:
        backoff = _Backoff(self.client)
        connected = False
        while True:
            try:
                websocket = await self.client._websocket()
            except ServiceUnavailable as exc:
                if not connected:
                    raise
                await backoff.pause(exc.reason, self._sequence)
                self.reconnects += 1
                continue
            connected = True
            self.connection = websocket
            try:
                async for event in self._relay(websocket):
                    backoff.reset()
                    if self._sequence.take(event):
                        if event.get("type") == "finished":
                            self.submission = _object(event.get("submission"))
                        yield event
                        if self.submission is not None:
                            return
            except _Dropped as exc:
                reason = exc.reason
            finally:
                self.connection = None
                if self.submission is not None:
                    self.client._keep(websocket)
                else:
                    self.client._forget_later(websocket)
            self.client._check_open()
            await backoff.pause(reason, self._sequence)
            self.reconnects += 1

    async def _relay(self, websocket: WebSocketClientConnection) -> AsyncGenerator[Document, None]:
        """The events this connection brings, after submitting or asking to watch."""
        request_id = self.client._request_id()
        if self.id is None:
            self.id = await self._submit(websocket, request_id)
            self._sequence.id = self.id
        else:
            message = {"type": "watch", "id": self.id, "since": self.last_seq}
            await _send(websocket, {**message, "request_id": request_id})
        while True:
            message = await _receive(websocket)
            if message.get("type") == "error" and message.get("request_id") in (request_id, None):
                raise api_error(None, message)
            if "seq" in message and message.get("id") == self.id:
                yield message

    async def _submit(self, websocket: WebSocketClientConnection, request_id: str) -> str:
        """Send the submission; its id once accepted."""
        try:
            await _send(
                websocket, {"type": "submit", "submission": self.request, "request_id": request_id}
            )
            while True:
                message = await asyncio.wait_for(_receive(websocket), self.client.timeout)
                if message.get("request_id") != request_id:
                    continue
                if message.get("type") == "accepted" and isinstance(message.get("id"), str):
                    sid: str = message["id"]
                    return sid
                raise api_error(None, message)
        except (_Dropped, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, _Dropped) else "no answer to the submission"
            raise ServiceUnavailable(
                self.client.url,
                reason,
                f"lost the connection to the Cellblock service at {self.client.url} before it "
                f"acknowledged the submission ({reason}); it may or may not have been queued",
            ) from None


class _Dropped(Exception):
    """The connection broke (or brought a gap in the events): reconnect and resume."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_open(websocket: WebSocketClientConnection) -> bool:
    """Open as far as this side knows: no close seen, and no message waiting (after a finished
    stream, the only one that can come is the end of the connection)."""
    stream = websocket.protocol.stream if websocket.protocol is not None else None
    return (
        stream is not None
        and not stream.closed()
        and websocket.close_code is None
        and websocket.read_queue.empty()
    )


def _close_connected(connecting: asyncio.Future[WebSocketClientConnection]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()


async def _send(websocket: WebSocketClientConnection, message: Mapping[str, Any]) -> None:
    try:
        await websocket.write_message(json.dumps(message))
    except (WebSocketClosedError, StreamClosedError):
        raise _Dropped("the connection closed") from None


async def _receive(websocket: WebSocketClientConnection) -> Document:
    text = await websocket.read_message()
    if text is None:
        raise _Dropped("the connection closed")
    try:
        message = json.loads(text)
    except ValueError:
        raise ApiError(None, "protocol", f"a message that is not JSON: {text[:200]!r}") from None
    return _object(message)


class _Sequence:
    """Hands each event out once, in order: drops repeats, calls a gap a broken connection."""

    def __init__(self, id: str, since: int) -> None:
        self.id = id
        self.last = since

    def take(self, event: Mapping[str, Any]) -> bool:
        seq = event.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ApiError(None, "protocol", f"an event without a sequence number: {event}")
        if seq <= self.last:
            return False
        if seq > self.last + 1:
            raise _Dropped(f"event {seq} came after event {self.last}")
        self.last = seq
        return True


class _Backoff:
    """Bounded reconnection: ``pause`` waits longer each time, then gives up."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    async def pause(self, reason: str, sequence: _Sequence) -> None:
        self.client._check_open()
        self.failures += 1
        if self.failures > self.client.reconnect_attempts:
            raise StreamInterrupted(self.client.url, reason, sequence.id, sequence.last)
        delay = min(self.client.reconnect_delay * 2 ** (self.failures - 1), MAX_BACKOFF)
        log.info(
            "reconnecting",
            extra={"submission": sequence.id, "since": sequence.last, "reason": reason,
                   "attempt": self.failures, "delay": delay},
        )  # fmt: skip
        await asyncio.sleep(delay)


# -- server-sent events -------------------------------------------------------------------------


class _StreamingResponse(httputil.HTTPMessageDelegate):
    """One HTTP response read as it arrives, on a connection of its own that ``close`` aborts."""

    def __init__(self, stream: IOStream) -> None:
        self.code = 0
        self.headers = httputil.HTTPHeaders()
        #: The body ended as HTTP says it should (not by a broken connection).
        self.complete = False
        self.on_close: Callable[[_StreamingResponse], None] | None = None
        self._stream = stream
        self._connection = HTTP1Connection(
            stream,
            True,
            HTTP1ConnectionParameters(no_keep_alive=True, max_body_size=2**62, decompress=False),
        )
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._headers: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self._ended = False

    async def send(self, target: str, headers: Mapping[str, str], timeout: float) -> None:
        start = httputil.RequestStartLine("GET", target, "HTTP/1.1")
        await self._connection.write_headers(start, httputil.HTTPHeaders(headers))
        self._connection.finish()
        self._reader = asyncio.ensure_future(self._read())
        await asyncio.wait_for(asyncio.shield(self._headers), timeout)

    async def _read(self) -> None:
        try:
            await self._connection.read_response(self)
        except StreamClosedError:
            pass
        finally:
            self._end()

    async def chunks(self, idle_timeout: float) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; ``_Dropped`` after ``idle_timeout`` seconds of silence."""
        while True:
            try:
                chunk = await asyncio.wait_for(self._chunks.get(), idle_timeout)
            except TimeoutError:
                raise _Dropped(f"nothing came for {idle_timeout:g} s") from None
            if chunk is None:
                return
            yield chunk

    async def body(self, idle_timeout: float) -> bytes:
        try:
            return b"".join([chunk async for chunk in self.chunks(idle_timeout)])
        except _Dropped:
            return b""

    async def close(self) -> None:
        self._stream.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None

    # HTTPMessageDelegate

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.code = start_line.code
        self.headers = headers
        if not self._headers.done():
            self._headers.set_result(None)

    def data_received(self, chunk: bytes) -> None:
        self._chunks.put_nowait(chunk)

    def finish(self) -> None:
        self.complete = True
        self._end()

    def on_connection_close(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self._headers.done():
            self._headers.set_exception(StreamClosedError())
        if not self._ended:
            self._ended = True
            self._chunks.put_nowait(None)


class _EventParser:
    """The ``data`` of each server-sent event, from the stream's bytes as they come."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        found: list[str] = []
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", "replace")
            if not line:  # a blank line ends an event
                if self._data:
                    found.append("\n".join(self._data))
                    self._data = []
            elif not line.startswith(":"):  # ":" starts a comment: the keep-alive
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value.removeprefix(" "))
        return found


# -- helpers ------------------------------------------------------------------------------------


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


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _object(value: object) -> Document:
    if not isinstance(value, dict):
        raise ApiError(None, "protocol", f"the service answered {value!r}, not a JSON object")
    return value


def _objects(value: object) -> Documents:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ApiError(None, "protocol", f"the service answered {value!r}, not a list of objects")
    return value
