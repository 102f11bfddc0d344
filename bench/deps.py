"""What a dependency stage costs: a cache hit, ``nix-shell -p``, and a cold build.

Measured in one run, against the real Nix store and the bundled offline channel
(``cachebuilder/channel``), every Nix command with ``NIX_CONFIG='substituters ='``:

``hit``
    ``await NixDependencies.provide(["busybox"], ...)``: the executor's deps stage on a cache
    hit, timed around the call, against a real redis-server (a private one on a unix socket)
    holding a prebuilt environment (built with ``nix.build_environment`` and published with
    ``EnvironmentCache.put``, as a builder does). A hit reads the channel and the record,
    ``stat``s every closure path and records the use; it runs no Nix process (checked: the
    bench counts the processes it starts during the hits, and there must be none).
``nix-shell``
    ``nix-shell -I nixpkgs=<channel> -p busybox --run true``, warm (its shell derivation is
    built by a first, untimed run): what getting the same package costs without the cache.
    This channel is tiny; with nixpkgs the evaluation alone takes seconds.
``cold``
    ``nix.build_environment`` of a package set whose environment is not in the store: the set
    of every package the channel has, its GC root removed and its store paths deleted first
    (``nix.delete``: Nix keeps any path another root still needs), so the env derivation, and
    every package no other environment roots, is built again. One ``nix-build`` plus the size
    query: what a builder spends on a miss before publishing.

Prints median and p95 (ms) of each, the ratio nix-shell / hit, and PASS or MISS against the
targets: a hit under 5 ms (median) and at least 100 times faster than nix-shell. Needs root
(the single-user Nix store) and redis-server.

    cd /work/main && .venv/bin/python bench/deps.py --hits 300 --shells 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import Channel, EnvironmentCache, environment_key
from cellblock.executor.deps import NixDependencies
from cellblock.service.store import Store

TARGET_HIT_MS = 5.0
TARGET_RATIO = 100.0
HIT_NAMES = ["busybox"]


def stats(samples: Sequence[float]) -> tuple[float, float]:
    """(median, p95) in ms."""
    ms = [s * 1000 for s in samples]
    return statistics.median(ms), statistics.quantiles(ms, n=20, method="inclusive")[18]


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a unix socket (its URL), ready for clients; gone afterwards."""
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed")
    folder = Path(tempfile.mkdtemp(prefix="cellblock-bench-redis-"))
    sock = folder / "redis.sock"
    proc = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(sock), "--dir", str(folder),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-s", str(sock), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("redis-server did not start")
            time.sleep(0.02)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


class SpawnCounter:
    """Counts the processes this process starts (``subprocess`` and asyncio both go through
    ``subprocess.Popen``), letting them start for real."""

    def __init__(self) -> None:
        self.count = 0
        self._real = subprocess.Popen

    def __enter__(self) -> SpawnCounter:
        counter, real = self, self._real

        class Counting(real):  # type: ignore[valid-type,misc]
            def __init__(self, *args: object, **kwargs: object) -> None:
                counter.count += 1
                super().__init__(*args, **kwargs)

        subprocess.Popen = Counting  # type: ignore[misc]
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.Popen = self._real  # type: ignore[misc]


async def bench_hits(redis_url: str, channel: Channel, runs: int) -> tuple[list[float], int]:
    store = Store.connect(redis_url)
    try:
        cache = EnvironmentCache(store)
        await cache.publish_channel(channel)
        env = await nix.build_environment(channel, environment_key(channel, HIT_NAMES), HIT_NAMES)
        await cache.put(env)
        deps = NixDependencies(cache)

        def emit(event: object) -> None:
            raise AssertionError(f"a hit emitted {event}")

        for _ in range(20):  # warm-up: connections, caches
            await deps.provide(HIT_NAMES, 10, emit)
        samples = []
        with SpawnCounter() as spawned:
            for _ in range(runs):
                started = time.perf_counter()
                outcome = await deps.provide(HIT_NAMES, 10, emit)
                samples.append(time.perf_counter() - started)
                assert outcome.result["cache"] == "hit", outcome.result
        return samples, spawned.count
    finally:
        await store.close()


