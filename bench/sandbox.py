"""What Cellblock's sandbox costs per stage, over bare nsjail and over a plain subprocess.

Measures the wall time of a trivial run stage (the script ``true``) several ways, in one
process, interleaved run by run after a warm-up, so that machine noise hits every way alike.
Every round takes a fresh random order: a fixed cycle would always put the same way after
another, and a jail leaves the kernel work (its namespaces' teardown) that the next run pays
for. The ways:

``cellblock``
    ``await Sandbox.run(StageSpec(script="true", ...))`` with the run stage's default limits,
    and then ``await Sandbox.aclose()``, timed together: the stage's own cgroup made, capped
    and removed, the nsjail command built, pipes and event-loop readers, the stage sent to
    ``cellblock-init`` pid 1 running ``bash -c true``, the status line parsed, the outcome
    classified, and nsjail's end (which ``run`` leaves to the background) waited for.
``cellblock-armed``
    The latency of the same stage when its jail was armed beforehand (``Sandbox.arm``, then
    50 ms untimed for nsjail to start), as an executor slot does between submissions: only
    ``await Sandbox.run`` is timed; its jail's end is waited for untimed.
``nsjail``
    The same nsjail argv, from ``Sandbox.command`` (same mounts, seccomp policy, uid map,
    ``cellblock-init`` running ``bash -c true``), run with plain ``subprocess.Popen``; the
    stage is queued on init's control socket before the start, with /dev/null for its stdio
    and a status socket, which is read and closed (init waits for that) before nsjail is
    waited for. Its cgroup options point at one cgroup made once before the runs, so nsjail
    does its own per-run child-cgroup work as under Cellblock; the log fd is a pipe made once,
    drained after each run outside the timed part. ``cellblock`` minus this is Cellblock's
    own overhead: Python orchestration, the per-stage cgroup lifecycle, measurement.
``nsjail-bash`` / ``nsjail-true``
    That argv with everything from ``cellblock-init`` on replaced by ``bash -c true`` or by
    ``/bin/true``: the same jail without init (and without bash), to show what those cost.
``subprocess``
    ``subprocess.run(["/bin/bash", "-c", "true"])``: no sandbox at all.

Prints median, p95, mean and min in ms, the ratios and differences, and whether Cellblock's
overhead over bare nsjail meets its target (under 5 ms median per stage); ``--json`` prints
the same figures as JSON. Needs root (nsjail, cgroups) and a C compiler (``cellblock-init`` is
built into a temporary state directory, removed at the end).

    cd /work/main && .venv/bin/python bench/sandbox.py --runs 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellblock import config as cellblock_config
from cellblock.executor.cgroups import StageCgroup
from cellblock.executor.host import SandboxHost, prepare
from cellblock.executor.jail import JailFds, send_header
from cellblock.executor.runner import StageEnvironment, stage_environment
from cellblock.executor.sandbox import INIT_PATH, Sandbox, StageSpec, request

#: Cellblock's own overhead over bare nsjail, per stage (median), must stay under this.
TARGET_OVERHEAD_MS = 5.0
SCRIPT = "true"
#: The order of the ways in each round (seeded: a run can be repeated exactly).
ORDER = random.Random(1)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    run: Callable[[], Awaitable[float]]  # one run; returns its wall time in seconds


@dataclass(frozen=True)
class Stats:
    median: float
    p95: float
    mean: float
    min: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        ms = [s * 1000 for s in samples]
        p95 = statistics.quantiles(ms, n=20, method="inclusive")[18]
        return cls(statistics.median(ms), p95, statistics.fmean(ms), min(ms))


class Pipe:
    """A pipe made once and handed to every bare nsjail run; drained after each run."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def drain(self) -> bytes:
        data = bytearray()
        while True:
            try:
                chunk = os.read(self.r, 65536)
            except BlockingIOError:
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk

    def close(self) -> None:
        for fd in (self.r, self.w):
            os.close(fd)


