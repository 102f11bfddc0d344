"""The cache builder process: builds package sets into cached environments, and evicts.

Build jobs come from the builds stream through the ``builders`` consumer group, so each goes
to one builder; a builder heartbeats while it builds, and a build whose builder stops (crash,
``kill -9``) is reclaimed by another after the lease. A build publishes its progress lines and
its outcome to the build's log, which every executor waiting on that package set follows.

Eviction: when the environments' closures outgrow the size budget, the least recently used
environments not used within the grace period are unrooted and their store paths deleted.

Drain (SIGTERM, SIGINT, ``DELETE /api/v1/workers/{id}``): the running build finishes, then the
builder stops. Cancelling ``run`` stops at once; the build is then reclaimed by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import (
    BuildOutcome,
    Channel,
    Environment,
    EnvironmentCache,
)
from cellblock.config import Config
from cellblock.outage import STORE_DOWN, Outage
from cellblock.presence import Presence, WorkerInfo
from cellblock.service import metrics
from cellblock.service.store import Lease, Store

log = logging.getLogger("cellblock.builder")
TAKE_BLOCK = 1.0
EVICT_EVERY = 60.0


class Builder:
    def __init__(self, store: Store, config: Config, *, worker_id: str) -> None:
        self.store = store
        self.config = config
        self.cache = EnvironmentCache(store)
        self.presence = Presence(
            store, WorkerInfo(id=worker_id, kind="builder", slots=1), config.lease_timeout
        )
        self.info = self.presence.info
        self.channel: Channel | None = None

    async def start(self) -> Channel:
        """Prepare the channel and publish it; executors compute keys from it."""
        path = self.config.channel or str(nix.BUNDLED_CHANNEL)
        self.channel = await nix.prepare_channel(path, bundled=not self.config.channel)
        await self.cache.publish_channel(self.channel)
        await self.cache.builds.ensure_group()
        return self.channel

    async def run(self) -> None:
        """Build until drained. See the module docstring for cancellation."""
        outage = Outage(self.info.id, "start")
        while True:
            try:
                channel = await self.start()
                await self.presence.register()
                break
            except STORE_DOWN as exc:
                await outage.wait(exc)
        outage.over()
        log.info("builder started", extra={"worker": self.info.id, "channel": channel.path,
                                           "identity": channel.identity})  # fmt: skip
        background = [
            asyncio.create_task(self.presence.keep()),
            asyncio.create_task(self._evict_periodically()),
        ]
        outage = Outage(self.info.id, "builds")
        try:
            while not self.presence.draining.is_set():
                try:
                    job = await self.cache.builds.reclaim(self.info.id, self.config.lease_timeout)
                    job = job or await self.cache.builds.take(self.info.id, block=TAKE_BLOCK)
                    outage.over()
                    if job is not None:
                        self.info.busy = 1
                        try:
                            await self.build(job)
                        finally:
                            self.info.busy = 0
                except STORE_DOWN as exc:
                    # A build this builder held is reclaimed after its lease (see outage.py).
                    await outage.wait(exc)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            log.info("builder stopped", extra={"worker": self.info.id})

    async def build(self, job: Lease) -> BuildOutcome:
        fields = job.fields
        key, build, names = fields["key"], fields["build"], json.loads(fields["names"])
        assert self.channel is not None
        extra = {"worker": self.info.id, "key": key, "build": build, "packages": names}
        log.info("build started", extra=extra)
        started = time.monotonic()
        # Counted apart from its end: a build lost with its builder shows as started, not ended.
        await metrics.build_started(self.store)
        heartbeat = asyncio.create_task(self._heartbeat(job))
        try:
            if (await self.cache.get(key)) is not None:  # a reclaimed build already published
                outcome = BuildOutcome(ok=True, message="already built")
            else:
                outcome = await self._build(key, build, names)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        seconds = round(time.monotonic() - started, 3)
        # Before its waiters hear of it: whoever saw a build end finds it counted.
        await metrics.build_ended(self.store, outcome.ok, seconds)
        await self.cache.build_done(job, key, build, outcome)
        # "outcome", not "message": a LogRecord's own attribute may not be set through extra.
        log.info("build ended", extra={**extra, "ok": outcome.ok, "outcome": outcome.message,
                                       "seconds": seconds})  # fmt: skip
        return outcome

    async def _build(self, key: str, build: str, names: list[str]) -> BuildOutcome:
        assert self.channel is not None

        async def line(text: str) -> None:
            await self.cache.log_line(build, text)

        try:
            env = await nix.build_environment(self.channel, key, names, on_line=line)
            # Into the binary cache before publishing: executors on other hosts can use only
            # an environment they can fetch, so a failed copy fails the build.
            if self.config.binary_cache:
                await nix.copy_to_binary_cache(env.store_path, Path(self.config.binary_cache))
            await self.cache.put(env)
        except nix.NixError as exc:
            return BuildOutcome(ok=False, message=exc.message)
        return BuildOutcome(ok=True, environment=env)

    async def _heartbeat(self, job: Lease) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.config.lease_timeout / 3))
            with contextlib.suppress(*STORE_DOWN):  # the next beat may reach it
                await self.cache.builds.heartbeat(self.info.id, job)

    async def _evict_periodically(self) -> None:
        while True:
            await asyncio.sleep(EVICT_EVERY)
            try:
                await evict(self.cache, self.config.cache_size_budget, self.config.cache_grace)
            except nix.NixError:
                log.exception("eviction failed", extra={"worker": self.info.id})
            except STORE_DOWN as exc:  # the next round tries again
                log.warning("eviction put off", extra={"worker": self.info.id, "error": str(exc)})


async def evict(cache: EnvironmentCache, budget: int, grace: float) -> list[Environment]:
    """Evict least recently used environments until their closures fit ``budget`` bytes.

    An environment used within ``grace`` seconds is never evicted: a submission may be using it.
    Store paths shared with a kept environment stay (Nix refuses to delete a live path).
    """
    envs = await cache.environments()
    sizes: dict[str, int] = {}
    for env, _ in envs:
        sizes.update(env.closure_sizes)
    kept = {env.key: env for env, _ in envs}

    def total() -> int:  # shared store paths count once
        return sum(sizes.get(p, 0) for p in {p for env in kept.values() for p in env.closure})

    evicted: list[Environment] = []
    horizon = time.time() - grace
    for env, last_used in envs:  # least recently used first
        if total() <= budget:
            break
        if last_used > horizon:
            continue
        del kept[env.key]
        await cache.forget(env)
        await nix.delete(env)
        evicted.append(env)
        log.info("environment evicted", extra={"key": env.key, "packages": list(env.names),
                                               "size": env.size})  # fmt: skip
    return evicted
