"""Cellblock under load, in one run: throughput and latency at 1, 2 and 4 executors, the time
from kill -9 of an executor to its job starting again elsewhere, and the service's peak memory
during a burst.

Each part starts a private deployment (bench/service.py's: redis-server on a unix socket,
``cellblock service`` and N ``cellblock executor`` processes of the configured slots) in a
temporary state directory.

``throughput``
    ``--submissions`` submissions of ``echo hi`` sent by ``--clients`` concurrent WebSocket
    clients (``Client.run``), after a warm-up; finished per second, and each one's latency
    from its submission to its ``finished`` event (p50, p95, p99), at 1, 2 and 4 executors.
    The baseline is 1 executor, in the same run: the ratios say what more executors buy on
    this machine (2 cores: little past 2 slots of CPU-bound work).
``reclaim``
    A job (``sleep 5``) running on one of two executors, whose process is killed with
    SIGKILL: the seconds until the submission runs again on the other one. Target: under the
    lease (``lease_timeout``, set here to ``--lease``) plus 1 s.
``burst``
    ``--burst`` POSTs at once (64 connections) against the service with no executor taking
    any: its peak resident memory (VmHWM) against its resident memory just before, in the
    same run.
``failover``
    The deployment on Sentinel (tests/faults/sentinelio.py: a master, a replica, three
    sentinels with ``down-after-milliseconds`` 1000), a POST every 20 ms, and the master
    killed with SIGKILL: the time without service (from the last submission accepted before
    the kill to the first accepted after it), the POSTs refused meanwhile (all 503 with
    Retry-After), and whether every accepted submission finished. The baseline is the gap
    between two accepted POSTs before the kill.

    cd /work/main && .venv/bin/python bench/load.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
# The Sentinel deployment the fault tests use (and what it needs from tests/).
sys.path.insert(1, str(Path(__file__).parent.parent / "tests" / "faults"))
sys.path.insert(2, str(Path(__file__).parent.parent / "tests"))

from sentinelio import Sentinels
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from cellblock.service.client import Client
from service import TOKEN, finish, private_deployment, stats

REQUEST = {"run": "echo hi"}
EXECUTORS = (1, 2, 4)


async def throughput(args: argparse.Namespace, executors: int) -> dict[str, Any]:
    with private_deployment("cellblock-bench-load-", executors=executors) as (deployment, _):
        client = Client(deployment.url, TOKEN, timeout=120)
        try:
            await deployment.ready(client, executors=executors)
            await asyncio.gather(*(client.run(REQUEST) for _ in range(args.clients)))
            latencies: list[float] = []
            todo = list(range(args.submissions))

            async def worker() -> None:
                while todo:
                    todo.pop()
                    start = time.perf_counter()
                    done = await client.run(REQUEST)
                    assert done["stages"]["run"]["stdout"] == "hi\n", done
                    latencies.append(time.perf_counter() - start)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.clients)))
            seconds = time.perf_counter() - start
        finally:
            await client.close()
    return {"per_s": args.submissions / seconds, "latency_ms": stats(latencies)}


async def reclaim(args: argparse.Namespace) -> dict[str, Any]:
    environ = {"CELLBLOCK_LEASE_TIMEOUT": str(args.lease)}
    with private_deployment("cellblock-bench-load-", executors=2, environ=environ) as (
        deployment,
        _,
    ):
        client = Client(deployment.url, TOKEN, timeout=120)
        try:
            await deployment.ready(client, executors=2)
            sid = (await client.submit({"run": "sleep 5; echo again"}))["id"]
            state = await _until(client, sid, lambda s: s["status"] == "running")
            holder = state["worker"]
            index = int(holder.rsplit("-", 1)[1])
            deployment.procs[1 + index].send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            await _until(client, sid, lambda s: s["status"] == "running" and s["worker"] != holder)
            seconds = time.perf_counter() - killed
            done = await _until(client, sid, lambda s: s["status"] == "finished", timeout=60)
            assert done["stages"]["run"]["stdout"] == "again\n", done
        finally:
            await client.close()
    return {"seconds": seconds, "lease": args.lease, "target": args.lease + 1}


async def burst(args: argparse.Namespace) -> dict[str, Any]:
    with private_deployment("cellblock-bench-load-", executors=0) as (deployment, _):
        client = Client(deployment.url, TOKEN, timeout=60)
        try:
            await deployment.ready(client, executors=0)
        finally:
            await client.close()
        service = deployment.procs[0].pid
        before = _memory(service, "VmRSS")
        http = AsyncHTTPClient(force_instance=True, max_clients=64)
        request = HTTPRequest(
            f"{deployment.url}/api/v1/submissions", method="POST", body='{"run": "true"}',
            headers={"Authorization": f"Bearer {TOKEN}"}, request_timeout=300,
        )  # fmt: skip
        start = time.perf_counter()
        try:
            answers = await asyncio.gather(
                *(http.fetch(request, raise_error=False) for _ in range(args.burst))
            )
        finally:
            http.close()
        seconds = time.perf_counter() - start
        peak = _memory(service, "VmHWM")
    codes = sorted({a.code for a in answers})
    return {"requests": args.burst, "seconds": seconds, "codes": codes,
            "rss_before_mib": before / 1024, "peak_mib": peak / 1024}  # fmt: skip


async def failover(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="cellblock-bench-sentinel-"))
    sentinels = Sentinels(directory)
    try:
        sentinels.start()
        await sentinels.ready()
        with private_deployment(
            "cellblock-bench-load-", executors=2, redis_url=sentinels.url
        ) as (deployment, _):  # fmt: skip
            client = Client(deployment.url, TOKEN, timeout=120)
            http = AsyncHTTPClient(force_instance=True)
            try:
                await deployment.ready(client, executors=2)
                accepted: list[tuple[float, str]] = []
                refused: list[float] = []
                killed = 0.0

                async def post() -> None:
                    request = HTTPRequest(
                        f"{deployment.url}/api/v1/submissions", method="POST",
                        body=json.dumps(REQUEST), request_timeout=30,
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    )  # fmt: skip
                    answer = await http.fetch(request, raise_error=False)
                    when = time.perf_counter()
                    if answer.code == 201:
                        accepted.append((when, json.loads(answer.body)["id"]))
                    elif answer.code == 503 and answer.headers.get("Retry-After"):
                        refused.append(when)
                    else:
                        raise RuntimeError(f"answered {answer.code}: {answer.body!r}")

                for i in range(args.failover_posts):
                    if i == args.failover_posts // 4:
                        sentinels.kill(sentinels.master)
                        killed = time.perf_counter()
                    await post()
                    await asyncio.sleep(0.02)
                before = [t for t, _ in accepted if t < killed]
                after = [t for t, _ in accepted if t > killed]
                if not after:
                    raise RuntimeError("no submission was accepted after the failover")
                for _, sid in accepted:
                    done = await _until(client, sid, lambda s: s["status"] == "finished", 120)
                    assert done["stages"]["run"]["stdout"] == "hi\n", done
            finally:
                http.close()
                await client.close()
    finally:
        sentinels.stop()
        shutil.rmtree(directory, ignore_errors=True)
    steps = [b - a for a, b in itertools.pairwise(before)]
    return {
        "gap_s": after[0] - before[-1],
        "kill_to_first_accepted_s": after[0] - killed,
        "baseline_ms": 1000 * statistics.median(steps),
        "refused": len(refused),
        "accepted": len(accepted),
        "all_finished": True,
    }


async def _until(client: Client, sid: str, ready: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        state: dict[str, Any] = await client.get(sid)
        if ready(state):
            return state
        await asyncio.sleep(0.05)
    raise RuntimeError(f"submission {sid} did not get there in {timeout:g} s")


def _memory(pid: int, field: str) -> int:
    """A memory figure of ``/proc/PID/status``, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    runs = {str(n): await throughput(args, n) for n in EXECUTORS}
    base = runs["1"]["per_s"]
    return {
        "submissions": args.submissions,
        "clients": args.clients,
        "throughput": runs,
        "ratio_to_one_executor": {n: r["per_s"] / base for n, r in runs.items()},
        "reclaim": await reclaim(args),
        "burst": await burst(args),
        "failover": await failover(args),
        "cpus": os.cpu_count(),
    }


