"""The JupyterLab frontend extension (server_ext/labextension), in a real browser: JupyterLab's
launcher has a "Cellblock status" card, and clicking it opens the status page in a tab.

Needs what `make` installs: Debian's chromium, playwright in the venv (its own browser
download is not used), and the extension built and copied into the venv.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

TOKEN = "launcher-test-token"
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying hosts this machine cannot
# reach; the sandbox needs user namespaces that a root CI run does not have.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """A `jupyter lab` of this test's own; yields its URL."""
    port = _free_port()
    env = {
        **os.environ,
        # An unreachable service: the extension starts no local deployment, and the status
        # page still renders (saying it cannot reach Cellblock).
        "CELLBLOCK_URL": "http://127.0.0.1:1",
        "CELLBLOCK_TOKEN": "x",
        # A fresh user config (settings, workspaces), so the launcher is what opens first.
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    log = tmp_path / "lab.log"
    root = tmp_path / "root"
    root.mkdir()
    command = [str(Path(sys.executable).with_name("jupyter-lab")), "--no-browser",
               "--allow-root", f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}"]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"jupyter lab exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"jupyter lab did not start:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=5):
                    break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_launcher_card_opens_the_status_page(lab: str, tmp_path: Path):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = browser.new_page()
            page.goto(f"{lab}/lab?token={TOKEN}")
            other = page.locator(".jp-Launcher-section", has_text="Other")
            card = other.locator(".jp-LauncherCard", has_text="Cellblock status")
            expect(card).to_be_visible(timeout=60_000)
            page.screenshot(path=tmp_path / "launcher.png")
            with page.expect_response(lambda r: r.url.endswith("/cellblock/status.json")) as data:
                card.click()

            # The page opened in a tab's iframe, its script ran (the iframe's sandbox lets it)
            # and fetched status.json with the Jupyter login cookie: the server let it through,
            # and the page reports the unreachable service.
            assert data.value.status not in (401, 403), data.value.status
            status = page.frame_locator("#cellblock-status iframe")
            expect(status.get_by_role("heading", name="Cellblock")).to_be_visible()
            expect(status.locator("#summary")).to_contain_text("Cannot reach Cellblock")
            frame = next(f for f in page.frames if f.url.endswith("/cellblock/"))
            assert frame.title() == "Cellblock"
            page.screenshot(path=tmp_path / "status-page.png")
        finally:
            browser.close()
