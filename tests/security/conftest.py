"""Fixtures of the sandbox attack suites: the real service and a real executor running real
nsjail, reached through ``attackio.Target``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from attackio import FIRST_OFFSET, UID_BASE, OpenTarget, Target, Until
from restio import Rest


@pytest.fixture
async def open_target(
    service: Any, launch: Callable[..., Awaitable[Any]], sandbox_root: Path, until: Until
) -> AsyncIterator[OpenTarget]:
    """``await open_target(slots=1, **env)``: the ``Target`` of the service once an executor
    with ``slots`` slots (and ``env``, extra environment variables) has registered."""
    clients: list[Rest] = []

    async def open_one(slots: int = 1, **env: str) -> Target:
        await launch(slots=slots, CELLBLOCK_SANDBOX__UID_BASE=str(UID_BASE), **env)
        rest = Rest(service.url)
        clients.append(rest)
        uids = [UID_BASE + FIRST_OFFSET + slot for slot in range(slots)]
        return Target(rest, service.ws_url, until, uids, sandbox_root / "work")

    yield open_one
    for rest in clients:
        rest.close()


@pytest.fixture
async def target(open_target: OpenTarget) -> Target:
    """The service with one executor of one slot: submissions in a row land in that slot."""
    return await open_target()


@pytest.fixture
def rest(target: Target) -> Rest:
    """The REST client of ``target``, for suites that only submit."""
    return target.rest
