"""The notebook syntax (shared/NOTEBOOK.md) as a pure parser: cell text in, sections out.

A cell is split into sections at every line that starts with ``%%``; each section is a magic
line and the body up to the next ``%%`` line. Line magics (``%reset`` …) may open a cell. A cell
with no ``%%`` line is a run script. Every error is a ``CellSyntaxError`` naming the line it
came from, raised before anything is sent anywhere.
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from cellblock.service.protocol import (
    DEPENDENCY_NAME,
    DEPS_LIMITS,
    ENV_NAME,
    LIMIT_BY_NAME,
    LIMITS,
    MAX_LIMIT,
    MAX_OUTPUT_PATTERNS,
    SANDBOXED_STAGES,
    STAGES,
    Compare,
    Unit,
    decode,
    pattern_problem,
)

SECTION_MAGICS = (
    "files", "deps", "compile", "run", "stdin", "env", "limits", "test", "expect", "check",
    "outputs",
)  # fmt: skip
LINE_MAGICS = ("reset", "staged", "packages", "workers", "status")
ENCODINGS = ("utf8", "hex", "base64")
#: Options each section magic takes; a value of True means the option takes an argument.
OPTIONS: dict[str, dict[str, bool]] = {
    "files": {"--encoding": True, "--executable": False},
    "deps": {},
    "compile": {"--show-output": False},
    "run": {},  # every word is the program's, but a first --interactive (_run_flag)
    "stdin": {"--encoding": True},
    "env": {},
    "limits": {},
    "test": {"--points": True, "--compare": True, "--encoding": True, "--limits": True},
    "expect": {},
    "check": {},
    "outputs": {},
}
#: What ``%reset`` may forget: everything (no argument) or only the tests.
RESET_WHAT = ("tests",)
#: Longest test name the protocol takes.
MAX_TEST_NAME = 200
#: Every limit a sandboxed stage takes, as the protocol names them.
STAGE_LIMITS = tuple(limit.name for limit in LIMITS)
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
#: Seconds per time unit; exact, so that ``1500ms`` is 1.5 s and not 1.5000000000000002.
TIME_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60)}
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


class CellSyntaxError(ValueError):
    """A bad magic, option or value; ``line`` is 1-based within the cell."""

    def __init__(self, line: int, text: str, message: str) -> None:
        super().__init__(f"line {line}: {message}\n    {text}")
        self.line = line
        self.text = text
        self.message = message


@dataclass(frozen=True)
class Section:
    magic: str
    args: tuple[str, ...]
    options: dict[str, str | bool]
    body: str
    line: int  # of the magic line, 1-based
    text: str  # the magic line itself


@dataclass(frozen=True)
class LineMagic:
    name: str
    args: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Cell:
    magics: tuple[LineMagic, ...] = ()
    sections: tuple[Section, ...] = ()
    plain_run: str | None = None  # a cell without %% lines: its text is a run script

    @property
    def run(self) -> Section | None:
        runs = [s for s in self.sections if s.magic == "run"]
        return runs[-1] if runs else None

    @property
    def interactive(self) -> bool:
        """``%%run --interactive``: its stdin typed in as it runs, on a terminal."""
        return self.run is not None and bool(self.run.options.get("--interactive"))


def lines_of(text: str) -> list[str]:
    """``text`` split after every newline, and only there: a form feed, a vertical tab or a
    Unicode line separator inside a file is content (``str.splitlines`` would split there, so a
    body would lose its exact text and errors would name the wrong line)."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _text(line: str) -> str:
    """A line without its line end (``\\n`` or ``\\r\\n``), as errors quote it."""
    return line.removesuffix("\n").removesuffix("\r")


def parse(code: str) -> Cell:
    """Split a cell into line magics and sections and check every magic line."""
    lines = lines_of(code)
    starts = [i for i, line in enumerate(lines) if line.startswith("%%")]
    head = lines[: starts[0]] if starts else lines
    magics, rest = _line_magics(head)
    if not starts:
        script = "".join(line for _, line in rest)
        return Cell(magics=magics, plain_run=script if script.strip() else None)
    for number, line in rest:
        if line.strip() and not _is_marker(line):
            raise CellSyntaxError(
                number, _text(line), "text before the first %% section; put it in a section"
            )
    sections = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        body = lines[start + 1 : end]
        while body and _is_marker(body[-1]):
            body.pop()
        sections.append(_section(start + 1, lines[start], "".join(body)))
    if sum(s.magic == "run" for s in sections) > 1:
        second = [s for s in sections if s.magic == "run"][1]
        raise CellSyntaxError(second.line, second.text, "a cell takes one %%run section")
    _check_tests(sections)
    return Cell(magics=magics, sections=tuple(sections))


