"""What a run shows in the cell, as pure functions of the submission's state.

The kernel keeps the submission's state with the protocol's own state machine
(``apply_event``) and renders from it: one status line updated in place (with a line per test
below it), a summary table per stage at the end, a table of the tests with what failed, the
output files, and the error that fails the cell or the points that are its result.
"""

from __future__ import annotations

import base64
import difflib
import html
from dataclasses import dataclass, field
from typing import Any

from cellblock.service.protocol import (
    DepsResult,
    OutputFile,
    PlannedTest,
    SandboxResult,
    StageResult,
    SubmissionState,
    TestResult,
    decode,
)

ICONS = {"ok": "✅", "failed": "❌", "signaled": "💥", "time_limit": "⏱", "memory_limit": "🧠",
         "output_limit": "📄", "disk_limit": "💾", "skipped": "⏭", "error": "⚠"}  # fmt: skip
STAGE_TITLES = {"deps": "dependencies", "compile": "compile", "run": "run"}


def size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _stage_words(
    stage: str, result: StageResult | None, current: bool, state: SubmissionState
) -> str | None:
    title = STAGE_TITLES[stage]
    tests = state.test_plan if stage == "run" else ()
    if result is None:
        if current and tests:
            return f"{title}: {sum(t is not None for t in state.tests)} of {len(tests)} tests…"
        return f"{title}…" if current else None
    status = result.status
    words = [f"{title}: {status}"]
    if tests and (score := state.score) is not None and status in ("ok", "failed"):
        # The run's own status says only "not every test passed"; how many did is the news.
        words = [f"{title}: {score.passed} of {score.total} tests passed",
                 f"{points_text(score.points)}/{points_text(score.max_points)} pt"]  # fmt: skip
    if isinstance(result, DepsResult):
        if result.cache:
            words.append(f"cache {result.cache}")
    else:
        if result.exit_code is not None and status != "ok":
            words.append(f"exit {result.exit_code}")
        if result.signal_name:
            words.append(result.signal_name)
    if status != "skipped":
        words.append(seconds(result.wall_time))
        if isinstance(result, SandboxResult) and result.memory:
            words.append(size(result.memory))
    if streams := truncated_streams(result):
        words.append(f"({' and '.join(streams)} truncated)")
    return " ".join(w for w in words if w)


def truncated_streams(result: StageResult) -> list[str]:
    """The streams of a stage that wrote more than its ``output`` limit keeps. The program went
    on but the rest of its output is gone, which the student must be told: what the cell shows
    looks complete otherwise."""
    if not isinstance(result, SandboxResult):
        return []
    flags = {"stdout": result.stdout_truncated, "stderr": result.stderr_truncated}
    return [name for name, cut in flags.items() if cut]


def truncation(result: StageResult) -> str | None:
    """``stdout truncated at 1.0 KiB`` (the stage's ``output`` limit), or None."""
    streams = truncated_streams(result)
    if not isinstance(result, SandboxResult) or not streams:
        return None
    limit = (result.limits or {}).get("output")
    at = f" at {size(limit)}" if isinstance(limit, int) else ""
    return f"{' and '.join(streams)} truncated{at}"


def status_line(state: SubmissionState) -> str:
    """One line through queued → picked up → dependencies → compile → run."""
    steps = ["queued"]
    if state.picked_up:
        steps.append(f"picked up by {state.worker}")
    for stage in ("deps", "compile", "run"):
        words = _stage_words(stage, state.stages.get(stage), state.stage == stage, state)
        if words:
            steps.append(words)
    if state.status in ("finished", "cancelled", "error"):
        steps.append(state.status if not state.error else f"{state.status}: {state.error}")
    return " → ".join(steps)


