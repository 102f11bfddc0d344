"""What a run shows (pure): the status line as the submission's events arrive, the summary table,
and the error that fails the cell."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from cellblock.kernel import render
from cellblock.service.protocol import (
    OutputFile,
    PlannedTest,
    SandboxResult,
    SubmissionState,
    apply_event,
    decode_event,
    stage_result,
)

MiB = 1024**2


def result(status: str = "ok", **fields: Any) -> dict[str, Any]:
    """A compile or run stage result as the protocol has it."""
    return {
        "status": status, "exit_code": 0 if status == "ok" else None, "signal": None,
        "signal_name": None, "stdout": "", "stderr": "", "stdout_encoding": "utf8",
        "stderr_encoding": "utf8", "stdout_truncated": False, "stderr_truncated": False,
        "wall_time": 0.012, "cpu_time": 0.004, "memory": 1843200, "limits": {},
        "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z", **fields,
    }  # fmt: skip


def deps_result(status: str = "ok", cache: str | None = "hit", **fields: Any) -> dict[str, Any]:
    return {"status": status, "cache": cache, "packages": [], "log": "", "wall_time": 0.002,
            **fields}  # fmt: skip


class Run:
    """A submission's state, advanced event by event as the kernel advances it."""

    def __init__(self, deps: bool = True, compile: bool = True) -> None:
        self.state = SubmissionState(id="s1", has_dependencies=deps, has_compile=compile)
        self.state = self.state.restarted()

    def event(self, type: str, **fields: Any) -> str:
        self.state = apply_event(self.state, decode_event({"type": type, "id": "s1", **fields}))
        return render.status_line(self.state)

    def started(self, stage: str) -> str:
        return self.event("stage_started", stage=stage)

    def finished(self, stage: str, stage_result: Mapping[str, Any]) -> str:
        return self.event("stage_finished", stage=stage, result=stage_result)


# -- the status line ---------------------------------------------------------------------------


def test_the_status_line_goes_through_every_step() -> None:
    run = Run()
    assert render.status_line(run.state) == "queued"
    assert run.event("status", status="queued") == "queued"
    picked = "queued → picked up by executor-1"
    assert run.event("status", status="running", worker="executor-1") == picked
    assert run.started("deps") == f"{picked} → dependencies…"
    deps = f"{picked} → dependencies: ok cache miss 2 ms"
    assert run.finished("deps", deps_result(cache="miss")) == deps
    assert run.started("compile") == f"{deps} → compile…"
    compiled = f"{deps} → compile: ok 111 ms 6.0 MiB"
    assert run.finished("compile", result(wall_time=0.111, memory=6 * MiB)) == compiled
    assert run.started("run") == f"{compiled} → run…"
    assert run.event("output", stage="run", stream="stdout", data="7\n") == f"{compiled} → run…"
    ran = f"{compiled} → run: ok 1.50 s 1.8 MiB"
    assert run.finished("run", result(wall_time=1.5)) == ran
    assert run.event("finished") == f"{ran} → finished"


def test_a_submission_without_deps_or_compile_shows_only_its_run() -> None:
    run = Run(deps=False, compile=False)
    run.event("status", status="running", worker="w")
    run.started("run")
    assert run.finished("run", result()) == "queued → picked up by w → run: ok 12 ms 1.8 MiB"


@pytest.mark.parametrize(
    ("stage_result", "words"),
    [
        (result("failed", exit_code=3), "run: failed exit 3 12 ms 1.8 MiB"),
        (result("signaled", signal=11, signal_name="SIGSEGV"),
         "run: signaled SIGSEGV 12 ms 1.8 MiB"),
        (result("time_limit", signal=9, signal_name="SIGKILL"),
         "run: time_limit SIGKILL 12 ms 1.8 MiB"),
        (result("memory_limit", memory=None), "run: memory_limit 12 ms"),
        (result("output_limit", exit_code=153), "run: output_limit exit 153 12 ms 1.8 MiB"),
        (result("skipped", wall_time=None, memory=None), "run: skipped"),
        (result("error", wall_time=0.0, memory=0), "run: error 0 ms"),
    ],
)  # fmt: skip
def test_the_status_line_of_each_run_status(stage_result: dict[str, Any], words: str) -> None:
    run = Run(deps=False, compile=False)
    run.event("status", status="running", worker="w")
    run.started("run")
    assert run.finished("run", stage_result).endswith(f"→ {words}")


