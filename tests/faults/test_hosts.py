"""Cellblock on several machines, simulated on this one (hostio.Host): this process is the first
host, with Redis and the service; hosts ``b`` and ``c`` each have their own network, pid and
mount namespaces and their own Nix store, and reach the first host over their veth only.

A closure built on one host is fetched by the other from the service's binary cache and never
built twice; losing a whole host under load loses no submission."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hostio import Host
from loadio import all_ended, check_each_finished_once, submit_load
from redisio import RedisServer
from restio import Rest
from serviceio import TEST_ENV, Service, serving

from cellblock.config import DEFAULTS
from cellblock.executor import cgroups

pytestmark = pytest.mark.timeout(300)

SUBMISSIONS = 50
UID_BASE = int(DEFAULTS["sandbox"]["uid_base"])


@dataclass
class HostProcess:
    """A ``cellblock executor`` or ``cellblock builder`` running on a simulated host."""

    worker_id: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in self.logs().splitlines()
            if line.startswith("{") and f'"event": "{name}"' in line
        ]  # fmt: skip


@dataclass
class Cluster:
    service: Service
    redis: RedisServer
    binary_cache: Path
    logs: Path
    started: int = 0
    #: The sandbox uids of the executors started: a host lost mid-stage leaves their cgroups.
    uids: list[int] = field(default_factory=list)

    def start(self, host: Host, kind: str) -> HostProcess:
        """A worker on ``host`` that knows the first host only by its address on the link."""
        self.started += 1
        worker_id = f"{kind}-{host.name}-{self.started}"
        state = self.logs / worker_id
        state.mkdir()
        port = self.service.url.rsplit(":", 1)[1]
        env = {
            **os.environ, **TEST_ENV,
            "CELLBLOCK_SANDBOX__ROOT": f'"{host.sandbox_root}"',
            "CELLBLOCK_CACHE__BINARY_CACHE": f'"{self.binary_cache}"',
            "CELLBLOCK_CACHE__SUBSTITUTER": f'"http://{host.gateway}:{port}/nix-cache"',
            "CELLBLOCK_CACHE__SUBSTITUTER_TOKEN": '"alice-token"',
        }  # fmt: skip
        argv = [sys.executable, "-m", "cellblock", kind, "--redis",
                self.redis.url_at(host.gateway), "--state-dir", str(state), "--id", worker_id,
                "--log-level", "info"]  # fmt: skip
        if kind == "executor":
            # Distinct uids: these "hosts" share one kernel, and a uid is a kernel's.
            offset = 100 + 10 * self.started
            argv += ["--slots", "2", "--uid-offset", str(offset)]
            self.uids += [UID_BASE + offset + slot for slot in range(2)]
        log = self.logs / f"{worker_id}.log"
        host.spawn(argv, env, log)
        return HostProcess(worker_id, log)

    async def registered(self, rest: Rest, *workers: HostProcess) -> bool:
        listed = await rest.call("GET", "/api/v1/workers", token="admin-token")
        ids = {w["id"] for w in listed["workers"]}
        return all(w.worker_id in ids for w in workers)


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    made = {name: Host(name, index) for index, name in enumerate("bc", start=1)}
    try:
        for host in made.values():
            host.start()
        yield made
    finally:
        for host in made.values():
            host.remove()


@pytest.fixture
def redis_server(tmp_path: Path, hosts: dict[str, Host]) -> Iterator[RedisServer]:
    """The first host's Redis, also on its end of each host's link."""
    server = RedisServer(tmp_path, addresses=[h.gateway for h in hosts.values()])
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def cluster(
    redis_server: RedisServer, hosts: dict[str, Host], tmp_path: Path, sandbox_root: Path
) -> AsyncIterator[Cluster]:
    cache, state, logs = tmp_path / "binary-cache", tmp_path / "service", tmp_path / "workers"
    state.mkdir()
    logs.mkdir()
    gateways = [h.gateway for h in hosts.values()]
    async with serving(
        redis_server.url, state, sandbox_root, addresses=gateways,
        CELLBLOCK_CACHE__BINARY_CACHE=f'"{cache}"',
    ) as service:  # fmt: skip
        cluster = Cluster(service, redis_server, cache, logs)
        yield cluster
    for host in hosts.values():
        host.lose()
    cgroups.detect().remove_stale(cluster.uids)


@pytest.fixture
def rest(cluster: Cluster) -> Iterator[Rest]:
    client = Rest(cluster.service.url)
    yield client
    client.close()


def built_closure(host: Host) -> list[str]:
    """The closure of the one environment ``host``'s builder built (its GC root)."""
    [root] = (host.nix / "var/nix/gcroots/cellblock").iterdir()
    closure = host.nix / Path(os.readlink(root)).relative_to("/nix") / "closure.json"
    return list(json.loads(closure.read_text()))


