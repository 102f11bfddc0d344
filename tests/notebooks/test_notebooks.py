"""Every notebook in notebooks/, run top to bottom with nbclient on the ``cellblock`` kernel
against the embedded deployment: a real ``cellblock up`` (private Redis, the service, two
executors, a cache builder). Each notebook must run without an error outside the cells tagged
``raises-exception``, every tagged cell must fail, and what each notebook is there to show is
asserted on the outputs it ends up with (nbclient applies update_display_data, so a status
display holds its last state, as a saved notebook does)."""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.etree import ElementTree

import nbformat
import pytest
import upio
from nbclient import NotebookClient
from nbformat import NotebookNode
from upio import cellblock_up

from cellblock.kernel import sections

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
TAG = "raises-exception"


# -- the deployment and the runs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, sandbox_root: Path) -> Iterator[Path]:
    """``cellblock up`` in a temporary state directory; its state directory."""
    with cellblock_up(tmp_path_factory.mktemp("up"), sandbox_root, uid_base=230000) as state:
        yield state


@pytest.fixture(scope="module")
def kernel_env(deployment: Path) -> dict[str, str]:
    """The environment of the notebooks' kernels."""
    return upio.kernel_env(deployment)


Run = Callable[[str], NotebookNode]


@pytest.fixture(scope="module")
def executed(kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Run a notebook of notebooks/ top to bottom, once per module; the executed notebook.
    nbclient goes on past a failing cell tagged raises-exception and stops at any other."""
    done: dict[str, NotebookNode] = {}

    def run(name: str) -> NotebookNode:
        if name not in done:
            nb = nbformat.read(NOTEBOOKS / name, as_version=4)
            folder = tmp_path_factory.mktemp(name.removesuffix(".ipynb"))
            client = NotebookClient(
                nb,
                kernel_name="cellblock",
                timeout=120,
                resources={"metadata": {"path": str(folder)}},
            )
            client.execute(env=kernel_env)
            nbformat.validate(nb)
            done[name] = nb
        return done[name]

    return run


# -- what a cell shows -------------------------------------------------------------------------


def code(nb: NotebookNode) -> list[NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def cell(nb: NotebookNode, start: str) -> NotebookNode:
    """The one code cell whose source starts with ``start``."""
    [found] = [c for c in code(nb) if c.source.startswith(start)]
    return found


def stream(cell: NotebookNode, name: str = "stdout") -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


def status(cell: NotebookNode) -> str:
    """The status display's last state."""
    [display] = [o for o in cell.outputs if o.output_type == "display_data"
                 and "cellblock-status" in o.data.get("text/html", "")]  # fmt: skip
    return str(display.data["text/plain"])


def summary(cell: NotebookNode) -> list[list[str]]:
    """The summary table's rows (header left out), split into words."""
    tables = [o for o in cell.outputs if o.output_type == "display_data"
              and "cellblock-summary" in o.data.get("text/html", "")]  # fmt: skip
    assert len(tables) == 1, cell.outputs
    return [row.split() for row in tables[0].data["text/plain"].split("\n")[1:]]


def error(cell: NotebookNode) -> tuple[str, str]:
    [found] = [o for o in cell.outputs if o.output_type == "error"]
    return found.ename, found.evalue


def ok(cell: NotebookNode) -> None:
    """The cell ran and did not fail."""
    assert cell.execution_count is not None
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs


def finished_ok(cell: NotebookNode) -> None:
    """The cell submitted, and every stage of its submission succeeded."""
    ok(cell)
    assert status(cell).split("\n")[0].endswith("→ finished"), status(cell)
    assert all(row[1:3] == ["✅", "ok"] for row in summary(cell)), summary(cell)


def verdicts(cell: NotebookNode) -> dict[str, tuple[str, str]]:
    """The tests table: each test's verdict and points (``("wrong answer", "0/2")``), in
    order; and the score line below it is the table's sum."""
    [table] = [o for o in cell.outputs if o.output_type == "display_data"
               and "cellblock-tests" in o.data.get("text/html", "")]  # fmt: skip
    header, *rows, score = table.data["text/plain"].split("\n\n")[0].split("\n")
    assert header.split() == ["test", "verdict", "points", "time", "memory"]
    found = {}
    for row in rows:
        name, verdict, points = re.split(r"\s{2,}", row)[:3]
        found[name] = (verdict.split(" ", 1)[1], points)
    earned, most = (sum(int(p.split("/")[i]) for _, p in found.values()) for i in (0, 1))
    passed = sum(v == "passed" for v, _ in found.values())
    assert score == f"{passed} of {len(rows)} tests passed, {earned}/{most} points"
    return found


def details(cell: NotebookNode) -> str:
    """What the tests table says below itself about the tests that failed."""
    [table] = [o for o in cell.outputs if o.output_type == "display_data"
               and "cellblock-tests" in o.data.get("text/html", "")]  # fmt: skip
    return str(table.data["text/plain"]).split("\n\n", 1)[1]


def result(cell: NotebookNode) -> str | None:
    """The cell's execute_result (text/plain), if it has one."""
    found = [o.data["text/plain"] for o in cell.outputs if o.output_type == "execute_result"]
    assert len(found) <= 1, cell.outputs
    return found[0] if found else None


def all_passed(cell: NotebookNode, points: dict[str, int]) -> None:
    """The cell ran its tests, every one of them passed with its points, and its result is
    their sum (what nbgrader reads)."""
    finished_ok(cell)
    assert verdicts(cell) == {name: ("passed", f"{n}/{n}") for name, n in points.items()}
    assert result(cell) == str(sum(points.values()))
    # The status: a line for the stages, then one per test.
    line, *lines = status(cell).split("\n")
    assert f"→ run: {len(points)} of {len(points)} tests passed " in line, line
    assert [" ".join(test.split()[:5]) for test in lines] == [
        f"✅ {name} passed {n}/{n} pt" for name, n in points.items()
    ], lines


def files(cell: NotebookNode) -> dict[str, dict[str, str]]:
    """The output files the cell shows, by their caption's name (``tree.svg``, or
    ``sapling: tree.svg`` for a test's): their MIME bundles."""
    shown = {}
    for o in cell.outputs:
        caption = o.data.get("text/plain", "") if o.output_type == "display_data" else ""
        if match := re.match(r"((?:\S+: )?\S+) \((\S+), [^)]*\)", caption):
            shown[match.group(1)] = dict(o.data)
    return shown


def svg_lines(svg: str) -> int:
    """An SVG document's <line> elements, after checking that it is one."""
    root = ElementTree.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
    return len(root.findall(".//{http://www.w3.org/2000/svg}line"))


# -- what each notebook shows --------------------------------------------------------------------


def check_welcome(nb: NotebookNode) -> None:
    hello = cell(nb, "%%files hello.c")
    finished_ok(hello)
    assert stream(hello) == "hello, world (from notebook)\n"
    assert re.fullmatch(
        r"queued → picked up by executor-\S+ → compile: ok .+ → run: ok .+ → finished",
        status(hello),
    )
    staged = (
        "staged: 2 file(s): greet.py, hello.c; a compile script; stdin (10 chars); env: GREETING\n"
    )
    assert stream(cell(nb, "%%files greet.py")) == staged
    greet = cell(nb, '%%run "two words" three')
    finished_ok(greet)
    assert stream(greet) == "hi there ['two words', 'three'] from stdin\n"
    assert stream(cell(nb, "%staged")) == staged + (
        "  file greet.py: 85 chars (utf8)\n"
        "  file hello.c: 184 chars (utf8)\n"
        "  compile: gcc -O2 -Wall -o hello hello.c\n"
    )

    deps = cell(nb, "%%deps busybox")
    finished_ok(deps)
    assert re.search(r"→ dependencies: ok cache (hit|miss) ", status(deps)), status(deps)
    assert re.fullmatch(r"BusyBox v\S+ .*multi-call binary\.\n", stream(deps)), stream(deps)
    packages = stream(cell(nb, "%packages")).splitlines()
    assert packages[0].split() == ["name", "version", "size", "uses", "last", "used"]
    assert [line.split()[0] for line in packages[1:]] == ["busybox"]

    limits = cell(nb, "%%limits")
    finished_ok(limits)
    assert stream(limits) == "2\n64\n"  # ulimit -t, ulimit -n (the soft limit)

    finished_ok(cell(nb, "%%files data.bin --encoding hex"))
    assert stream(cell(nb, "%%files data.bin")) == " 00 ff 10\n"
    plain = cell(nb, 'echo "running in')
    finished_ok(plain)
    assert (
        stream(plain) == "running in /box as runner\ndata.bin\ngreet.py\nhello\nhello.c\nshow.sh\n"
    )

    failing = cell(nb, "%%run\necho about to fail")
    assert error(failing) == ("CellblockStageFailed", "run stage: failed: exit code 3")
    assert stream(failing, "stderr") == "about to fail\n"
    assert summary(failing)[-1][:4] == ["run", "❌", "failed", "3"]
    again = cell(nb, "%status")
    ok(again)
    assert status(again) == status(failing)  # the last submission, shown again
    assert summary(again) == summary(failing)
    workers = [line.split() for line in stream(cell(nb, "%workers")).splitlines()]
    assert workers[0] == ["id", "kind", "host", "busy", "slots", "last", "seen"]
    assert sorted((w[1], w[4]) for w in workers[1:]) == [
        ("builder", "1"), ("executor", "2"), ("executor", "2"),
    ]  # fmt: skip

    all_passed(cell(nb, "%%files square.c"), {"one": 1, "several": 2})
    dice = cell(nb, "%reset tests\n%%check")
    all_passed(dice, {"roll": 1, "roll-again": 1})  # whichever faces came up
    assert stream(dice) == "staged tests and checker cleared\n"
    drawn = cell(nb, "%reset tests\n%%outputs")
    finished_ok(drawn)
    assert result(drawn) is None  # no tests, no points
    shown = files(drawn)
    assert list(shown) == ["squares.svg", "squares.txt"]
    bars = ElementTree.fromstring(shown["squares.svg"]["image/svg+xml"])
    assert [int(bar.get("height", "")) for bar in bars] == [4 * i * i for i in range(1, 7)]
    assert shown["squares.txt"]["text/plain"] == (
        "squares.txt (text/plain, 27 B)\n1 1\n2 4\n3 9\n4 16\n5 25\n6 36\n"
    )
    assert [o.data for o in drawn.outputs if o.output_type == "display_data"][-1] == {
        "text/plain": "no file matched: *.png"
    }
    assert stream(cell(nb, "%reset\n%staged")) == "staged submission cleared\nstaged: nothing\n"


def check_assignment_c(nb: NotebookNode) -> None:
    tried = cell(nb, "%%stdin\n3\n1 2 3")
    finished_ok(tried)
    assert stream(tried) == "6\n"
    points = {"small": 1, "empty": 1, "negative": 1, "mean": 1, "large": 2}
    tests = cell(nb, "%%test small")
    all_passed(tests, points)
    assert re.search(r"→ compile: ok .* → run: 5 of 5 tests passed 6/6 pt ", status(tests))
    assert stream(tests) == ""  # a passing test's output is in its result, not in the cell

    [buggy] = [c for c in code(nb) if TAG in c.metadata.get("tags", [])]
    assert error(buggy) == ("CellblockTestsFailed", "1 of 5 tests failed: large")
    assert verdicts(buggy) == {name: ("passed", f"{n}/{n}") for name, n in points.items()} | {
        "large": ("wrong answer", "0/2")
    }
    assert result(buggy) is None
    assert details(buggy) == (
        "── large: ❌ wrong answer\n"
        "   the output differs from the expected output (lines)\n"
        "expected:\n   4000000000\nactual:\n   -294967296"
    )


def check_assignment_python(nb: NotebookNode) -> None:
    tried = cell(nb, "%%stdin\nthe cat")
    finished_ok(tried)
    assert stream(tried) == "the 3\nand 2\n"
    all_passed(cell(nb, "%%test simple 1"), {"simple": 1, "ties": 1, "case": 1, "empty": 1})
    # quick.py breaks ties otherwise than the expected outputs: the checker accepts it.
    checked = cell(nb, "%reset tests\n%%files quick.py")
    all_passed(checked, {"ties-first-seen": 1, "one-winner": 1, "all-different": 1})
    assert stream(checked) == "staged tests and checker cleared\n"

    [reversed_] = [c for c in code(nb) if TAG in c.metadata.get("tags", [])]
    assert error(reversed_) == ("CellblockTestsFailed", "1 of 3 tests failed: one-winner")
    assert verdicts(reversed_)["one-winner"] == ("wrong answer", "0/1")
    assert details(reversed_).startswith(
        "── one-winner: ❌ wrong answer\n"
        "   these are not the most frequent words, most frequent first\n"
    ), details(reversed_)


def check_assignment_shell(nb: NotebookNode) -> None:
    tried = cell(nb, "%%files a.txt")
    finished_ok(tried)
    assert stream(tried) == "a.txt 2\nb.txt 1\ntotal 3\n"
    all_passed(cell(nb, "%%test stdin"), {"stdin": 1, "one-file": 1, "two-files": 2})


def check_drawing(nb: NotebookNode) -> None:
    tree = cell(nb, "%%files tree.c")
    finished_ok(tree)
    assert stream(tree) == "tree.svg: depth 9, 511 branches\n"
    assert list(files(tree)) == ["tree.svg"]
    assert svg_lines(files(tree)["tree.svg"]["image/svg+xml"]) == 511

    mandelbrot = cell(nb, "%%files mandelbrot.py")
    finished_ok(mandelbrot)
    assert list(files(mandelbrot)) == ["mandelbrot.png"]  # the %%outputs staged above replaced
    png = base64.b64decode(files(mandelbrot)["mandelbrot.png"]["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (300, 200)
    assert stream(mandelbrot) == f"mandelbrot.png: 300x200, {len(png) - 12} bytes\n"  # no IEND

    tests = cell(nb, "%%outputs tree.svg branches.txt")
    all_passed(tests, {"sapling": 1, "bush": 1})
    shown = files(tests)
    assert list(shown) == [
        "sapling: tree.svg", "sapling: branches.txt", "bush: tree.svg", "bush: branches.txt",
    ]  # fmt: skip
    for test, depth in (("sapling", 3), ("bush", 6)):
        assert svg_lines(shown[f"{test}: tree.svg"]["image/svg+xml"]) == 2**depth - 1
        report = shown[f"{test}: branches.txt"]["text/plain"]
        assert report.endswith(f"\ntree.svg: depth {depth}, {2**depth - 1} branches\n"), report


def check_limits(nb: NotebookNode) -> None:
    tagged = [c for c in code(nb) if TAG in c.metadata.get("tags", [])]
    loop, sleep, memory, flood, fsize = tagged
    assert error(loop) == (
        "CellblockStageFailed",
        "run stage: time_limit: CPU time limit of 1 s exceeded",
    )
    assert summary(loop)[0][:4] == ["run", "⏱", "time_limit", "SIGKILL"]
    assert error(sleep) == (
        "CellblockStageFailed", "run stage: time_limit: wall time limit of 1 s exceeded",
    )  # fmt: skip
    assert error(memory) == (
        "CellblockStageFailed", "run stage: memory_limit: memory limit of 67108864 bytes exceeded",
    )  # fmt: skip
    assert summary(memory)[0][:3] == ["run", "🧠", "memory_limit"]
    assert summary(memory)[0][-2:] == ["64.0", "MiB"]  # the peak, at the cap

    assert error(flood) == (
        "CellblockStageFailed",
        "run stage: time_limit: wall time limit of 1 s exceeded (stdout truncated at 1.0 KiB)",
    )
    assert stream(flood) == "y\n" * 512  # the first 1 KiB, and nothing after it
    assert stream(flood, "stderr") == (
        "[stdout truncated at 1.0 KiB: the rest was not kept; raise run.output in %%limits]\n"
    )
    assert "run: time_limit" in status(flood) and status(flood).endswith(
        "(stdout truncated) → finished"
    )

    assert error(fsize) == (
        "CellblockStageFailed",
        "run stage: output_limit: file size limit of 1048576 bytes exceeded",
    )
    assert summary(fsize)[0][:4] == ["run", "📄", "output_limit", "153"]  # 128 + SIGXFSZ

    last = code(nb)[-1]
    finished_ok(last)
    assert stream(last) == "staged submission cleared\nfine\n"


def check_interactive(nb: NotebookNode) -> None:
    # nbclient allows no stdin: each interactive run read the staged %%stdin, and says so.
    note = "(no interactive input here: ran with the staged %%stdin)\n"
    game = cell(nb, "%%run --interactive 2025")
    finished_ok(game)
    guesses = "".join(f"Your guess: {n} is too {w}.\n" for n, w in (
        (50, "low"), (75, "low"), (88, "high"), (81, "high"), (78, "high"),
    ))  # fmt: skip
    assert stream(game) == (
        f"{note}I am thinking of a number from 1 to 100.\n{guesses}"
        "Your guess: 76 it is, in 6 tries!\n"
    )
    menu = cell(nb, "%%run --interactive\npython3 shopping.py")
    finished_ok(menu)
    # The menu, then what each choice printed (a prompt's input does not show: a pipe).
    menu_text = "1) add an item   2) show the list   3) done\nChoose: "
    replies = ["  (empty)\n", "Item: ", "Item: ", "  1. bread\n  2. cheese\n",
               "No option '4': type 1, 2 or 3.\n", "Bye! 2 item(s) on the list.\n"]  # fmt: skip
    assert stream(menu) == note + "".join(menu_text + reply for reply in replies)


EXPECTED: dict[str, Callable[[NotebookNode], None]] = {
    "welcome.ipynb": check_welcome,
    "assignment-c.ipynb": check_assignment_c,
    "assignment-python.ipynb": check_assignment_python,
    "assignment-shell.ipynb": check_assignment_shell,
    "drawing.ipynb": check_drawing,
    "limits.ipynb": check_limits,
    "interactive.ipynb": check_interactive,
}


# -- the tests -----------------------------------------------------------------------------------


def test_every_notebook_has_its_expectations_and_is_tidy() -> None:
    """Stored without outputs, on the cellblock kernel, tagged only with the standard tag; and
    a notebook added to notebooks/ without expectations here fails this test."""
    assert sorted(EXPECTED) == NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec == {
            "name": "cellblock", "display_name": "Cellblock", "language": "cellblock",
        }, name  # fmt: skip
        for c in code(nb):
            assert c.outputs == [] and c.execution_count is None, (name, c.source)
            assert set(c.metadata.get("tags", [])) <= {TAG}, (name, c.source)
            sections.parse(c.source)  # no cell is a syntax error


def test_the_welcome_notebook_shows_every_magic() -> None:
    nb = nbformat.read(NOTEBOOKS / "welcome.ipynb", as_version=4)
    cells = [sections.parse(c.source) for c in code(nb)]
    assert {s.magic for c in cells for s in c.sections} == set(sections.SECTION_MAGICS)
    assert {m.name for c in cells for m in c.magics} == set(sections.LINE_MAGICS)
    assert any(c.plain_run for c in cells)  # and a cell with no section at all
    assert any(m.args == ("tests",) for c in cells for m in c.magics)  # and %reset tests


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_a_notebook_fails_exactly_in_its_tagged_cells(name: str, executed: Run) -> None:
    """nbclient stops at an untagged cell that fails (CellExecutionError); every cell runs, and
    a cell fails if and only if it is tagged raises-exception."""
    nb = executed(name)
    for c in code(nb):
        assert c.execution_count is not None, c.source
        failed = any(o.output_type == "error" for o in c.outputs)
        assert failed == (TAG in c.metadata.get("tags", [])), (c.source, c.outputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_a_notebook_shows_what_it_is_meant_to(name: str, executed: Run) -> None:
    EXPECTED[name](executed(name))