def test_a_failed_compile_skips_the_run() -> None:
    run = Run(deps=False)
    run.event("status", status="running", worker="w")
    run.started("compile")
    run.finished("compile", result("failed", exit_code=1, wall_time=0.05, memory=2 * MiB))
    line = run.finished("run", result("skipped"))
    assert line == "queued → picked up by w → compile: failed exit 1 50 ms 2.0 MiB → run: skipped"


def test_the_status_line_of_a_cancelled_and_of_a_failed_submission() -> None:
    run = Run(deps=False, compile=False)
    run.event("status", status="running", worker="w")
    run.started("run")
    assert run.event("status", status="cancelled") == "queued → picked up by w → cancelled"
    run = Run()
    assert run.event("status", status="error", error="too many executor crashes") == (
        "queued → error: too many executor crashes"
    )


def test_a_reclaimed_submission_starts_its_stages_over() -> None:
    run = Run(deps=False, compile=False)
    run.event("status", status="running", worker="w1")
    run.started("run")
    assert run.event("status", status="running", worker="w2") == "queued → picked up by w2"


def test_status_html_is_escaped_and_colored_by_outcome() -> None:
    run = Run(deps=False, compile=False)
    running = render.status_html(run.state)
    assert 'class="cellblock-status"' in running and "#0969da" in running
    run.event("status", status="running", worker="<w&1>")
    assert "picked up by &lt;w&amp;1&gt;" in render.status_html(run.state)
    run.started("run")
    run.finished("run", result())
    run.event("finished")
    assert "#1a7f37" in render.status_html(run.state)  # finished, and every stage ok

    failed = Run(deps=False, compile=False)
    failed.event("status", status="running", worker="w")
    failed.started("run")
    failed.finished("run", result("failed", exit_code=1))
    failed.event("finished")
    assert "#cf222e" in render.status_html(failed.state)  # finished, but the run failed


def test_sizes_and_times() -> None:
    assert [render.size(n) for n in (None, 0, 1023, 1024, 1536, 6 * MiB, 3 * 1024**3)] == [
        "", "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "6.0 MiB", "3.0 GiB",
    ]  # fmt: skip
    assert render.size(2048 * 1024**3) == "2048.0 GiB"
    assert [render.seconds(s) for s in (None, 0, 0.0004, 0.012, 0.9994, 1, 1.5, 62.25)] == [
        "", "0 ms", "0 ms", "12 ms", "999 ms", "1.00 s", "1.50 s", "62.25 s",
    ]  # fmt: skip


# -- the summary table -------------------------------------------------------------------------


def finished_state(**stages: Mapping[str, Any] | None) -> SubmissionState:
    """A finished submission with these stage results (JSON, as the protocol has them)."""
    results = {"deps": None, "compile": None, "run": None, **stages}
    return SubmissionState.from_record({"id": "s1", "status": "finished", "stages": results})


def test_summary_rows_per_stage() -> None:
    state = finished_state(
        deps=deps_result(cache="miss", wall_time=0.195),
        compile=result(wall_time=0.111, cpu_time=0.044, memory=int(6.3 * MiB)),
        run=result("signaled", signal=11, signal_name="SIGSEGV", wall_time=1.5, cpu_time=1.25),
    )
    assert render.summary_rows(state) == [
        ["deps", "✅ ok", "cache miss", "", "195 ms", "", ""],
        ["compile", "✅ ok", "0", "", "111 ms", "44 ms", "6.3 MiB"],
        ["run", "💥 signaled", "", "SIGSEGV", "1.50 s", "1.25 s", "1.8 MiB"],
    ]


@pytest.mark.parametrize(
    ("status", "icon"),
    [("ok", "✅"), ("failed", "❌"), ("signaled", "💥"), ("time_limit", "⏱"),
     ("memory_limit", "🧠"), ("output_limit", "📄"), ("skipped", "⏭"), ("error", "⚠")],
)  # fmt: skip
def test_every_status_has_its_icon(status: str, icon: str) -> None:
    [row] = render.summary_rows(finished_state(run=result(status)))
    assert row[1] == f"{icon} {status}"


