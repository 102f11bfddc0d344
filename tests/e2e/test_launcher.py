"""The JupyterLab frontend extension (server_ext/labextension), in a real browser: JupyterLab's
launcher has a "Cellblock status" card, and clicking it opens the status page in a tab.

Needs what `make` installs: Debian's chromium, playwright in the venv (its own browser
download is not used), and the extension built and copied into the venv.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from browserio import chromium, jupyterlab
from playwright.sync_api import expect

TOKEN = "launcher-test-token"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    """A `jupyter lab` of this test's own; yields its URL."""
    env = {
        **os.environ,
        # An unreachable service: the extension starts no local deployment, and the status
        # page still renders (saying it cannot reach Cellblock).
        "CELLBLOCK_URL": "http://127.0.0.1:1",
        "CELLBLOCK_TOKEN": "x",
    }
    # jupyterlab() gives it a fresh user config (settings, workspaces), so the launcher is
    # what opens first.
    root = tmp_path / "root"
    root.mkdir()
    with jupyterlab(tmp_path, root, TOKEN, env, timeout=60) as lab:
        yield lab.url


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_launcher_card_opens_the_status_page(lab: str, tmp_path: Path):
    with chromium(tmp_path, 1280, 800) as browser:
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