def status_html(state: SubmissionState) -> str:
    color = {"finished": "#1a7f37", "cancelled": "#9a6700", "error": "#cf222e"}.get(
        state.status, "#0969da"
    )
    failed = failure(state)
    if failed:
        color = "#cf222e"
    tests = "".join(f"<div>{html.escape(line)}</div>" for line in progress_lines(state))
    return (
        f'<div class="cellblock-status" style="font-family: monospace; color: {color}">'
        f"{html.escape(status_line(state))}</div>"
        + (f'<div class="cellblock-live-tests" style="font-family: monospace">{tests}</div>'
           if tests else "")
    )  # fmt: skip


def status_text(state: SubmissionState) -> str:
    """The status line, then one line per test (a submission with tests)."""
    return "\n".join([status_line(state), *progress_lines(state)])


def summary_rows(state: SubmissionState) -> list[list[str]]:
    rows = []
    for stage in ("deps", "compile", "run"):
        result = state.stages.get(stage)
        if result is None:
            continue
        status = result.status
        if isinstance(result, DepsResult):
            cache = f"cache {result.cache}" if result.cache else ""
            rows.append([stage, f"{ICONS.get(status, '')} {status}", cache,
                         "", seconds(result.wall_time), "", ""])  # fmt: skip
        elif status == "skipped":  # it never ran: nothing was measured
            rows.append([stage, f"{ICONS.get(status, '')} {status}", "", "", "", "", ""])
        else:
            rows.append([
                stage, f"{ICONS.get(status, '')} {status}",
                "" if result.exit_code is None else str(result.exit_code),
                result.signal_name or "",
                seconds(result.wall_time), seconds(result.cpu_time),
                size(result.memory),
            ])  # fmt: skip
    return rows


HEADERS = ["stage", "status", "exit", "signal", "wall", "cpu", "memory"]


