"""What every worker process (executor, cache builder) shares: its registration and drain.

A worker registers itself in the store with a time-to-live and refreshes it while it lives, so
``GET /api/v1/workers`` lists exactly the live ones; a drain request (``DELETE
/api/v1/workers/{id}``, SIGTERM or SIGINT) sets ``draining``, after which the worker takes no new
work, finishes what it runs, unregisters and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from cellblock.outage import STORE_DOWN, Outage
from cellblock.service.protocol import now
from cellblock.service.store import Store

log = logging.getLogger("cellblock.presence")


@dataclass
class WorkerInfo:
    """What ``GET /api/v1/workers`` shows of a worker."""

    id: str
    kind: str
    slots: int
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: str = field(default_factory=now)
    busy: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "host": self.host, "pid": self.pid,
            "slots": self.slots, "busy": self.busy, "started_at": self.started_at,
            "last_seen": now(),
        }  # fmt: skip


class Presence:
    """A worker's registration and drain flag. One per worker process."""

    def __init__(self, store: Store, info: WorkerInfo, lease: float) -> None:
        self.store = store
        self.info = info
        self.lease = lease
        self.draining = asyncio.Event()

    def drain(self) -> None:
        """Stop taking new work; running work finishes. Safe to call more than once."""
        if not self.draining.is_set():
            log.info("draining", extra={"worker": self.info.id})
        self.draining.set()

    def drain_on_signals(self) -> None:
        """SIGTERM and SIGINT drain the worker instead of killing running work."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)

    async def register(self) -> None:
        await self.store.register_worker(self.info.as_json(), ttl=self.lease)

    async def keep(self) -> None:
        """Refresh the registration and watch for a drain request, until cancelled; then
        unregister."""
        outage = Outage(self.info.id, "presence")
        try:
            while True:
                try:
                    await self.register()
                    if await self.store.drain_requested(self.info.id):
                        self.drain()
                    outage.over()
                except STORE_DOWN as exc:
                    await outage.wait(exc)
                    continue
                # Python 3.11's asyncio.wait_for (which redis-py uses to send a command) loses
                # a cancellation that lands as the command completes; without this check the
                # worker would never stop. A cancellation is still counted by cancelling().
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                await asyncio.sleep(min(1.0, self.lease / 3))
        finally:
            # Unreachable, the store forgets this worker by itself when its registration ends.
            with contextlib.suppress(*STORE_DOWN):
                await asyncio.shield(self.store.unregister_worker(self.info.id))
