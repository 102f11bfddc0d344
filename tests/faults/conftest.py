"""Fault tests run the real parts under load and break one of them: here, a Redis that can be
killed and started again (redisio.RedisServer). It replaces the shared ``redis_url`` fixture,
so the service and executors of tests/conftest.py use it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redisio import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
