"""How a worker waits out the store's outage (cellblock/outage.py): pauses that grow to a cap,
spread by jitter, and one log line as it goes and one as it comes back."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from cellblock import outage
from cellblock.outage import FIRST_PAUSE, LAST_PAUSE, Outage


async def test_pauses_grow_to_a_cap_with_jitter_and_are_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(outage.asyncio, "sleep", sleep)
    caplog.set_level(logging.INFO, logger="cellblock.outage")
    away = Outage("executor-1", "slot")
    pauses = []
    for _ in range(8):
        await away.wait(ConnectionError("Connection refused"))
        pauses.append(away.pause)
    assert pauses == [FIRST_PAUSE * 2**i for i in range(5)] + [LAST_PAUSE] * 3
    assert all(0.5 * p <= s <= 1.5 * p for p, s in zip(pauses, slept, strict=True))
    away.over()
    away.over()
    await away.wait(ConnectionError("again"))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["store unreachable", "store reachable again", "store unreachable"]
    assert slept[-1] <= FIRST_PAUSE * 1.5  # a new outage starts short again


def test_what_counts_as_the_store_being_away() -> None:
    for exc in (ConnectionError(), TimeoutError(), BusyLoadingError()):
        assert isinstance(exc, outage.STORE_DOWN)
    assert not isinstance(ValueError(), outage.STORE_DOWN)