def test_summary_rows_leave_out_stages_that_did_not_run() -> None:
    assert render.summary_rows(finished_state()) == []
    [row] = render.summary_rows(finished_state(run=result("failed", exit_code=2, memory=None)))
    assert row == ["run", "❌ failed", "2", "", "12 ms", "4 ms", ""]


def test_a_deps_row_without_a_cache_result() -> None:
    [row] = render.summary_rows(finished_state(deps=deps_result("time_limit", cache=None)))
    assert row == ["deps", "⏱ time_limit", "", "", "2 ms", "", ""]


def test_summary_text_is_an_aligned_table() -> None:
    state = finished_state(deps=deps_result(), run=result("failed", exit_code=1))
    assert render.summary_text(state).split("\n") == [
        "stage  status    exit       signal  wall   cpu   memory",
        "deps   ✅ ok      cache hit          2 ms",
        "run    ❌ failed  1                  12 ms  4 ms  1.8 MiB",
    ]


def test_summary_html_is_a_table_with_a_row_per_stage() -> None:
    state = finished_state(run=result("signaled", signal_name="<SIG&>"))
    html = render.summary_html(state)
    assert html.startswith('<table class="cellblock-summary"><thead><tr><th>stage</th>')
    assert "".join(f"<th>{h}</th>" for h in render.HEADERS) in html
    assert html.count("<tr>") == 2
    assert "<td>&lt;SIG&amp;&gt;</td>" in html


# -- failure: what ends the cell in error ------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "error"),
    [
        ({"deps": deps_result("failed", cache="miss",
                              message="unknown package(s): nosuchpackage")},
         "dependencies: failed: unknown package(s): nosuchpackage"),
        ({"deps": deps_result("time_limit", message="took longer than 600 s")},
         "dependencies: time_limit: took longer than 600 s"),
        ({"deps": deps_result("failed")}, "dependencies: failed"),
        ({"compile": result("failed", exit_code=1), "run": result("skipped")},
         "compile stage: failed: exit code 1"),
        ({"run": result("failed", exit_code=3)}, "run stage: failed: exit code 3"),
        ({"run": result("signaled", signal=11, signal_name="SIGSEGV")},
         "run stage: signaled: killed by SIGSEGV"),
        ({"run": result("time_limit", message="wall time limit of 1 s exceeded")},
         "run stage: time_limit: wall time limit of 1 s exceeded"),
        ({"run": result("time_limit", signal_name="SIGXCPU")},
         "run stage: time_limit: killed by SIGXCPU"),
        ({"run": result("memory_limit", message="memory limit of 67108864 bytes exceeded")},
         "run stage: memory_limit: memory limit of 67108864 bytes exceeded"),
        ({"run": result("output_limit", exit_code=153)}, "run stage: output_limit: exit code 153"),
        ({"run": result("error", message="the sandbox could not start")},
         "run stage: error: the sandbox could not start"),
        ({"run": result("memory_limit")}, "run stage: memory_limit"),
    ],
)  # fmt: skip
def test_failure_names_the_stage_and_the_reason(
    stages: dict[str, Mapping[str, Any]], error: str
) -> None:
    assert render.failure(finished_state(**stages)) == ("CellblockStageFailed", error)


def test_failure_of_a_cancelled_or_failed_submission() -> None:
    cancelled = SubmissionState(id="s1", status="cancelled")
    assert render.failure(cancelled) == ("CellblockCancelled", "the submission was cancelled")
    error = SubmissionState(id="s1", status="error", error="too many executor crashes")
    assert render.failure(error) == ("CellblockError", "too many executor crashes")
    assert render.failure(SubmissionState(id="s1", status="error")) == (
        "CellblockError", "the system failed the submission",
    )  # fmt: skip


def test_no_failure_when_every_stage_succeeded() -> None:
    state = finished_state(deps=deps_result(), compile=result(), run=result())
    assert render.failure(state) is None
    assert render.failure(finished_state(run=result())) is None


