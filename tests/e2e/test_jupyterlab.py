"""The classroom end to end, in a real browser: a real JupyterLab server with the embedded
deployment (the extension starts `cellblock up` itself: no CELLBLOCK_URL), headless Debian
chromium driven by Playwright. A student opens a notebook, runs a Cellblock cell, watches its
status line and output come live, then opens the status page. And a kernel that JupyterLab
started before the deployment was up still finds it.

Needs what `make` installs: Debian's chromium and playwright in the venv (its own browser
download is not used). Screenshots go to the test's temporary directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from browserio import Lab, chromium, jupyterlab
from jupyter_client import BlockingKernelClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from playwright.sync_api import expect

from cellblock.kernel.install import install

TOKEN = "e2e-test-token"
#: The cell the student runs: output first, then a second in which the status line must still
#: say the run goes on while that output is already on the page (it streams, live).
CELL = "%%run\necho hello from the browser\nsleep 1"
#: Records every state of the cell's status line with the output shown at that moment.
RECORD = """() => {
  window.cellblockSeen = [];
  new MutationObserver(() => {
    const status = document.querySelector(".cellblock-status");
    if (!status) return;
    const out = [...document.querySelectorAll(".jp-OutputArea-output")]
      .map(o => o.textContent).join("");
    const seen = window.cellblockSeen, last = seen[seen.length - 1];
    if (!last || last.status !== status.textContent || last.out !== out)
      seen.push({status: status.textContent, out: out});
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _wait_for_cellblock(lab: Lab) -> None:
    """Until the embedded deployment is up and its executors are there."""

    def up() -> bool:
        health = lab.call("/cellblock/status.json")["health"]  # None: no answer yet
        return bool(health and health["executors"])

    lab.wait("Cellblock", up)


@pytest.fixture
def lab_server(tmp_path: Path, sandbox_root: Path) -> Iterator[Lab]:
    """`jupyter lab` on a folder holding one Cellblock notebook, with the embedded deployment
    (which starts with the server and comes up a few seconds later); once the server answers."""
    install(prefix=sys.prefix)  # `pip install -e` leaves the kernelspec out
    root = tmp_path / "root"
    root.mkdir()
    nb = new_notebook(cells=[new_markdown_cell("# Hello from Cellblock"), new_code_cell(CELL)])
    nb.metadata["kernelspec"] = {"name": "cellblock", "display_name": "Cellblock",
                                 "language": "cellblock"}  # fmt: skip
    nbformat.write(nb, root / "hello.ipynb")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about Jupyter news?" toast over the screenshots.
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')

    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBLOCK_")}
    env |= {
        "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
        "CELLBLOCK_LEASE_TIMEOUT": "1.5",
        # Slot uids (and the cgroups named for them) no other test's executors use: an
        # executor starting on a slot uid removes that uid's cgroups as its leftovers.
        "CELLBLOCK_SANDBOX__UID_BASE": "240000",
        # Fresh settings and workspace (jupyterlab() adds a fresh user configuration):
        # nothing of an earlier run opens.
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    state = f"--Cellblock.state_dir={tmp_path / 'state'}"
    with jupyterlab(tmp_path, root, TOKEN, env, state) as lab:
        yield lab


@pytest.fixture
def lab(lab_server: Lab) -> str:
    """The URL of a `jupyter lab` whose embedded deployment is up."""
    _wait_for_cellblock(lab_server)
    return lab_server.url


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_cell_runs_live_in_jupyterlab_and_the_status_page_shows_it(
    lab: str, tmp_path: Path
) -> None:
    with chromium(tmp_path, 1280, 720) as browser:
        page = browser.new_page()
        page.goto(f"{lab}/lab/tree/hello.ipynb?token={TOKEN}")
        cell = page.locator(".jp-CodeCell").first
        expect(cell).to_contain_text("hello from the browser", timeout=60_000)
        # Running before the kernel is connected would be dropped: wait until it is idle.
        kernel = page.get_by_role("button", name="Cellblock | Idle")
        expect(kernel).to_be_visible(timeout=60_000)
        page.evaluate(RECORD)
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")  # run the cell, stay on it

        status = cell.locator(".cellblock-status")
        expect(status).to_contain_text("→ finished", timeout=30_000)
        expect(status).to_contain_text("picked up by executor-")
        expect(status).to_contain_text("run: ok")
        expect(cell.locator(".jp-OutputArea-output").first).to_be_visible()
        expect(cell.locator(".jp-OutputArea")).to_contain_text("hello from the browser")
        expect(cell.locator("table.cellblock-summary")).to_contain_text("ok")
        seen = page.evaluate("window.cellblockSeen")
        assert seen[-1]["status"].endswith("→ finished"), seen
        # Live: the output was on the page while the status line still said "run…".
        assert any(
            s["status"].endswith("run…") and "hello from the browser" in s["out"] for s in seen
        ), seen
        page.screenshot(path=tmp_path / "notebook.png")

        status_page = browser.new_page()
        status_page.goto(f"{lab}/cellblock/")  # the login cookie of the notebook page
        expect(status_page.get_by_role("heading", name="Cellblock")).to_be_visible()
        workers = status_page.locator("#workers tbody tr")
        expect(workers.filter(has_text="executor")).to_have_count(2)
        expect(workers.filter(has_text="builder")).to_have_count(1)
        [submission] = status_page.locator("#submissions tbody tr").all()
        expect(submission).to_contain_text("finished")
        expect(submission).to_contain_text("ok (")
        expect(status_page.locator("#summary")).to_contain_text(
            "2 executor(s), 1 builder(s), 0 submission(s) queued"
        )
        status_page.screenshot(path=tmp_path / "status-page.png")


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in raw if entry)


@pytest.mark.timeout(120)
def test_a_kernel_started_before_the_deployment_is_up_reaches_it(lab_server: Lab) -> None:
    """JupyterLab starts the kernels of the notebooks it restores at once, before the embedded
    deployment is up: such a kernel gets no CELLBLOCK_URL (the extension puts it into the
    server's environment only then), and finds the service through the state directory."""
    kernel = lab_server.call("/api/kernels", {"name": "cellblock"})
    connection = lab_server.runtime / f"kernel-{kernel['id']}.json"
    [pid] = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
             and str(connection).encode() in _read(p / "cmdline")]  # fmt: skip
    if "CELLBLOCK_URL" in _environ(pid):
        pytest.skip("the deployment was up before the kernel started: nothing to test")
    _wait_for_cellblock(lab_server)

    client = BlockingKernelClient(connection_file=str(connection))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=30)
        sent = client.execute("%%run\necho found it")
        outputs = []
        while True:
            message = client.get_iopub_msg(timeout=30)
            if message["parent_header"].get("msg_id") != sent:
                continue
            if message["msg_type"] in ("stream", "error"):
                outputs.append((message["msg_type"], message["content"]))
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
    finally:
        client.stop_channels()
    assert outputs == [("stream", {"name": "stdout", "text": "found it\n"})], outputs


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""
