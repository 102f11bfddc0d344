"""Grading in the kernel, end to end: ``%%test``, ``%%expect``, ``%%check`` and ``%%outputs``
cells on a real kernel process against the real service and executors (real nsjail), and the
IOPub messages a notebook front end and nbgrader see: a live line per test, the results table,
the error naming the failing tests, the points as the cell's result, and output files as
images and text."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from kernelio import Kernel, Message, Outcome, StartKernel, execute, kernel_env

#: The smallest PNG: one transparent pixel.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
SVG = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/>'
SVG += "</svg>"

#: A shell "program" that sums the numbers on its stdin, or with --mean prints their mean.
SUM_SH = """\
%%files sum.sh --executable
#!/bin/bash
read -r -a numbers
total=0
for n in "${numbers[@]}"; do total=$((total + n)); done
if [ "$1" = --mean ]; then
    awk -v t="$total" -v n="${#numbers[@]}" 'BEGIN { printf "%.2f\\n", t / n }'
else
    echo "$total"
fi
"""

C_SUM = """\
#include <stdio.h>
int main(void) {
    long n, x, total = 0;
    if (scanf("%ld", &n) != 1) return 2;
    for (long i = 0; i < n; i++) { if (scanf("%ld", &x) != 1) return 2; total += x; }
    if (total < 0) { fprintf(stderr, "negative!\\n"); return 3; }
    printf("%ld\\n", total);
    return 0;
}
"""


def printf_bytes(data: bytes) -> str:
    """``data`` as a bash ``printf`` format: every byte as \\xHH."""
    return "".join(f"\\x{b:02x}" for b in data)


def live_lines(out: Outcome) -> list[str]:
    """The live per-test lines of the status display's last state."""
    return out.status_lines()[-1].split("\n")[1:]


def table_of(out: Outcome) -> dict[str, Any]:
    """The results table's display (the one with the cellblock-tests table)."""
    [table] = [
        m["content"]["data"]
        for m in out.of("display_data")
        if 'class="cellblock-tests"' in m["content"]["data"].get("text/html", "")
    ]
    return dict(table)


def results(out: Outcome) -> list[Message]:
    return out.of("execute_result")


async def test_tests_that_all_pass_give_their_points_as_the_cell_result(kernel: Kernel) -> None:
    _, kc = kernel
    out = await execute(kc, SUM_SH)
    assert out.status == "ok", out.reply
    cell = (
        "%%test small\n1 2 3\n%%expect\n6\n"
        "%%test mean --mean --points 2 --compare number:0.01\n1 2\n%%expect\n1.5\n"
        "%%test empty --points 0.5\n%%expect\n0\n"
        '%%run\n./sum.sh "$@"\n'
    )
    out = await execute(kc, cell)
    assert out.status == "ok", (out.reply, out.messages)
    # The live display: the status line, then one line per test, updated in place.
    lines = out.status_lines()
    assert any(re.search(r"run: \d of 3 tests…", line.split("\n")[0]) for line in lines), lines
    assert any("▶ small running…" in line for line in lines), lines
    final = live_lines(out)
    assert len(final) == 3
    assert re.fullmatch(r"✅ small passed 1/1 pt \d+ ms \S+ \S+", final[0]), final
    assert final[1].startswith("✅ mean passed 2/2 pt")
    assert final[2].startswith("✅ empty passed 0.5/0.5 pt")
    assert "run: 3 of 3 tests passed 3.5/3.5 pt" in lines[-1].split("\n")[0]
    # The table: name, verdict, points, time, memory.
    table = table_of(out)
    rows = table["text/plain"].split("\n")
    assert rows[0].split() == ["test", "verdict", "points", "time", "memory"]
    assert rows[1].split()[:4] == ["small", "✅", "passed", "1/1"]
    assert "3 of 3 tests passed, 3.5/3.5 points" in table["text/plain"]
    # The points are the cell's result, as nbgrader reads them: a float in text/plain.
    [result] = results(out)
    assert result["content"]["data"] == {"text/plain": "3.5"}
    assert result["content"]["execution_count"] == out.reply["execution_count"]
    assert out.of("error") == []
    # The tests' own output is in their results, not streamed into the cell.
    assert out.stream() == ""


