"""The deps stage: a submission's Nix dependencies, from the shared environment cache.

On a hit the executor reads the recorded environment and runs no Nix process at all: a few
Redis reads and a ``stat`` per closure path. On a miss it asks the builders (one build per
package set, however many submissions wait for it), follows the build's progress and relays
it as ``output`` events of the deps stage. A closure path this host's store lacks (the builder
ran elsewhere) is fetched from the builders' binary cache.

Cancellation: cancelling ``provide`` stops waiting; the build itself goes on for others.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import (
    Channel,
    Environment,
    EnvironmentCache,
    environment_key,
)
from cellblock.executor.runner import DepsOutcome, StageEnvironment
from cellblock.executor.streaming import Emit
from cellblock.service.protocol import CacheOutcome, DepsResult, DepsStatus, OutputEvent

#: How often to look again for a channel while no builder has published one.
CHANNEL_POLL = 0.5


class NixDependencies:
    def __init__(
        self,
        cache: EnvironmentCache,
        substituter: str = "",
        netrc: Path | None = None,
        nix_cache: Path | None = None,
    ) -> None:
        """``netrc``: the credentials for ``substituter`` (``nix.write_netrc``); ``nix_cache``:
        this executor's own folder for Nix's cache of the substituter's contents."""
        self.cache = cache
        self.substituter, self.netrc, self.nix_cache = substituter, netrc, nix_cache
        #: One fetch at a time (``nix.substitute``); the slots that wait then fetch only what
        #: the one before them did not.
        self._fetching = asyncio.Lock()
        #: The channel seen last: a guess at the current one, checked on every lookup.
        self._known: Channel | None = None

    async def provide(self, names: Sequence[str], wall_time: float, emit: Emit) -> DepsOutcome:
        log: list[str] = []

        def say(line: str) -> None:
            log.append(line)
            emit(OutputEvent(stage="deps", stream="stderr", data=line + "\n"))

        started = time.monotonic()
        state: dict[str, Any] = {"cache": None}
        try:
            async with asyncio.timeout(wall_time):
                return await self._provide(names, say, log, state, started)
        except TimeoutError:
            message = f"dependencies not ready within the deps wall time of {wall_time:g} s"
            return _failed("time_limit", message, log, state["cache"], started)

    async def _provide(
        self, names: Sequence[str], say: Any, log: list[str], state: dict[str, Any], started: float
    ) -> DepsOutcome:
        key, env = await self._lookup(names, say)
        state["cache"] = "hit" if env is not None else "miss"
        if env is None:
            build = await self.cache.request_build(key, names, ttl=3600)
            say(f"building {', '.join(sorted(set(names)))} (build {build})")
            async for entry in self.cache.follow(build):
                if "line" in entry:
                    say(entry["line"])
                elif entry.get("done") == "failed":
                    return _failed("failed", entry["message"], log, "miss", started)
            env = await self.cache.get(key)
            if env is None:
                return _failed(
                    "failed", "the build ended without an environment", log, "miss", started
                )
        missing = [p for p in env.closure if not os.path.exists(p)]
        if missing:
            if not self.substituter:
                message = f"{len(missing)} store path(s) are missing here and no substituter is set"
                return _failed("failed", message, log, state["cache"], started)
            try:
                await self._fetch(missing, say)
            except nix.NixError as exc:
                return _failed("failed", exc.message, log, state["cache"], started)
        await self.cache.touch(env)
        result = DepsResult(
            status="ok",
            cache=state["cache"],
            packages=[p.as_json() for p in env.packages],
            log="\n".join(log),
            wall_time=round(time.monotonic() - started, 6),
        )
        provided = StageEnvironment(
            variables=env.variables, paths=env.closure, packages=result.packages
        )
        return DepsOutcome(result=result, environment=provided)

    async def _fetch(self, missing: list[str], say: Any) -> None:
        async with self._fetching:
            missing = [p for p in missing if not os.path.exists(p)]
            if missing:
                say(f"fetching {len(missing)} store path(s) from {self.substituter}")
                await nix.substitute(missing, self.substituter, self.netrc, self.nix_cache)

    async def _lookup(self, names: Sequence[str], say: Any) -> tuple[str, Environment | None]:
        """The key of ``names`` and its record, if any.

        A hit costs one Redis command here: the key comes from the channel seen last, and the
        channel is read together with the record; only if it changed meanwhile (a builder
        published another) is the key computed again and the record read again.
        """
        if self._known is not None:
            key = environment_key(self._known, names)
            channel, env = await self.cache.get_with_channel(key)
            if channel == self._known:
                return key, env
        self._known = await self._channel(say)
        key = environment_key(self._known, names)
        return key, await self.cache.get(key)

    async def _channel(self, say: Any) -> Channel:
        """The builders' channel; waits (within the stage's wall time) for a builder to start."""
        waited = False
        while (channel := await self.cache.channel()) is None:
            if not waited:
                say("waiting for a cache builder to start")
                waited = True
            await asyncio.sleep(CHANNEL_POLL)
        return channel


def _failed(
    status: DepsStatus, message: str, log: list[str], cache: CacheOutcome | None, started: float
) -> DepsOutcome:
    result = DepsResult(
        status=status,
        cache=cache,
        log="\n".join([*log, message]),
        message=message,
        wall_time=round(time.monotonic() - started, 6),
    )
    return DepsOutcome(result=result, environment=None)
