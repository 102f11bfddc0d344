"""The shared dependency cache: environment keys, records, and their place in Redis.

A package set's key is a hash of the channel's identity, the system and the sorted,
de-duplicated attribute names. A builder turns a key into an ``Environment`` record (the
variables the packages need, the store paths of the closure, the packages) and publishes it;
an executor on a hit reads the record and runs no Nix at all.

Keys (``{p}`` is the store prefix):

- ``{p}:channel``: the channel builders build from (path, identity, system), set by builders.
- ``{p}:env:{key}``: an environment record (JSON); ``{p}:envs``: keys by last use (a sorted set).
- ``{p}:packages``: the package index, name → JSON (name, version, store path, size);
  ``{p}:packages:cached_at``, ``{p}:packages:uses``, ``{p}:packages:last_used``: name → when it
  was first cached, how often used, when last used. Separate hashes, so that no update reads,
  modifies and writes back a JSON entry, and concurrent uses are all counted.
- ``{p}:builds``: the build job stream, consumer group ``builders``.
- ``{p}:building:{key}``: the id of the build in progress for a key (set-if-absent: one build).
- ``{p}:buildlog:{build}``: a build's progress lines and, last, its outcome.

Concurrency: every method is safe to use from many tasks and processes; ``request_build`` makes
concurrent requests for one key share one build.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cellblock.service.protocol import now
from cellblock.service.store import JobQueue, Lease, Store

BUILDS_GROUP = "builders"
#: How long a finished build's log stays readable for late waiters.
BUILD_LOG_TTL = 600
# Record a use. KEYS: envs, packages:uses, packages:last_used. ARGV: epoch seconds, the
# environment's key, the RFC 3339 time, its package names.
_TOUCH = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
for i = 4, #ARGV do
  redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[3])
end
return 1
"""
# Delete KEYS[1] if it holds ARGV[1]: compare-and-delete in one step.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Channel:
    """What builders build from. ``identity`` changes whenever the channel's content does."""

    path: str
    identity: str
    system: str


def environment_key(channel: Channel, names: Sequence[str]) -> str:
    """The cache key of a package set: the same set gives the same key, in any order."""
    material = json.dumps([channel.identity, channel.system, sorted(set(names))])
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    store_path: str

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "store_path": self.store_path}


@dataclass(frozen=True)
class Environment:
    """A built package set: everything an executor needs to use it without Nix."""

    key: str
    names: tuple[str, ...]
    variables: Mapping[str, str]
    closure: tuple[str, ...]
    packages: tuple[Package, ...]
    store_path: str
    #: NAR size of each closure path, for the size budget (shared paths count once).
    closure_sizes: Mapping[str, int]
    built_at: str = field(default_factory=now)

    @property
    def size(self) -> int:
        return sum(self.closure_sizes.values())

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["packages"] = [p.as_json() for p in self.packages]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Environment:
        return cls(
            key=data["key"],
            names=tuple(data["names"]),
            variables=dict(data["variables"]),
            closure=tuple(data["closure"]),
            packages=tuple(Package(**p) for p in data["packages"]),
            store_path=data["store_path"],
            closure_sizes={p: int(n) for p, n in data["closure_sizes"].items()},
            built_at=data["built_at"],
        )


@dataclass(frozen=True)
class BuildOutcome:
    """How a build ended: the environment, or why there is none."""

    ok: bool
    message: str = ""
    environment: Environment | None = None


