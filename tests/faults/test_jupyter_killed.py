"""The Jupyter server killed (SIGKILL, as the OOM killer does; SIGHUP, as closing the terminal
of `make run` does) while its embedded deployment runs and works: nothing of the deployment is
left running. And a server that finds a deployment left running in its state directory stops
it, says so, and starts its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from e2e.browserio import Lab, jupyterlab
from procio import processes_of
from upio import free_port

from cellblock.kernel.install import install

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
TOKEN = "faults-lab-token"
SUBMISSIONS = 50


@contextmanager
def lab_with_deployment(tmp_path: Path, sandbox_root: Path, state: Path) -> Iterator[Lab]:
    install(prefix=sys.prefix)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    env |= {
        "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
        "CELLBLOCK_LEASE_TIMEOUT": "1.5",
        "CELLBLOCK_SANDBOX__UID_BASE": "250000",  # slot uids of these tests alone
    }
    with jupyterlab(tmp_path, root, TOKEN, env, f"--Cellblock.state_dir={state}") as lab:

        def up() -> bool:
            health = lab.call("/cellblock/status.json")["health"]
            return bool(health and health["executors"])

        lab.wait("Cellblock", up, timeout=120)
        yield lab


def wait_until_gone(state: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while processes_of(state):
        assert time.monotonic() < deadline, f"still running: {processes_of(state)}"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_a_killed_jupyter_server_leaves_no_process_of_its_deployment_and_loses_nothing(
    tmp_path: Path, sandbox_root: Path, sig: signal.Signals
) -> None:
    state = tmp_path / "state"
    with lab_with_deployment(tmp_path, sandbox_root, state) as lab:
        # Busy when it dies: 50 submissions in flight in its deployment.
        ids = [lab.call("/cellblock/api/v1/submissions", {"run": f"sleep 0.3; echo {i}"})["id"]
               for i in range(SUBMISSIONS)]  # fmt: skip
        running = processes_of(state)
        assert len(running) >= 4, running  # up, redis, the service, an executor
        lab.server.send_signal(sig)
        lab.server.wait(timeout=60)
        wait_until_gone(state)
    # The next server's deployment has them all, from its store's append-only file.
    with lab_with_deployment(tmp_path, sandbox_root, state) as lab:
        for i, sid in enumerate(ids):
            lab.wait(f"submission {i} to end", lambda sid=sid: ended(lab, sid), timeout=120)
            document = lab.call(f"/cellblock/api/v1/submissions/{sid}")
            assert document["status"] == "finished", document
            assert document["stages"]["run"]["stdout"] == f"{i}\n", document
            events = lab.read(f"/cellblock/api/v1/submissions/{sid}/events")
            assert events.count("event: finished\n") == 1, events
    wait_until_gone(state)


def ended(lab: Lab, sid: str) -> bool:
    status = lab.call(f"/cellblock/api/v1/submissions/{sid}")["status"]
    return status in ("finished", "error", "cancelled")


def test_a_deployment_left_running_is_stopped_and_replaced(
    tmp_path: Path, sandbox_root: Path
) -> None:
    """One started by hand (no server to end with) holds the state directory's lock."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    env |= {"CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"', "CELLBLOCK_SANDBOX__UID_BASE": "250000"}
    left = subprocess.Popen(
        [sys.executable, "-m", "cellblock", "up", "--state-dir", str(state), "--port",
         str(free_port()), "--executors", "1", "--builders", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(processes_of(state)) < 3:
            assert left.poll() is None and time.monotonic() < deadline, "no deployment came up"
            time.sleep(0.2)
        with lab_with_deployment(tmp_path, sandbox_root, state) as lab:
            assert left.wait(timeout=5) == 0  # it stopped in order, not killed
            log = lab.log.read_text()
            assert f"stopped a deployment left running in {state} (pid {left.pid})" in log
            answer = lab.call("/cellblock/api/v1/submissions?wait=true", {"run": "echo replaced"})
            assert answer["stages"]["run"]["stdout"] == "replaced\n"
        wait_until_gone(state)
    finally:
        if left.poll() is None:
            os.killpg(left.pid, signal.SIGKILL)
            left.wait()
