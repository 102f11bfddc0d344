"""How a worker waits out an outage of the store (Redis): it backs off, with jitter so that a
fleet does not come back in step, logs one line when the outage starts and one when it ends,
and goes on. A worker outside ``cellblock up`` has no supervisor to restart it: it must not
die of a Redis restart, a failover or a network blip.

What it was doing is safe to drop: a job it held is either still leased to it when the store
comes back, or reclaimed by a slot after its lease and run again, fenced by its attempt
number (service/store.py), so that it ends exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: What a client of an unreachable store raises: a Redis that restarts and loads its data
#: answers BusyLoadingError, a ConnectionError, as does Sentinel that finds no master; a
#: master demoted by a failover answers writes with ReadOnlyError until the client reconnects.
STORE_DOWN = (
    RedisConnectionError, RedisTimeoutError, ReadOnlyError, ConnectionRefusedError,
    FileNotFoundError,
)  # fmt: skip
#: Seconds of the first pause after a failure, and of the longest.
FIRST_PAUSE = 0.2
LAST_PAUSE = 5.0

log = logging.getLogger("cellblock.outage")


class Outage:
    """The store's outages as one worker (or one of its loops, ``what``) lives through them.
    Not shared between tasks: each loop keeps its own."""

    def __init__(self, worker: str, what: str) -> None:
        self.worker, self.what = worker, what
        self.pause = 0.0  # 0: the store answers

    async def wait(self, exc: BaseException) -> None:
        """Pause before trying again: longer at each failure in a row, up to ``LAST_PAUSE``."""
        if self.pause == 0:
            fields = {"worker": self.worker, "loop": self.what, "error": str(exc) or repr(exc)}
            log.warning("store unreachable", extra=fields)
        self.pause = min(max(self.pause * 2, FIRST_PAUSE), LAST_PAUSE)
        await asyncio.sleep(self.pause * random.uniform(0.5, 1.5))

    def over(self) -> None:
        """The store answered: the next failure starts a new outage."""
        if self.pause:
            log.info("store reachable again", extra={"worker": self.worker, "loop": self.what})
            self.pause = 0.0