#: nbgrader's hidden-test delimiters (its ClearHiddenTests looks for the words in a line).
_HIDDEN_TESTS_MARKER = re.compile(r"\s*(#+|//)\s*(BEGIN|END) HIDDEN TESTS\s*")


def _is_marker(line: str) -> bool:
    """An nbgrader hidden-test delimiter line. It sits between sections (before one, or at the
    end of a body), where it would otherwise become part of the expected output or a file:
    there it is no part of the cell."""
    return _HIDDEN_TESTS_MARKER.fullmatch(_text(line)) is not None


def _check_tests(sections: list[Section]) -> None:
    """Each ``%%expect`` right after the ``%%test`` it belongs to, and a test name once a cell:
    within one cell a second one is a slip, not a replacement."""
    first: dict[str, int] = {}
    for k, section in enumerate(sections):
        if section.magic == "expect":
            before = sections[k - 1] if k else None
            if before is None or before.magic != "test":
                where = f"it follows %%{before.magic}" if before else "it opens the cell"
                message = (
                    f"%%expect without a %%test right above it ({where}): it is the expected "
                    "output of the %%test section just before it, in the same cell"
                )
                raise CellSyntaxError(section.line, section.text, message)
        elif section.magic == "test":
            name = section.args[0]
            if name in first:
                message = f"test {name!r} is given twice in this cell, also on line {first[name]}"
                raise CellSyntaxError(section.line, section.text, message)
            first[name] = section.line


def _line_magics(head: list[str]) -> tuple[tuple[LineMagic, ...], list[tuple[int, str]]]:
    """Line magics at the top of the cell; the lines after them."""
    magics: list[LineMagic] = []
    for i, line in enumerate(head):
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("%"):
            return tuple(magics), list(enumerate(head[i:], start=i + 1))
        words = _split(i + 1, line, stripped[1:])
        if not words or words[0] not in LINE_MAGICS:
            name = words[0] if words else ""
            raise CellSyntaxError(
                i + 1,
                _text(line),
                f"unknown line magic %{name}; known: " + ", ".join(f"%{m}" for m in LINE_MAGICS),
            )
        if words[0] == "reset" and words[1:] and words[1:] not in ([w] for w in RESET_WHAT):
            message = "%reset forgets everything staged, %reset tests only the tests"
            raise CellSyntaxError(i + 1, _text(line), message)
        magics.append(LineMagic(words[0], tuple(words[1:]), i + 1))
    return tuple(magics), []


