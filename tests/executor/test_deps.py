"""The deps stage, for real: ``NixDependencies`` against real ``cellblock builder`` processes,
and whole submissions through the real service, executors (nsjail) and builders.

Nothing is faked: builds are real nix-builds of the bundled offline channel. The one
instrument is ``popen_spy``, which records the processes this test process starts (and starts
them for real), to show that a cache hit runs no Nix at all.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import Channel, EnvironmentCache, environment_key
from cellblock.executor.deps import NixDependencies
from cellblock.service.protocol import Event, OutputEvent
from cellblock.service.store import Store

ALICE = "alice-token"
BROKEN_LINE = "broken-example: this package always fails to build (on purpose, for tests)"
HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from gcc"); return 0; }\n'


async def provide(
    cache: EnvironmentCache, names: list[str], wall_time: float = 30
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One real deps stage: its result and the events it emitted, as their JSON."""
    events: list[Event] = []
    outcome = await NixDependencies(cache).provide(names, wall_time, events.append)
    assert (outcome.environment is None) == (outcome.result.status != "ok")
    return outcome.result.wire(), [event.wire() for event in events]


def relayed(events: list[dict[str, Any]]) -> list[str]:
    """The lines a deps stage relayed as output events (all of them deps, stderr)."""
    assert all(e["type"] == "output" and e["stage"] == "deps" for e in events)
    assert all(e["stream"] == "stderr" and e["data"].endswith("\n") for e in events)
    return [e["data"].removesuffix("\n") for e in events]


def host_versions() -> dict[str, str]:
    versions: dict[str, str] = json.loads((nix.BUNDLED_CHANNEL / "versions.json").read_text())[
        "versions"
    ]
    return versions


# -- the deps stage in this process -------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_miss_builds_and_relays_the_log_then_a_hit_runs_no_nix(
    start_builder, store: Store, popen_spy
) -> None:
    builder = start_builder()
    await builder.started()
    cache = EnvironmentCache(store)
    names = ["slow-example", "busybox"]

    miss, events = await provide(cache, names)
    assert miss["status"] == "ok" and miss["cache"] == "miss", miss
    packages = {p["name"]: p for p in miss["packages"]}
    assert set(packages) == {"busybox", "slow-example"}
    busybox = packages["busybox"]
    banner = subprocess.run(
        [f"{busybox['store_path']}/bin/busybox"], capture_output=True, text=True
    )
    assert banner.stdout.startswith(f"BusyBox v{busybox['version']} ")
    assert busybox["version"] == host_versions()["busybox"] == "1.35.0"
    assert busybox["store_path"].startswith("/nix/store/")
    assert busybox["store_path"].endswith("-busybox-1.35.0")
    assert packages["slow-example"]["version"] == "1.0"
    # The builder's nix-build output reached the stage live, as output events, and its log.
    lines = relayed(events)
    assert lines[0].startswith("building busybox, slow-example (build ")
    assert "slow-example: building for 2 s" in lines
    assert any(line.startswith("building '/nix/store/") for line in lines)
    assert miss["log"].splitlines() == lines
    assert miss["wall_time"] >= 2
    assert popen_spy.nix() == []  # the executor itself never runs Nix: the builder does

    spawned, started = len(popen_spy.argvs), time.monotonic()
    hit, events = await provide(cache, [*reversed(names), "busybox"])
    elapsed = time.monotonic() - started
    assert hit["status"] == "ok" and hit["cache"] == "hit", hit
    assert hit["packages"] == miss["packages"] and hit["log"] == "" and events == []
    assert popen_spy.argvs[spawned:] == []  # no process at all on a hit, Nix or other
    assert len(builder.events("build started")) == 1  # and no build
    assert elapsed < 0.5 and hit["wall_time"] < 0.5