def test_truncated_output_is_named_in_the_status_line_and_the_failure() -> None:
    flood = result("time_limit", message="wall time limit of 1 s exceeded", wall_time=1.05,
                   stdout_truncated=True, limits={"output": 1024})  # fmt: skip
    state = finished_state(run=flood)
    assert "run: time_limit 1.05 s 1.8 MiB (stdout truncated)" in render.status_line(state)
    assert render.failure(state) == (
        "CellblockStageFailed",
        "run stage: time_limit: wall time limit of 1 s exceeded (stdout truncated at 1.0 KiB)",
    )
    both = result(stdout_truncated=True, stderr_truncated=True)  # no limits: no size
    assert render.truncation(stage_result("run", both)) == "stdout and stderr truncated"
    assert "run: ok 12 ms 1.8 MiB (stdout and stderr truncated)" in render.status_line(
        finished_state(run=both)
    )
    assert render.failure(finished_state(run=both)) is None  # cut output alone is no failure
    assert render.truncation(stage_result("run", result())) is None


# -- tests (v1.1) --------------------------------------------------------------------------------


def finished_test(name: str, verdict: str = "passed", points: float = 1.0, **fields: Any) -> Any:
    """A test's result as a test_finished event carries it."""
    status = {"passed": "ok", "wrong_answer": "ok", "runtime_error": "failed"}.get(verdict, verdict)
    earned = points if verdict == "passed" else 0.0
    return {**result(status), "name": name, "verdict": verdict, "points": earned,
            "max_points": points, "message": None, "expected_output": None, **fields}  # fmt: skip


class Graded(Run):
    """A submission with tests, advanced event by event."""

    def __init__(self, *names: str, points: float = 1.0) -> None:
        plan = tuple(PlannedTest(name, points) for name in names)
        self.state = SubmissionState(id="s1", has_dependencies=False, has_compile=False,
                                     test_plan=plan).restarted()  # fmt: skip
        self.event("status", status="running", worker="w")
        self.started("run")

    def done(self, index: int, **fields: Any) -> str:
        name = self.state.test_plan[index].name
        self.event("test_started", test=index, name=name)
        fields.setdefault("points", self.state.test_plan[index].max_points)
        return self.event("test_finished", test=index, result=finished_test(name, **fields))

    def finish(self) -> SubmissionState:
        self.state = SubmissionState.from_record(self.state.as_json())  # the client's view
        ok = all(t is not None and t.verdict == "passed" for t in self.state.tests)
        self.finished("run", result("ok" if ok else "failed", exit_code=None))
        self.event("finished")
        return self.state


def test_a_live_line_per_test_while_they_run() -> None:
    run = Graded("small", "big", "neg")
    assert render.status_line(run.state).endswith("run: 0 of 3 tests…")
    assert render.progress_lines(run.state) == ["▶ small running…", "· big", "· neg"]
    run.done(0, wall_time=0.003, memory=int(1.2 * MiB))
    assert render.status_line(run.state).endswith("run: 1 of 3 tests…")
    assert render.progress_lines(run.state) == [
        "✅ small passed 1/1 pt 3 ms 1.2 MiB", "▶ big running…", "· neg",
    ]  # fmt: skip
    run.done(1, verdict="wrong_answer")
    run.done(2, verdict="time_limit", wall_time=2.0)
    assert render.progress_lines(run.state)[1:] == [
        "❌ big wrong answer 0/1 pt 12 ms 1.8 MiB", "⏱ neg time limit 0/1 pt 2.00 s 1.8 MiB",
    ]  # fmt: skip
    text = render.status_text(run.state)
    assert text.split("\n") == [render.status_line(run.state), *render.progress_lines(run.state)]
    page = render.status_html(run.state)
    assert '<div class="cellblock-live-tests"' in page and "<div>· neg</div>" not in page
    assert "#cf222e" in page  # a test failed: red before the end


