"""The browser and the JupyterLab server of the end-to-end tests: headless Debian chromium
driven by Playwright (its own browser download is not used), and a `jupyter lab` subprocess
of the test's own. (A module of its own because test modules cannot import conftest.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, sync_playwright
from upio import free_port

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying hosts this machine cannot
# reach; its own sandbox needs user namespaces that a root CI run does not give it.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextmanager
def chromium(tmp_path: Path, width: int, height: int) -> Iterator[BrowserContext]:
    """Debian's chromium with a fresh profile in ``tmp_path`` and a ``width`` by ``height``
    viewport; closed on leaving."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Lab:
    """A running `jupyter lab` and where its kernels' connection files go."""

    url: str
    token: str
    runtime: Path
    server: subprocess.Popen[bytes]
    log: Path

    def call(self, path: str, body: object = None) -> Any:
        """The JSON answer of a GET (a POST with ``body``) to the server, with its token."""
        return json.loads(self.read(path, body))

    def read(self, path: str, body: object = None, timeout: float = 30) -> str:
        """The whole answer of a GET (a POST with ``body``) to the server, as text."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return str(response.read().decode())

    def wait(self, what: str, ready: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.server.poll() is None, f"jupyter lab exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no {what} in jupyter lab:\n{self.log.read_text()}"
            try:
                if ready():
                    return
            except OSError:  # not listening yet, or 503 from the extension: not up yet
                pass
            time.sleep(0.1)


@contextmanager
def jupyterlab(
    tmp_path: Path, root: Path, token: str, env: dict[str, str], *args: str, timeout: float = 90
) -> Iterator[Lab]:
    """`jupyter lab` on ``root`` with ``env`` plus a fresh user configuration and runtime
    directory in ``tmp_path`` (its output in tmp_path/lab.log), once it answers; stopped on
    leaving. ``args``: more command-line options."""
    env = env | {
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    port = free_port()
    log = tmp_path / "lab.log"
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
               f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               *args]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    lab = Lab(f"http://127.0.0.1:{port}", token, tmp_path / "runtime", server, log)
    try:
        lab.wait("server", lambda: bool(lab.call("/api/status")), timeout)
        yield lab
    finally:
        # SIGTERM: the server stops its kernels (and the extension its `cellblock up`).
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
