"""Cache builder tests: the real Nix store and the bundled offline channel, real Redis.

``start_builder`` (real ``cellblock builder`` processes) and ``popen_spy`` live in
tests/conftest.py, because the executor and service tests use them too.
"""

from __future__ import annotations

import asyncio
import os
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
