"""A kernel cannot reach admin endpoints. A real Jupyter server (its own process) with the
embedded deployment, its admin token given in the server's environment as
``CELLBLOCK_ADMIN_TOKEN=... jupyter lab`` would; a real kernel that server starts tries every
credential it was handed (its environment, the state directory it is pointed at) on the admin
endpoints, and none lets it in."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from kernelrun import printed_by
from procio import processes_of
from tornado.httpclient import AsyncHTTPClient
from upio import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

#: What the kernel runs: every token it can find, on an admin and a client endpoint.
ATTACK = r"""
import json, os, pathlib, urllib.error, urllib.request

def call(method, path, token, body=None):
    request = urllib.request.Request(
        os.environ["CELLBLOCK_URL"] + path, method=method, data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code

found = {f"env {k}": v for k, v in os.environ.items() if k.startswith("CELLBLOCK_")}
state = pathlib.Path(os.environ["CELLBLOCK_STATE_DIR"])
found.update({f"file {p.name}": p.read_text().strip() for p in state.iterdir() if p.is_file()})
scale = json.dumps({"executors": 0}).encode()
print(json.dumps({
    "environ": dict(os.environ),
    "proc_environ": open("/proc/self/environ", "rb").read().decode(errors="replace"),
    "answers": {
        source: {
            "workers": call("GET", "/api/v1/workers", token),
            "scale": call("POST", "/api/v1/admin/scale", token, scale),
            "capacity": call("GET", "/api/v1/capacity", token),
        }
        for source, token in found.items()
    },
}))
"""


@dataclass
class JupyterServer:
    url: str
    token: str
    runtime: Path
    state: Path
    admin_token: str
    proc: subprocess.Popen[bytes]
    http: AsyncHTTPClient

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.http.fetch(
            self.url + path,
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"token {self.token}"},
            raise_error=False,
            request_timeout=30,
        )
        return response.code, json.loads(response.body) if response.body else None


@pytest.fixture
async def jupyter(tmp_path: Path, sandbox_root: Path) -> AsyncIterator[JupyterServer]:
    """``jupyter server`` with the extension's embedded deployment (no workers: the admin
    endpoints need none), up and serving."""
    runtime, config, root, state = (tmp_path / n for n in ("runtime", "config", "root", "state"))
    for folder in (runtime, config, root):
        folder.mkdir()
    (config / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "ServerApp": {"jpserver_extensions": {"cellblock.server_ext": True}},
                "Cellblock": {
                    "start_local": True,
                    "state_dir": str(state),
                    "executors": 0,
                    "builders": 0,
                },
            }
        )
    )
    token, admin = secrets.token_urlsafe(16), f"admin-{secrets.token_urlsafe(16)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLBLOCK_", "JUPYTER"))}
    env.update(
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(runtime),
        CELLBLOCK_ADMIN_TOKEN=admin,
        CELLBLOCK_SANDBOX__ROOT=f'"{sandbox_root}"',
    )
    port = free_port()
    log = (tmp_path / "jupyter.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
         "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}"],
        env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    server = JupyterServer(
        f"http://127.0.0.1:{port}", token, runtime, state, admin, proc, AsyncHTTPClient()
    )
    try:
        deadline = time.monotonic() + 90
        while True:  # status.json answers 503 until the deployment is up
            assert proc.poll() is None, (tmp_path / "jupyter.log").read_text()
            try:
                if (await server.call("GET", "/cellblock/status.json"))[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, (tmp_path / "jupyter.log").read_text()
            await asyncio.sleep(0.3)
        yield server
    finally:
        # SIGTERM stops the server, which stops the deployment; what is left is killed.
        with_signal(proc, signal.SIGTERM)
        for _ in range(300):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        with_signal(proc, signal.SIGKILL)
        proc.wait()
        log.close()
        # `cellblock up` runs in a session of its own: the server must have stopped it.
        left = processes_of(state)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"the server left the deployment running: {left}"


def with_signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)


async def run_in_kernel(server: JupyterServer, code: str) -> str:
    """What ``code`` prints in a new python3 kernel that the Jupyter server starts."""
    status, kernel = await server.call("POST", "/api/kernels", {"name": "python3"})
    assert status == 201, kernel
    client = AsyncKernelClient(connection_file=str(server.runtime / f"kernel-{kernel['id']}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        return await printed_by(client, code, timeout=60)
    finally:
        client.stop_channels()
        await server.call("DELETE", f"/api/kernels/{kernel['id']}")


async def test_a_kernel_cannot_reach_admin_endpoints(jupyter: JupyterServer) -> None:
    # The deployment took the server's admin token: it is the one worth stealing.
    assert (jupyter.state / "admin-token").read_text().strip() == jupyter.admin_token
    seen = json.loads(await run_in_kernel(jupyter, ATTACK))
    assert "CELLBLOCK_ADMIN_TOKEN" not in seen["environ"]
    assert jupyter.admin_token not in json.dumps(seen["environ"])
    assert jupyter.admin_token not in seen["proc_environ"]
    answers = seen["answers"]
    # The client token it was given works where a client may go, and nowhere else.
    assert answers["env CELLBLOCK_TOKEN"] == {"workers": 403, "scale": 403, "capacity": 200}
    assert answers["file token"] == answers["env CELLBLOCK_TOKEN"]
    # Whatever else it found (the URL, its file, other settings) is no token at all.
    others = {k: v for k, v in answers.items() if k not in ("env CELLBLOCK_TOKEN", "file token")}
    assert "file url" in others
    assert all(v == {"workers": 401, "scale": 401, "capacity": 401} for v in others.values())
