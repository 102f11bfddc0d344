"""The cache builder: real ``cellblock builder`` processes building with real nix-build, and
eviction against the real Nix store.

Deps stages here are the executor's real ``NixDependencies.provide``, run in this process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.builder import evict
from cellblock.cachebuilder.environments import (
    Channel,
    Environment,
    EnvironmentCache,
    environment_key,
)
from cellblock.executor.deps import NixDependencies
from cellblock.service.protocol import Event
from cellblock.service.store import Store

BROKEN_LINE = "broken-example: this package always fails to build (on purpose, for tests)"


async def deps(cache: EnvironmentCache, names: list[str], wall_time: float = 30) -> dict[str, Any]:
    """One deps stage; its result with the output events it emitted under ``events``."""
    events: list[Event] = []
    outcome = await NixDependencies(cache).provide(names, wall_time, events.append)
    return {**outcome.result.wire(), "events": [event.wire() for event in events]}


def logged_at(line: dict[str, Any]) -> float:
    """When a builder logged a line (its JSON log's UTC time, in epoch seconds)."""
    stamp = datetime.strptime(str(line["time"]), "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=UTC).timestamp()


def gcroot_holders(key: str) -> list[int]:
    """Processes whose command line names the GC root of ``key`` (a nix-build of it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(nix.GCROOTS / key).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# -- the builder process ------------------------------------------------------------------------


async def test_a_builder_registers_and_publishes_its_channel(
    start_builder, store: Store, cache: EnvironmentCache, channel: Channel
) -> None:
    builder = start_builder()
    await builder.started()
    assert await cache.channel() == channel
    [worker] = await store.workers()
    assert worker["id"] == builder.worker_id and worker["kind"] == "builder"
    assert worker["busy"] == 0 and worker["pid"] == builder.proc.pid


async def test_builders_starting_together_publish_one_channel_identity(
    start_builder, cache: EnvironmentCache, channel: Channel
) -> None:
    """Each runs the channel's setup.sh, which writes a temporary file into the directory that
    the others hash: they must not hash it."""
    builders = [start_builder(), start_builder()]
    for builder in builders:
        await builder.started()
    identities = [b.events("builder started")[0]["identity"] for b in builders]
    assert identities == [channel.identity] * 2
    assert await cache.channel() == channel


@pytest.mark.timeout(60)
async def test_a_builder_goes_on_building_after_failed_builds(
    start_builder, cache: EnvironmentCache, until
) -> None:
    builder = start_builder()
    await builder.started()
    unknown = await deps(cache, ["busybox", "nosuch"])
    assert unknown["status"] == "failed" and unknown["message"] == "unknown package(s): nosuch"
    broken = await deps(cache, ["broken-example"])
    assert broken["status"] == "failed" and BROKEN_LINE in broken["log"].splitlines()
    ok = await deps(cache, ["busybox"])
    assert ok["status"] == "ok" and ok["cache"] == "miss"
    assert builder.proc.poll() is None
    # (A builder logs a build's end just after telling its waiters.)
    ended = await until(
        lambda: len(builder.events("build ended")) == 3 and builder.events("build ended"),
        "the third build's end",
    )
    assert [e["ok"] for e in ended] == [False, False, True]
    assert ended[0]["outcome"] == "unknown package(s): nosuch"


async def test_a_build_the_binary_cache_refuses_fails_and_publishes_nothing(
    start_builder, cache: EnvironmentCache, channel: Channel, tmp_path: Path
) -> None:
    """Executors on other hosts can only use an environment the binary cache holds."""
    (tmp_path / "a-file").write_text("")
    builder = start_builder(CELLBLOCK_CACHE__BINARY_CACHE=f'"{tmp_path / "a-file" / "cache"}"')
    await builder.started()
    result = await deps(cache, ["busybox"], wall_time=15)
    assert result["status"] == "failed", result
    assert result["message"].startswith("cannot copy /nix/store/")
    assert "to the binary cache" in result["message"]
    assert await cache.get(environment_key(channel, ["busybox"])) is None
    assert await cache.packages() == []
    assert builder.proc.poll() is None  # and it goes on building


@pytest.mark.timeout(60)
async def test_a_killed_builders_build_is_reclaimed_and_finished_by_another(
    start_builder, cache: EnvironmentCache, channel: Channel, until
) -> None:
    builders = [start_builder(), start_builder()]
    for builder in builders:
        await builder.started()
    names = ["busybox", "slow-example"]
    key = environment_key(channel, names)
    waiting = asyncio.create_task(deps(cache, names))

    async def building() -> Any:
        return next((b for b in builders if b.events("build started")), None)

    first = await until(building, "a builder to start the build")
    [build] = first.events("build started")

    async def mid_build() -> bool:
        status = await cache.build_status(str(build["build"]))
        return status is not None and "slow-example: building for 2 s" in status["log"]

    await until(mid_build, "slow-example's builder to run", 10)
    assert gcroot_holders(key)
    first.stop(signal.SIGKILL)
    killed_at = time.time()
    [survivor] = [b for b in builders if b is not first]
    result = await asyncio.wait_for(waiting, 30)
    assert result["status"] == "ok" and result["cache"] == "miss", result
    assert sorted(p["name"] for p in result["packages"]) == names
    # The survivor took over once the lease (1.5 s since the last heartbeat, which comes
    # every 0.5 s) had run out, and no sooner; then it built the set whole.
    [started] = survivor.events("build started")
    assert started["build"] == build["build"] and started["key"] == key
    took_over = logged_at(started) - killed_at
    assert 1.0 - 0.01 <= took_over < 1.5 + 1.0 + 1.0, took_over  # + its queue poll, + slack
    # (It logs the end after telling the waiters.)
    [ended] = await until(lambda: survivor.events("build ended"), "the build's end")
    assert ended["ok"] is True and ended["seconds"] >= 2
    env = await cache.get(key)
    assert env is not None and all(os.path.exists(p) for p in env.closure)
    assert os.readlink(nix.GCROOTS / key) == env.store_path
    # The killed builder's nix-build died with it: nothing builds this key any more.
    assert gcroot_holders(key) == []
    assert result["log"].count("slow-example: building for 2 s") == 2  # once per attempt


@pytest.mark.timeout(60)
async def test_sigterm_drains_a_builder_after_its_running_build(
    start_builder, store: Store, cache: EnvironmentCache, until
) -> None:
    builder = start_builder()
    await builder.started()
    waiting = asyncio.create_task(deps(cache, ["slow-example"]))
    await until(lambda: builder.events("build started"), "the build to start")
    builder.proc.send_signal(signal.SIGTERM)
    result = await asyncio.wait_for(waiting, 30)
    assert result["status"] == "ok"
    assert await asyncio.to_thread(builder.proc.wait, 10) == 0
    assert [e["ok"] for e in builder.events("build ended")] == [True]
    assert builder.events("builder stopped") and await store.workers() == []


# -- eviction -----------------------------------------------------------------------------------


async def publish(cache: EnvironmentCache, channel: Channel, names: list[str]) -> Environment:
    """What a builder does with a build: nix-build, then publish."""
    env = await nix.build_environment(channel, environment_key(channel, names), names)
    await cache.put(env)
    return env


async def used_at(cache: EnvironmentCache, env: Environment, stamp: float) -> None:
    await cache.redis.zadd(f"{cache.p}:envs", {env.key: stamp})


@pytest.mark.timeout(60)
async def test_eviction_takes_the_least_recently_used_beyond_grace_until_within_budget(
    cache: EnvironmentCache, channel: Channel
) -> None:
    grace, now = 3600.0, time.time()
    # Only environments holding slow-example (new store paths at every build) are evicted.
    oldest = await publish(cache, channel, ["slow-example"])
    older = await publish(cache, channel, ["busybox", "slow-example"])
    recent = await publish(cache, channel, ["busybox"])
    await used_at(cache, oldest, now - 3 * grace)
    await used_at(cache, older, now - 2 * grace)
    await used_at(cache, recent, now - grace / 2)
    assert oldest.closure_sizes.keys().isdisjoint(older.closure_sizes.keys() - {
        p.store_path for p in recent.packages
    })  # fmt: skip
    busybox = next(p.store_path for p in recent.packages)
    [older_slow] = [p.store_path for p in older.packages if p.name == "slow-example"]

    # A budget that the two newer environments fit: only the oldest goes.
    budget = sum({**older.closure_sizes, **recent.closure_sizes}.values())
    evicted = await evict(cache, budget, grace)
    assert [e.key for e in evicted] == [oldest.key]
    assert await cache.get(oldest.key) is None
    assert not (nix.GCROOTS / oldest.key).is_symlink()
    assert not any(os.path.exists(p) for p in oldest.closure)
    assert [e.key for e, _ in await cache.environments()] == [older.key, recent.key]

    # Nothing fits a budget of zero, but the environment used within grace stays, and so do
    # the store paths it shares with the evicted one.
    evicted = await evict(cache, 0, grace)
    assert [e.key for e in evicted] == [older.key]
    assert not os.path.exists(older.store_path) and not os.path.exists(older_slow)
    assert os.path.exists(busybox) and (nix.GCROOTS / recent.key).is_symlink()
    assert await cache.get(recent.key) == recent
    assert [p["name"] for p in await cache.packages()] == ["busybox"]
    assert await evict(cache, 0, grace) == []


async def test_nothing_is_evicted_within_the_budget(
    cache: EnvironmentCache, channel: Channel
) -> None:
    env = await publish(cache, channel, ["busybox"])
    await used_at(cache, env, time.time() - 10 * 3600)
    assert await evict(cache, env.size, grace=0) == []
    assert await cache.get(env.key) == env and (nix.GCROOTS / env.key).is_symlink()
