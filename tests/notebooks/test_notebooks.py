"""Every notebook in notebooks/, run top to bottom with nbclient on the ``cellblock`` kernel
against the embedded deployment: a real ``cellblock up`` (private Redis, the service, two
executors, a cache builder). Each notebook must run without an error outside the cells tagged
``raises-exception``, every tagged cell must fail, and what each notebook is there to show is
asserted on the outputs it ends up with (nbclient applies update_display_data, so a status
display holds its last state, as a saved notebook does)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

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
    assert status(cell).endswith("→ finished"), status(cell)
    assert all(row[1:3] == ["✅", "ok"] for row in summary(cell)), summary(cell)


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
    assert stream(cell(nb, "%reset")) == "staged submission cleared\nstaged: nothing\n"


def check_assignment(try_it: str, shown: str, checks: list[str]) -> Callable[[NotebookNode], None]:
    """An assignment: its "try it" cell shows ``shown``; its checks cell prints PASS for each
    of ``checks``, in order; no cell prints FAIL."""

    def check(nb: NotebookNode) -> None:
        tried = cell(nb, try_it)
        finished_ok(tried)
        assert stream(tried) == shown
        checked = code(nb)[-1]
        finished_ok(checked)
        assert stream(checked) == "".join(f"PASS {name}\n" for name in checks)
        assert not any("FAIL" in stream(c) + stream(c, "stderr") for c in code(nb))

    return check


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


EXPECTED: dict[str, Callable[[NotebookNode], None]] = {
    "welcome.ipynb": check_welcome,
    "assignment-c.ipynb": check_assignment(
        "%%stdin\n3\n1 2 3", "6\n", ["small", "empty", "negative", "mean", "large"]
    ),
    "assignment-python.ipynb": check_assignment(
        "%%stdin\nthe cat", "the 3\nand 2\n", ["simple", "ties", "case", "empty"]
    ),
    "assignment-shell.ipynb": check_assignment(
        "%%files a.txt", "a.txt 2\nb.txt 1\ntotal 3\n", ["stdin", "one-file", "two-files"]
    ),
    "limits.ipynb": check_limits,
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
