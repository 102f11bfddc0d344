"""Judging tests (PROTOCOL.md v1.1, "Tests" and "Output files"): comparison modes, verdicts,
the run stage's aggregate, the score, output files' media types and ``outputs`` patterns."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocolio import PROPERTY

from cellblock.service.protocol import (
    COMPARE_MODES,
    Compare,
    Judgement,
    SandboxResult,
    TestResult,
    aggregate,
    grading,  # whose test_result is not imported by name: pytest would collect it as a test
    judge,
    media_type,
    pattern_problem,
    skipped_test,
)

LINES, EXACT, TOKENS = Compare("lines"), Compare("exact"), Compare("tokens")

# -- parsing a comparison mode ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "tolerance"),
    [
        ("lines", "lines", 0.0),
        ("exact", "exact", 0.0),
        ("tokens", "tokens", 0.0),
        ("number:0", "number", 0.0),
        ("number:1e-6", "number", 1e-6),
        ("number:0.5", "number", 0.5),
        ("number:2", "number", 2.0),
    ],
)
def test_every_comparison_mode_parses(text, mode, tolerance):
    compare = Compare.parse(text)
    assert (compare.mode, compare.tolerance) == (mode, tolerance)
    assert Compare.parse(str(compare)) == compare


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("line", "unknown comparison 'line'"),
        ("LINES", "unknown comparison"),
        ("", "unknown comparison"),
        ("lines:1", "unknown comparison"),
        ("exact:", "unknown comparison"),
        ("numbers:1", "unknown comparison"),
        ("diff", "use lines, exact, tokens, number:TOL"),
        ("number", "number needs its tolerance"),
        ("number:", "is not a number"),
        ("number:abc", "the tolerance 'abc' of 'number:abc' is not a number"),
        ("number:1e-6:2", "is not a number"),
        ("number:-0.1", "must be a finite number of at least 0"),
        ("number:nan", "must be a finite number of at least 0"),
        ("number:inf", "must be a finite number of at least 0"),
        ("number:-inf", "must be a finite number of at least 0"),
    ],
)
def test_a_bad_comparison_mode_or_tolerance_says_what_is_wrong(text, fragment):
    with pytest.raises(ValueError) as info:
        Compare.parse(text)
    assert fragment in str(info.value)


def test_the_modes_are_listed_as_a_client_writes_them():
    assert COMPARE_MODES == ("lines", "exact", "tokens", "number:TOL")
    assert str(Compare.parse("number:1e-06")) == "number:1e-06"
    assert str(LINES) == "lines"


# -- lines ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ("6\n", b"6\n"),
        ("6\n", b"6"),  # the final newline is a trailing empty line
        ("6", b"6\n\n\n"),
        ("6\n", b"6   \n"),  # trailing spaces of a line
        ("6\n", b"6\t\r\n"),  # and a Windows line end
        ("a\nb\n", b"a \nb\t\n\n"),
        ("a  \nb", b"a\nb"),  # the expected output's own trailing whitespace too
        ("", b""),
        ("", b"\n\n  \n"),  # nothing but empty lines is nothing
        ("é\n", "é\n".encode()),
    ],
)
def test_lines_ignores_trailing_whitespace_and_trailing_empty_lines(expected, actual):
    assert LINES.matches(expected, actual)


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        ("6\n", b"7\n"),
        ("6\n", b" 6\n"),  # leading whitespace counts
        ("a\nb\n", b"a\n\nb\n"),  # an empty line in the middle counts
        ("a\nb\n", b"ab\n"),
        ("a b\n", b"a  b\n"),  # whitespace inside a line counts
        ("\na\n", b"a\n"),  # a leading empty line counts
        ("6\n", b""),
        ("", b"x"),
        ("a\nb", b"b\na"),
    ],
)
def test_lines_still_sees_every_other_difference(expected, actual):
    assert not LINES.matches(expected, actual)


# -- exact ------------------------------------------------------------------------------------


def test_exact_is_byte_for_byte():
    assert EXACT.matches("6\n", b"6\n")
    assert EXACT.matches("é", "é".encode())
    assert EXACT.matches("", b"")
    for actual in (b"6", b"6\n\n", b"6 \n", b"6\r\n", b" 6\n", b""):
        assert not EXACT.matches("6\n", actual), actual


# -- tokens -----------------------------------------------------------------------------------


def test_tokens_compares_whitespace_separated_tokens():
    assert TOKENS.matches("1.50", b"1.50\n")
    assert TOKENS.matches("a b\nc", b"  a\tb c  \n\n")
    assert TOKENS.matches("", b" \n\t ")
    assert not TOKENS.matches("1.50", b"1.5\n")  # tokens are text, not numbers
    assert not TOKENS.matches("a b", b"ab")
    assert not TOKENS.matches("a b", b"b a")
    assert not TOKENS.matches("a b", b"a b c")


# -- number:TOL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tolerance", "expected", "actual", "match"),
    [
        (0.0, "1.5", b"1.50\n", True),  # numbers, not text
        (0.0, "1", b"1.0", True),
        (0.0, "3", b"3.0000001", False),
        (0.0, "1e3", b"1000", True),
        # Absolute: near zero a relative tolerance alone would allow nothing.
        (1e-6, "0", b"0.0000009", True),
        (1e-6, "0", b"0.0000011", False),
        (0.01, "2.5", b"2.52", True),  # 0.02 apart, within 1 % of 2.52
        (0.01, "2.5", b"2.6", False),
        # Relative: far from zero an absolute tolerance alone would allow nothing.
        (1e-6, "1000000", b"1000000.9", True),
        (1e-6, "1000000", b"1000001.1", False),
        (1e-6, "-1e12", b"-1.0000005e12", True),
        (1e-6, "-1e12", b"1e12", False),  # the sign counts
        # Every token, in order: words must be equal, numbers close.
        (0.1, "x = 1.0 y = 2.0", b"x = 1.05\ny = 1.95\n", True),
        (0.1, "x = 1.0", b"X = 1.0", False),
        (0.1, "1 2", b"1", False),
        (0.1, "1", b"1 2", False),
        (0.1, "1 2", b"2 1", False),
        (0.1, "1.0", b"one", False),
        (0.1, "one", b"1.0", False),
        # Not-finite numbers match only as the same text.
        (0.1, "nan", b"nan", True),
        (0.1, "inf", b"inf", True),
        (0.1, "nan", b"1.0", False),
        (0.1, "1.0", b"nan", False),
        (0.1, "inf", b"1e308", False),
        (1.0, "inf", b"-inf", False),
    ],
)
def test_number_compares_numbers_within_an_absolute_or_relative_tolerance(
    tolerance, expected, actual, match
):
    assert Compare("number", tolerance).matches(expected, actual) is match


@PROPERTY
@given(
    value=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    tolerance=st.floats(min_value=1e-9, max_value=0.1),
)
def test_a_number_within_its_tolerance_always_passes(value, tolerance):
    compare = Compare("number", tolerance)
    assert compare.matches(repr(value), repr(value).encode())
    nudged = value + tolerance / 2  # within the absolute tolerance, whatever the magnitude
    assert compare.matches(repr(value), repr(nudged).encode())
    far = value + 10 * tolerance * max(1.0, abs(value))  # beyond both tolerances
    if math.isfinite(far):
        assert not compare.matches(repr(value), repr(far).encode())


# -- output that is not UTF-8 -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lines", "exact", "tokens", "number:0.1"])
def test_output_that_is_not_utf8_never_matches_text(mode):
    compare = Compare.parse(mode)
    for actual in (b"\xff\n", b"caf\xe9\n", b"6\xff\n", b"\xc3\n"):
        for expected in ("\ufffd\n", "café\n", "6\n", "6", "é\n", "\xff\n"):
            assert not compare.matches(expected, actual), (mode, actual, expected)


def test_output_that_is_not_utf8_does_not_break_the_comparison_of_the_rest():
    # A stray byte in one line: the other lines still compare, and this one differs.
    assert not LINES.matches("a\nb\n", b"a\n\xff\n")
    assert Compare("number", 0.1).matches("1", b"1.0\n") is True
    assert not TOKENS.matches("a", b"a \xff")


# -- judge ------------------------------------------------------------------------------------


def run(status: str = "ok", **fields: Any) -> SandboxResult:
    exit_code = {"ok": 0, "failed": 3}.get(status)
    return SandboxResult.model_validate({"status": status, "exit_code": exit_code, **fields})


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        ("failed", "runtime_error"),
        ("signaled", "runtime_error"),
        ("time_limit", "time_limit"),
        ("memory_limit", "memory_limit"),
        ("output_limit", "output_limit"),
        ("disk_limit", "disk_limit"),
        ("skipped", "skipped"),
        ("error", "error"),
    ],
)
def test_a_run_that_did_not_end_well_earns_the_verdict_of_how_it_ended(status, verdict):
    ended = run(status, message=f"it ended: {status}")
    # Whatever it wrote, and whatever a checker says: the output is not what decides.
    judgement = judge(ended, b"6\n", "6\n", LINES)
    assert judgement == Judgement(verdict, f"it ended: {status}")
    assert judge(ended, b"6\n", "6\n", LINES, checker=run("ok"), checker_says="fine").verdict == (
        verdict
    )


def test_a_run_whose_output_is_expected_passes():
    assert judge(run(), b"6\n", "6\n", LINES) == Judgement("passed")


def test_a_run_whose_output_differs_is_a_wrong_answer_naming_the_comparison():
    judgement = judge(run(), b"7\n", "6\n", Compare("number", 0.01))
    assert judgement.verdict == "wrong_answer"
    assert judgement.message is not None and "number:0.01" in judgement.message


def test_without_an_expected_output_a_run_that_succeeds_passes():
    assert judge(run(), b"anything at all", None, EXACT) == Judgement("passed")
    assert judge(run("failed"), b"", None, EXACT).verdict == "runtime_error"


def test_a_cut_stdout_never_passes_as_the_whole_expected_output():
    # The program wrote more than limits.output keeps: what was kept equals the expected
    # output, but the program's output was longer, so it is not what was expected.
    cut = run(stdout="abc", stdout_truncated=True)
    assert judge(cut, b"abc", "abc", EXACT).verdict == "wrong_answer"
    assert judge(cut, b"abc", "abc", LINES).verdict == "wrong_answer"
    # Without an expected output nothing is compared, so nothing is cut from it.
    assert judge(cut, b"abc", None, EXACT).verdict == "passed"


def test_a_checker_that_accepts_passes_whatever_the_comparison_says():
    judgement = judge(run(), b"3 2 1\n", "1 2 3\n", EXACT, checker=run("ok"), checker_says="")
    assert judgement == Judgement("passed")  # an empty stdout is no message
    said = judge(run(), b"x", "y", EXACT, checker=run("ok"), checker_says="close enough")
    assert said == Judgement("passed", "close enough")


def test_a_checker_that_rejects_is_a_wrong_answer_with_its_words():
    judgement = judge(run(), b"6\n", "6\n", LINES, checker=run("failed"), checker_says="no: 7")
    assert judgement == Judgement("wrong_answer", "no: 7")
    silent = judge(run(), b"6\n", "6\n", LINES, checker=run("failed"))
    assert silent.verdict == "wrong_answer"
    assert silent.message == "the checker rejected the output"


@pytest.mark.parametrize("status", ["time_limit", "signaled", "memory_limit", "error"])
def test_a_checker_that_does_not_finish_is_an_error_not_the_students_fault(status):
    checker = run(status, message="killed after 5 s")
    judgement = judge(run(), b"6\n", "6\n", LINES, checker=checker, checker_says="partial")
    assert judgement.verdict == "error"
    assert judgement.message == "the checker did not finish: killed after 5 s"
    bare = judge(run(), b"6\n", "6\n", LINES, checker=run(status))
    assert bare.message == f"the checker did not finish: {status}"


# -- a test's result --------------------------------------------------------------------------


def test_a_passed_tests_result_has_its_runs_fields_and_earns_its_points():
    ran = run(stdout="6\n", wall_time=0.25, cpu_time=0.1, memory=4096, message="exit 0",
              limits={"cpu": 1}, started_at="t0", finished_at="t1")  # fmt: skip
    result = grading.test_result("small", ran, Judgement("passed"), 2.5, "6\n")
    assert isinstance(result, TestResult)
    wire = result.wire()
    kept = {k: wire[k] for k in ("status", "exit_code", "stdout", "wall_time", "memory")}
    assert kept == {"status": "ok", "exit_code": 0, "stdout": "6\n", "wall_time": 0.25,
                    "memory": 4096}  # fmt: skip
    assert (wire["limits"], wire["started_at"], wire["finished_at"]) == ({"cpu": 1}, "t0", "t1")
    assert (wire["name"], wire["verdict"], wire["points"], wire["max_points"]) == (
        "small", "passed", 2.5, 2.5)  # fmt: skip
    # The message is the judgement's, never the run's.
    assert wire["message"] is None
    assert wire["expected_output"] == "6\n"


def test_a_failed_test_earns_no_points_and_says_why():
    result = grading.test_result("t", run(), Judgement("wrong_answer", "differs"), 3.0, None)
    assert (result.points, result.max_points, result.message) == (0.0, 3.0, "differs")
    assert result.expected_output is None


def test_a_tests_result_keeps_its_output_files():
    files = [{"name": "a.txt", "content": "aGk=", "size": 2, "media_type": "text/plain"}]
    ran = run(files=files, missing=["b.png"])
    wire = grading.test_result("t", ran, Judgement("passed"), 1.0, None).wire()
    assert wire["files"][0]["name"] == "a.txt"
    assert wire["missing"] == ["b.png"]
    # And a result without outputs has neither field.
    plain = grading.test_result("t", run(), Judgement("passed"), 1.0, None).wire()
    assert "files" not in plain and "missing" not in plain


def test_a_skipped_test_did_not_run_and_earns_nothing():
    result = skipped_test("big", 4.0, "x\n", "skipped: the submission was cancelled")
    assert (result.status, result.verdict, result.points, result.max_points) == (
        "skipped", "skipped", 0.0, 4.0)  # fmt: skip
    assert (result.wall_time, result.cpu_time, result.memory, result.exit_code) == (
        None, None, None, None)  # fmt: skip
    assert result.message == "skipped: the submission was cancelled"
    assert result.expected_output == "x\n"


# -- aggregate and score ----------------------------------------------------------------------


def graded(name: str, verdict: str, points: float = 1.0, **fields: Any) -> TestResult:
    status = {"passed": "ok", "wrong_answer": "ok", "runtime_error": "failed"}.get(verdict, verdict)
    earned = points if verdict == "passed" else 0.0
    data = {"status": status, "name": name, "verdict": verdict, "points": earned,
            "max_points": points, **fields}  # fmt: skip
    return TestResult.model_validate(data)


def test_the_run_stage_is_ok_when_every_test_passed():
    tests = [
        graded("a", "passed", wall_time=0.5, cpu_time=0.25, memory=1000),
        graded("b", "passed", wall_time=0.25, cpu_time=0.5, memory=3000),
    ]
    result = aggregate(tests, "t0", "t1")
    assert result.status == "ok"
    assert (result.wall_time, result.cpu_time, result.memory) == (0.75, 0.75, 3000)
    assert (result.stdout, result.stderr, result.exit_code) == ("", "", None)
    assert (result.started_at, result.finished_at) == ("t0", "t1")
    assert result.message == "2 of 2 tests passed"


def test_the_run_stage_fails_when_any_test_did_not_pass_and_names_them():
    tests = [
        graded("a", "passed", wall_time=1.0, memory=10),
        graded("b", "wrong_answer", wall_time=0.1, memory=20),
        graded("c", "time_limit", wall_time=2.0, memory=5),
        skipped_test("d", 1.0, None, "skipped"),  # no times of its own: counts as 0
    ]
    result = aggregate(tests, "t0", "t1")
    assert result.status == "failed"
    assert result.wall_time == 3.1 and result.memory == 20
    assert result.message == "1 of 4 tests passed; not passed: b, c, d"


def test_the_aggregate_of_no_tests_is_empty():
    result = aggregate([], "t0", "t1")
    assert (result.status, result.wall_time, result.cpu_time, result.memory) == ("ok", 0, 0, 0)


def test_the_score_counts_passed_tests_and_their_points():
    tests = [graded("a", "passed", 2.0), graded("b", "wrong_answer", 3.0), graded("c", "passed")]
    assert grading.score(tests, [2.0, 3.0, 1.0]).wire() == {
        "passed": 2, "total": 3, "points": 3.0, "max_points": 6.0}  # fmt: skip


def test_a_test_without_a_result_yet_counts_as_not_passed():
    score = grading.score([graded("a", "passed", 0.5), None, None], [0.5, 1.0, 1.0])
    assert score.wire() == {"passed": 1, "total": 3, "points": 0.5, "max_points": 2.5}
    assert grading.score([None], [1]).wire() == {
        "passed": 0, "total": 1, "points": 0.0, "max_points": 1.0}  # fmt: skip
    assert isinstance(grading.score([None], [1]).max_points, float)


def test_tests_worth_no_points_still_count_as_passed():
    score = grading.score([graded("warmup", "passed", 0.0)], [0.0])
    assert (score.passed, score.total, score.points, score.max_points) == (1, 1, 0.0, 0.0)


# -- media types ------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01"
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"></svg>\n'
HTML = b"<!doctype html><html><script>alert(document.cookie)</script></html>"


@pytest.mark.parametrize(
    ("name", "head", "kind"),
    [
        ("plot.png", PNG, "image/png"),
        ("photo.jpg", JPEG, "image/jpeg"),
        ("photo.JPEG", JPEG, "image/jpeg"),
        ("anim.gif", b"GIF89a\x01\x00\x01\x00", "image/gif"),
        ("old.gif", b"GIF87a\x01\x00\x01\x00", "image/gif"),
        ("report.pdf", b"%PDF-1.7\n", "application/pdf"),
        # The bytes decide, not the name the sandbox gave the file.
        ("plot", PNG, "image/png"),
        ("plot.txt", PNG, "image/png"),
        ("results/plot.svg", JPEG, "image/jpeg"),
        ("drawing.svg", SVG, "image/svg+xml"),
        ("DRAWING.SVG", b"<svg></svg>", "image/svg+xml"),
        ("out.txt", b"hello\n", "text/plain"),
        ("out", b"hello\n", "text/plain"),
        ("out.log", b"hello\n", "text/plain"),
        ("results/data.csv", b"a,b\n1,2\n", "text/csv"),
        ("data.tsv", b"a\tb\n", "text/tab-separated-values"),
        ("data.json", b'{"a": 1}', "application/json"),
        ("notes.md", b"# Notes\n", "text/markdown"),
        ("page.html", b"<p>hi</p>", "text/html"),
        ("feed.xml", b"<feed/>", "application/xml"),
        ("empty.txt", b"", "text/plain"),
        ("utf8.txt", "héllo ✓\n".encode(), "text/plain"),
        # netpbm: its header is text, its pixels (P4, P5, P6) are binary.
        ("image.ppm", b"P6\n2 1\n255\n\xff\x00\x00\x00\xff\x00", "image/x-portable-pixmap"),
        ("image.ppm", b"P3\n1 1\n255\n255 0 0\n", "image/x-portable-pixmap"),
        ("image.pgm", b"P5\n1 1\n255\n\x80", "image/x-portable-graymap"),
        ("image.pbm", b"P4\n8 1\n\xa5", "image/x-portable-bitmap"),
        ("image.pbm", b"P1\n2 1\n0 1\n", "image/x-portable-bitmap"),
    ],
)
def test_media_types(name, head, kind):
    assert media_type(name, head) == kind


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("plot.png", HTML),  # a .png holding HTML
        ("plot.png", b"<svg onload=alert(1)>"),
        ("photo.jpg", b"just text"),
        ("anim.gif", b"GIF8"),  # not the whole magic
        ("plot.png", b"\x89PNG"),
    ],
)
def test_a_name_never_makes_a_file_an_image(name, head):
    kind = media_type(name, head)
    assert not kind.startswith("image/"), kind
    assert kind in ("text/plain", "application/octet-stream")


def test_an_svg_name_without_an_svg_inside_is_plain_text():
    assert media_type("x.svg", HTML) == "text/plain"
    assert media_type("x.svg", b"hello") == "text/plain"


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("blob.bin", b"\x00\x01\x02\x03\xfe\xff" * 50),
        ("a.out", b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + b"\x02\x00\x3e\x00\xff\xff"),
        ("blob.txt", b"\xff\xfe\xfd" + b"x" * 100),  # a text name does not make it text
        ("short.bin", b"\xff"),  # a whole file of one byte that is never UTF-8
        ("short.txt", b"hello\xff"),  # a bad byte at the end of a whole small file
        ("data.csv", b"a,b\n\xc3\x28,1\n"),  # an invalid sequence, not a cut one
        ("zeros.dat", b"\x00" * 64),  # NUL bytes are valid UTF-8 but no text
        ("data.csv", b"P5\n1 1\n255\n\x80\xff"),  # netpbm's header under another name
    ],
)
def test_binary_content_is_octet_stream_whatever_its_name(name, head):
    assert media_type(name, head) == "application/octet-stream"


def test_a_character_cut_at_the_end_of_the_head_is_still_text():
    text = ("a" * 510 + "é").encode()  # 512 bytes: é's two bytes are the last
    assert media_type("out.txt", text[:511]) == "text/plain"  # the head ends inside é
    assert media_type("out.txt", "✓".encode()[:2]) == "text/plain"


def test_a_dot_in_a_folder_name_is_no_extension():
    assert media_type("results.csv/data", b"a,b\n") == "text/plain"
    assert media_type(".csv", b"a,b\n") == "text/csv"


# -- outputs patterns -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["plot.png", "results/*.csv", "*.png", "**/*.txt", "out/[ab].txt", ".hidden", "a..b", "..x"],
)
def test_a_relative_pattern_is_fine(pattern):
    assert pattern_problem(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("/etc/passwd", "is absolute"),
        ("/", "is absolute"),
        ("/box/*.png", "is absolute"),
        ("..", "contains '..'"),
        ("../x", "contains '..'"),
        ("a/../../etc/passwd", "contains '..'"),
        ("results/..", "contains '..'"),
        ("", "must not be empty"),
        ("a//b", "empty or '.' path component"),
        ("./a", "empty or '.' path component"),
        ("a/", "empty or '.' path component"),
        ("a\x00b", "NUL"),
        ("x" * 1025, "longer than 1024 bytes"),
    ],
)
def test_a_pattern_outside_the_working_directory_is_refused(pattern, fragment):
    problem = pattern_problem(pattern)
    assert problem is not None and fragment in problem, problem


@pytest.mark.parametrize(
    ("mode", "expected", "actual"),
    [
        ("number:0.5", "10", "1_0"),  # float() takes it; no program prints a number so
        ("number:0.5", "8", "\u0668"),  # an Arabic-Indic digit
        ("number:1e9", "1", "infinity"),
        ("tokens", "a b", "a\u00a0b"),  # a non-breaking space is part of a token
        ("lines", "a", "a\u00a0"),
    ],
)
def test_only_ascii_numbers_and_whitespace_count(mode, expected, actual):
    assert not Compare.parse(mode).matches(expected, actual.encode())


def test_a_checker_never_passes_an_output_the_limit_cut():
    cut = run(stdout_truncated=True)
    accepting = run()
    verdict = judge(cut, b"42\n", None, Compare.parse("lines"), accepting, "fine").verdict
    assert verdict == "wrong_answer"
    assert judge(cut, b"42\n", None, Compare.parse("lines")).verdict == "passed"  # no judge