async def test_a_closure_built_on_one_host_is_fetched_by_another_and_never_built_twice(
    cluster: Cluster, hosts: dict[str, Host], rest: Rest, until: Any
) -> None:
    b, c = hosts["b"], hosts["c"]
    builder = cluster.start(b, "builder")
    executors = [cluster.start(b, "executor"), cluster.start(c, "executor")]
    await until(lambda: cluster.registered(rest, builder, *executors), "the workers",
                timeout=60)  # fmt: skip
    ids = await submit_load(rest, SUBMISSIONS, "busybox sleep 0.2", ["busybox"])
    await until(lambda: all_ended(rest, ids), "every submission to end", timeout=180)
    documents = await check_each_finished_once(rest, cluster.service.ws_url, ids)
    assert {d["worker"] for d in documents} == {e.worker_id for e in executors}

    # One build, on b; c has the closure without having built any of it.
    assert len(builder.events("build started")) == 1
    closure = built_closure(b)
    assert b.build_logs() and all(b.has(p) for p in closure)
    assert c.build_logs() == [] and all(c.has(p) for p in closure)
    fetched = [d for d in documents if "fetching" in d["stages"]["deps"]["log"]]
    assert fetched and {d["worker"] for d in fetched} == {executors[1].worker_id}
    assert all(f"from http://{c.gateway}:" in d["stages"]["deps"]["log"] for d in fetched)

    # c's own builder, started now, finds it built: the second round builds nothing.
    other = cluster.start(c, "builder")
    await until(lambda: cluster.registered(rest, other), "c's builder", timeout=60)
    more = await submit_load(rest, 10, "busybox true", ["busybox"])
    await until(lambda: all_ended(rest, more), "the second round to end", timeout=120)
    await check_each_finished_once(rest, cluster.service.ws_url, more)
    assert len(builder.events("build started")) == 1 and not other.events("build started")
    assert c.build_logs() == []


async def test_losing_a_whole_host_under_load_loses_nothing(
    cluster: Cluster, hosts: dict[str, Host], rest: Rest, until: Any
) -> None:
    b, c = hosts["b"], hosts["c"]
    workers = [cluster.start(h, kind) for h in (b, c) for kind in ("builder", "executor")]
    await until(lambda: cluster.registered(rest, *workers), "the workers", timeout=60)
    plain = await submit_load(rest, SUBMISSIONS - 10, "sleep 0.3")
    with_deps = await submit_load(rest, 10, "busybox sleep 0.3", ["busybox"])
    await until(lambda: workers[1].events("job started"), "b to hold jobs", timeout=60)
    b.lose()
    assert b.pids() == [] and not b.alive
    ids = plain + with_deps
    await until(lambda: all_ended(rest, ids), "every submission to end", timeout=240)
    documents = await check_each_finished_once(rest, cluster.service.ws_url, plain)
    documents += await check_each_finished_once(rest, cluster.service.ws_url, with_deps)
    # b's jobs were taken from it and run again on c, which ran every submission's end.
    assert any(d["attempts"] > 1 for d in documents)
    assert {d["worker"] for d in documents} == {workers[3].worker_id}
