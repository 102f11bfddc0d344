"""Whole notebooks, built with nbformat and run with nbclient ("Run all") on the ``cellblock``
kernel against the real service, executors and a cache builder. What is checked is what a
saved notebook holds: nbclient applies update_display_data to the output with the same display
id, so the status display holds its last state."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernelio import kernel_env
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

C_SUM = """\
#include <stdio.h>
int main(void) {
    long a, b;
    if (scanf("%ld %ld", &a, &b) != 2) {
        fprintf(stderr, "sum: two numbers, please\\n");
        return 2;
    }
    printf("%ld\\n", a + b);
    return 0;
}
"""


def notebook(*cells: NotebookNode) -> NotebookNode:
    nb = new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "cellblock", "display_name": "Cellblock",
                                 "language": "cellblock"}  # fmt: skip
    return nb


def raises(source: str) -> NotebookNode:
    """A code cell that is meant to fail: nbclient goes on past it."""
    return new_code_cell(source, metadata={"tags": ["raises-exception"]})


async def run_all(nb: NotebookNode, url: str, folder: Path) -> NotebookNode:
    client = NotebookClient(
        nb, kernel_name="cellblock", timeout=60, resources={"metadata": {"path": str(folder)}}
    )
    await client.async_execute(env=kernel_env(url))
    nbformat.validate(nb)
    return nb


def status(cell: NotebookNode) -> str:
    """The status display's last state (its first output)."""
    first = cell.outputs[0]
    assert first.output_type == "display_data"
    assert "cellblock-status" in first.data["text/html"]
    return str(first.data["text/plain"])