def bench_nix_shell(channel: Channel, runs: int) -> list[float]:
    env = nix.nix_environment()
    env.pop("NIX_BUILD_SHELL", None)
    argv = ["nix-shell", "-I", f"nixpkgs={channel.path}", "-p", "busybox", "--run", "true"]

    def once() -> float:
        started = time.perf_counter()
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"nix-shell failed: {result.stderr.decode(errors='replace')}")
        return elapsed

    once()  # warm: builds the shell derivation once
    return [once() for _ in range(runs)]


async def bench_cold(channel: Channel, runs: int) -> tuple[list[float], list[str], int, int]:
    versions = json.loads(Path(channel.path, "versions.json").read_text())["versions"]
    names = sorted({*versions, "busybox"})
    key = environment_key(channel, names)
    samples, deleted, closure = [], 0, 0
    for _ in range(runs):
        env = await nix.build_environment(channel, key, names)  # so there is one to delete
        await nix.delete(env)
        deleted, closure = sum(not os.path.exists(p) for p in env.closure), len(env.closure)
        started = time.perf_counter()
        await nix.build_environment(channel, key, names)
        samples.append(time.perf_counter() - started)
    return samples, names, deleted, closure


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hits", type=int, default=300, help="deps stages on a hit (>= 200)")
    parser.add_argument("--shells", type=int, default=20, help="nix-shell runs (>= 20)")
    parser.add_argument("--cold", type=int, default=3, help="cold builds")
    args = parser.parse_args()
    if args.hits < 200 or args.shells < 20 or args.cold < 1:
        parser.error("--hits must be at least 200, --shells at least 20, --cold at least 1")
    if os.geteuid() != 0:
        sys.exit("run as root: the single-user Nix store belongs to root")

    channel = await nix.prepare_channel(str(nix.BUNDLED_CHANNEL), bundled=True)
    nix_version = subprocess.run(["nix-build", "--version"], capture_output=True, text=True)
    print(
        f"deps bench: {platform.node()}, Python {platform.python_version()}, "
        f"{nix_version.stdout.strip()}, channel {channel.path} ({channel.identity[:12]}…)"
    )

    with redis_server() as redis_url:
        hits, spawned = await bench_hits(redis_url, channel, args.hits)
    shells = bench_nix_shell(channel, args.shells)
    cold, cold_names, deleted, closure = await bench_cold(channel, args.cold)

    hit_median, hit_p95 = stats(hits)
    shell_median, shell_p95 = stats(shells)
    ratio = shell_median / hit_median
    print(f"hit        median {hit_median:8.3f} ms   p95 {hit_p95:8.3f} ms   "
          f"({len(hits)} calls of NixDependencies.provide({HIT_NAMES}); "
          f"processes started: {spawned})")  # fmt: skip
    print(f"nix-shell  median {shell_median:8.3f} ms   p95 {shell_p95:8.3f} ms   "
          f"({len(shells)} runs of nix-shell -p busybox --run true, warm)")  # fmt: skip
    print(f"ratio      nix-shell / hit = {ratio:.0f}x (medians)")
    cold_ms = [s * 1000 for s in cold]
    print(f"cold       median {statistics.median(cold_ms):8.3f} ms   "
          f"runs {', '.join(f'{ms:.0f}' for ms in cold_ms)} ms   (nix.build_environment of "
          f"{cold_names} after deleting {deleted} of its closure's {closure} paths; other "
          f"environments' roots kept the rest)")  # fmt: skip

    checks = [
        (hit_median < TARGET_HIT_MS, f"hit median {hit_median:.3f} ms < {TARGET_HIT_MS:g} ms"),
        (ratio >= TARGET_RATIO, f"hit {ratio:.0f}x faster than nix-shell >= {TARGET_RATIO:g}x"),
        (spawned == 0, f"no process started on a hit ({spawned})"),
    ]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'MISS'} {text}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
