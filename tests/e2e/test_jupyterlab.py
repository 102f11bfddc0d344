"""The classroom end to end, in a real browser: a real JupyterLab server with the embedded
deployment (the extension starts `cellblock up` itself: no CELLBLOCK_URL), headless Debian
chromium driven by Playwright. A student opens a notebook, runs a Cellblock cell, watches its
status line and output come live, then opens the status page. A teacher's graded cell shows
its tests live, then their table with what failed, and the picture the program drew (an SVG
shown as an image, its script never run). An interactive program asks for its input in an
input box, which goes away when the program ends, answered or not. And a kernel that JupyterLab
started before the deployment was up still finds it.

Needs what `make` installs: Debian's chromium and playwright in the venv (its own browser
download is not used). Screenshots go to the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

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
#: A C program drawing ``n`` circles into picture.svg, with a bug three tests catch one of
#: ("1 circles"). The SVG carries a script and an onload handler: shown as the image it is,
#: neither may run in the notebook's page.
CIRCLES_C = r"""%%files circles.c
#include <stdio.h>

int main(void) {
    int n;
    if (scanf("%d", &n) != 1) return 1;
    FILE *svg = fopen("picture.svg", "w");
    if (svg == NULL) { perror("picture.svg"); return 1; }
    fprintf(svg, "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='60'"
                 " onload='window.cellblockPwned = 1'>\n", 50 * n + 10);
    fprintf(svg, "<script>window.cellblockPwned = 1;</script>\n");
    for (int i = 0; i < n; i++)
        fprintf(svg, "<circle cx='%d' cy='30' r='22' fill='hsl(%d, 70%%, 55%%)'/>\n",
                30 + 50 * i, 70 * i);
    fprintf(svg, "</svg>\n");
    fclose(svg);
    printf("%d circles\n", n);
    return 0;
}
%%compile
gcc -O2 -Wall -o circles circles.c"""
GRADED = """%%outputs picture.svg
%%test three
3
%%expect
3 circles
%%test one
1
%%expect
1 circle
%%test five --points 2
5
%%expect
5 circles
%%run
./circles"""
#: Records every set of live test lines under the status line while the tests run.
RECORD_TESTS = """() => {
  window.cellblockLive = [];
  new MutationObserver(() => {
    const live = document.querySelector(".cellblock-live-tests");
    if (!live) return;
    const lines = [...live.children].map(line => line.textContent);
    const seen = window.cellblockLive, last = seen[seen.length - 1];
    if (!last || last.join("\\n") !== lines.join("\\n")) seen.push(lines);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""

#: An interactive game (guess 37), and a program whose box nobody answers before its wall time.
GUESS = r"""%%files guess.c
#include <stdio.h>
int main(void) {
    int guess;
    do {
        printf("Guess a number (1-100): ");
        if (scanf("%d", &guess) != 1) return 1;
        if (guess != 37) printf("%d is too %s\n", guess, guess < 37 ? "low" : "high");
    } while (guess != 37);
    printf("Right: 37!\n");
    return 0;
}
%%compile
gcc -O2 -o guess guess.c
%%run --interactive
./guess"""
UNANSWERED = """%%limits
run.wall_time = 3s
%%run --interactive
read -p "Name? " name"""
#: The text of a cell's outputs above its input box.
ABOVE_THE_BOX = """area => {
  const children = [...area.querySelectorAll(".jp-OutputArea-child")];
  const box = children.findIndex(child => child.querySelector(".jp-Stdin"));
  return children.slice(0, box).map(child => child.textContent).join("");
}"""


def _notebook(path: Path, *cells: str, title: str) -> None:
    nb = new_notebook(cells=[new_markdown_cell(title), *map(new_code_cell, cells)])
    nb.metadata["kernelspec"] = {"name": "cellblock", "display_name": "Cellblock",
                                 "language": "cellblock"}  # fmt: skip
    nbformat.write(nb, path)


def _wait_for_cellblock(lab: Lab) -> None:
    """Until the embedded deployment is up and its executors are there."""

    def up() -> bool:
        health = lab.call("/cellblock/status.json")["health"]  # None: no answer yet
        return bool(health and health["executors"])

    lab.wait("Cellblock", up)


@pytest.fixture
def lab_server(tmp_path: Path, sandbox_root: Path) -> Iterator[Lab]:
    """`jupyter lab` on a folder holding two Cellblock notebooks (a run, and a graded one),
    with the embedded deployment (which starts with the server and comes up a few seconds
    later); once the server answers."""
    install(prefix=sys.prefix)  # `pip install -e` leaves the kernelspec out
    root = tmp_path / "root"
    root.mkdir()
    _notebook(root / "hello.ipynb", CELL, title="# Hello from Cellblock")
    _notebook(root / "circles.ipynb", CIRCLES_C, GRADED, title="# Circles, graded")
    _notebook(root / "guess.ipynb", GUESS, UNANSWERED, title="# Guess")
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


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_graded_cell_shows_its_tests_and_the_picture_it_drew_in_jupyterlab(
    lab: str, tmp_path: Path
) -> None:
    with chromium(tmp_path, 1280, 1120) as browser:
        page = browser.new_page()
        page.goto(f"{lab}/lab/tree/circles.ipynb?token={TOKEN}")
        expect(page.locator(".jp-CodeCell").nth(1)).to_contain_text("%%test three", timeout=60_000)
        kernel = page.get_by_role("button", name="Cellblock | Idle")
        expect(kernel).to_be_visible(timeout=60_000)
        page.keyboard.press("Control+b")  # the file browser closed: room for the outputs
        page.evaluate(RECORD_TESTS)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

        cell = page.locator(".jp-CodeCell").nth(1)
        status = cell.locator(".cellblock-status")
        expect(status).to_contain_text("→ finished", timeout=45_000)
        expect(status).to_contain_text("run: 2 of 3 tests passed 3/4 pt")
        live = cell.locator(".cellblock-live-tests > div")
        expect(live).to_have_count(3)
        expect(live.nth(0)).to_contain_text("✅ three passed 1/1 pt")
        expect(live.nth(1)).to_contain_text("❌ one wrong answer 0/1 pt")
        expect(live.nth(2)).to_contain_text("✅ five passed 2/2 pt")

        rows = cell.locator("table.cellblock-tests tbody tr")
        expect(cell.locator("table.cellblock-tests")).to_be_visible()
        expect(rows).to_have_count(3)
        for row, (name, verdict, points) in zip(
            rows.all(),
            [("three", "✅ passed", "1/1"), ("one", "❌ wrong answer", "0/1"),
             ("five", "✅ passed", "2/2")],
            strict=True,
        ):  # fmt: skip
            cells = row.locator("td")
            expect(cells.nth(0)).to_have_text(name)
            expect(cells.nth(1)).to_have_text(verdict)
            expect(cells.nth(2)).to_have_text(points)
            expect(cells.nth(3)).to_have_text(re.compile(r"^\d+ ms$"))
            expect(cells.nth(4)).to_have_text(re.compile(r"^[\d.]+ (B|KiB|MiB)$"))
        expect(cell.locator(".cellblock-tests + p")).to_have_text("2 of 3 tests passed, 3/4 points")
        [failure] = cell.locator(".cellblock-test-failure").all()
        expect(failure.locator("h4")).to_have_text("one: ❌ wrong answer")
        side = failure.locator("table.cellblock-expected-actual pre")
        expect(side).to_have_text(["1 circle", "1 circles"])
        error = cell.locator(".jp-OutputArea-output[data-mime-type$='stderr']")
        expect(error).to_contain_text("CellblockTestsFailed: 1 of 3 tests failed: one")

        # Each test's picture.svg as an image: an <img> of a data: URL, never the SVG in the
        # page, so that its script and onload handler do not run.
        images = cell.locator(".jp-OutputArea-output img")
        expect(images).to_have_count(3)
        sizes, svgs = [], []
        for image in images.all():
            kind, _, svg = (image.get_attribute("src") or "").partition(",")
            assert kind == "data:image/svg+xml", kind
            svgs.append(unquote(svg))
            assert "<script>window.cellblockPwned = 1;</script>" in svgs[-1], svgs[-1]
            image.evaluate("img => img.decode()")  # until it is drawn
            sizes.append(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))
        assert sizes == [[160, 60], [60, 60], [260, 60]], sizes  # 3, 1 and 5 circles
        assert cell.locator(".jp-OutputArea svg circle").count() == 0
        assert page.evaluate("typeof window.cellblockPwned") == "undefined"

        # Live: a test was seen running while an earlier one had its verdict already.
        seen = page.evaluate("window.cellblockLive")
        assert seen[-1] == [line.text_content() for line in live.all()], seen
        assert any(
            any("running…" in line for line in lines) and any("passed" in line for line in lines)
            for lines in seen
        ), seen

        # The picture above the fold, for docs/grading.png too.
        cell.evaluate("cell => cell.scrollIntoView({block: 'start'})")
        page.screenshot(path=tmp_path / "grading.png")

        # And the same SVG does run its script when it is put in a page as markup: had the
        # notebook inlined it, the check above would have failed.
        inlined = browser.new_page()
        inlined.set_content(f"<!doctype html><body>{svgs[0]}</body>")
        assert inlined.evaluate("window.cellblockPwned") == 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_interactive_program_asks_in_an_input_box_in_jupyterlab(
    lab: str, tmp_path: Path
) -> None:
    with chromium(tmp_path, 1280, 900) as browser:
        page = browser.new_page()
        page.goto(f"{lab}/lab/tree/guess.ipynb?token={TOKEN}")
        game, unanswered = page.locator(".jp-CodeCell").nth(0), page.locator(".jp-CodeCell").nth(1)
        expect(game).to_contain_text("%%run --interactive", timeout=60_000)
        expect(page.get_by_role("button", name="Cellblock | Idle")).to_be_visible(timeout=60_000)
        game.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")

        # The box comes when the program waits, below its prompt; what is typed goes to it.
        area = game.locator(".jp-OutputArea")
        for guess, answer in (("50", "50 is too high"), ("37", "Right: 37!")):
            box = game.locator(".jp-Stdin-input")
            expect(box).to_have_count(1, timeout=30_000)
            assert area.evaluate(ABOVE_THE_BOX).endswith("Guess a number (1-100): ")
            box.fill(guess)
            if guess == "37":
                page.screenshot(path=tmp_path / "interactive.png")
            box.press("Enter")
            expect(area).to_contain_text(answer)
        expect(game.locator(".cellblock-status")).to_contain_text("→ finished", timeout=30_000)
        expect(game.locator(".cellblock-status")).to_contain_text("run: ok")
        expect(game.locator(".jp-Stdin")).to_have_count(0)
        # What was typed shows once (the frontend's own), not again as the terminal's echo.
        stdout = "[data-mime-type='application/vnd.jupyter.stdout']"
        assert game.locator(f".jp-OutputArea-output{stdout}").all_inner_texts() == [
            "Guess a number (1-100): ", " 50\n", "50 is too high\nGuess a number (1-100): ",
            " 37\n", "Right: 37!\n",
        ]  # fmt: skip

        # Nobody answers: the program's wall time ends it, and its box goes with it.
        unanswered.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")
        expect(unanswered.locator(".jp-Stdin-input")).to_have_count(1, timeout=30_000)
        status = unanswered.locator(".cellblock-status")
        expect(status).to_contain_text("→ finished", timeout=30_000)
        expect(status).to_contain_text("run: time_limit")
        expect(unanswered.locator(".jp-Stdin")).to_have_count(0)
        expect(unanswered.locator(".jp-OutputArea")).to_contain_text("Name? ")
        expect(unanswered.locator(".jp-OutputArea")).to_contain_text("CellblockStageFailed")


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
