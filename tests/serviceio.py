"""The in-process service of the tests: its tokens, its settings, and ``serving``, which the
``service`` fixture of conftest.py uses and a test may call for a service of its own (a second
host's, other settings). A module of its own because test modules cannot import conftest.py;
tests/ is on sys.path as the folder of the root conftest.py."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tornado.httpserver
import tornado.netutil

from cellblock import config as config_module
from cellblock.service.auth import Principal, Tokens
from cellblock.service.server import make_app
from cellblock.service.store import Store

#: Tokens of the in-process service: two clients and an admin.
TOKENS = {"alice-token": ("alice", "client"), "bob-token": ("bob", "client"),
          "admin-token": ("admin", "admin")}  # fmt: skip
#: Short leases, so that reclaiming a dead executor's job takes a second, not fifteen.
TEST_ENV = {"CELLBLOCK_LEASE_TIMEOUT": "1.5", "CELLBLOCK_QUEUE_SIZE": "50"}


@dataclass(frozen=True)
class Service:
    url: str
    redis_url: str
    state_dir: Path

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/api/v1/ws"


@contextlib.asynccontextmanager
async def serving(
    redis_url: str,
    state_dir: Path,
    sandbox_root: Path,
    addresses: Sequence[str] = (),
    **settings: str,
) -> AsyncIterator[Service]:
    """The real Tornado app on ``redis_url``, in this test's event loop, on a free loopback
    port (and the same port of each of ``addresses``: other hosts reach it there), until the
    block ends; ``settings``: more ``CELLBLOCK_*`` variables."""
    env = {
        **TEST_ENV,
        "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
        "CELLBLOCK_MAX_BODY_SIZE": "1048576",
        **settings,
    }
    cfg = config_module.load(state_dir, environ=env)
    store = Store.connect(redis_url, retention=cfg.retention, queue_size=cfg.queue_size)
    await store.jobs.ensure_group()
    tokens = Tokens({t: Principal(name, role) for t, (name, role) in TOKENS.items()})  # type: ignore[arg-type]
    app = make_app(store, cfg, tokens)
    server = tornado.httpserver.HTTPServer(app, max_body_size=cfg.max_body_size + 1024 * 1024)
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    port = sock.getsockname()[1]
    server.add_sockets([sock])
    for address in addresses:
        server.add_sockets(tornado.netutil.bind_sockets(port, address, family=socket.AF_INET))
    try:
        yield Service(url=f"http://127.0.0.1:{port}", redis_url=redis_url, state_dir=state_dir)
    finally:
        server.stop()
        await app.settings["services"].streams.end()
        await server.close_all_connections()
        await store.close()