async def test_a_failing_test_fails_the_cell_naming_it(kernel: Kernel) -> None:
    _, kc = kernel
    await execute(kc, SUM_SH)
    long_expected = "".join(f"{i}\n" for i in range(20))
    cell = (
        "%%test good\n1 2\n%%expect\n3\n"
        "%%test wrong\n1 2\n%%expect\n4\n"
        "%%test long\n5\n%%expect\n" + long_expected + ""
        "%%test crash x\n\n"
        '%%run\nif [ "$1" = x ]; then echo oops >&2; exit 7; fi\n./sum.sh\n'
    )
    out = await execute(kc, cell)
    assert out.status == "error"
    assert out.error == ("CellblockTestsFailed", "3 of 4 tests failed: wrong, long, crash")
    [error] = out.of("error")
    assert error["content"]["ename"] == "CellblockTestsFailed"
    assert results(out) == []  # no points: nbgrader sees the error
    final = live_lines(out)
    assert final[0].startswith("✅ good passed 1/1 pt")
    assert final[1].startswith("❌ wrong wrong answer 0/1 pt")
    assert final[3].startswith("💥 crash runtime error 0/1 pt")
    table = table_of(out)
    text, page = table["text/plain"], table["text/html"]
    assert "1 of 4 tests passed, 1/4 points" in text
    # A short output: expected and actual side by side, two <pre> in a table.
    assert "── wrong: ❌ wrong answer" in text
    assert "expected:\n   4\nactual:\n   3" in text
    assert '<table class="cellblock-expected-actual">' in page
    assert "<pre>4\n</pre></td><td><pre>3\n</pre>" in page
    # A long one: a unified diff.
    assert "--- expected\n+++ actual\n" in text
    assert '<pre class="cellblock-diff">' in page
    # A crash: its exit code and its stderr.
    assert "exit code 7" in text and "stderr:\n   oops" in text
    kinds = [m["msg_type"] for m in out.messages]
    assert kinds[-1] == "error"


async def test_a_test_with_its_own_limits_runs_under_them(kernel: Kernel) -> None:
    _, kc = kernel
    cell = (
        "%%limits\nrun.wall_time = 5s\n"
        "%%test quick --limits wall_time=300ms\n%%expect\nawake\n"
        "%%test patient --limits wall_time=2s,cpu=1\n%%expect\nawake\n"
        "%%run\nsleep 0.6; echo awake\n"
    )
    out = await execute(kc, cell)
    assert out.error == ("CellblockTestsFailed", "1 of 2 tests failed: quick")
    final = live_lines(out)
    assert final[0].startswith("⏱ quick time limit 0/1 pt")
    assert final[1].startswith("✅ patient passed 1/1 pt")


async def test_a_checker_and_a_skipped_compile(kernel: Kernel) -> None:
    _, kc = kernel
    await execute(kc, SUM_SH)
    cell = (
        # Either order of the two words is right: the checker decides.
        "%%check\n"
        'if [ "$(sort "$CB_ACTUAL")" = "$(sort "$CB_EXPECTED")" ]; then echo "same words"\n'
        'else echo "other words"; exit 1; fi\n'
        "%%test ab\n%%expect\nb\na\n"
        "%%test ba\n%%expect\na\nb\n"
        "%%test cd\n%%expect\nc\nd\n"
        "%%run\nprintf 'a\\nb\\n'\n"
    )
    out = await execute(kc, cell)
    assert out.error == ("CellblockTestsFailed", "1 of 3 tests failed: cd")
    text = table_of(out)["text/plain"]
    assert "── cd: ❌ wrong answer\n   other words" in text
    # %reset tests forgets the tests and the checker, nothing else.
    out = await execute(kc, "%reset tests\n%staged")
    assert "test" not in out.stream().split("staged tests and checker cleared\n")[1]
    assert "sum.sh" in out.stream()
    # A compile that fails skips every test, and the error names the compile.
    out = await execute(kc, "%%compile\nexit 1\n%%test t\n%%run\ntrue\n")
    assert out.error == ("CellblockStageFailed", "compile stage: failed: exit code 1")
    assert live_lines(out) == ["⏭ t skipped 0/1 pt"]