def stdout(cell: NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def summary(cell: NotebookNode) -> list[list[str]]:
    """The summary table's rows (header left out), split into words."""
    tables = [o for o in cell.outputs if o.output_type == "display_data"
              and "cellblock-summary" in o.data.get("text/html", "")]  # fmt: skip
    assert len(tables) == 1, cell.outputs
    return [row.split() for row in tables[0].data["text/plain"].split("\n")[1:]]


def errors(cell: NotebookNode) -> list[NotebookNode]:
    return [o for o in cell.outputs if o.output_type == "error"]


def assert_ran(cell: NotebookNode) -> None:
    """The cell ran and did not fail."""
    assert cell.execution_count is not None
    assert not errors(cell), cell.outputs


@pytest.mark.timeout(120)
async def test_a_c_program_with_dependencies_compiled_and_run_with_stdin(
    service: Any, executor: Any, start_builder: Any, tmp_path: Path
) -> None:
    builder = start_builder()
    await builder.started()
    nb = notebook(
        new_markdown_cell("# Sum\nRead two numbers, print their sum."),
        new_code_cell("%%deps gcc"),
        new_code_cell(f"%%files sum.c\n{C_SUM}"),
        new_code_cell("%%compile\ngcc -O2 -Wall -o sum sum.c\n%%stdin\n3 4\n%%run\n./sum"),
        new_code_cell("%%stdin\n1000000000000 1\n%%run\n./sum"),
        raises("%%stdin\nthree four\n%%run\n./sum"),
        new_code_cell("%staged"),
    )
    nb = await run_all(nb, service.url, tmp_path)
    _, deps, files, first, second, failing, staged = nb.cells

    assert_ran(deps)
    assert stdout(deps) == "staged: deps: gcc\n"
    assert_ran(files)
    assert stdout(files) == "staged: 1 file(s): sum.c; deps: gcc\n"

    assert_ran(first)
    assert re.fullmatch(
        r"queued → picked up by executor-test-0 → dependencies: ok cache (hit|miss) \d+ ms"
        r" → compile: ok \S+ \S+ \S+ \S+ → run: ok \S+ \S+ \S+ \S+ → finished",
        status(first),
    ), status(first)
    assert stdout(first) == "7\n"
    assert [row[:3] for row in summary(first)] == [
        ["deps", "✅", "ok"], ["compile", "✅", "ok"], ["run", "✅", "ok"],
    ]  # fmt: skip
    assert summary(first)[2][3] == "0"  # the run's exit code
    # Outputs in order: the status display, the run's output, the summary table.
    assert [o.output_type for o in first.outputs] == ["display_data", "stream", "display_data"]

    assert_ran(second)
    assert stdout(second) == "1000000000001\n"
    assert status(second).endswith("→ finished")

    [error] = errors(failing)
    assert error.ename == "CellblockStageFailed"
    assert error.evalue == "run stage: failed: exit code 2"
    assert "two numbers, please" in "".join(
        o.text for o in failing.outputs if o.output_type == "stream" and o.name == "stderr"
    )
    assert summary(failing)[2][:4] == ["run", "❌", "failed", "2"]
    assert "run: failed exit 2" in status(failing)

    assert_ran(staged)  # "Run all" went on past the tagged failure
    assert stdout(staged).startswith(
        "staged: 1 file(s): sum.c; deps: gcc; a compile script; stdin (11 chars)\n"
    )


async def test_limits_in_a_notebook(service: Any, executor: Any, tmp_path: Path) -> None:
    nb = notebook(
        new_code_cell("%%limits\nrun.wall_time = 1s\nrun.nproc = 64:128\nrun.as = 256M"),
        raises("%%run\necho sleeping\nsleep 10"),
        new_code_cell("%%limits\nrun.wall_time = 10s\n%%run\nulimit -Su; ulimit -Hu; ulimit -v"),
        new_code_cell("# a plain cell is a run script\nprintf 'plain %s\\n' \"$0\" | head -c 6"),
    )
    nb = await run_all(nb, service.url, tmp_path)
    limits, sleeper, ulimit, plain = nb.cells

    assert_ran(limits)
    assert stdout(limits) == ("staged: run limits: as=268435456, nproc=[64, 128], wall_time=1.0\n")
    [error] = errors(sleeper)
    assert (error.ename, error.evalue) == (
        "CellblockStageFailed", "run stage: time_limit: wall time limit of 1 s exceeded",
    )  # fmt: skip
    assert stdout(sleeper) == "sleeping\n"
    assert "run: time_limit" in status(sleeper)
    assert summary(sleeper)[0][:3] == ["run", "⏱", "time_limit"]

    assert_ran(ulimit)
    assert stdout(ulimit) == "64\n128\n262144\n"  # ulimit -v counts KiB
    assert_ran(plain)
    assert stdout(plain) == "plain "


async def test_run_all_stops_at_a_failing_cell(service: Any, executor: Any, tmp_path: Path) -> None:
    nb = notebook(
        new_code_cell("%%run\necho first"),
        new_code_cell("%%run\necho failing\nexit 7"),
        new_code_cell("%%run\necho never"),
    )
    with pytest.raises(CellExecutionError) as info:
        await run_all(nb, service.url, tmp_path)
    assert "CellblockStageFailed" in str(info.value)
    assert "run stage: failed: exit code 7" in str(info.value)
    first, failing, never = nb.cells
    assert_ran(first)
    assert stdout(first) == "first\n"
    [error] = errors(failing)
    assert error.evalue == "run stage: failed: exit code 7"
    assert never.execution_count is None and never.outputs == []


#: The smallest PNG, one pixel, as bash printf escapes.
PNG_PRINTF = "".join(
    f"\\x{b:02x}"
    for b in base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
)


async def test_test_cells_as_nbgrader_reads_them(
    service: Any, executor: Any, tmp_path: Path
) -> None:
    """What nbgrader's autograder looks at in a saved test cell: an execute_result whose
    text/plain is the points when every test passed, an error output when one failed; and the
    pictures a cell brought back, by MIME type."""
    nb = notebook(
        new_code_cell("%%files double.sh\nread -r n; echo $((n * 2))\n"),
        new_code_cell(
            "%%test one --points 2\n1\n%%expect\n2\n%%test ten --points 0.5\n10\n%%expect\n20\n"
            "%%run\nbash double.sh"
        ),
        raises("%%test ten\n10\n%%expect\n21\n%%run\nbash double.sh"),
        new_code_cell(f"%reset tests\n%%outputs dot.png\n%%run\nprintf '{PNG_PRINTF}' > dot.png"),
    )
    nb = await run_all(nb, service.url, tmp_path)
    _, passing, failing, picture = nb.cells

    assert_ran(passing)
    [result] = [o for o in passing.outputs if o.output_type == "execute_result"]
    assert result.data == {"text/plain": "2.5"} and float(result.data["text/plain"]) == 2.5
    # The status display saved in its last state: a line per test under the status line.
    assert [line.split()[:3] for line in status(passing).split("\n")[1:]] == [
        ["✅", "one", "passed"], ["✅", "ten", "passed"],
    ]  # fmt: skip
    assert passing.outputs[-1].output_type == "execute_result"

    [error] = errors(failing)
    assert (error.ename, error.evalue) == ("CellblockTestsFailed", "1 of 2 tests failed: ten")
    assert not [o for o in failing.outputs if o.output_type == "execute_result"]

    assert_ran(picture)
    images = [o for o in picture.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and images[0].output_type == "display_data"
    assert base64.b64decode(images[0].data["image/png"]).startswith(b"\x89PNG")
    assert not [o for o in picture.outputs if o.output_type == "execute_result"]