async def test_an_unknown_package_fails_the_stage_naming_it(
    start_builder, store: Store, popen_spy
) -> None:
    builder = start_builder()
    await builder.started()
    result, events = await provide(EnvironmentCache(store), ["busybox", "nosuch", "gcc"])
    assert result["status"] == "failed" and result["cache"] == "miss"
    assert result["packages"] == []
    assert result["message"] == "unknown package(s): nosuch"
    assert result["log"].splitlines()[-1] == "unknown package(s): nosuch"
    assert any("cellblock-env: unknown package attribute(s): nosuch" in x for x in relayed(events))
    assert popen_spy.nix() == []


async def test_a_broken_package_fails_the_stage_with_its_build_log(
    start_builder, store: Store
) -> None:
    builder = start_builder()
    await builder.started()
    result, events = await provide(EnvironmentCache(store), ["busybox", "broken-example"])
    assert result["status"] == "failed" and result["cache"] == "miss"
    assert result["message"] == (
        "the build of broken-example-1.0 (exit code 1) failed; its output is in the log"
    )
    assert BROKEN_LINE in result["log"].splitlines()
    assert BROKEN_LINE in relayed(events)
    # A failed build is not cached: asking again builds again (and fails again).
    again, _ = await provide(EnvironmentCache(store), ["broken-example", "busybox"])
    assert again["status"] == "failed" and again["cache"] == "miss"
    assert len(builder.events("build started")) == 2


async def test_a_newly_published_channel_is_used_by_the_very_next_stage(store: Store) -> None:
    """An executor remembers the channel between stages, but never uses a stale one."""
    cache = EnvironmentCache(store)
    channel = await nix.prepare_channel(str(nix.BUNDLED_CHANNEL), bundled=True)
    await cache.publish_channel(channel)
    env = await nix.build_environment(channel, environment_key(channel, ["busybox"]), ["busybox"])
    await cache.put(env)
    deps = NixDependencies(cache)
    for _ in range(2):
        outcome = await deps.provide(["busybox"], 5, lambda e: None)
        assert outcome.result.cache == "hit"
    # A builder with another channel (say, after apt-get upgrade) publishes it.
    upgraded = Channel(channel.path, "1" * 52, channel.system)
    await cache.publish_channel(upgraded)
    outcome = await deps.provide(["busybox"], 0.5, lambda e: None)
    assert outcome.result.status == "time_limit" and outcome.result.cache == "miss"
    [(_, fields)] = await cache.redis.xrange(cache.builds_key)
    assert fields["key"] == environment_key(upgraded, ["busybox"]) != env.key


async def test_without_a_builder_the_stage_ends_at_its_wall_time(store: Store) -> None:
    started = time.monotonic()
    result, events = await provide(EnvironmentCache(store), ["busybox"], wall_time=0.6)
    assert 0.6 <= time.monotonic() - started < 2
    assert result["status"] == "time_limit" and result["packages"] == []
    assert result["message"] == "dependencies not ready within the deps wall time of 0.6 s"
    assert relayed(events) == ["waiting for a cache builder to start"]


# -- whole submissions: service, executor (nsjail), builders ---------------------------------------


class Client:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = AsyncHTTPClient(force_instance=True)

    async def run(self, request: dict[str, Any], timeout: float = 45) -> dict[str, Any]:
        """Submit and wait: the finished submission."""
        response = await self.http.fetch(
            f"{self.url}/api/v1/submissions?wait=true&timeout={timeout}",
            method="POST",
            body=json.dumps(request),
            headers={"Authorization": f"Bearer {ALICE}"},
            request_timeout=timeout + 10,
        )
        state: dict[str, Any] = json.loads(response.body)
        assert state["status"] == "finished", state
        return state


@pytest.fixture
async def client(service: Any) -> Any:
    client = Client(service.url)
    yield client
    client.http.close()


def stages(state: dict[str, Any]) -> dict[str, str]:
    return {name: result["status"] for name, result in state["stages"].items() if result}


