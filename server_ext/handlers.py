"""The extension's handlers. Every one is authenticated with the Jupyter server's own auth;
the Cellblock token stays on the server side and never reaches the browser.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import tornado.web
import tornado.websocket
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerJinjaMixin, ExtensionHandlerMixin
from jupyter_server.utils import ensure_async, url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import IOStream
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient

from cellblock.errors import ErrorCode
from cellblock.server_ext.deployment import Backend

#: Response headers passed back from the service.
PASSED_HEADERS = ("Content-Type", "Retry-After", "Location", "Cache-Control")
#: Request headers passed on to the service (besides its token, which replaces the user's
#: credentials). Last-Event-ID is how a reconnecting EventSource resumes its stream.
FORWARDED_HEADERS = ("Content-Type", "Last-Event-ID")
AUTH_RESOURCE = "cellblock"
#: The service's API paths, which the proxy serves under ``<base_url>cellblock/api/v1/``.
API_PREFIX = "/api/v1/"


class _UpstreamConnections(TCPClient):
    """A TCPClient that remembers the connections it opens, so that the proxy can cut off a
    request to the service whose browser has gone: tornado's HTTP client cannot abort a fetch,
    and raising from its streaming callback makes tornado log an error traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[IOStream] = []

    async def connect(self, *args: Any, **kwargs: Any) -> IOStream:
        stream = await super().connect(*args, **kwargs)
        self.streams.append(stream)
        return stream

    def close_all(self) -> None:
        for stream in self.streams:
            stream.close()