def summary_text(state: SubmissionState) -> str:
    rows = [HEADERS, *summary_rows(state)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def summary_html(state: SubmissionState) -> str:
    head = "".join(f"<th>{h}</th>" for h in HEADERS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in summary_rows(state)
    )
    table = f'<table class="cellblock-summary"><thead><tr>{head}</tr></thead>'
    return f"{table}<tbody>{body}</tbody></table>"


def failure(state: SubmissionState) -> tuple[str, str] | None:
    """(ename, evalue) when the cell should end in error: a stage that did not succeed,
    dependencies that could not be installed, a test that did not pass, a cancellation or a
    system error. A failed compile is named as such: it is why every test was skipped."""
    if state.status == "cancelled":
        return "CellblockCancelled", "the submission was cancelled"
    if state.status == "error":
        return "CellblockError", state.error or "the system failed the submission"
    for stage in ("deps", "compile", "run"):
        result = state.stages.get(stage)
        if stage == "run" and state.test_plan and (failed := failed_tests(state)):
            return "CellblockTestsFailed", f"{len(failed)} of {len(state.test_plan)} tests " + (
                f"failed: {_names(failed)}"
            )
        if result is not None and result.status not in ("ok", "skipped"):
            reason = result.message or _reason(result)
            title = "dependencies" if stage == "deps" else f"{stage} stage"
            evalue = f"{title}: {result.status}" + (f": {reason}" if reason else "")
            if cut := truncation(result):
                evalue += f" ({cut})"
            return "CellblockStageFailed", evalue
    return None


def _reason(result: StageResult) -> str:
    if not isinstance(result, SandboxResult):
        return ""
    if result.signal_name:
        return f"killed by {result.signal_name}"
    if result.exit_code not in (None, 0):
        return f"exit code {result.exit_code}"
    return ""


# -- tests ---------------------------------------------------------------------------------------

VERDICT_ICONS = {"passed": "✅", "wrong_answer": "❌", "time_limit": "⏱", "memory_limit": "🧠",
                 "output_limit": "📄", "disk_limit": "💾", "runtime_error": "💥",
                 "skipped": "⏭", "error": "⚠"}  # fmt: skip
#: Outputs longer than this (in lines, either side) also get a unified diff.
DIFF_LINES = 10
#: Lines and characters of one output shown at most; the rest is counted, not shown.
SHOWN_LINES = 200
SHOWN_CHARACTERS = 20_000
#: Failing test names an error names at most.
NAMED_TESTS = 10


def points_text(value: float) -> str:
    """``3`` for 3.0 and ``2.5`` for 2.5: points as a teacher writes them, and as nbgrader's
    autograder reads them back (``float`` of the cell's result)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def verdict_words(verdict: str) -> str:
    return f"{VERDICT_ICONS.get(verdict, '')} {verdict.replace('_', ' ')}"


def _points(result: TestResult) -> str:
    return f"{points_text(result.points)}/{points_text(result.max_points)}"


def progress_line(plan: PlannedTest, result: TestResult | None, running: bool) -> str:
    """``✅ small passed 1/1 pt 3 ms 1.2 MiB``; ``▶ big running…``; ``· big`` (not yet)."""
    if result is None:
        return f"▶ {plan.name} running…" if running else f"· {plan.name}"
    icon = VERDICT_ICONS.get(result.verdict, "")
    words = [icon, plan.name, result.verdict.replace("_", " "), f"{_points(result)} pt"]
    if result.verdict != "skipped":
        words += [seconds(result.wall_time), size(result.memory)]
    return " ".join(w for w in words if w)


def progress_lines(state: SubmissionState) -> list[str]:
    """One line per test; tests run in order, so the first without a result is the one
    running while the run stage runs."""
    results = state.tests or (None,) * len(state.test_plan)
    running = state.status == "running" and state.stage == "run"
    first = next((i for i, r in enumerate(results) if r is None), None) if running else None
    pairs = zip(state.test_plan, results, strict=True)
    return [progress_line(plan, result, i == first) for i, (plan, result) in enumerate(pairs)]


def failed_tests(state: SubmissionState) -> list[str]:
    """The tests that ended and did not pass; one still to run has not failed (yet)."""
    results = state.tests or (None,) * len(state.test_plan)
    return [plan.name for plan, result in zip(state.test_plan, results, strict=True)
            if result is not None and result.verdict != "passed"]  # fmt: skip


def _names(names: list[str]) -> str:
    more = len(names) - NAMED_TESTS
    return ", ".join(names[:NAMED_TESTS]) + (f" and {more} more" if more > 0 else "")


def points_result(state: SubmissionState) -> str | None:
    """The cell's result when every test passed: its points, for nbgrader's partial credit
    (it reads a test cell's ``execute_result`` ``text/plain`` as the points earned)."""
    score = state.score
    if score is None or state.status != "finished" or score.passed != score.total:
        return None
    return points_text(score.points)


TEST_HEADERS = ["test", "verdict", "points", "time", "memory"]


def tests_rows(state: SubmissionState) -> list[list[str]]:
    rows = []
    for plan, result in zip(state.test_plan, state.tests, strict=True):
        if result is None:
            rows.append([plan.name, "· not run", f"0/{points_text(plan.max_points)}", "", ""])
            continue
        ran = result.verdict != "skipped"
        rows.append([plan.name, verdict_words(result.verdict), _points(result),
                     seconds(result.wall_time) if ran else "",
                     size(result.memory) if ran else ""])  # fmt: skip
    return rows


def _score_line(state: SubmissionState) -> str:
    score = state.score
    if score is None:
        return ""
    return (f"{score.passed} of {score.total} tests passed, "
            f"{points_text(score.points)}/{points_text(score.max_points)} points")  # fmt: skip


def tests_text(state: SubmissionState) -> str:
    """The results table, the score, then what went wrong in each test that did not pass."""
    rows = [TEST_HEADERS, *tests_rows(state)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TEST_HEADERS))]
    table = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    details = [_detail_text(r) for r in _failed_results(state)]
    return "\n\n".join([f"{table}\n{_score_line(state)}", *details])


def tests_html(state: SubmissionState) -> str:
    head = "".join(f"<th>{h}</th>" for h in TEST_HEADERS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in tests_rows(state)
    )
    table = (f'<table class="cellblock-tests"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
             f"</table><p>{html.escape(_score_line(state))}</p>")  # fmt: skip
    return table + "".join(_detail_html(r) for r in _failed_results(state))


