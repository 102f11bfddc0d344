"""Interactive standard input: the round trip from a ``stdin`` message to the program's echo
of that line reaching the client, against the same round trip through a bare pipe to a local
process, in one run.

Starts a private deployment (as bench/service.py does: redis-server on a unix socket, the
service and two executors) and keeps two interactive submissions of ``cat`` running, each on
a WebSocket of its own, beside a local ``cat`` started by asyncio. Each of ``--lines`` rounds
(default 200, after a warm-up) sends every one a line of its own, in a random order each
round so that machine noise hits them alike, and times from the send (``Stream.send_stdin``,
or a write to the pipe) to the output that holds the line:

``pipe``
    ``{"run": "cat", "stdin_mode": "interactive"}``: cat's copy of the line, on a pipe.
``tty_echo``
    The same with ``"tty": true``: the echo of the remote terminal's line discipline, which
    comes back as the line is written to the terminal, before cat reads it.
``tty``
    That submission's cat's copy of the line, after the echo.
``local``
    A bare pipe to a local ``cat``: what the sandbox, the service, Redis and the WebSocket add
    to the others.

Median and p95 in milliseconds of each, and each one's median over the local one's. Target: a
median under 5 ms for the submissions.

    cd /work/main && .venv/bin/python bench/interactive.py
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from cellblock.service.client import Client, Stream
from service import TOKEN, finish, private_deployment, stats

TARGET_MEDIAN_MS = 5.0
#: The order of the programs in each round (seeded: a run can be repeated exactly).
ORDER = random.Random(1)
LIMITS = {"run": {"wall_time": 120}}  # the whole bench, in one run stage each
REMOTE: dict[str, dict[str, Any]] = {
    "pipe": {"run": "cat", "stdin_mode": "interactive", "limits": LIMITS},
    "tty": {"run": "cat", "stdin_mode": "interactive", "tty": True, "limits": LIMITS},
}


class Echoes:
    """The text a program sent back so far, and a way to wait for a line in it."""

    def __init__(self) -> None:
        self.text = ""
        self._grown = asyncio.Event()

    def add(self, data: str) -> None:
        self.text += data
        self._grown.set()

    async def until(self, token: str, copies: int) -> None:
        """Wait until ``token`` has come back ``copies`` times."""
        while self.text.count(token) < copies:
            self._grown.clear()
            await self._grown.wait()


class Remote:
    """An interactive submission of ``cat``, its output followed as it comes."""

    def __init__(self, client: Client, request: dict[str, Any]) -> None:
        self.stream: Stream = client.stream(request)
        self.echoes = Echoes()
        self._following: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Once the run stage runs: input sent before would find no stage to go to."""
        async for event in self.stream:
            if event["type"] == "stage_started" and event["stage"] == "run":
                break
        else:
            raise RuntimeError(
                f"the submission ended before its run stage: {self.stream.submission}"
            )
        self._following = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for event in self.stream:
            if event["type"] == "output":
                self.echoes.add(event["data"])

    async def send(self, line: str) -> None:
        await self.stream.send_stdin(line)

    async def stop(self) -> None:
        """End cat's input and wait for its end; it must have ended well."""
        await self.stream.close_stdin()
        assert self._following is not None
        await self._following
        assert self.stream.submission is not None
        run = self.stream.submission["stages"]["run"]
        if run["status"] != "ok":
            raise RuntimeError(f"cat ended {run['status']}: {run}")


class Local:
    """A local ``cat`` on pipes."""

    def __init__(self) -> None:
        self.echoes = Echoes()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self._following = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        assert self.proc.stdout is not None
        while data := await self.proc.stdout.read(65536):
            self.echoes.add(data.decode())

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode())
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self._following
        await self.proc.wait()


async def round_trip(program: Remote | Local, token: str, copies: int) -> list[float]:
    """Seconds from sending the line ``token`` to each of its first ``copies`` copies."""
    start = time.perf_counter()
    await program.send(token + "\n")
    times = []
    for copy in range(1, copies + 1):
        await program.echoes.until(token, copy)
        times.append(time.perf_counter() - start)
    return times


async def measure(client: Client, lines: int, warmup: int) -> dict[str, list[float]]:
    remotes = {name: Remote(client, request) for name, request in REMOTE.items()}
    local = Local()
    programs: list[Remote | Local] = [*remotes.values(), local]
    samples: dict[str, list[float]] = {"pipe": [], "tty_echo": [], "tty": [], "local": []}
    try:
        for program in programs:
            await program.start()
        for i in range(warmup + lines):
            for name in ORDER.sample(["pipe", "tty", "local"], 3):
                token = f"line-{name}-{i:04}"
                program = local if name == "local" else remotes[name]
                times = await round_trip(program, token, copies=2 if name == "tty" else 1)
                if i < warmup:
                    continue
                if name == "tty":
                    samples["tty_echo"].append(times[0])
                samples[name].append(times[-1])
        for program in programs:
            await program.stop()
    finally:
        for remote in remotes.values():
            await remote.stream.aclose()
    return samples


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with private_deployment("cellblock-bench-interactive-") as (deployment, _host):
        client = Client(deployment.url, TOKEN, timeout=60)
        try:
            await deployment.ready(client, executors=2)
            samples = await measure(client, args.lines, args.warmup)
        finally:
            await client.close()
    figures = {name: stats(values) for name, values in samples.items()}
    local = figures["local"]["median"]
    return {
        "lines": args.lines,
        "round_trip_ms": figures,
        "ratio_to_local": {
            name: f["median"] / local for name, f in figures.items() if name != "local"
        },
    }


def print_report(f: dict[str, Any]) -> None:
    print(f"round trip of a line to cat and back, {f['lines']} interleaved lines (ms)")
    print(f"{'':44}{'median':>8}{'p95':>8}{'/ local':>9}")
    labels = {
        "pipe": "interactive submission, pipe",
        "tty_echo": "interactive submission, tty: its echo",
        "tty": "interactive submission, tty: cat's copy",
        "local": "bare pipe to a local cat",
    }
    for name, label in labels.items():
        s = f["round_trip_ms"][name]
        ratio = f"{f['ratio_to_local'][name]:8.1f}x" if name != "local" else ""
        print(f"{label:44}{s['median']:8.2f}{s['p95']:8.2f}{ratio}")
    for name in ("pipe", "tty"):
        median = f["round_trip_ms"][name]["median"]
        verdict = "PASS" if median < TARGET_MEDIAN_MS else "MISS"
        print(f"median round trip ({name}): {median:.2f} ms "
              f"(target < {TARGET_MEDIAN_MS:g} ms): {verdict}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    return finish(asyncio.run(bench(args)), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
