"""Server extension tests: a real Jupyter server (pytest-jupyter's ``jp_*`` fixtures) with
``cellblock.server_ext`` enabled, in front of the real in-process Cellblock service, Redis and
executors of tests/conftest.py.

pytest-jupyter's fixtures are taken in here rather than enabled with ``pytest_plugins``: pytest
honours ``pytest_plugins`` only in the top-level conftest and fails the whole run (``pytest``
from the repository root collects this folder after start-up) when a deeper one defines it;
enabled at the top level instead, the plugin's autouse fixtures (a ServerApp instance cleaned
up after every test, an event loop closed after every test) would run for the entire suite.
Put into this conftest's namespace they are fixtures of this folder only.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_jupyter.jupyter_server
from jupyterio import ADMIN, ALICE, Connect, Fetch, Socket, assert_no_secret, browser_view
from tornado.httpclient import HTTPResponse
from traitlets.config import Config

#: pytest-jupyter's fixtures behind jp_serverapp, jp_fetch and jp_ws_fetch (jp_asyncio_loop and
#: jp_server_config are this file's own, below), made fixtures of this folder.
JP_FIXTURES = (
    "echo_kernel_spec", "http_server", "http_server_client", "http_server_port", "jp_argv",
    "jp_auth_header", "jp_base_url", "jp_config_dir", "jp_configurable_serverapp",
    "jp_data_dir", "jp_env_config_path", "jp_env_jupyter_path", "jp_environ", "jp_fetch",
    "jp_home_dir", "jp_http_port", "jp_kernel_dir", "jp_logging_stream",
    "jp_nbconvert_templates", "jp_root_dir", "jp_runtime_dir", "jp_server_cleanup",
    "jp_serverapp", "jp_system_config_path", "jp_system_jupyter_path", "jp_web_app",
    "jp_ws_fetch",
)  # fmt: skip
globals().update({name: getattr(pytest_jupyter.jupyter_server, name) for name in JP_FIXTURES})


@pytest.fixture
async def jp_asyncio_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """pytest-asyncio's loop, for the ``jp_*`` fixtures too: the in-process service (an async
    fixture) and the Jupyter server must serve on the one loop the tests run in. pytest-jupyter's
    own fixture would make (and afterwards close) a second one."""
    yield asyncio.get_running_loop()


@pytest.fixture(autouse=True)
def cellblock_environ() -> Iterator[None]:
    """No ``CELLBLOCK_*`` settings from outside, and none left behind: the extension writes
    the service's URL and tokens into ``os.environ`` for the kernels, and that must not leak
    into later tests. (monkeypatch.delenv of an unset variable records nothing to undo, so a
    variable the extension sets later would stay.)"""
    names = [f"CELLBLOCK_{name}" for name in ("URL", "TOKEN", "ADMIN_TOKEN", "STATE_DIR")]
    before = {name: os.environ.pop(name) for name in names if name in os.environ}
    yield
    for name in names:
        os.environ.pop(name, None)
    os.environ.update(before)


@pytest.fixture
def cellblock_config(request: pytest.FixtureRequest, service: Any) -> dict[str, Any]:
    """``c.Cellblock``: the in-process service as alice, with the admin token for the status
    page. A test changes keys with ``@pytest.mark.parametrize("cellblock_config", [{...}],
    indirect=True)``."""
    config = {"start_local": False, "url": service.url, "token": ALICE, "admin_token": ADMIN}
    for key, value in getattr(request, "param", {}).items():
        config[key] = value() if callable(value) else value  # e.g. a port found at run time
    return config


@pytest.fixture
def jp_server_config_extra(request: pytest.FixtureRequest) -> dict[str, Any]:
    """More configuration of the Jupyter server (indirect parametrization, as above)."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
def jp_server_config(
    cellblock_config: dict[str, Any], jp_server_config_extra: dict[str, Any]
) -> Config:
    config = Config(
        {
            "ServerApp": {"jpserver_extensions": {"cellblock.server_ext": True}},
            "Cellblock": cellblock_config,
        }
    )
    config.merge(Config(jp_server_config_extra))
    return config


@pytest.fixture
def fetch(jp_fetch: Any) -> Fetch:
    """``await fetch(*path_parts, method=, body=, params=, headers=)`` under
    ``<base_url>/cellblock/``, authenticated as the Jupyter user (jp_fetch's token header);
    ``body`` may be JSON-able. Answers every HTTP status (no exception for 4xx/5xx; a request
    that gets no answer, 599, still raises), follows no redirect, and fails the test if a
    service token is anywhere in what came back."""

    async def do(*parts: str, body: Any = None, **kwargs: Any) -> HTTPResponse:
        if body is not None and not isinstance(body, bytes | str):
            body = json.dumps(body)
        kwargs.setdefault("request_timeout", 30)
        response: HTTPResponse = await jp_fetch(
            "cellblock", *parts, body=body, raise_error=False, follow_redirects=False, **kwargs
        )
        assert_no_secret(browser_view(response), f"{kwargs.get('method', 'GET')} {parts}")
        return response

    return do


@pytest.fixture
async def connect(jp_ws_fetch: Any) -> AsyncIterator[Connect]:
    """``await connect()``: a WebSocket to ``<base_url>/cellblock/api/v1/ws`` as the Jupyter
    user; ``headers``/``params`` go to jp_ws_fetch (e.g. another Authorization)."""
    opened: list[Socket] = []

    async def open_socket(**kwargs: Any) -> Socket:
        conn = await jp_ws_fetch("cellblock", "api", "v1", "ws", **kwargs)
        ws = Socket(conn)
        opened.append(ws)
        return ws

    yield open_socket
    for ws in opened:
        if not ws.closed:
            ws.conn.close()
            await ws.ended()