def _failed_results(state: SubmissionState) -> list[TestResult]:
    """The tests worth a closer look: those that ran and did not pass (a skipped test's
    reason is the compile's failure or the cancellation, shown on their own)."""
    return [t for t in state.tests if t is not None and t.verdict not in ("passed", "skipped")]


def output_text(result: SandboxResult, stream: str = "stdout") -> str:
    """A stream of a result as text: output that is not UTF-8 came base64, shown decoded with
    replacement characters where its bytes are not text."""
    text = result.stdout if stream == "stdout" else result.stderr
    encoding = result.stdout_encoding if stream == "stdout" else result.stderr_encoding
    if encoding == "utf8":
        return text
    try:
        return decode(text, encoding).decode("utf-8", "replace")
    except ValueError:
        return text


def _clip(text: str) -> str:
    """At most ``SHOWN_LINES`` lines and ``SHOWN_CHARACTERS`` characters of ``text``: a program
    may print megabytes on one line."""
    lines = text.split("\n")
    clipped = "\n".join(lines[:SHOWN_LINES])
    if len(clipped) > SHOWN_CHARACTERS:
        return clipped[:SHOWN_CHARACTERS] + f"… {len(text) - SHOWN_CHARACTERS} more characters"
    if len(lines) <= SHOWN_LINES:
        return text
    return clipped + f"\n… {len(lines) - SHOWN_LINES} more lines"


def _is_long(expected: str, actual: str) -> bool:
    return max(expected.count("\n"), actual.count("\n")) > DIFF_LINES


def unified_diff(expected: str, actual: str) -> str:
    """A unified diff of the two, of their first ``SHOWN_CHARACTERS`` each (difflib takes
    quadratic time on long inputs)."""
    return "".join(
        difflib.unified_diff(
            expected[:SHOWN_CHARACTERS].splitlines(keepends=True),
            actual[:SHOWN_CHARACTERS].splitlines(keepends=True),
            "expected", "actual",
        )
    )  # fmt: skip


def _notes(result: TestResult) -> list[str]:
    """Why the test failed, in words: the message (the checker's, a limit's), how the run
    ended, whitespace that looks equal, output that was cut."""
    notes = [result.message] if result.message else []
    if result.signal_name:
        notes.append(f"killed by {result.signal_name}")
    elif result.exit_code not in (None, 0):
        notes.append(f"exit code {result.exit_code}")
    expected, actual = result.expected_output, output_text(result)
    if expected is not None and expected != actual and expected.split() == actual.split():
        notes.append("the outputs differ only in whitespace")
    if cut := truncation(result):
        notes.append(cut)
    return notes


def _detail_text(result: TestResult) -> str:
    lines = [f"── {result.name}: {verdict_words(result.verdict).strip()}"]
    lines += [f"   {note}" for note in _notes(result)]
    expected, actual = result.expected_output, output_text(result)
    if expected is not None and expected != actual:
        if _is_long(expected, actual):
            lines.append(_clip(unified_diff(expected, actual)).rstrip("\n"))
        else:
            lines += ["expected:", _indent(expected), "actual:", _indent(actual)]
    elif actual:
        lines += ["output:", _indent(_clip(actual))]
    if stderr := output_text(result, "stderr"):
        lines += ["stderr:", _indent(_clip(stderr))]
    return "\n".join(lines)


def _indent(text: str) -> str:
    if not text:
        return "   (nothing)"
    return "\n".join(f"   {line}" for line in text.removesuffix("\n").split("\n"))


def _pre(text: str) -> str:
    return f"<pre>{html.escape(_clip(text))}</pre>"


