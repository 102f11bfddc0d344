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
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from cellblock.server_ext.deployment import Backend

#: Response headers passed back from the service.
PASSED_HEADERS = ("Content-Type", "Retry-After", "Location", "Cache-Control")
AUTH_RESOURCE = "cellblock"


class _Base(ExtensionHandlerMixin, JupyterHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def backend(self) -> Backend:
        backend: Backend | None = self.settings.get("cellblock_backend")
        if backend is None:
            raise tornado.web.HTTPError(503, "Cellblock is not configured or not started yet")
        return backend


class ProxyHandler(_Base, APIHandler):
    """``<base_url>/cellblock/api/v1/PATH``: the Cellblock REST API (and its server-sent
    events, streamed), with the extension's token in place of the Jupyter user's login."""

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
        if content_type := self.request.headers.get("Content-Type"):
            headers["Content-Type"] = content_type
        started = False

        def header(line: str) -> None:
            nonlocal started
            name, _, value = line.partition(":")
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif name.strip().title() in PASSED_HEADERS:
                self.set_header(name.strip(), value.strip())

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
        try:
            await AsyncHTTPClient().fetch(request, raise_error=False)
        except (HTTPClientError, OSError) as exc:
            if not started:
                self.set_status(502)
                self.finish(
                    json.dumps(
                        {
                            "error": {
                                "code": "bad_gateway",
                                "details": [],
                                "message": f"the Cellblock service did not answer: {exc}",
                            }
                        }
                    )
                )
                return
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

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
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
        await super().get(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)
        self._pump = asyncio.ensure_future(self._from_upstream())

    async def _from_upstream(self) -> None:
        assert self.upstream is not None
        while (message := await self.upstream.read_message()) is not None:
            try:
                await self.write_message(message)
            except tornado.websocket.WebSocketClosedError:
                break
        self.close()

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            await self.upstream.write_message(message)

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

        async def call(path: str, token: str | None) -> Any:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                response = await client.fetch(
                    f"{backend.url}{path}", headers=headers, request_timeout=10
                )
            except (HTTPClientError, OSError):
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
