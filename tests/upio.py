"""A real ``cellblock up`` deployment for the tests that run notebooks on the ``cellblock``
kernel (tests/notebooks, tests/course): private Redis, the service, two executors and a cache
builder, in a temporary state directory; and the environment a kernel needs to reach it.
A module of its own because test modules cannot import each other; tests/ is on sys.path."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cellblock.kernel.install import install


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def health(url: str) -> dict[str, int]:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:
            answer: dict[str, int] = json.load(response)
            return answer
    except OSError:
        return {}


@contextmanager
def cellblock_up(folder: Path, sandbox_root: Path, uid_base: int) -> Iterator[Path]:
    """``cellblock up`` with its state in ``folder``/state, until every worker is there; its
    state directory (url, token, admin-token). ``uid_base``: slot uids (and the cgroups named
    for them) of the deployment's own: an executor starting on a slot uid removes that uid's
    cgroups as its leftovers, and the other tests' executors (in this run or a concurrent one)
    use 200000 + 100 + ..., so each deployment of the tests takes a base of its own."""
    state, log = folder / "state", folder / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    env |= {
        "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
        "CELLBLOCK_LEASE_TIMEOUT": "1.5",
        "CELLBLOCK_SANDBOX__UID_BASE": str(uid_base),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "cellblock", "up", "--state-dir", str(state),
             "--port", str(port), "--executors", "2", "--builders", "1"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (up := health(url)).get("executors", 0) < 2 or up.get("builders", 0) < 1:
            assert proc.poll() is None, f"cellblock up exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"cellblock up did not come up:\n{log.read_text()}"
            time.sleep(0.1)
        yield state
    finally:
        # SIGINT, like Ctrl-C: `cellblock up` drains its workers, then stops Redis.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kernel_env(state: Path) -> dict[str, str]:
    """The environment of a ``cellblock`` kernel on the deployment whose state directory is
    ``state``: its service and tokens, as the JupyterLab extension hands them on. Installs
    the kernelspec into this venv first (``pip install -e`` leaves it out)."""
    install(prefix=sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    files = {
        "CELLBLOCK_URL": "url",
        "CELLBLOCK_TOKEN": "token",
        "CELLBLOCK_ADMIN_TOKEN": "admin-token",
    }
    return env | {name: (state / f).read_text().strip() for name, f in files.items()}
