"""What a run shows in the cell, as pure functions of the submission's state.

The kernel keeps the submission's state with the protocol's own state machine
(``apply_event``) and renders from it: one status line updated in place, a summary table per
stage at the end, and the error that fails the cell.
"""

from __future__ import annotations

import html

from cellblock.service.protocol import DepsResult, SandboxResult, StageResult, SubmissionState

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


def _stage_words(stage: str, result: StageResult | None, current: bool) -> str | None:
    title = STAGE_TITLES[stage]
    if result is None:
        return f"{title}…" if current else None
    status = result.status
    words = [f"{title}: {status}"]
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
        words = _stage_words(stage, state.stages.get(stage), state.stage == stage)
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
    return (
        f'<div class="cellblock-status" style="font-family: monospace; color: {color}">'
        f"{html.escape(status_line(state))}</div>"
    )


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
    dependencies that could not be installed, a cancellation or a system error."""
    if state.status == "cancelled":
        return "CellblockCancelled", "the submission was cancelled"
    if state.status == "error":
        return "CellblockError", state.error or "the system failed the submission"
    for stage in ("deps", "compile", "run"):
        result = state.stages.get(stage)
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
