"""Environment keys, records, the package index and build requests, in a real Redis.

Records come from real ``nix-build``s of the bundled offline channel, so every store path,
version and size below is one the Nix store really holds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import (
    BUILDS_GROUP,
    BuildOutcome,
    Channel,
    Environment,
    EnvironmentCache,
    environment_key,
)
from cellblock.service.store import Lease

NAMES = ["busybox", "gcc", "python3", "coreutils", "nodejs", "bash"]
FIXED = Channel(path="/channel", identity="0" * 52, system="x86_64-linux")


# -- keys ---------------------------------------------------------------------------------------


async def test_the_same_set_in_any_order_with_duplicates_has_one_key(channel: Channel) -> None:
    key = environment_key(channel, ["gcc", "busybox"])
    assert len(key) == 32 and int(key, 16) >= 0
    assert environment_key(channel, ["busybox", "gcc"]) == key
    assert environment_key(channel, ["busybox", "gcc", "gcc", "busybox"]) == key
    assert environment_key(channel, ("gcc", "busybox")) == key
    assert environment_key(channel, ["busybox"]) != key
    assert environment_key(channel, ["gcc", "busybox", "python3"]) != key


@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=12), st.randoms())
def test_keys_ignore_order_and_repetition(names: list[str], rnd: object) -> None:
    shuffled = list(names)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert environment_key(FIXED, names + shuffled) == environment_key(FIXED, sorted(set(names)))


async def test_another_channel_identity_or_system_gives_another_key(
    channel: Channel, tmp_path: Path
) -> None:
    names = ["busybox", "gcc"]
    key = environment_key(channel, names)
    # The identity is the hash of the channel's content, not of its path: a copy has the same.
    copy = tmp_path / "channel"
    shutil.copytree(nix.BUNDLED_CHANNEL, copy, ignore=shutil.ignore_patterns(".versions.json.*"))
    same = await nix.channel_info(str(copy))
    assert same.identity == channel.identity and same.path != channel.path
    assert environment_key(same, names) == key
    # Another host's tool versions (setup.sh's versions.json) make another channel.
    versions = json.loads((copy / "versions.json").read_text())
    versions["versions"]["gcc"] = "99.1.0"
    (copy / "versions.json").write_text(json.dumps(versions))
    other = await nix.channel_info(str(copy))
    assert other.identity != channel.identity
    assert environment_key(other, names) != key
    foreign = Channel(channel.path, channel.identity, "aarch64-linux")
    assert foreign.system != channel.system
    assert environment_key(foreign, names) != key


async def test_channel_info_reads_the_real_identity_and_system(channel: Channel) -> None:
    assert channel.path == str(nix.BUNDLED_CHANNEL)
    assert len(channel.identity) == 52  # sha256 in Nix's base32
    status, out, _ = await nix.run(["nix-hash", "--type", "sha256", "--base32", channel.path])
    assert status == 0 and out.strip() == channel.identity
    status, out, _ = await nix.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem"]
    )
    assert status == 0 and json.loads(out) == channel.system


async def test_a_path_without_default_nix_is_not_a_channel(tmp_path: Path) -> None:
    with pytest.raises(nix.NixError, match="not a Nix channel"):
        await nix.channel_info(str(tmp_path))
    with pytest.raises(nix.NixError, match="not a Nix channel"):
        await nix.prepare_channel(str(tmp_path), bundled=False)
    with pytest.raises(nix.NixError, match="not a Nix channel"):
        await nix.prepare_channel(str(tmp_path / "nothing"), bundled=False)


async def test_preparing_the_bundled_channel_concurrently_gives_one_identity(
    channel: Channel,
) -> None:
    prepared = await asyncio.gather(
        *(nix.prepare_channel(channel.path, bundled=True) for _ in range(4))
    )
    assert prepared == [channel] * 4


# -- records and the package index --------------------------------------------------------------


async def built(channel: Channel, names: list[str]) -> Environment:
    return await nix.build_environment(channel, environment_key(channel, names), names)


async def test_a_published_environment_reads_back_equal(
    channel: Channel, cache: EnvironmentCache
) -> None:
    env = await built(channel, ["busybox", "gcc"])
    assert await cache.get(env.key) is None
    await cache.put(env)
    again = await cache.get(env.key)
    assert again == env
    assert again is not None and again.size == sum(env.closure_sizes.values()) > 0
    assert [e.key for e, _ in await cache.environments()] == [env.key]


async def test_the_index_lists_packages_with_sizes_and_counts_uses(
    channel: Channel, cache: EnvironmentCache
) -> None:
    env = await built(channel, ["busybox", "gcc"])
    await cache.put(env)
    index = {p["name"]: p for p in await cache.packages()}
    assert set(index) == {"busybox", "gcc"}
    busybox = next(p for p in env.packages if p.name == "busybox")
    entry = index["busybox"]
    assert entry["version"] == busybox.version and entry["store_path"] == busybox.store_path
    assert entry["size"] == env.closure_sizes[busybox.store_path] > 0
    assert entry["uses"] == 0 and entry["last_used"] is None and entry["cached_at"]
    await cache.touch(env)
    await cache.touch(env)
    entry = {p["name"]: p for p in await cache.packages()}["busybox"]
    assert entry["uses"] == 2 and entry["last_used"] is not None
    # A rebuild of the same packages keeps when they were first cached, and their uses.
    await cache.put(env)
    again = {p["name"]: p for p in await cache.packages()}["busybox"]
    assert again["cached_at"] == index["busybox"]["cached_at"] and again["uses"] == 2


async def test_concurrent_uses_are_all_counted(channel: Channel, cache: EnvironmentCache) -> None:
    env = await built(channel, ["busybox"])
    await cache.put(env)
    await asyncio.gather(*(cache.touch(env) for _ in range(50)))
    [entry] = await cache.packages()
    assert entry["uses"] == 50


async def test_forget_keeps_index_entries_another_environment_needs(
    channel: Channel, cache: EnvironmentCache
) -> None:
    both = await built(channel, ["busybox", "gcc"])
    alone = await built(channel, ["busybox"])
    await cache.put(both)
    await cache.put(alone)
    await cache.forget(both)
    assert await cache.get(both.key) is None and await cache.get(alone.key) == alone
    assert [p["name"] for p in await cache.packages()] == ["busybox"]
    await cache.forget(alone)
    assert await cache.packages() == [] and await cache.environments() == []


async def test_environments_come_least_recently_used_first(
    channel: Channel, cache: EnvironmentCache
) -> None:
    first = await built(channel, ["busybox"])
    second = await built(channel, ["gcc"])
    await cache.put(first)
    await cache.put(second)
    await cache.touch(first)
    listed = await cache.environments()
    assert [e.key for e, _ in listed] == [second.key, first.key]
    assert listed[0][1] <= listed[1][1] <= time.time()


# -- build requests -----------------------------------------------------------------------------


async def test_concurrent_requests_for_one_key_share_one_build(
    channel: Channel, cache: EnvironmentCache
) -> None:
    names = ["busybox", "slow-example"]
    key = environment_key(channel, names)
    builds = await asyncio.gather(
        *(cache.request_build(key, list(reversed(names)) if i % 2 else names, ttl=60)
          for i in range(20))
    )  # fmt: skip
    assert len(set(builds)) == 1
    entries = await cache.redis.xrange(cache.builds_key)
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields == {"key": key, "names": json.dumps(sorted(names)), "build": builds[0]}
    # Another set is another build.
    other = await cache.request_build(environment_key(channel, ["busybox"]), ["busybox"], ttl=60)
    assert other != builds[0]


async def test_a_finished_build_releases_its_key_and_tells_its_waiters(
    channel: Channel, cache: EnvironmentCache
) -> None:
    await cache.builds.ensure_group()
    await cache.builds.ensure_group()  # idempotent
    names = ["busybox"]
    key = environment_key(channel, names)
    build = await cache.request_build(key, names, ttl=60)
    job = await cache.builds.take("builder-x", block=1)
    assert job is not None and job.fields["build"] == build
    follower = asyncio.create_task(_collect(cache, build))
    await cache.log_line(build, "these 1 derivations will be built:")
    env = await built(channel, names)
    await cache.build_done(job, key, build, BuildOutcome(ok=True, environment=env))
    entries = await asyncio.wait_for(follower, 10)
    assert entries[0] == {"line": "queued: busybox"}
    assert entries[1] == {"line": "these 1 derivations will be built:"}
    assert entries[-1] == {"done": "ok", "message": ""}
    status = await cache.build_status(build)
    assert status == {"id": build, "status": "ok", "message": "",
                      "log": ["queued: busybox", "these 1 derivations will be built:"]}  # fmt: skip
    # The key is free and the job gone: the next request is a new build.
    assert await cache.redis.xlen(cache.builds_key) == 0
    assert (await cache.redis.xpending(cache.builds_key, BUILDS_GROUP))["pending"] == 0
    assert await cache.request_build(key, names, ttl=60) != build
    assert await cache.build_status("0123456789abcdef") is None


async def test_a_late_finisher_does_not_release_a_newer_build(
    channel: Channel, cache: EnvironmentCache
) -> None:
    await cache.builds.ensure_group()
    key = environment_key(channel, ["busybox"])
    old = await cache.request_build(key, ["busybox"], ttl=0.2)
    job = await cache.builds.take("builder-x", block=1)
    assert job is not None
    await asyncio.sleep(0.3)  # the old build's claim on the key lapsed
    new = await cache.request_build(key, ["busybox"], ttl=60)
    assert new != old
    await cache.build_done(job, key, old, BuildOutcome(ok=False, message="lost"))
    assert await cache.redis.get(f"{cache.p}:building:{key}") == new
    assert await cache.request_build(key, ["busybox"], ttl=60) == new


async def test_an_abandoned_build_is_reclaimed_after_the_lease(cache: EnvironmentCache) -> None:
    await cache.builds.ensure_group()
    build = await cache.request_build("k" * 32, ["busybox"], ttl=60)
    job = await cache.builds.take("builder-a", block=1)
    assert job is not None and job.deliveries == 1
    assert await cache.builds.reclaim("builder-b", lease=0.3) is None  # still fresh
    await asyncio.sleep(0.2)
    await cache.builds.heartbeat("builder-a", job)  # builder-a is alive: renews its lease
    await asyncio.sleep(0.2)
    assert await cache.builds.reclaim("builder-b", lease=0.3) is None
    await asyncio.sleep(0.4)  # builder-a went quiet
    again = await cache.builds.reclaim("builder-b", lease=0.3)
    assert isinstance(again, Lease) and again.entry == job.entry and again.deliveries == 2
    assert again.fields["build"] == build


async def _collect(cache: EnvironmentCache, build: str) -> list[dict[str, str]]:
    return [entry async for entry in cache.follow(build, block=0.1) if entry]