class EnvironmentCache:
    """The cache's records, index and build requests, in the store's Redis."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis: Any = store.redis
        self.p = store.p
        self._touch = store.redis.register_script(_TOUCH)
        self.builds = JobQueue(store.redis, f"{self.p}:builds", BUILDS_GROUP)

    @property
    def builds_key(self) -> str:
        return self.builds.key

    # -- channel -------------------------------------------------------------------------------

    async def publish_channel(self, channel: Channel) -> None:
        await self.redis.set(f"{self.p}:channel", json.dumps(asdict(channel)))

    async def channel(self) -> Channel | None:
        raw = await self.redis.get(f"{self.p}:channel")
        return None if raw is None else Channel(**json.loads(raw))

    # -- environments --------------------------------------------------------------------------

    async def get(self, key: str) -> Environment | None:
        raw = await self.redis.get(f"{self.p}:env:{key}")
        return None if raw is None else Environment.from_json(json.loads(raw))

    async def get_with_channel(self, key: str) -> tuple[Channel | None, Environment | None]:
        """The published channel and the record of ``key``, in one command (a hit's read)."""
        raw_channel, raw_env = await self.redis.mget(f"{self.p}:channel", f"{self.p}:env:{key}")
        channel = None if raw_channel is None else Channel(**json.loads(raw_channel))
        env = None if raw_env is None else Environment.from_json(json.loads(raw_env))
        return channel, env

    async def touch(self, env: Environment) -> None:
        """Record a use: last use of the environment and of each of its packages.

        One atomic script of single-command updates (no read-modify-write in Python), so
        that many executors using one package at once count every use, in one round trip:
        this runs on every cache hit.
        """
        names = [package.name for package in env.packages]
        await self._touch(
            keys=[f"{self.p}:envs", f"{self.p}:packages:uses", f"{self.p}:packages:last_used"],
            args=[time.time(), env.key, now(), *names],
        )

    async def put(self, env: Environment) -> None:
        """Publish a built environment and index its packages."""
        stamp = now()
        pipe = self.redis.pipeline(transaction=False)
        for package in env.packages:
            entry = {**package.as_json(), "size": env.closure_sizes.get(package.store_path, 0)}
            pipe.hset(f"{self.p}:packages", package.name, json.dumps(entry))
            pipe.hsetnx(f"{self.p}:packages:cached_at", package.name, stamp)
        pipe.set(f"{self.p}:env:{env.key}", json.dumps(env.as_json()))
        pipe.zadd(f"{self.p}:envs", {env.key: time.time()})
        await pipe.execute()

    async def environments(self) -> list[tuple[Environment, float]]:
        """Every environment with its last use (epoch seconds), least recently used first."""
        found = []
        for key, last_used in await self.redis.zrange(f"{self.p}:envs", 0, -1, withscores=True):
            if (env := await self.get(key)) is not None:
                found.append((env, float(last_used)))
        return found

    async def forget(self, env: Environment) -> None:
        """Remove an environment's record, and index entries no other environment needs."""
        await self.redis.delete(f"{self.p}:env:{env.key}")
        await self.redis.zrem(f"{self.p}:envs", env.key)
        still_used = {p.name for other, _ in await self.environments() for p in other.packages}
        for package in env.packages:
            if package.name not in still_used:
                for suffix in ("", ":cached_at", ":uses", ":last_used"):
                    await self.redis.hdel(f"{self.p}:packages{suffix}", package.name)

    async def packages(self) -> list[dict[str, Any]]:
        """The package index: name, version, store_path, size, cached_at, last_used, uses."""
        pipe = self.redis.pipeline(transaction=False)
        for suffix in ("", ":cached_at", ":uses", ":last_used"):
            pipe.hgetall(f"{self.p}:packages{suffix}")
        index, cached_at, uses, last_used = await pipe.execute()
        return [
            {**json.loads(index[name]), "cached_at": cached_at.get(name),
             "last_used": last_used.get(name), "uses": int(uses.get(name, 0))}
            for name in sorted(index)
        ]  # fmt: skip

    # -- builds --------------------------------------------------------------------------------

    async def request_build(self, key: str, names: Sequence[str], ttl: float) -> str:
        """The id of the build of ``key``: the one in progress, or a new one queued now.

        ``ttl`` bounds how long a build may be considered in progress, so that a lost build
        (every builder gone) does not block the key forever.
        """
        candidate = secrets.token_hex(8)
        if await self.redis.set(f"{self.p}:building:{key}", candidate, nx=True, px=int(ttl * 1000)):
            await self.log_line(candidate, f"queued: {', '.join(sorted(set(names)))}")
            await self.redis.xadd(
                self.builds_key,
                {"key": key, "names": json.dumps(sorted(set(names))), "build": candidate},
            )
            return candidate
        current = await self.redis.get(f"{self.p}:building:{key}")
        return current or await self.request_build(key, names, ttl)

    async def build_done(self, job: Lease, key: str, build: str, outcome: BuildOutcome) -> None:
        """Release the key, publish a build's outcome to its waiters, and release the job."""
        # The key first: a request made once the outcome is out must not join this build (and
        # be handed its failure again) but start a new one. Only the build that holds the key
        # releases it, atomically (a reclaimed build may finish late, after a newer one began).
        await self.redis.eval(_RELEASE, 1, f"{self.p}:building:{key}", build)
        log = f"{self.p}:buildlog:{build}"
        await self.redis.xadd(
            log, {"done": "ok" if outcome.ok else "failed", "message": outcome.message}
        )
        await self.redis.expire(log, BUILD_LOG_TTL)
        await self.builds.done(job)

    async def log_line(self, build: str, line: str) -> None:
        log = f"{self.p}:buildlog:{build}"
        await self.redis.xadd(log, {"line": line}, maxlen=10000, approximate=True)
        await self.redis.expire(log, BUILD_LOG_TTL)

    async def follow(self, build: str, block: float = 1.0) -> AsyncIterator[dict[str, str]]:
        """A build's log entries from its start, live, ending with its outcome entry."""
        last = "0-0"
        while True:
            reply = await self.redis.xread(
                {f"{self.p}:buildlog:{build}": last}, block=max(1, int(block * 1000))
            )
            if not reply:
                yield {}  # nothing new within ``block``: lets the caller check its deadline
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields
                    if "done" in fields:
                        return

    async def build_status(self, build: str) -> dict[str, Any] | None:
        """A build's state for ``GET /api/v1/packages/builds/{id}``."""
        entries = await self.redis.xrange(f"{self.p}:buildlog:{build}")
        if not entries:
            return None
        lines = [f["line"] for _, f in entries if "line" in f]
        last = entries[-1][1]
        status = last.get("done", "building")
        return {"id": build, "status": status, "message": last.get("message", ""), "log": lines}