class Bench:
    """Everything the runs share: the sandbox, the stage, the bare argvs and their pipes."""

    def __init__(
        self, host: SandboxHost, sandbox: Sandbox, workdir: Path, script: str = SCRIPT
    ) -> None:
        self.sandbox = sandbox
        limits = host.config.limits.run.defaults
        env = stage_environment(StageEnvironment(), {}, pure=host.config.sandbox.base == "pure")
        self.spec = StageSpec(script=script, limits=limits, workdir=workdir, env=env)
        self.log = Pipe()
        # One cgroup for all bare runs, made here and not timed: nsjail's own options then
        # name a real parent, exactly as they do under Cellblock.
        self.cgroup: StageCgroup = sandbox.cgroups.create(f"bench-{os.getpid()}")
        self.cgroup.limit(limits.memory, limits.pids)
        self.request = request(self.spec)
        self.control = os.dup(0)
        self.argv = self.jail_argv(self.control)
        cut = self.argv.index(INIT_PATH)
        assert self.argv[cut - 1] == "--", "unexpected nsjail argv layout"
        jail = self.argv[:cut]
        self.argv_bash = [*jail, self.spec.shell, "-c", SCRIPT, "bash"]
        self.argv_true = [*jail, "/bin/true"]

    def jail_argv(self, control: int) -> list[str]:
        """The bare nsjail command, with init's control socket at descriptor ``control``."""
        fds = JailFds(control=control, log=self.log.w)
        return self.sandbox.command(self.spec.workdir, (), fds, self.cgroup.nsjail_args())

    def load_control(self, control: int) -> tuple[socket.socket, socket.socket]:
        """A fresh control socket at descriptor ``control``, the stage queued on it as
        ``Jail.serve`` sends it (stdio /dev/null, a status socket); our ends of both."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        status, status_jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        null = os.open(os.devnull, os.O_RDWR)
        fds = (null, null, null, status_jail.fileno())
        send_header(ours, len(self.request), os.stat(self.spec.workdir), fds)
        ours.sendall(self.request)
        os.close(null)
        status_jail.close()
        os.dup2(theirs.fileno(), control)
        theirs.close()
        return ours, status

    def methods(self) -> list[Method]:
        return [
            Method("cellblock", "cellblock Sandbox.run, and its end", self.run_cellblock),
            Method("cellblock-armed", "cellblock Sandbox.run, jail armed", self.run_armed),
            Method("nsjail", "nsjail, same argv (init, bash)", lambda: self.run_bare(self.argv)),
            Method("nsjail-bash", "nsjail, no init, bash -c true", self.run_bare_bash),
            Method("nsjail-true", "nsjail, no init, /bin/true", self.run_bare_true),
            Method("subprocess", "subprocess bash -c true", self.run_subprocess),
        ]

    async def run_cellblock(self) -> float:
        start = time.perf_counter()
        outcome = await self.sandbox.run(self.spec)
        await self.sandbox.aclose()
        elapsed = time.perf_counter() - start
        if outcome.status != "ok":
            raise RuntimeError(f"Sandbox.run: {outcome.status}: {outcome.error}")
        return elapsed

    async def run_armed(self) -> float:
        self.sandbox.arm(self.spec.workdir)
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        outcome = await self.sandbox.run(self.spec)
        elapsed = time.perf_counter() - start
        await self.sandbox.aclose()
        if outcome.status != "ok":
            raise RuntimeError(f"Sandbox.run: {outcome.status}: {outcome.error}")
        return elapsed

    async def run_bare(self, argv: list[str], init: bool = True) -> float:
        control, status_socket = self.load_control(self.control)
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(self.log.w, self.control),
            start_new_session=True,
            env={},
        )
        status = b""
        if init:  # init reports, then waits for the host to close the status socket
            with status_socket.makefile("rb") as lines:
                status = lines.readline()
        status_socket.close()
        _, stderr = proc.communicate()
        elapsed = time.perf_counter() - start
        control.close()
        log = self.log.drain()
        if proc.returncode != 0 or (init and not status.startswith(b"exited 0 ")):
            raise RuntimeError(
                f"bare nsjail: exit {proc.returncode}, status {status!r}: "
                f"{log.decode(errors='replace')}{stderr.decode(errors='replace')}"
            )
        return elapsed

    async def run_bare_bash(self) -> float:
        return await self.run_bare(self.argv_bash, init=False)

    async def run_bare_true(self) -> float:
        return await self.run_bare(self.argv_true, init=False)

    async def run_subprocess(self) -> float:
        start = time.perf_counter()
        result = subprocess.run(["/bin/bash", "-c", SCRIPT])
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"subprocess: exit {result.returncode}")
        return elapsed

    def close(self) -> None:
        os.close(self.control)
        self.cgroup.close()
        self.cgroup.remove()
        self.log.close()


async def measure(methods: Sequence[Method], runs: int, warmup: int) -> dict[str, list[float]]:
    """``warmup`` then ``runs`` rounds; each round runs every method once, in random order."""
    samples: dict[str, list[float]] = {m.key: [] for m in methods}
    for i in range(warmup + runs):
        for method in ORDER.sample(methods, len(methods)):
            elapsed = await method.run()
            if i >= warmup:
                samples[method.key].append(elapsed)
    return samples


def report(
    methods: Sequence[Method], samples: dict[str, list[float]], args: argparse.Namespace, info: str
) -> dict[str, Any]:
    stats = {m.key: Stats.of(samples[m.key]) for m in methods}
    cb, bare, sub = stats["cellblock"], stats["nsjail"], stats["subprocess"]
    paired = statistics.median(
        (c - b) * 1000 for c, b in zip(samples["cellblock"], samples["nsjail"], strict=True)
    )
    overhead = cb.median - bare.median
    return {
        "runs": args.runs,
        "warmup": args.warmup,
        "host": info,
        "methods": {
            m.key: {
                "label": m.label,
                "median_ms": stats[m.key].median,
                "p95_ms": stats[m.key].p95,
                "mean_ms": stats[m.key].mean,
                "min_ms": stats[m.key].min,
            }
            for m in methods
        },
        "cellblock_over_nsjail_ratio": cb.median / bare.median,
        "armed_over_nsjail_ratio": stats["cellblock-armed"].median / bare.median,
        "cellblock_minus_nsjail_ms": {
            "median": overhead,
            "mean": cb.mean - bare.mean,
            "paired_median": paired,
        },
        "nsjail_over_subprocess_ratio": bare.median / sub.median,
        "init_cost_ms": bare.median - stats["nsjail-bash"].median,
        "bash_in_jail_cost_ms": stats["nsjail-bash"].median - stats["nsjail-true"].median,
        "targets": [
            {
                "name": "overhead over bare nsjail",
                "median_ms": overhead,
                "limit_ms": TARGET_OVERHEAD_MS,
                "pass": overhead < TARGET_OVERHEAD_MS,
            }
        ],
    }


def print_table(figures: dict[str, Any]) -> None:
    print(
        f"trivial run stage (`{SCRIPT}`): {figures['runs']} runs per way after "
        f"{figures['warmup']} warm-up rounds, interleaved"
    )
    print(f"host: {figures['host']}")
    print()
    width = max(len(m["label"]) for m in figures["methods"].values())
    print(f"{'':{width}}  {'median':>7}  {'p95':>7}  {'mean':>7}  {'min':>7}   (ms)")
    for m in figures["methods"].values():
        print(
            f"{m['label']:{width}}  {m['median_ms']:7.2f}  {m['p95_ms']:7.2f}  "
            f"{m['mean_ms']:7.2f}  {m['min_ms']:7.2f}"
        )
    diff = figures["cellblock_minus_nsjail_ms"]
    print()
    print(f"cellblock / bare nsjail:   {figures['cellblock_over_nsjail_ratio']:.2f}x (medians)")
    print(
        f"cellblock - bare nsjail:   {diff['median']:.2f} ms median, {diff['mean']:.2f} ms mean, "
        f"{diff['paired_median']:.2f} ms median of paired runs"
    )
    print(f"armed / bare nsjail:       {figures['armed_over_nsjail_ratio']:.2f}x (medians)")
    print(f"bare nsjail / subprocess:  {figures['nsjail_over_subprocess_ratio']:.2f}x (medians)")
    print(
        f"in the jail: cellblock-init costs {figures['init_cost_ms']:.2f} ms, "
        f"bash {figures['bash_in_jail_cost_ms']:.2f} ms (medians)"
    )
    print()
    for t in figures["targets"]:
        verdict = "PASS" if t["pass"] else "MISS"
        print(
            f"{t['name']}: {t['median_ms']:.1f} ms median "
            f"(target < {t['limit_ms']:g} ms): {verdict}"
        )


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="cellblock-bench-"))
    try:
        # nsjail bind-mounts the /etc files, cellblock-init and the working directory as the
        # sandbox's unprivileged uid, so every folder above them must be searchable by
        # others; mkdtemp makes a 0700 directory.
        state_dir.chmod(0o755)
        environ = {}
        if "root" in cellblock_config.DEFAULTS["sandbox"]:  # keep off the real sandbox root
            environ["CELLBLOCK_SANDBOX__ROOT"] = str(state_dir / "sandbox")
        config = cellblock_config.load(state_dir, None, environ=environ)
        host = prepare(config)
        sandbox = host.sandbox(args.slot)
        workdir = host.disk.create("bench", sandbox.uid)
        setup = Bench(host, sandbox, workdir)
        try:
            methods = setup.methods()
            samples = await measure(methods, args.runs, args.warmup)
        finally:
            setup.close()
            host.disk.remove(workdir)
            host.disk.detach()
        info = (
            f"Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"cgroup v{host.cgroups.version}, sandbox base {config.sandbox.base}, "
            f"uid {sandbox.uid}, Python {platform.python_version()}"
        )
        return report(methods, samples, args, info)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per way (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds first (default 20)")
    parser.add_argument("--slot", type=int, default=0, help="executor slot whose uid to use")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.runs < 20 or args.warmup < 0:
        parser.error("--runs must be at least 20 (for a p95) and --warmup at least 0")
    if os.geteuid() != 0:
        print("bench/sandbox.py must run as root (nsjail, cgroups)", file=sys.stderr)
        return 2
    figures = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
