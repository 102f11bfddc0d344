"""Judging tests (PROTOCOL.md v1.1, "Tests" and "Output files"), as pure functions.

How a test's output is compared with what was expected (``Compare``), which verdict a run
earns (``judge``), the run stage's aggregate over its tests and the submission's score, and the
media type of an output file. The executor runs the programs and reads the files; everything
it decides about them is decided here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cellblock.service.protocol.results import (
    SandboxResult,
    Score,
    TestResult,
    Verdict,
)

CompareMode = Literal["lines", "exact", "tokens", "number"]
COMPARE_MODES: tuple[str, ...] = ("lines", "exact", "tokens", "number:TOL")
#: The verdict of each way a run can end, when its output is not what decides.
VERDICT_OF_STATUS: dict[str, Verdict] = {
    "failed": "runtime_error",
    "signaled": "runtime_error",
    "time_limit": "time_limit",
    "memory_limit": "memory_limit",
    "output_limit": "output_limit",
    "disk_limit": "disk_limit",
    "skipped": "skipped",
    "error": "error",
}


@dataclass(frozen=True)
class Compare:
    """A comparison mode: ``lines``, ``exact``, ``tokens`` or ``number`` with its tolerance."""

    mode: CompareMode
    tolerance: float = 0.0

    def __str__(self) -> str:
        return f"number:{self.tolerance:g}" if self.mode == "number" else self.mode

    @classmethod
    def parse(cls, text: str) -> Compare:
        """``lines``, ``exact``, ``tokens`` or ``number:TOL``; ``ValueError`` says what is wrong."""
        name, colon, tolerance = text.partition(":")
        if name in ("lines", "exact", "tokens") and not colon:
            return cls(name)  # type: ignore[arg-type]
        if name != "number":
            raise ValueError(f"unknown comparison {text!r}; use {', '.join(COMPARE_MODES)}")
        if not colon:
            raise ValueError("number needs its tolerance: number:TOL, e.g. number:1e-6")
        try:
            value = float(tolerance)
        except ValueError:
            raise ValueError(f"the tolerance {tolerance!r} of {text!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"the tolerance of {text!r} must be a finite number of at least 0")
        return cls("number", value)

    def matches(self, expected: str, actual: bytes) -> bool:
        """Whether ``actual`` (the program's stdout) is what ``expected`` asks for."""
        if self.mode == "exact":
            return actual == expected.encode()
        # Bytes that are not UTF-8 stay distinct from any text rather than becoming U+FFFD.
        text = actual.decode("utf-8", "surrogateescape")
        if self.mode == "lines":
            return _lines(text) == _lines(expected)
        if self.mode == "tokens":
            return _tokens(text) == _tokens(expected)
        want, got = _tokens(expected), _tokens(text)
        return len(want) == len(got) and all(
            self._close(w, g) for w, g in zip(want, got, strict=True)
        )

    def _close(self, want: str, got: str) -> bool:
        if want == got:
            return True
        if not (_NUMBER.fullmatch(want) and _NUMBER.fullmatch(got)):
            return False  # float() would also take "1_0", "ⅷ"-like digits and "infinity"
        a, b = float(want), float(got)
        return math.isclose(a, b, rel_tol=self.tolerance, abs_tol=self.tolerance)


#: ASCII whitespace separates tokens and ends lines: a non-breaking space a program printed
#: is part of what it printed.
WHITESPACE = " \t\n\r\x0b\x0c"
_TOKEN = re.compile(f"[^{WHITESPACE}]+")
#: A decimal number as programs print them, and nothing float() merely accepts.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _lines(text: str) -> list[str]:
    """Lines without trailing whitespace, and without trailing empty lines (as Judge0 does)."""
    lines = [line.rstrip(WHITESPACE) for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    message: str | None = None


def judge(
    run: SandboxResult,
    stdout: bytes,
    expected: str | None,
    compare: Compare,
    checker: SandboxResult | None = None,
    checker_says: str | None = None,
) -> Judgement:
    """The verdict of one test from how its run ended and what it wrote.

    A run that did not end well earns the verdict of how it ended. Otherwise a checker, when
    there is one, decides (it sees the expected output and may accept several answers);
    without one, the output is compared with ``expected`` (no ``expected``: any output passes).
    ``checker_says`` is the checker's stdout, which becomes the message.
    """
    if run.status != "ok":
        return Judgement(VERDICT_OF_STATUS[run.status], run.message)
    if run.stdout_truncated and (expected is not None or checker is not None):
        # What was kept may be right, but the program wrote more: neither the comparison nor
        # the checker saw all of it.
        return Judgement("wrong_answer", "the output is longer than limits.output keeps")
    if checker is not None:
        if checker.status == "ok":
            return Judgement("passed", checker_says or None)
        if checker.status == "failed":
            return Judgement("wrong_answer", checker_says or "the checker rejected the output")
        why = checker.message or checker.status
        return Judgement("error", f"the checker did not finish: {why}")
    if expected is None or compare.matches(expected, stdout):
        return Judgement("passed")
    return Judgement("wrong_answer", f"the output differs from the expected output ({compare})")


def test_result(
    name: str,
    run: SandboxResult,
    judgement: Judgement,
    points: float,
    expected: str | None,
) -> TestResult:
    """The test's result: its run's fields, and how it was judged."""
    earned = points if judgement.verdict == "passed" else 0.0
    fields = run.model_dump(exclude={"message"})
    return TestResult(
        **fields,
        name=name,
        verdict=judgement.verdict,
        points=earned,
        max_points=points,
        message=judgement.message,
        expected_output=expected,
    )


def skipped_test(name: str, points: float, expected: str | None, message: str) -> TestResult:
    """A test that did not run: compile failed, or the submission was cancelled."""
    return TestResult(
        status="skipped",
        name=name,
        verdict="skipped",
        points=0.0,
        max_points=points,
        message=message,
        expected_output=expected,
        wall_time=None,
        cpu_time=None,
        memory=None,
    )


def aggregate(tests: Sequence[TestResult], started_at: str, finished_at: str) -> SandboxResult:
    """The run stage's result over its tests: ``ok`` when every test passed, else ``failed``;
    times summed, memory the largest peak, no output of its own."""
    passed = sum(t.verdict == "passed" for t in tests)
    failing = [t.name for t in tests if t.verdict != "passed"]
    return SandboxResult(
        status="ok" if passed == len(tests) else "failed",
        wall_time=round(sum(t.wall_time or 0.0 for t in tests), 6),
        cpu_time=round(sum(t.cpu_time or 0.0 for t in tests), 6),
        memory=max((t.memory or 0 for t in tests), default=0),
        message=f"{passed} of {len(tests)} tests passed"
        + (f"; not passed: {', '.join(failing)}" if failing else ""),
        started_at=started_at,
        finished_at=finished_at,
    )


def score(tests: Sequence[TestResult | None], max_points: Sequence[float]) -> Score:
    """The submission's score; a test without a result yet counts as not passed."""
    done = [t for t in tests if t is not None]
    return Score(
        passed=sum(t.verdict == "passed" for t in done),
        total=len(max_points),
        points=float(sum(t.points for t in done)),
        max_points=float(sum(max_points)),
    )


#: Media types told by a file's first bytes: what a browser would render is never guessed
#: from a name the sandbox chose.
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
)
#: Text types by extension, for content that is valid UTF-8.
TEXT_TYPES = {
    ".txt": "text/plain", ".csv": "text/csv", ".tsv": "text/tab-separated-values",
    ".json": "application/json", ".md": "text/markdown", ".html": "text/html",
    ".htm": "text/html", ".xml": "application/xml", ".svg": "image/svg+xml",
    ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap",
    ".pbm": "image/x-portable-bitmap",
}  # fmt: skip


def media_type(name: str, head: bytes) -> str:
    """The media type of an output file from its name and its first bytes."""
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    dot = name.rfind(".")
    extension = name[dot:].lower() if dot > name.rfind("/") else ""
    netpbm = extension in (".ppm", ".pgm", ".pbm")
    if head.startswith((b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")) and netpbm:
        return TEXT_TYPES[extension]  # netpbm: binary after its header, named by extension
    if b"\x00" in head:  # valid UTF-8, but no text holds NUL bytes
        return "application/octet-stream"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":  # not merely a character cut at the end
            return "application/octet-stream"
    if extension == ".svg" and b"<svg" not in head:
        return "text/plain"
    return TEXT_TYPES.get(extension, "text/plain")


def pattern_problem(pattern: str) -> str | None:
    """Why an ``outputs`` pattern cannot be used, or None: it must name paths inside the working
    directory (relative, no ``..``, no empty components)."""
    if not pattern:
        return "must not be empty"
    if "\x00" in pattern:
        return "must not contain NUL characters"
    if pattern.startswith("/"):
        return f"{pattern!r} is absolute; use a path relative to the working directory"
    parts = pattern.split("/")
    if ".." in parts:
        return f"{pattern!r} contains '..': only files inside the working directory come back"
    if any(part in ("", ".") for part in parts):
        return f"{pattern!r} has an empty or '.' path component"
    if len(pattern.encode("utf-8", "surrogatepass")) > 1024:
        return "is longer than 1024 bytes"
    return None
