"""End-to-end latency and throughput of the whole service, against bare nsjail, in one run.

Starts a private deployment (redis-server on a unix socket, as bench/deps.py does, then
``cellblock service`` and two ``cellblock executor`` processes with the configured slots) in
a temporary state directory and measures, after a warm-up:

``websocket``
    A trivial submission (``echo hi``) through ``Client.run``: submit over the WebSocket and
    follow its events to ``finished``: the latency a notebook sees. One client makes every
    run, so from the second on it reuses the WebSocket its last run left open, as a kernel
    does.
``wait``
    The same through ``POST /api/v1/submissions?wait=true``.
``nsjail``
    The same run stage through the bare nsjail command Cellblock would run (the argv of
    ``Sandbox.command``, with ``cellblock-init`` and bash), started when it is needed. The
    executors start each slot's next jail while the slot is idle (see ``Sandbox.arm``), so a
    submission does not wait for nsjail's start and can finish sooner than this.

The three are interleaved round by round, in a random order each round, so that machine
noise hits them alike and none always follows the same other one; median, p95 and
p99 over ``--runs`` rounds (default 300). Then throughput: submissions finished per second
with ``--clients`` concurrent WebSocket clients (default 8) over ``--seconds`` (default 30),
against the best of 2 and 4 parallel loops of bare nsjail runs over the same time on the same
cores. Targets: median end-to-end under 25 ms; throughput at least half of bare nsjail's.

    cd /work/main && .venv/bin/python bench/service.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from deps import redis_server
from sandbox import ORDER, Bench

from cellblock import config as cellblock_config
from cellblock.executor.host import SandboxHost, prepare
from cellblock.service.client import Client

TARGET_MEDIAN_MS = 25.0
TARGET_THROUGHPUT_RATIO = 0.5
REQUEST = {"run": "echo hi"}
TOKEN = "bench-token"
CELLBLOCK = [sys.executable, "-m", "cellblock"]


def percentile(samples: Sequence[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def stats(samples: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "median": statistics.median(ms),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "mean": statistics.fmean(ms),
    }


class Deployment:
    """The service and two executors on the Redis at ``redis``, in a temporary state
    directory."""

    def __init__(
        self,
        root: Path,
        sandbox_root: Path,
        redis: str,
        executors: int = 2,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CELLBLOCK_TOKEN": TOKEN,
            "CELLBLOCK_ADMIN_TOKEN": TOKEN + "-admin",
            "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
            "CELLBLOCK_QUEUE_SIZE": "100000",
            **(environ or {}),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self._start(
            [
                *CELLBLOCK,
                "service",
                "--redis",
                redis,
                "--port",
                str(self.port),
                "--state-dir",
                str(root),
            ]
        )
        for i in range(executors):
            self._start(
                [
                    *CELLBLOCK,
                    "executor",
                    "--redis",
                    redis,
                    "--state-dir",
                    str(root),
                    "--id",
                    f"bench-executor-{i}",
                    "--uid-offset",
                    str(300 + 10 * i),
                ]
            )

    def _start(self, argv: list[str]) -> None:
        self.procs.append(
            subprocess.Popen(
                argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )

    async def ready(self, client: Client, executors: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if (await client.health())["executors"] >= executors:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("the deployment did not come up")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def latency(client: Client, bare: Bench, runs: int, warmup: int) -> dict[str, list[float]]:
    async def websocket() -> None:
        done = await client.run(REQUEST)
        assert done["stages"]["run"]["stdout"] == "hi\n", done

    async def wait() -> None:
        done = await client.submit(REQUEST, wait=True)
        assert done["stages"]["run"]["stdout"] == "hi\n", done

    async def nsjail() -> None:
        await bare.run_bare(bare.argv)

    methods: dict[str, Callable[[], Awaitable[None]]] = {
        "websocket": websocket,
        "wait": wait,
        "nsjail": nsjail,
    }
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for i in range(warmup + runs):
        for key in ORDER.sample(list(methods), len(methods)):
            elapsed = await timed(methods[key])
            if i >= warmup:
                samples[key].append(elapsed)
    return samples


async def service_throughput(client: Client, clients: int, seconds: float) -> float:
    finished = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal finished
        while time.monotonic() < deadline:
            await client.run(REQUEST)
            finished += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return finished / (time.monotonic() - start)


def nsjail_throughput(bare: Bench, loops: int, seconds: float) -> float:
    """Runs per second of ``loops`` threads each running bare nsjail back to back."""
    counts = [0] * loops
    deadline = time.monotonic() + seconds
    controls = [os.dup(0) for _ in range(loops)]
    argvs = [bare.jail_argv(control) for control in controls]

    def loop(i: int) -> None:
        while time.monotonic() < deadline:
            control, status = bare.load_control(controls[i])
            proc = subprocess.Popen(
                argvs[i],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(bare.log.w, controls[i]),
                start_new_session=True,
                env={},
            )
            # init reports, then waits for the host to close the status socket (run_bare).
            with status.makefile("rb") as lines:
                lines.readline()
            status.close()
            proc.wait()
            control.close()
            counts[i] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for control in controls:
        os.close(control)
    bare.log.drain()
    return sum(counts) / (time.monotonic() - start)


@contextlib.contextmanager
def private_deployment(
    prefix: str,
    executors: int = 2,
    environ: dict[str, str] | None = None,
    redis_url: str | None = None,
) -> Iterator[tuple[Deployment, SandboxHost]]:
    """A deployment of ``executors`` on a redis-server of its own, or on ``redis_url``
    (``environ``: more of its processes' environment), in a temporary state directory, and this
    host's sandbox set up beside it for bare runs; all of it gone afterwards."""
    with contextlib.nullcontext(redis_url) if redis_url else redis_server() as redis:
        root = Path(tempfile.mkdtemp(prefix=prefix))
        root.chmod(0o711)
        sandbox_root = root / "sandbox"
        sandbox_root.mkdir(mode=0o711)
        deployment = Deployment(root, sandbox_root, redis, executors, environ)
        environ = {"CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"'}
        host: SandboxHost | None = None
        try:
            host = prepare(cellblock_config.load(root, environ=environ))
            yield deployment, host
        finally:
            deployment.stop()
            if host is not None:
                host.disk.detach()
            shutil.rmtree(root, ignore_errors=True)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with private_deployment("cellblock-bench-service-") as (deployment, host):
        sandbox = host.sandbox(slot=250)
        workdir = host.disk.create("bench-box", sandbox.uid)
        bare = Bench(host, sandbox, workdir, script=REQUEST["run"])  # the program submitted
        client = Client(deployment.url, TOKEN, timeout=60)
        try:
            await deployment.ready(client, executors=2)
            samples = await latency(client, bare, args.runs, args.warmup)
            service_rate = await service_throughput(client, args.clients, args.seconds)
            nsjail_rates = {n: nsjail_throughput(bare, n, args.seconds) for n in (2, 4)}
        finally:
            await client.close()
            bare.close()
            host.disk.remove(workdir)
    figures = {key: stats(values) for key, values in samples.items()}
    best_loops = max(nsjail_rates, key=lambda k: nsjail_rates[k])
    return {
        "runs": args.runs,
        "latency_ms": figures,
        "ratio_websocket_to_nsjail": figures["websocket"]["median"] / figures["nsjail"]["median"],
        "ratio_wait_to_nsjail": figures["wait"]["median"] / figures["nsjail"]["median"],
        "throughput": {
            "service_per_s": service_rate,
            "clients": args.clients,
            "seconds": args.seconds,
            "nsjail_per_s": nsjail_rates,
            "best_nsjail_loops": best_loops,
            "ratio": service_rate / nsjail_rates[best_loops],
        },
    }


def print_report(f: dict[str, Any]) -> None:
    print(f"end-to-end latency of `echo hi`, {f['runs']} interleaved rounds (ms)")
    print(f"{'':34}{'median':>8}{'p95':>8}{'p99':>8}{'mean':>8}")
    labels = {
        "websocket": "service, WebSocket (Client.run)",
        "wait": "service, POST ?wait=true",
        "nsjail": "bare nsjail, same run stage",
    }
    for key, label in labels.items():
        s = f["latency_ms"][key]
        print(f"{label:34}{s['median']:8.2f}{s['p95']:8.2f}{s['p99']:8.2f}{s['mean']:8.2f}")
    print(f"\nWebSocket / bare nsjail: {f['ratio_websocket_to_nsjail']:.2f}x (medians)")
    print(f"wait=true / bare nsjail: {f['ratio_wait_to_nsjail']:.2f}x (medians)")
    t = f["throughput"]
    rate = t["service_per_s"]
    print(f"\nthroughput, {t['clients']} clients, {t['seconds']:g} s: {rate:.1f} submissions/s")
    for loops, rate in t["nsjail_per_s"].items():
        print(f"bare nsjail, {loops} parallel loops: {rate:.1f} runs/s")
    print(f"service / best bare nsjail: {t['ratio']:.2f}")
    for label, key in (("WebSocket", "websocket"), ("wait=true", "wait")):
        median = f["latency_ms"][key]["median"]
        verdict = "PASS" if median < TARGET_MEDIAN_MS else "MISS"
        target = f"target < {TARGET_MEDIAN_MS:g} ms"
        print(f"median end-to-end ({label}): {median:.1f} ms ({target}): {verdict}")
    verdict = "PASS" if t["ratio"] >= TARGET_THROUGHPUT_RATIO else "MISS"
    target = f"target >= {TARGET_THROUGHPUT_RATIO}"
    print(f"throughput vs bare nsjail: {t['ratio']:.2f} ({target}): {verdict}")


def finish(figures: dict[str, Any], as_json: bool, report: Callable[[dict[str, Any]], None]) -> int:
    """Print a bench's figures, as JSON or as its ``report``; the exit status."""
    if as_json:
        print(json.dumps(figures, indent=2))
    else:
        report(figures)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return finish(asyncio.run(bench(args)), args.json, print_report)


if __name__ == "__main__":
    raise SystemExit(main())