def test_the_status_line_of_a_finished_run_with_tests_counts_them() -> None:
    run = Graded("a", "b", points=1.5)
    run.done(0)
    run.done(1, verdict="runtime_error", exit_code=3)
    state = run.finish()
    assert "run: 1 of 2 tests passed 1.5/3 pt" in render.status_line(state)
    assert render.progress_lines(state)[1] == "💥 b runtime error 0/1.5 pt 12 ms 1.8 MiB"


def test_every_verdict_has_its_icon() -> None:
    verdicts = ["passed", "wrong_answer", "time_limit", "memory_limit", "output_limit",
                "disk_limit", "runtime_error", "skipped", "error"]  # fmt: skip
    assert list(render.VERDICT_ICONS) == verdicts
    assert len(set(render.VERDICT_ICONS.values())) == len(verdicts)


def test_points_are_written_as_a_teacher_writes_them() -> None:
    assert [render.points_text(p) for p in (3.0, 0.0, 2.5, 0.25, 10)] == [
        "3", "0", "2.5", "0.25", "10",
    ]  # fmt: skip
    assert float(render.points_text(1 / 3)) == pytest.approx(1 / 3, rel=1e-5)


def test_all_tests_passed_the_points_are_the_result_and_no_failure() -> None:
    run = Graded("a", "b", points=1.5)
    run.done(0)
    assert render.points_result(run.state) is None  # not finished yet
    run.done(1)
    state = run.finish()
    assert render.failure(state) is None
    assert render.points_result(state) == "3"


def test_a_failing_test_is_the_failure_naming_every_failing_test() -> None:
    run = Graded("small", "big", "neg", "mean", "zero")
    run.done(0)
    run.done(1, verdict="wrong_answer")
    run.done(2, verdict="runtime_error")
    for i in (3, 4):
        run.done(i)
    state = run.finish()
    assert render.failure(state) == ("CellblockTestsFailed", "2 of 5 tests failed: big, neg")
    assert render.points_result(state) is None


def test_many_failing_tests_are_named_up_to_ten() -> None:
    names = [f"t{i}" for i in range(13)]
    run = Graded(*names)
    for i in range(13):
        run.done(i, verdict="wrong_answer")
    _, evalue = render.failure(run.finish()) or ("", "")
    assert evalue == "13 of 13 tests failed: " + ", ".join(names[:10]) + " and 3 more"


def test_a_failed_compile_is_the_failure_when_every_test_is_skipped() -> None:
    run = Run(deps=False)
    run.state = replace(run.state, test_plan=(PlannedTest("a"),), tests=(None,))
    run.event("status", status="running", worker="w")
    run.started("compile")
    run.finished("compile", result("failed", exit_code=1))
    run.finished("run", result("skipped", exit_code=None))
    run.event("finished")
    assert render.failure(run.state) == (
        "CellblockStageFailed",
        "compile stage: failed: exit code 1",
    )
    assert render.progress_lines(run.state) == ["⏭ a skipped 0/1 pt"]
    assert render.tests_rows(run.state) == [["a", "⏭ skipped", "0/1", "", ""]]
    assert "── a" not in render.tests_text(run.state)  # a skipped test needs no closer look


def test_the_results_table() -> None:
    run = Graded("small", "big")
    run.done(0, wall_time=0.003, memory=MiB)
    run.done(1, verdict="memory_limit", wall_time=0.5, memory=64 * MiB,
             message="memory limit of 64.0 MiB exceeded")  # fmt: skip
    state = run.finish()
    assert render.tests_rows(state) == [
        ["small", "✅ passed", "1/1", "3 ms", "1.0 MiB"],
        ["big", "🧠 memory limit", "0/1", "500 ms", "64.0 MiB"],
    ]
    text = render.tests_text(state)
    assert text.split("\n")[:4] == [
        "test   verdict         points  time    memory",
        "small  ✅ passed        1/1     3 ms    1.0 MiB",
        "big    🧠 memory limit  0/1     500 ms  64.0 MiB",
        "1 of 2 tests passed, 1/2 points",
    ]
    assert "── big: 🧠 memory limit\n   memory limit of 64.0 MiB exceeded" in text
    page = render.tests_html(state)
    assert page.startswith('<table class="cellblock-tests"><thead><tr><th>test</th>')
    assert "<td>🧠 memory limit</td>" in page and "<p>1 of 2 tests passed, 1/2 points</p>" in page


