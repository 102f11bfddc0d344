"""Grading a C assignment of 50 tests: one submission with ``tests`` against 50 submissions
that each compile and run (the way Judge0 and SandboxFusion grade), in one run; and what a
test's fresh working directory costs.

Starts a private deployment (as bench/service.py does: redis-server on a unix socket, the
service and two executors of two slots each) and measures, round by round in a random order
so that machine noise hits both alike:

``tests``
    One submission: ``gcc -O2`` once, then the 50 tests, each a sandboxed run from a fresh
    copy of the compiled directory, judged by comparison (``lines``).
``separate``
    50 submissions of the same program, each compiling it and running one test's input,
    submitted at once (as a Judge0 batch is) over the WebSocket, until the last finishes;
    their outputs are compared here the same way. They spread over all four slots, where the
    submission with tests takes one.
``one_by_one``
    The same 50 submissions one after another, as one grader with one slot sends them.

For each, the machine's busy CPU seconds (``/proc/stat``) as well as the wall time: what a
grading costs the host, whatever the number of slots it spreads over.

Then, in this process, a test's fresh working directory, made and removed: a btrfs snapshot
of the compiled working directory (``WorkDisk.snapshot``), Cellblock's own copy into a new
subvolume (``WorkDisk.copy``, for a tree it deems ``copyable``), and ``cp -a``; for the small
directory of this assignment, one with 512 KiB more (near the copy's cap) and one with 64 MiB
more. Wall milliseconds of each, and the machine's busy CPU milliseconds (a snapshot's commit
runs in kernel threads), and which one Cellblock takes.

Target: the submission with tests at least 5 times faster than the separate submissions.

    cd /work/main && .venv/bin/python bench/grading.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


from cellblock.executor.disk import WorkDisk
from cellblock.service.client import Client
from cellblock.service.protocol import Compare
from service import TOKEN, finish, private_deployment

TARGET_RATIO = 5.0
TESTS = 50
SUM_C = r"""
#include <stdio.h>
int main(void) {
    long n, x, sum = 0;
    if (scanf("%ld", &n) != 1) return 1;
    for (long i = 0; i < n; i++) { if (scanf("%ld", &x) != 1) return 1; sum += x; }
    printf("%ld\n", sum);
    return 0;
}
"""
COMPILE = "gcc -O2 -o sum sum.c"
RUN = "./sum"


def cases(count: int) -> list[dict[str, Any]]:
    """``count`` tests: sums of 1 … 200 random numbers."""
    rng = random.Random(12)
    tests = []
    for i in range(count):
        numbers = [rng.randint(-1000, 1000) for _ in range(rng.randint(1, 200))]
        stdin = f"{len(numbers)}\n{' '.join(map(str, numbers))}\n"
        tests.append({"name": f"t{i:02}", "stdin": stdin, "expected_output": f"{sum(numbers)}\n"})
    return tests


async def with_tests(client: Client, tests: list[dict[str, Any]]) -> int:
    """One submission with every test; how many passed."""
    document = await client.run({
        "files": [{"name": "sum.c", "content": SUM_C}], "compile": COMPILE, "run": RUN,
        "tests": tests,
    })  # fmt: skip
    passed: int = document["score"]["passed"]
    return passed


async def separately(client: Client, tests: list[dict[str, Any]]) -> int:
    """One submission per test, all at once; how many printed the expected output."""
    return sum(await asyncio.gather(*(_alone(client, t) for t in tests)))


async def one_by_one(client: Client, tests: list[dict[str, Any]]) -> int:
    """One submission per test, each after the last; how many printed the expected output."""
    return sum([await _alone(client, t) for t in tests])


async def _alone(client: Client, test: dict[str, Any]) -> bool:
    """One test as a submission of its own, compiling the program again."""
    document = await client.run({
        "files": [{"name": "sum.c", "content": SUM_C}], "compile": COMPILE, "run": RUN,
        "stdin": test["stdin"],
    })  # fmt: skip
    stdout = document["stages"]["run"]["stdout"].encode()
    return Compare.parse("lines").matches(test["expected_output"], stdout)


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting for I/O)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def fresh_directory_costs(disk: WorkDisk, uid: int, runs: int) -> dict[str, dict[str, Any]]:
    """For each size of compiled directory, the median wall and the mean busy CPU
    milliseconds of making (and removing) a fresh one each way, and the way Cellblock takes."""
    figures: dict[str, dict[str, Any]] = {}
    for label, data in (("small", 0), ("512KiB", 512 * 1024), ("64MiB", 64 * 1024 * 1024)):
        source = disk.create(f"bench-source-{secrets.token_hex(4)}", uid)
        try:
            (source / "sum.c").write_text(SUM_C)
            subprocess.run(["gcc", "-O2", "-o", source / "sum", source / "sum.c"], check=True)
            if data:
                (source / "data").mkdir()
                for i in range(16):
                    (source / "data" / f"{i}.bin").write_bytes(secrets.token_bytes(data // 16))
            copyable = disk.copyable(source)
            ways = {"snapshot": _snapshot, "cp_a": _cp_a} | ({"copy": _copy} if copyable else {})
            figures[label] = {"chosen": "copy" if copyable else "snapshot"}
            for name, way in random.sample(list(ways.items()), len(ways)):
                walls, busy = [], busy_cpu()
                for _ in range(runs):
                    start = time.perf_counter()
                    way(disk, source)
                    walls.append(time.perf_counter() - start)
                figures[label][name] = {
                    "wall_ms": statistics.median(walls) * 1000,
                    "cpu_ms": (busy_cpu() - busy) / runs * 1000,
                }
        finally:
            disk.remove(source)
    return figures


def _snapshot(disk: WorkDisk, source: Path) -> None:
    disk.remove(disk.snapshot(source, f"bench-snap-{secrets.token_hex(4)}"))


def _copy(disk: WorkDisk, source: Path) -> None:
    disk.remove(disk.copy(source, f"bench-copy-{secrets.token_hex(4)}"))


def _cp_a(disk: WorkDisk, source: Path) -> None:
    target = disk.root / f"bench-cp-{secrets.token_hex(4)}"
    subprocess.run(["cp", "-a", "--reflink=never", str(source), str(target)], check=True)
    shutil.rmtree(target)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tests = cases(TESTS)
    runs = {"tests": with_tests, "separate": separately, "one_by_one": one_by_one}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    with private_deployment("cellblock-bench-grading-") as (deployment, host):
        client = Client(deployment.url, TOKEN, timeout=300)
        try:
            await deployment.ready(client, executors=2)
            # Warm up: gcc's files in the page cache, both executors' slots busy once.
            await with_tests(client, tests[:2])
            await separately(client, tests[:4])
            for _ in range(args.rounds):
                order = list(runs)
                random.shuffle(order)
                for name in order:
                    start, busy = time.perf_counter(), busy_cpu()
                    passed = await runs[name](client, tests)
                    samples[name].append(time.perf_counter() - start)
                    cpu[name].append(busy_cpu() - busy)
                    if passed != TESTS:
                        raise RuntimeError(f"{name}: only {passed} of {TESTS} tests passed")
        finally:
            await client.close()
        uid = host.sandbox(slot=251).uid
        directories = fresh_directory_costs(host.disk, uid, args.dir_runs)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "tests": TESTS,
        "rounds": args.rounds,
        "seconds": {name: {"median": m, "all": samples[name]} for name, m in medians.items()},
        "cpu_seconds": cpu_medians,
        "ratio_separate_to_tests": medians["separate"] / medians["tests"],
        "ratio_one_by_one_to_tests": medians["one_by_one"] / medians["tests"],
        "cpu_ratio_separate_to_tests": cpu_medians["separate"] / cpu_medians["tests"],
        "per_test_ms": medians["tests"] / TESTS * 1000,
        "fresh_directory": directories,
    }


def print_report(f: dict[str, Any]) -> None:
    s, c, n = f["seconds"], f["cpu_seconds"], f["tests"]
    print(f"A C assignment of {n} tests, median of {f['rounds']} rounds (wall, machine CPU):")
    print(f"  one submission with tests         {s['tests']['median']:6.2f} s  {c['tests']:6.2f} s"
          f"  ({f['per_test_ms']:.1f} ms a test, compile included)")  # fmt: skip
    print(f"  {n} submissions at once (4 slots) {s['separate']['median']:6.2f} s  "
          f"{c['separate']:6.2f} s")  # fmt: skip
    print(f"  {n} submissions one by one        {s['one_by_one']['median']:6.2f} s  "
          f"{c['one_by_one']:6.2f} s")  # fmt: skip
    for label, key in (("at once, wall", "ratio_separate_to_tests"),
                       ("one by one, wall", "ratio_one_by_one_to_tests"),
                       ("at once, machine CPU", "cpu_ratio_separate_to_tests")):  # fmt: skip
        ratio = f[key]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(f"  ratio {label:<22} {ratio:6.2f} x  ({verdict} the {TARGET_RATIO:g}x target)")
    print("A test's fresh working directory, made and removed (median wall, mean machine CPU):")
    for label, d in f["fresh_directory"].items():
        ways = "  ".join(
            f"{name} {d[name]['wall_ms']:6.2f} / {d[name]['cpu_ms']:6.2f} ms"
            for name in ("snapshot", "copy", "cp_a") if name in d
        )  # fmt: skip
        print(f"  {label:>6}: {ways}  (Cellblock takes: {d['chosen']})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir-runs", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    return finish(asyncio.run(bench(args)), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