async def test_syntax_errors_are_reported_before_anything_is_sent(kernel: Kernel) -> None:
    _, kc = kernel
    for code, line in [
        ("%%expect\n3\n%%run\ntrue", 1),
        ("%%test a\n%%run\ntrue\n%%expect\n3", 4),
        ("%%test a --points -1\n%%run\ntrue", 1),
        ("%%test a --compare nearly\n%%run\ntrue", 1),
        ("%%outputs ../x\n%%run\ntrue", 1),
        ("%reset everything", 1),
    ]:
        out = await execute(kc, code)
        ename, evalue = out.error
        assert ename == "CellSyntaxError", (code, out.reply)
        assert evalue.startswith(f"line {line}: "), evalue
        assert out.displays == []  # nothing submitted, no status display


async def test_output_files_are_shown_as_images_and_text(kernel: Kernel) -> None:
    _, kc = kernel
    cell = (
        "%%outputs plot.png pic.svg data.csv blob.bin nothing-*.txt\n"
        f"%%run\nprintf '{printf_bytes(PNG)}' > plot.png\n"
        f"printf '%s' '{SVG}' > pic.svg\n"
        "printf 'x,y\\n1,2\\n' > data.csv\n"
        "printf '\\x00\\x01\\x02' > blob.bin\n"
    )
    out = await execute(kc, cell)
    assert out.status == "ok", (out.reply, out.messages)
    files = [m["content"]["data"] for m in out.of("display_data")
             if not m["content"].get("transient")][1:]  # fmt: skip
    by_type = {next(iter(k for k in d if k != "text/plain"), "text/plain"): d for d in files}
    assert base64.b64decode(by_type["image/png"]["image/png"]) == PNG
    assert by_type["image/png"]["text/plain"].startswith("plot.png (image/png, 70 B")
    assert by_type["image/svg+xml"]["image/svg+xml"] == SVG
    texts = [d["text/plain"] for d in files]
    assert any(t.startswith("data.csv (text/csv") and t.endswith("x,y\n1,2\n") for t in texts)
    assert "blob.bin (application/octet-stream, 3 B)" in texts
    assert "no file matched: nothing-*.txt" in texts
    assert results(out) == []  # no tests: no points


async def test_output_files_of_each_test_are_named_by_their_test(kernel: Kernel) -> None:
    _, kc = kernel
    cell = '%%outputs out.txt\n%%test one 1\n%%test two 2\n%%run\necho "test $1" > out.txt\n'
    out = await execute(kc, cell)
    assert out.status == "ok", out.reply
    texts = [m["content"]["data"]["text/plain"] for m in out.of("display_data")]
    assert any(t.startswith("one: out.txt (text/plain") and t.endswith("test 1\n") for t in texts)
    assert any(t.startswith("two: out.txt (text/plain") and t.endswith("test 2\n") for t in texts)
    assert results(out)[0]["content"]["data"] == {"text/plain": "2"}


@pytest.mark.timeout(180)
async def test_a_c_program_compiled_once_and_tested(
    service: Any, executor: Any, start_builder: Any, start_kernel: StartKernel
) -> None:
    builder = start_builder()
    await builder.started()
    _, kc = await start_kernel(kernel_env(service.url))
    cell = (
        f"%%deps gcc\n%%files sum.c\n{C_SUM}%%compile\ngcc -O2 -o sum sum.c\n"
        "%%test small\n3\n1 2 3\n%%expect\n6\n"
        "%%test big --points 2\n4\n1000000 2000000 3000000 4000000\n%%expect\n10000000\n"
        "%%test negative\n1\n-5\n%%expect\n-5\n"
        "%%run\n./sum\n"
    )
    out = await execute(kc, cell, timeout=150)
    assert out.error == ("CellblockTestsFailed", "1 of 3 tests failed: negative"), out.reply
    final = live_lines(out)
    assert final[0].startswith("✅ small passed 1/1 pt")
    assert final[1].startswith("✅ big passed 2/2 pt")
    assert final[2].startswith("💥 negative runtime error 0/1 pt")
    assert "stderr:\n   negative!" in table_of(out)["text/plain"]
    # Replace the failing test: the same name, its place kept; now all pass.
    out = await execute(kc, "%%test negative\n1\n5\n%%expect\n5\n%%run\n./sum\n", timeout=150)
    assert out.status == "ok", out.reply
    assert [line.split()[1] for line in live_lines(out)] == ["small", "big", "negative"]
    assert results(out)[0]["content"]["data"] == {"text/plain": "4"}