def wrong(expected: str, actual: str, **fields: Any) -> SubmissionState:
    run = Graded("t")
    run.done(0, verdict="wrong_answer", expected_output=expected, stdout=actual, **fields)
    return run.finish()


def test_a_short_wrong_answer_shows_expected_and_actual_side_by_side() -> None:
    state = wrong("4\n", "3 <b>\n", message="the output differs from the expected output (lines)")
    text = render.tests_text(state)
    assert "── t: ❌ wrong answer\n   the output differs" in text
    assert "expected:\n   4\nactual:\n   3 <b>" in text
    assert "--- expected" not in text
    page = render.tests_html(state)
    assert ('<table class="cellblock-expected-actual"><thead><tr><th>expected</th>'
            "<th>actual</th></tr></thead><tbody><tr><td><pre>4\n</pre></td>"
            "<td><pre>3 &lt;b&gt;\n</pre></td></tr></tbody></table>") in page  # fmt: skip
    assert "cellblock-diff" not in page


def test_a_long_wrong_answer_gets_a_unified_diff() -> None:
    expected = "".join(f"{i}\n" for i in range(12))
    actual = expected.replace("7\n", "seven\n")
    state = wrong(expected, actual)
    text = render.tests_text(state)
    assert "--- expected\n+++ actual\n@@ " in text and "-7\n+seven\n" in text
    assert "expected:\n" not in text
    page = render.tests_html(state)
    assert '<pre class="cellblock-diff">--- expected\n+++ actual\n' in page
    # Side by side still, folded away.
    assert "<details><summary>expected and actual side by side</summary><table" in page


def test_outputs_that_differ_only_in_whitespace_say_so() -> None:
    assert "differ only in whitespace" in render.tests_text(wrong("3 \n", "3\n"))
    assert "differ only in whitespace" not in render.tests_text(wrong("3\n", "4\n"))


def test_binary_output_is_shown_decoded() -> None:
    state = wrong("ok\n", "/w==", stdout_encoding="base64")
    assert "actual:\n   �" in render.tests_text(state)


def test_a_runtime_error_shows_its_exit_code_output_and_stderr() -> None:
    run = Graded("t")
    run.done(0, verdict="runtime_error", exit_code=3, stdout="partial\n", stderr="boom\n")
    text = render.tests_text(run.finish())
    assert "── t: 💥 runtime error\n   exit code 3\noutput:\n   partial\nstderr:\n   boom" in text
    run = Graded("t")
    run.done(0, verdict="runtime_error", exit_code=None, signal=11, signal_name="SIGSEGV")
    assert "   killed by SIGSEGV" in render.tests_text(run.finish())


def test_a_very_long_output_is_clipped() -> None:
    many = "".join(f"line {i}\n" for i in range(500))
    text = render.tests_text(wrong("x\n", many))
    assert "line 150" in text and "line 450" not in text
    assert "more lines" in text


def test_truncated_test_output_is_said() -> None:
    state = wrong("1\n", "1", stdout_truncated=True, limits={"output": 1024})
    assert "stdout truncated at 1.0 KiB" in render.tests_text(state)


# -- output files --------------------------------------------------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a") + b"rest"


def output_file(name: str, data: bytes, media_type: str, **fields: Any) -> OutputFile:
    return OutputFile(name=name, content=base64.b64encode(data).decode(), size=len(data),
                      media_type=media_type, **fields)  # fmt: skip


@pytest.mark.parametrize("kind", ["image/png", "image/jpeg", "image/gif"])
def test_an_image_is_shown_as_that_image_in_base64(kind: str) -> None:
    display = render.file_display(output_file("plot.x", PNG, kind))
    assert display.data == {
        kind: base64.b64encode(PNG).decode(),
        "text/plain": f"plot.x ({kind}, 12 B)",
    }


def test_an_svg_is_shown_as_its_text() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    display = render.file_display(output_file("a.svg", svg, "image/svg+xml"), "t1: ")
    assert display.data == {"image/svg+xml": svg.decode(),
                            "text/plain": "t1: a.svg (image/svg+xml, 41 B)"}  # fmt: skip


