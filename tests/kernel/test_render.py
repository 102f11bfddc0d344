"""What a run shows (pure): the status line as the submission's events arrive, the summary table,
and the error that fails the cell."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from cellblock.kernel import render
from cellblock.service.protocol import SubmissionState, apply_event, decode_event, stage_result

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