def _detail_html(result: TestResult) -> str:
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in _notes(result))
    parts = [f'<div class="cellblock-test-failure"><h4>{html.escape(result.name)}: '
             f"{html.escape(verdict_words(result.verdict))}</h4>"
             + (f"<ul>{notes}</ul>" if notes else "")]  # fmt: skip
    expected, actual = result.expected_output, output_text(result)
    if expected is not None and expected != actual:
        side = (
            '<table class="cellblock-expected-actual"><thead><tr><th>expected</th>'
            f"<th>actual</th></tr></thead><tbody><tr><td>{_pre(expected)}</td>"
            f"<td>{_pre(actual)}</td></tr></tbody></table>"
        )
        if _is_long(expected, actual):
            diff = html.escape(_clip(unified_diff(expected, actual)))
            parts.append(f'<pre class="cellblock-diff">{diff}</pre>')
            side = f"<details><summary>expected and actual side by side</summary>{side}</details>"
        parts.append(side)
    elif actual:
        parts.append(f"<p>output:</p>{_pre(actual)}")
    if stderr := output_text(result, "stderr"):
        parts.append(f"<p>stderr:</p>{_pre(stderr)}")
    return "".join(parts) + "</div>"


# -- output files --------------------------------------------------------------------------------

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif")


@dataclass(frozen=True)
class Display:
    """One ``display_data``: its MIME bundle and metadata."""

    data: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)


def is_text_type(media_type: str) -> bool:
    return media_type.startswith("text/") or media_type == "application/json"


def _caption(file: OutputFile, prefix: str) -> str:
    words = [file.media_type, size(file.size)]
    if file.truncated:
        words.append(f"truncated: {size(len(_bytes(file)))} kept")
    return f"{prefix}{file.name} ({', '.join(words)})"


def _bytes(file: OutputFile) -> bytes:
    try:
        return decode(file.content, file.encoding)
    except ValueError:
        return b""


def file_display(file: OutputFile, prefix: str = "") -> Display:
    """An output file as the notebook shows it: an image as that image (PNG, JPEG and GIF
    base64, SVG as its text), a text file as its text, anything else as a line naming it.
    A cut image would show as a broken picture, so it is named, not shown."""
    caption = _caption(file, prefix)
    kind = file.media_type
    if kind in IMAGE_TYPES and not file.truncated:
        return Display(
            {kind: base64.b64encode(_bytes(file)).decode("ascii"), "text/plain": caption}
        )
    if kind == "image/svg+xml" and not file.truncated:
        return Display({kind: _bytes(file).decode("utf-8", "replace"), "text/plain": caption})
    if is_text_type(kind):
        text = _clip(_bytes(file).decode("utf-8", "replace"))
        return Display({
            "text/plain": f"{caption}\n{text}",
            "text/html": _caption_display(caption).data["text/html"] + _pre(text),
        })  # fmt: skip
    note = ": cut, not shown" if kind.startswith("image/") and file.truncated else ""
    return Display({"text/plain": caption + note})


PICTURE_TYPES = frozenset((*IMAGE_TYPES, "image/svg+xml"))


def _caption_display(caption: str) -> Display:
    return Display({
        "text/plain": caption,
        "text/html": f'<div class="cellblock-file">{html.escape(caption)}</div>',
    })  # fmt: skip


def file_displays(state: SubmissionState) -> list[Display]:
    """The run stage's output files, then each test's (named by their test), each followed
    by a line naming the patterns that matched nothing."""
    groups: list[tuple[str, SandboxResult]] = []
    if isinstance(run := state.stages.get("run"), SandboxResult):
        groups.append(("", run))
    groups += [(f"{t.name}: ", t) for t in state.tests if t is not None]
    displays = []
    for prefix, result in groups:
        for f in result.files or ():
            shown = file_display(f, prefix)
            if PICTURE_TYPES.intersection(shown.data):
                # JupyterLab shows a picture alone (an HTML caption in its bundle would be
                # shown instead of it): its caption goes just above it.
                displays.append(_caption_display(_caption(f, prefix)))
            displays.append(shown)
        if result.missing:
            displays.append(Display(
                {"text/plain": f"{prefix}no file matched: {', '.join(result.missing)}"}
            ))  # fmt: skip
    return displays