def _split(number: int, line: str, text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise CellSyntaxError(number, _text(line), f"cannot split the arguments: {exc}") from None


def _section(number: int, line: str, body: str) -> Section:
    text = _text(line)
    words = _split(number, line, line[2:])
    if not words:
        raise CellSyntaxError(number, text, "%% without a magic name")
    magic, *rest = words
    if magic not in SECTION_MAGICS:
        known = ", ".join(f"%%{m}" for m in SECTION_MAGICS)
        raise CellSyntaxError(number, text, f"unknown magic %%{magic}; known: {known}")
    args: list[str] = []
    options: dict[str, str | bool] = {}
    takes = OPTIONS[magic]
    if magic == "run":
        options, rest = _run_flag(number, text, rest)
    i = 0
    while i < len(rest):
        word = rest[i]
        name, eq, value = word.partition("=")
        if magic == "test" and word == "--":  # what follows is the program's, options or not
            args.extend(rest[i + 1 :])
            break
        if magic == "test" and name.startswith("--") and name not in takes:
            # A test's words are its program's arguments (``--mean`` among them); only a
            # near miss of an option is a typo that would silently change the grading.
            if near := difflib.get_close_matches(name, takes, n=1, cutoff=0.75):
                raise CellSyntaxError(
                    number, text, f"%%test has no option {name}: did you mean {near[0]}? "
                    f"(a program argument that looks like an option goes after --)",
                )  # fmt: skip
            args.append(word)
        elif magic != "run" and name.startswith("--"):
            if name not in takes:
                allowed = ", ".join(takes) or "none"
                raise CellSyntaxError(
                    number, text, f"%%{magic} has no option {name} (options: {allowed})"
                )
            if takes[name]:
                if not eq:
                    if i + 1 >= len(rest):
                        raise CellSyntaxError(number, text, f"{name} needs a value")
                    i += 1
                    value = rest[i]
                options[name] = value
            else:
                if eq:
                    raise CellSyntaxError(number, text, f"{name} takes no value")
                options[name] = True
        else:
            args.append(word)
        i += 1
    encoding = options.get("--encoding")
    if encoding is not None and encoding not in ENCODINGS:
        raise CellSyntaxError(
            number, text, f"unknown encoding {encoding!r}; use {', '.join(ENCODINGS)}"
        )
    if magic == "files" and len(args) != 1:
        raise CellSyntaxError(number, text, "%%files takes one file name: %%files NAME")
    if magic in ("compile", "stdin", "env", "limits", "expect", "check") and args:
        raise CellSyntaxError(number, text, f"%%{magic} takes no arguments, only a body")
    if magic == "test":
        _check_test_line(number, text, args, options)
    return Section(magic, tuple(args), options, body, number, text)


def _run_flag(number: int, text: str, words: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """``%%run``'s ``--interactive``, as its first word only: every word after it (and any
    word at all of a plain ``%%run``) is the program's, ``--verbose`` or not."""
    first = words[0] if words else ""
    if first.startswith("--interactive="):
        raise CellSyntaxError(number, text, "--interactive takes no value")
    if first == "--interactive":
        return {"--interactive": True}, words[1:]
    return {}, words


def _check_test_line(
    number: int, text: str, args: list[str], options: dict[str, str | bool]
) -> None:
    if not args or not args[0]:
        raise CellSyntaxError(
            number, text, "%%test takes a test name: %%test NAME [ARG ...] [--points N]"
        )
    name = args[0]
    if len(name) > MAX_TEST_NAME or "\x00" in name:
        raise CellSyntaxError(
            number, text, f"a test name is at most {MAX_TEST_NAME} characters, without NUL"
        )
    if "--points" in options:
        points_value(number, text, str(options["--points"]))
    if "--compare" in options:
        try:
            Compare.parse(str(options["--compare"]))
        except ValueError as exc:
            raise CellSyntaxError(number, text, f"--compare: {exc}") from None
    if "--limits" in options:
        try:
            per_test_limits(str(options["--limits"]))
        except ValueError as exc:
            raise CellSyntaxError(number, text, f"--limits: {exc}") from None


def points_value(number: int, text: str, value: str) -> float:
    """The ``--points`` of a test: a finite number, 0 or more."""
    try:
        points = float(value)
    except ValueError:
        points = math.nan
    if not math.isfinite(points) or points < 0:
        raise CellSyntaxError(
            number, text, f"--points takes a number of points, 0 or more, not {value!r}"
        )
    return points


# -- section bodies ---------------------------------------------------------------------------


def encoded_body(section: Section) -> tuple[str, str]:
    """The content of a ``%%files`` or ``%%stdin`` section as the request carries it, and its
    encoding. Text (utf8) is kept exactly. A hex or base64 body loses its whitespace (the line
    breaks of ``base64`` output, the newline before the next section), which is no part of the
    bytes it encodes, and must decode: a bad one is reported here, with the magic line."""
    encoding = str(section.options.get("--encoding", "utf8"))
    if encoding == "utf8":
        return section.body, encoding
    content = "".join(section.body.split())
    try:
        decode(content, encoding)
    except ValueError as exc:
        raise CellSyntaxError(section.line, section.text, f"the body {exc}") from None
    return content, encoding


def deps_names(section: Section) -> list[str]:
    """The names on the magic line, then those of the body; a bad name is reported with the
    line it is on."""
    lines = [(section.line, section.text, list(section.args))] + [
        (section.line + offset, _text(line), line.split())
        for offset, line in enumerate(lines_of(section.body), start=1)
    ]
    names = []
    for number, text, words in lines:
        for name in words:
            if not DEPENDENCY_NAME.fullmatch(name):
                message = f"{name!r} is not a package name (like gcc or python3Packages.numpy)"
                raise CellSyntaxError(number, text, message)
            names.append(name)
    return names


def output_patterns(section: Section) -> list[str]:
    """The ``%%outputs`` patterns: on the magic line, then shell-quoted words in the body; one
    that could name a file outside the working directory is reported with its line."""
    lines = [(section.line, section.text, list(section.args))] + [
        (number, text, _split(number, text, text)) for number, text in _numbered(section)
    ]
    patterns = []
    for number, text, words in lines:
        for pattern in words:
            if problem := pattern_problem(pattern):
                raise CellSyntaxError(number, text, f"output pattern {problem}")
            patterns.append(pattern)
            if len(patterns) > MAX_OUTPUT_PATTERNS:
                message = f"at most {MAX_OUTPUT_PATTERNS} output patterns; use a glob"
                raise CellSyntaxError(number, text, message)
    return patterns


def _numbered(section: Section) -> list[tuple[int, str]]:
    """The body's lines with their line numbers in the cell."""
    return [
        (section.line + offset, _text(line))
        for offset, line in enumerate(lines_of(section.body), start=1)
    ]


def env_variables(section: Section) -> dict[str, str]:
    variables: dict[str, str] = {}
    for offset, line in enumerate(_body_lines(section), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not ENV_NAME.fullmatch(name):
            raise CellSyntaxError(
                section.line + offset, line, "write NAME=value (NAME: letters, digits, _)"
            )
        variables[name] = value
    return variables


@dataclass(frozen=True)
class LimitSetting:
    stage: str
    name: str
    value: Any  # int, float, or [soft, hard]


def limit_settings(section: Section) -> list[LimitSetting]:
    """``stage.limit = value`` lines, values with units and ``soft:hard`` pairs."""
    settings = []
    for offset, line in enumerate(_body_lines(section), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        number = section.line + offset
        key, eq, value = line.partition("=")
        stage, dot, name = key.strip().partition(".")
        if not eq or not dot:
            raise CellSyntaxError(number, line, "write stage.limit = value, e.g. run.cpu = 2")
        if stage not in STAGES:
            raise CellSyntaxError(
                number, line, f"unknown stage {stage!r}; use compile, run or deps"
            )
        try:
            settings.append(limit_setting(stage, name.strip(), value))
        except ValueError as exc:
            raise CellSyntaxError(number, line, str(exc)) from None
    return settings


def limit_setting(stage: str, name: str, value: str) -> LimitSetting:
    """One limit of ``stage`` from its text (units, ``soft:hard``); ``ValueError`` says what
    is wrong, naming ``stage.name``."""
    known_here = STAGE_LIMITS if stage in SANDBOXED_STAGES else DEPS_LIMITS
    if name not in known_here:
        raise ValueError(f"unknown limit {stage}.{name}; known: {', '.join(known_here)}")
    try:
        parts = value.split(":")
        if len(parts) > 2 or (len(parts) == 2 and not LIMIT_BY_NAME[name].rlimit):
            raise ValueError(f"{name} takes one value, not soft:hard")
        values = [limit_value(name, p) for p in parts]
        if len(values) == 2 and values[0] > values[1]:
            raise ValueError(f"the soft limit {values[0]} is above the hard limit {values[1]}")
    except ValueError as exc:
        raise ValueError(f"{stage}.{name}: {exc}") from None
    return LimitSetting(stage, name, values[0] if len(values) == 1 else values)


def per_test_limits(text: str) -> dict[str, Any]:
    """A test's ``--limits NAME=VALUE,...``: run-stage limits of that test alone, written as
    ``%%limits`` writes them (``cpu=1,wall_time=500ms,as=256M``)."""
    limits: dict[str, Any] = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"write NAME=VALUE,..., e.g. cpu=1,wall_time=2s, not {item!r}")
        limits[name.strip()] = limit_setting("run", name.strip(), value).value
    return limits


def _body_lines(section: Section) -> list[str]:
    return [_text(line) for line in lines_of(section.body)]


def limit_value(name: str, text: str) -> int | float:
    """One limit value in the limit's own unit, which is also what a bare number means: bytes,
    seconds (``cpu`` whole, ``wall_time`` fractional), or for ``rttime`` microseconds (as
    RLIMIT_RTTIME and ``prlimit --rttime`` count). Computed exactly: no float rounding."""
    match = _NUMBER.fullmatch(text)
    if not match:
        raise ValueError(f"{text.strip()!r} is not a number")
    number, unit = Fraction(match.group(1)), match.group(2)
    limit = LIMIT_BY_NAME.get(name)
    if limit is None:
        raise ValueError(f"unknown limit {name!r}; known: {', '.join(STAGE_LIMITS)}")
    if limit.unit is Unit.BYTES:
        if unit.upper() not in SIZE_UNITS:
            raise ValueError(f"unknown size unit {unit!r}; use K, M or G (powers of 1024)")
        return _whole(number * SIZE_UNITS[unit.upper()], name)
    if limit.unit in (Unit.SECONDS, Unit.MICROSECONDS):
        if unit and unit not in TIME_UNITS:
            raise ValueError(f"unknown time unit {unit!r}; use ms, s or m")
        if limit.unit is Unit.MICROSECONDS:
            return _whole(number * TIME_UNITS[unit] * 1_000_000 if unit else number, name)
        seconds = number * TIME_UNITS[unit] if unit else number
        if not limit.whole:
            _check_range(seconds, name)
            return float(seconds)
        return _whole(seconds, name)
    if unit:
        raise ValueError(f"{name} is a count and takes no unit")
    return _whole(number, name)


def _whole(value: Fraction, name: str) -> int:
    if value.denominator != 1:
        raise ValueError(f"{name} takes a whole number, not {float(value):g}")
    _check_range(value, name)
    return value.numerator


def _check_range(value: Fraction, name: str) -> None:
    if value > MAX_LIMIT:
        raise ValueError(f"{name} is larger than any limit the kernel holds ({MAX_LIMIT})")
