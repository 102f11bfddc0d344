"""Cache builder tests: the real Nix store and the bundled offline channel, real Redis.

``start_builder`` (real ``cellblock builder`` processes) and ``popen_spy`` live in
tests/conftest.py, because the executor and service tests use them too.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import Channel, EnvironmentCache
from cellblock.service.store import Store

if os.geteuid() != 0:
    pytest.skip(
        "cache builder tests need root (the single-user Nix store)", allow_module_level=True
    )


@pytest.fixture(scope="session")
def channel() -> Channel:
    """The bundled offline channel, as a builder publishes it (its setup run once)."""
    return asyncio.run(nix.prepare_channel(str(nix.BUNDLED_CHANNEL), bundled=True))


@pytest.fixture
async def cache(store: Store) -> AsyncIterator[EnvironmentCache]:
    yield EnvironmentCache(store)


def ready_redis(url: str, timeout: float = 10) -> str:
    """Wait until the redis-server at the unix socket ``url`` accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(url.removeprefix("unix://"))
                return url
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.005)


@pytest.fixture
def redis_url(redis_url: str) -> str:
    """tests/conftest.py's redis-server, once it accepts connections: that fixture waits for
    the socket file, which redis-server binds a moment before it listens, so a connection
    in between is refused and the test errors at setup. (Drop this when it waits for PONG.)"""
    return ready_redis(redis_url)