@pytest.mark.parametrize("kind", ["text/plain", "text/csv", "application/json", "text/html"])
def test_a_text_file_is_shown_as_text(kind: str) -> None:
    display = render.file_display(output_file("r.txt", b"a,<b>\n", kind))
    assert display.data["text/plain"] == f"r.txt ({kind}, 6 B)\na,<b>\n"
    assert "<pre>a,&lt;b&gt;\n</pre>" in display.data["text/html"]  # never rendered as HTML


def test_a_file_of_another_type_is_a_line_naming_it_and_its_size() -> None:
    for kind in ("application/octet-stream", "application/pdf", "image/x-portable-pixmap"):
        display = render.file_display(output_file("blob", b"\x00" * 2048, kind))
        assert display.data == {"text/plain": f"blob ({kind}, 2.0 KiB)"}


def test_a_truncated_file_says_so_and_a_cut_image_is_not_shown() -> None:
    cut = output_file("big.png", PNG[:8], "image/png", truncated=True).model_copy(
        update={"size": 5 * MiB}
    )
    assert render.file_display(cut).data == {
        "text/plain": "big.png (image/png, 5.0 MiB, truncated: 8 B kept): cut, not shown"
    }
    text = output_file("log.txt", b"first", "text/plain", truncated=True)
    assert "truncated: 5 B kept" in render.file_display(text).data["text/plain"]


def test_the_files_of_the_run_and_of_each_test_and_the_missing_patterns() -> None:
    run = Graded("one", "two")
    run.done(0, files=[output_file("o.txt", b"1", "text/plain").wire()], missing=["*.png"])
    run.done(1, files=[output_file("o.txt", b"2", "text/plain").wire()])
    state = run.finish()
    state = replace(state, stages={**state.stages, "run": SandboxResult(
        status="ok", files=[output_file("all.csv", b"x", "text/csv")], missing=["p.svg", "q/*"],
    )})  # fmt: skip
    texts = [d.data["text/plain"] for d in render.file_displays(state)]
    assert texts == [
        "all.csv (text/csv, 1 B)\nx",
        "no file matched: p.svg, q/*",
        "one: o.txt (text/plain, 1 B)\n1",
        "one: no file matched: *.png",
        "two: o.txt (text/plain, 1 B)\n2",
    ]
    assert render.file_displays(Graded("a").finish()) == []


def test_a_picture_has_its_caption_just_above_it() -> None:
    """JupyterLab shows a picture's bundle as the picture alone: which test drew it is said
    by a caption of its own, above it; a text file carries its caption in its own bundle."""
    run = Graded("one")
    run.done(0, files=[output_file("p.png", PNG, "image/png").wire(),
                       output_file("n.txt", b"x", "text/plain").wire()])  # fmt: skip
    displays = render.file_displays(run.finish())
    assert [sorted(d.data) for d in displays] == [
        ["text/html", "text/plain"], ["image/png", "text/plain"], ["text/html", "text/plain"]
    ]  # fmt: skip
    assert displays[0].data["text/plain"].startswith("one: p.png (image/png")
    assert '<div class="cellblock-file">one: p.png' in displays[0].data["text/html"]


def test_a_skipped_stage_shows_no_measures_it_never_had() -> None:
    state = SubmissionState.from_record({
        "id": "s", "status": "finished",
        "stages": {"deps": None, "compile": SandboxResult(status="failed", exit_code=1).wire(),
                   "run": SandboxResult.skipped().wire()},
    })  # fmt: skip
    run_row = next(row for row in render.summary_rows(state) if row[0] == "run")
    assert run_row[2:] == ["", "", "", "", ""]


def test_an_output_of_one_huge_line_is_clipped_by_characters() -> None:
    huge = "x" * 1_000_000
    shown = render._clip(huge)
    assert len(shown) < render.SHOWN_CHARACTERS + 100
    assert shown.endswith(f"… {1_000_000 - render.SHOWN_CHARACTERS} more characters")
    assert len(render.unified_diff(huge, huge + "y")) < 3 * render.SHOWN_CHARACTERS