class _Base(ExtensionHandlerMixin, JupyterHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def backend(self) -> Backend:
        backend: Backend | None = self.settings.get("cellblock_backend")
        if backend is None:
            raise tornado.web.HTTPError(503, "Cellblock is not configured or not started yet")
        return backend

    def bad_gateway(self, problem: object) -> None:
        """Answer 502 in the service's own error shape: the browser's code reads one kind."""
        self.set_status(502)
        message = f"the Cellblock service did not answer: {problem}"
        self.finish(
            json.dumps(
                {"error": {"code": ErrorCode.BAD_GATEWAY, "details": [], "message": message}}
            )
        )


class ProxyHandler(_Base, APIHandler):
    """``<base_url>/cellblock/api/v1/PATH``: the Cellblock REST API (and its server-sent
    events, streamed), with the extension's token in place of the Jupyter user's login."""

    _gone = False
    _upstream: _UpstreamConnections | None = None

    def on_connection_close(self) -> None:
        # A browser that leaves an event stream (a closed EventSource, a closed tab) or a
        # ``?wait=true`` request would otherwise keep the request to the service open until
        # the submission ends, which for a queued one may be never.
        self._gone = True
        if self._upstream is not None:
            self._upstream.close_all()
        super().on_connection_close()

    def _location(self, value: str, backend: Backend) -> str:
        """The service's Location as the browser can follow it: under this proxy."""
        path = value.removeprefix(backend.url)
        if path.startswith(API_PREFIX):
            return url_path_join(self.base_url, "cellblock", path)
        return value

    async def _proxy(self, path: str) -> None:
        backend = self.backend
        query = urlencode(
            [
                (k, v.decode())
                for k, vs in self.request.query_arguments.items()
                for v in vs
                if k != "token"
            ]
        )
        url = f"{backend.url}/api/v1/{path}" + (f"?{query}" if query else "")
        body = self.request.body if self.request.method in ("POST", "PUT", "PATCH") else None
        headers = {"Authorization": f"Bearer {backend.token}"}
        for name in FORWARDED_HEADERS:
            if (value := self.request.headers.get(name)) is not None:
                headers[name] = value
        started = False

        def header(line: str) -> None:
            name, _, value = line.partition(":")
            name, value = name.strip().title(), value.strip()
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif name == "Location":
                self.set_header(name, self._location(value, backend))
            elif name in PASSED_HEADERS:
                self.set_header(name, value)

        def chunk(data: bytes) -> None:
            nonlocal started
            started = True
            self.write(data)
            self.flush()  # a Future; the write is queued, its completion needs no wait here

        request = HTTPRequest(
            url,
            method=self.request.method or "GET",
            headers=headers,
            body=body,
            header_callback=header,
            streaming_callback=chunk,
            request_timeout=3600,
            allow_nonstandard_methods=True,
        )
        # A client of this request's own, whose connection on_connection_close can close.
        client = SimpleAsyncHTTPClient(force_instance=True)
        client.tcp_client = self._upstream = _UpstreamConnections()
        try:
            await client.fetch(request, raise_error=False)
        except (HTTPClientError, OSError) as exc:
            if self._gone:
                return  # nobody to answer
            if not started:
                self.bad_gateway(exc)
                return
        finally:
            client.close()
        self.finish()

    @tornado.web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        await self._proxy(path)

    @tornado.web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        await self._proxy(path)

    @tornado.web.authenticated
    @authorized
    async def delete(self, path: str) -> None:
        await self._proxy(path)


class ProxyWebSocketHandler(
    ExtensionHandlerMixin, tornado.websocket.WebSocketHandler, JupyterHandler
):
    """``<base_url>/cellblock/api/v1/ws``: the Cellblock WebSocket, piped both ways."""

    auth_resource = AUTH_RESOURCE
    upstream: tornado.websocket.WebSocketClientConnection | None = None
    _opened = False

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        # ws_authenticated only authenticates. The socket submits and cancels as POST and
        # DELETE do, so Jupyter's authorizer decides here too, as it does for jupyter_server's
        # own kernel and event sockets.
        user = self.current_user
        if not await ensure_async(
            self.authorizer.is_authorized(self, user, "execute", AUTH_RESOURCE)
        ):
            raise tornado.web.HTTPError(403, f"not authorized to execute on {AUTH_RESOURCE}")
        backend: Backend | None = self.settings.get("cellblock_backend")
        if backend is None:
            raise tornado.web.HTTPError(503, "Cellblock is not configured or not started yet")
        ws_url = backend.url.replace("http", "ws", 1) + "/api/v1/ws"
        request = HTTPRequest(ws_url, headers={"Authorization": f"Bearer {backend.token}"})
        try:
            self.upstream = await tornado.websocket.websocket_connect(request)
        except (HTTPClientError, OSError) as exc:
            raise tornado.web.HTTPError(
                502, f"the Cellblock service did not answer: {exc}"
            ) from None
        try:
            await super().get(*args, **kwargs)
        finally:
            # The upgrade can still be refused (not a WebSocket request, another origin):
            # then nothing else would ever close the connection to the service.
            if not self._opened:
                self.upstream.close()

    def open(self, *args: Any, **kwargs: Any) -> None:
        self._opened = True
        self.set_nodelay(True)
        self._pump = asyncio.ensure_future(self._from_upstream())

    async def _from_upstream(self) -> None:
        assert self.upstream is not None
        while (message := await self.upstream.read_message()) is not None:
            try:
                await self.write_message(message, binary=isinstance(message, bytes))
            except tornado.websocket.WebSocketClosedError:
                break
        self.close()

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is None:
            return
        try:
            await self.upstream.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            self.close()  # the service closed its side; _from_upstream closes too

    def on_close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def check_origin(self, origin_to_satisfy_tornado: str = "") -> bool:
        # The Jupyter server's own origin policy (allow_origin settings) applies.
        return bool(JupyterHandler.check_origin(self, origin_to_satisfy_tornado))


class StatusDataHandler(_Base, APIHandler):
    """``<base_url>/cellblock/status.json``: what the status page shows."""

    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        backend = self.backend
        client = AsyncHTTPClient()

        problems: dict[str, Exception] = {}

        async def call(path: str, token: str | None) -> Any:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                response = await client.fetch(
                    f"{backend.url}{path}", headers=headers, request_timeout=10
                )
            except (HTTPClientError, OSError) as exc:
                problems[path] = exc
                return None
            return json.loads(response.body)

        health, workers, recent, packages = await asyncio.gather(
            call("/api/v1/health", None),
            call("/api/v1/workers", backend.admin_token)
            if backend.admin_token
            else asyncio.sleep(0),
            call("/api/v1/submissions?limit=20", backend.token),
            call("/api/v1/packages", backend.token),
        )
        if health is None:
            # The service is down (health needs no token): say so, rather than a 200 of nulls
            # that the page would show as a service with no workers.
            self.bad_gateway(problems.get("/api/v1/health"))
            return
        self.finish(
            json.dumps(
                {
                    "service": backend.url,
                    "health": health,
                    "workers": (workers or {}).get("workers"),
                    "submissions": (recent or {}).get("submissions", []),
                    "packages": (packages or {}).get("packages", []),
                }
            )
        )


class StatusPageHandler(ExtensionHandlerJinjaMixin, _Base):
    """``<base_url>/cellblock/``: workers and their load, the queue, this user's recent
    submissions and the cached packages, refreshed live."""

    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(self.render_template("status.html", base_url=self.base_url))