@pytest.mark.timeout(90)
async def test_a_c_program_compiles_and_runs_with_gcc_from_the_cache(
    start_builder, start_executor, client: Client, store: Store
) -> None:
    await start_builder().started()
    start_executor(slots=1)
    state = await client.run({
        "files": [{"name": "main.c", "content": HELLO_C}],
        "dependencies": ["gcc"],
        "compile": "gcc -O2 -o main main.c && command -v gcc",
        "run": './main; printf "%s\\n" "$PATH"',
    })  # fmt: skip
    assert stages(state) == {"deps": "ok", "compile": "ok", "run": "ok"}, state
    deps = state["stages"]["deps"]
    [gcc] = deps["packages"]
    assert gcc["name"] == "gcc" and gcc["version"] == host_versions()["gcc"]
    assert deps["cache"] == "miss" and state["dependencies_installed"] is True
    assert state["stages"]["compile"]["stdout"] == f"{gcc['store_path']}/bin/gcc\n"
    hello, path = state["stages"]["run"]["stdout"].splitlines()
    assert hello == "hello from gcc"
    assert path.split(":")[0] == f"{gcc['store_path']}/bin"
    events = await store.events(state["id"])
    deps_lines = [e.data for e in events if isinstance(e, OutputEvent) and e.stage == "deps"]
    assert deps_lines and deps_lines[0].startswith("building gcc (build ")
    # The same set again: a hit.
    again = await client.run({"files": [{"name": "main.c", "content": HELLO_C}],
                              "dependencies": ["gcc"], "compile": "gcc -o main main.c",
                              "run": "./main"})  # fmt: skip
    assert again["stages"]["deps"]["cache"] == "hit"
    assert again["stages"]["run"]["stdout"] == "hello from gcc\n"


@pytest.mark.timeout(90)
async def test_a_pure_sandbox_sees_only_the_closure(
    start_builder, start_executor, client: Client, store: Store, channel_key: Any
) -> None:
    start_builder()
    start_executor(slots=1, CELLBLOCK_SANDBOX__BASE="pure")
    state = await client.run({
        "dependencies": ["busybox"],
        "run": "ls -a /; echo ---; ls /nix; echo ---; ls /nix/store; echo ---; "
               "ls /usr/bin 2>&1; echo ---; echo \"$PATH\"",
    })  # fmt: skip
    assert stages(state) == {"deps": "ok", "run": "ok"}, state
    root, nix_dir, store_dir, usr, path = state["stages"]["run"]["stdout"].split("---\n")
    assert sorted(root.split()) == sorted(
        [".", "..", ".cellblock", "box", "dev", "etc", "nix", "proc", "tmp"]
    )
    assert nix_dir.split() == ["store"]
    env = await EnvironmentCache(store).get(await channel_key(["busybox"]))
    assert env is not None
    assert sorted(store_dir.split()) == sorted(p.removeprefix("/nix/store/") for p in env.closure)
    assert "No such file or directory" in usr
    [busybox] = state["stages"]["deps"]["packages"]
    assert path == f"{busybox['store_path']}/bin\n"  # no host directory in a pure PATH


@pytest.fixture
def channel_key(store: Store) -> Any:
    async def key(names: list[str]) -> str:
        channel = await EnvironmentCache(store).channel()
        assert channel is not None
        return environment_key(channel, names)

    return key


@pytest.mark.timeout(90)
async def test_two_clients_asking_for_one_new_set_at_once_share_one_build(
    start_builder, start_executor, client: Client
) -> None:
    builders = [start_builder(), start_builder()]
    for builder in builders:
        await builder.started()
    start_executor(slots=2)
    request = {
        "dependencies": ["slow-example", "coreutils"],
        "run": "ls /nix/store >/dev/null && command -v ls",
    }
    first, second = await asyncio.gather(
        client.run(request), client.run({**request, "dependencies": ["coreutils", "slow-example"]})
    )
    for state in (first, second):
        assert stages(state) == {"deps": "ok", "run": "ok"}, state
        assert state["stages"]["deps"]["cache"] == "miss"
    # One build: both have the very same slow-example (a second build would be a new path).
    assert first["stages"]["deps"]["packages"] == second["stages"]["deps"]["packages"]
    coreutils = first["stages"]["deps"]["packages"][0]
    assert first["stages"]["run"]["stdout"] == f"{coreutils['store_path']}/bin/ls\n"
    assert sum(len(b.events("build started")) for b in builders) == 1
