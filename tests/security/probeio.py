"""The attack probe (programs/probe.c) as the security tests use it: built once on the host,
uploaded as a hostile binary, run end to end through the real service and a real executor.
A module of its own because test modules cannot import conftest.py."""

from __future__ import annotations

import base64
import functools
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from restio import Rest

PROGRAMS = Path(__file__).with_name("programs")


@functools.cache
def probe_binary() -> bytes:
    """programs/probe.c, compiled by the host's gcc (the sandbox sees the same libc)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe"
        subprocess.run(["gcc", "-O", "-o", str(out), str(PROGRAMS / "probe.c")], check=True)
        return out.read_bytes()


def program_file(name: str) -> dict[str, Any]:
    """A file of programs/ as a submission's file."""
    return {"name": name, "content": (PROGRAMS / name).read_text()}


def probe_file() -> dict[str, Any]:
    content = base64.b64encode(probe_binary()).decode()
    return {"name": "probe", "content": content, "encoding": "base64", "executable": True}


async def submit(rest: Rest, request: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Submit and wait for the finished submission (``?wait=true``)."""
    path = f"/api/v1/submissions?wait=true&timeout={timeout}"
    answer: dict[str, Any] = await rest.call(
        "POST", path, request, expect=201, timeout=timeout + 10
    )
    assert answer["status"] == "finished", answer
    return answer


async def probe(rest: Rest, *attacks: str) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
    """Run the probe's ``attacks`` in one submission: the run stage's result, and each attack's
    return value and errno name."""
    answer = await submit(rest, {"files": [probe_file()], "run": "./probe " + " ".join(attacks)})
    run = answer["stages"]["run"]
    seen = {}
    for line in run["stdout"].splitlines():
        name, ret, err = line.split()
        seen[name] = (int(ret), err)
    return run, seen


async def still_serves(rest: Rest) -> None:
    """The service and its executor still run a plain submission."""
    answer = await submit(rest, {"run": "echo ok"})
    assert answer["stages"]["run"]["status"] == "ok"
    assert answer["stages"]["run"]["stdout"] == "ok\n"