def print_report(f: dict[str, Any]) -> None:
    print(f"{f['submissions']} submissions of `echo hi`, {f['clients']} clients, "
          f"{f['cpus']} CPUs")  # fmt: skip
    print(f"{'executors':>10}{'per s':>9}{'x 1':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for n, r in f["throughput"].items():
        lat = r["latency_ms"]
        print(f"{n:>10}{r['per_s']:9.1f}{f['ratio_to_one_executor'][n]:7.2f}"
              f"{lat['median']:9.1f}{lat['p95']:9.1f}{lat['p99']:9.1f}")  # fmt: skip
    r = f["reclaim"]
    verdict = "meets" if r["seconds"] < r["target"] else "misses"
    print(f"kill -9 of an executor to its job running again elsewhere: {r['seconds']:.2f} s "
          f"(lease {r['lease']:g} s; target under {r['target']:g} s: {verdict})")  # fmt: skip
    b = f["burst"]
    print(f"burst of {b['requests']} POSTs in {b['seconds']:.1f} s (answers {b['codes']}): "
          f"service peak {b['peak_mib']:.0f} MiB against {b['rss_before_mib']:.0f} MiB "
          f"before ({b['peak_mib'] / b['rss_before_mib']:.1f}x)")  # fmt: skip
    o = f["failover"]
    print(f"Sentinel failover, master killed: {o['gap_s']:.2f} s without service "
          f"(kill to first accepted {o['kill_to_first_accepted_s']:.2f} s; accepted POSTs "
          f"{o['baseline_ms']:.0f} ms apart before), {o['refused']} refused with 503, "
          f"{o['accepted']} accepted, every one finished")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--failover-posts", type=int, default=400)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    return finish(asyncio.run(bench(args)), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
