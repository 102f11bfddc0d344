"""How a Cellblock process reaches Redis: a ``redis://``, ``rediss://`` or ``unix://`` URL, or
``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` for a Redis that
Sentinel keeps available (redis-py's own Sentinel support: it asks the sentinels for the
current master whenever it connects, so after a failover each new connection finds the new
master; the processes wait out the failover as any outage, see cellblock/outage.py).

A Sentinel deployment has replicas, and a submission accepted by a master that dies before it
replicated would be lost with it: there, admission waits until a replica has it (``WAIT``,
``REPLICA_WAIT``; see ``Store.submit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from cellblock.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel://"
#: Connections one process may hold (Redis itself takes 10000 clients): every event stream and
#: WebSocket watch holds one through its blocking read.
MAX_CONNECTIONS = 1000
#: Replicas an admission waits for on Sentinel, and for how long (milliseconds).
REPLICAS = 1
REPLICA_WAIT_MS = 2000


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        rest = url.removeprefix(SENTINEL_SCHEME)
        netloc, _, path = rest.partition("/")
        password = None
        if "@" in netloc:
            auth, _, netloc = netloc.rpartition("@")
            password = unquote(auth.partition(":")[2]) or None
        sentinels = []
        for part in filter(None, netloc.split(",")):
            host, _, port = part.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"{url}: {part!r} is not HOST:PORT of a sentinel")
            sentinels.append((host.strip("[]"), int(port)))
        service, _, db = path.partition("/")
        if not sentinels or not service:
            raise ConfigError(f"{url}: give redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
        if db and not db.isdigit():
            raise ConfigError(f"{url}: the database {db!r} is not a number")
        return cls(sentinels, service, int(db or 0), password)


@dataclass(frozen=True)
class Reached:
    """A client of a Redis, the replicas an admission waits for there, and the clients of its
    sentinels (closed with it)."""

    redis: Any
    replicas: int = 0
    sentinels: tuple[Any, ...] = ()

    async def close(self) -> None:
        await self.redis.aclose()
        for sentinel in self.sentinels:
            await sentinel.aclose()


def connect(url: str) -> Reached:
    """The Redis at ``url``."""
    # No read timeout: blocking reads (XREAD BLOCK, XREADGROUP BLOCK) wait longer than
    # redis-py's default of 5 s, and each names its own bound.
    if url.startswith(SENTINEL_SCHEME):
        where = SentinelUrl.parse(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            where.sentinels, sentinel_kwargs={"socket_timeout": 2.0},
            socket_timeout=None, decode_responses=True, password=where.password, db=where.db,
        )  # fmt: skip
        master = sentinel.master_for(where.service, max_connections=MAX_CONNECTIONS)
        return Reached(master, REPLICAS, tuple(sentinel.sentinels))
    # A blocking pool, and a large one: redis-py's default pool (100) answers the next
    # request over it with MaxConnectionsError, a 500, where it should wait.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, decode_responses=True, socket_timeout=None, max_connections=MAX_CONNECTIONS
    )
    return Reached(aioredis.Redis.from_pool(pool))
