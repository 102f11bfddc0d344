"""The Tornado application and ``cellblock service``."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import tornado.httpserver
import tornado.web

from cellblock.config import Config
from cellblock.service import api, packages
from cellblock.service.auth import Tokens, load_tokens
from cellblock.service.metrics import Metrics
from cellblock.service.store import Store
from cellblock.service.submissions import Submissions
from cellblock.service.websocket import WebSocketHandler

log = logging.getLogger("cellblock.service")
SID = r"([A-Za-z0-9_-]{1,64})"


def make_app(store: Store, config: Config, tokens: Tokens) -> tornado.web.Application:
    services = api.Services(
        store=store,
        config=config,
        tokens=tokens,
        metrics=Metrics(store),
        submissions=Submissions(store, config.limits),
    )
    routes: list[Any] = [
        (r"/api/v1/health", api.HealthHandler),
        (r"/api/v1/capacity", api.CapacityHandler),
        (r"/api/v1/submissions", api.SubmissionsHandler),
        (rf"/api/v1/submissions/{SID}", api.SubmissionHandler),
        (rf"/api/v1/submissions/{SID}/events", api.EventsHandler),
        (r"/api/v1/ws", WebSocketHandler),
        (r"/api/v1/workers", api.WorkersHandler),
        (r"/api/v1/workers/([^/]+)", api.WorkerHandler),
        (r"/api/v1/admin/scale", api.ScaleHandler),
        (r"/api/v1/openapi.json", api.OpenApiHandler),
        (r"/api/v1/packages", packages.PackagesHandler),
        (r"/api/v1/packages/builds/([0-9a-f]{1,32})", packages.BuildHandler),
        (r"/metrics", api.MetricsHandler),
    ]
    if config.binary_cache:
        binary_cache = {"path": config.binary_cache}
        routes.append((r"/nix-cache/(.*)", packages.BinaryCacheHandler, binary_cache))
    return tornado.web.Application(
        routes,
        services=services,
        default_handler_class=api.NotFoundHandler,
        websocket_ping_interval=20,
        websocket_max_message_size=config.max_body_size,
    )


async def serve(config: Config, redis_url: str, host: str, port: int) -> int:
    """Run the service until SIGTERM or SIGINT."""
    store = Store.connect(redis_url, retention=config.retention, queue_size=config.queue_size)
    await store.jobs.ensure_group()
    app = make_app(store, config, load_tokens(config))
    # The handler enforces the configured body limit with a 413; this bound only stops
    # anything far larger before it is read.
    server = tornado.httpserver.HTTPServer(app, max_body_size=config.max_body_size + 1024 * 1024)
    server.listen(port, host)
    log.info("service listening", extra={"url": f"http://{host}:{port}"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    # WebSockets and event streams first: the HTTP connections' close leaves them open.
    await app.settings["services"].streams.end()
    await server.close_all_connections()
    # The last second's request counts, which would otherwise go with this process.
    await app.settings["services"].metrics.flush()
    await store.close()
    log.info("service stopped")
    return 0
