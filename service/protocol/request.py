"""The submission request as a client sends it, and its validation (``parse_submission``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from cellblock.errors import FieldProblem, InvalidRequest
from cellblock.service.protocol.content import Encoding, decode
from cellblock.service.protocol.grading import Compare, pattern_problem
from cellblock.service.protocol.interactive import tty_size_problem
from cellblock.service.protocol.limits import LimitPolicy, ResolvedLimits, resolve_limits

#: One argv or environment string ("NAME=value"), which Linux caps at MAX_ARG_STRLEN (128 KiB
#: with its NUL): a longer one can never start. A stage script travels as one argv string.
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_SCRIPT_BYTES = MAX_ARG_BYTES
TOO_LONG = "Linux passes no longer string to a program: send data as a file or stdin"
DEPENDENCY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_+-]*(\.[A-Za-z_][A-Za-z0-9_+-]*){0,3}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FILES = 1000
MAX_DEPENDENCIES = 64
MAX_OUTPUT_PATTERNS = 64
#: The most tests any submission holds, whatever the configured cap (``max_tests``) below it.
MAX_TESTS = 10_000
#: Points a test is worth at most: far above any grading scale, far below float overflow.
MAX_POINTS = 1_000_000
#: Far above any nixpkgs attribute path, and short enough that a name never floods a key,
#: a log line or nix's command line.
MAX_DEPENDENCY_NAME = 255


def _no_nul(value: str) -> str:
    """Text that can become an argv string, a variable or a file name."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def _dependency_name(name: str) -> str:
    if len(name) > MAX_DEPENDENCY_NAME:
        raise ValueError(f"is longer than {MAX_DEPENDENCY_NAME} characters")
    if not DEPENDENCY_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a package attribute name (letters, digits, _ + -, "
            "dot-separated, like gcc or python3Packages.numpy)"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    name: str
    encoding: Encoding = "utf8"
    content: str
    executable: StrictBool = False

    @field_validator("name")
    @classmethod
    def _relative_path(cls, name: str) -> str:
        _no_nul(name)
        if not name:
            raise ValueError("must not be empty")
        if name.startswith("/"):
            raise ValueError(f"{name!r} is absolute; use a path relative to the working directory")
        parts = name.split("/")
        if ".." in parts:
            raise ValueError(f"{name!r} contains '..'")
        if any(part in ("", ".") for part in parts):
            raise ValueError(f"{name!r} has an empty or '.' path component")
        if any(len(part.encode()) > 255 for part in parts) or len(name.encode()) > 1024:
            raise ValueError("is too long (255 bytes a component, 1024 in all)")
        return name

    @field_validator("content")
    @classmethod
    def _decodable(cls, content: str, info: Any) -> str:
        decode(content, info.data.get("encoding", "utf8"))
        return content

    def data(self) -> bytes:
        return decode(self.content, self.encoding)


def _args(args: list[str]) -> list[str]:
    for i, arg in enumerate(args):
        _no_nul(arg)
        if len(arg.encode()) > MAX_ARG_BYTES:
            raise ValueError(f"args[{i}] is longer than {MAX_ARG_BYTES} bytes; {TOO_LONG}")
    return args


def _script_text(script: str | None) -> str | None:
    if script is None:
        return None
    _no_nul(script)
    if len(script.encode()) > MAX_SCRIPT_BYTES:
        raise ValueError(f"is longer than {MAX_SCRIPT_BYTES} bytes; put code in files")
    return script


def _compare(text: str) -> str:
    Compare.parse(text)
    return text


def _output_pattern(pattern: str) -> str:
    if problem := pattern_problem(pattern):
        raise ValueError(problem)
    return pattern


Args = Annotated[list[str], AfterValidator(_args), Field(max_length=1024)]


class TestSpec(_Strict):
    """One test of a submission (PROTOCOL.md, "Tests"): the run script's stdin and args."""

    __test__: ClassVar[bool] = False  # not a test case, whatever pytest guesses from the name
    name: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_no_nul)]
    stdin_encoding: Encoding = "utf8"
    stdin: str = ""
    args: Args = Field(default_factory=list)
    expected_output: Annotated[str, AfterValidator(_no_nul)] | None = None
    compare: Annotated[str, AfterValidator(_compare)] = "lines"
    points: float = Field(default=1.0, strict=True)
    limits: dict[str, Any] = Field(default_factory=dict)

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, stdin: str, info: Any) -> str:
        decode(stdin, info.data.get("stdin_encoding", "utf8"))
        return stdin

    @field_validator("points")
    @classmethod
    def _not_negative(cls, points: float) -> float:
        if not math.isfinite(points) or not 0 <= points <= MAX_POINTS:
            raise ValueError(f"{points} is not a number of points: give 0 to {MAX_POINTS}")
        return float(points)

    def stdin_data(self) -> bytes:
        return decode(self.stdin, self.stdin_encoding)

    def comparison(self) -> Compare:
        return Compare.parse(self.compare)


class SubmissionRequest(_Strict):
    """A submission as a client sends it (``POST /api/v1/submissions``)."""

    files: list[FileSpec] = Field(default_factory=list, max_length=MAX_FILES)
    dependencies: list[Annotated[str, AfterValidator(_dependency_name)]] = Field(
        default_factory=list, max_length=MAX_DEPENDENCIES
    )
    compile: str | None = None
    run: str
    env: dict[str, str] = Field(default_factory=dict, max_length=256)
    stdin_encoding: Encoding = "utf8"
    stdin: str = ""
    args: Args = Field(default_factory=list)
    limits: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Tests: the run script runs once per test instead of once (``None``: no tests).
    tests: list[TestSpec] | None = Field(default=None, min_length=1, max_length=MAX_TESTS)
    checker: str | None = None
    outputs: list[Annotated[str, AfterValidator(_output_pattern)]] = Field(
        default_factory=list, max_length=MAX_OUTPUT_PATTERNS
    )
    #: ``interactive``: the run stage's stdin comes over the WebSocket as the program runs.
    stdin_mode: Literal["buffered", "interactive"] = "buffered"
    #: The run stage on a pseudo-terminal of ``tty_size`` (rows, columns).
    tty: StrictBool = False
    tty_size: tuple[int, int] | None = None

    @field_validator("tty_size", mode="before")
    @classmethod
    def _tty_size(cls, size: object) -> object:
        if size is not None and (problem := tty_size_problem(size)):
            raise ValueError(problem)
        return size

    @field_validator("compile", "run", "checker")
    @classmethod
    def _script(cls, script: str | None) -> str | None:
        return _script_text(script)

    @field_validator("run")
    @classmethod
    def _run_not_blank(cls, script: str) -> str:
        if not script.strip():
            raise ValueError("must not be empty: it is the command that runs the program")
        return script

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
            try:
                _no_nul(value)
            except ValueError as exc:
                raise ValueError(f"the value of {name} {exc}") from None
            if len(f"{name}={value}".encode()) > MAX_ARG_BYTES:
                raise ValueError(f"{name}=value is longer than {MAX_ARG_BYTES} bytes; {TOO_LONG}")
        return env

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, stdin: str, info: Any) -> str:
        decode(stdin, info.data.get("stdin_encoding", "utf8"))
        return stdin

    def stdin_data(self) -> bytes:
        return decode(self.stdin, self.stdin_encoding)


@dataclass(frozen=True)
class Submission:
    """A validated request with its limits resolved: what the executor runs."""

    request: SubmissionRequest
    limits: ResolvedLimits

    def as_json(self) -> dict[str, Any]:
        return {"request": self.request.model_dump(), "limits": self.limits.as_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Submission:
        return cls(
            request=SubmissionRequest.model_validate(data["request"]),
            limits=ResolvedLimits.from_json(data["limits"]),
        )


class PackagesRequest(_Strict):
    """``POST /api/v1/packages``: a package set to build into the cache ahead of use."""

    names: list[Annotated[str, AfterValidator(_dependency_name)]] = Field(
        min_length=1, max_length=MAX_DEPENDENCIES
    )


def parse_packages_request(raw: object) -> PackagesRequest:
    """Validate a prefetch request; ``InvalidRequest`` names every bad field."""
    try:
        return PackagesRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None


#: What a missing required field is for, instead of pydantic's bare "Field required".
REQUIRED: dict[tuple[int | str, ...], str] = {
    ("run",): "is required: the script that runs the program (with tests, once per test)",
}


def _invalid(exc: ValidationError) -> InvalidRequest:
    return InvalidRequest(
        [
            FieldProblem(field_path(e["loc"]), _message(e["loc"], e["type"], e["msg"]))
            for e in exc.errors(include_url=False)
        ]
    )


def _message(loc: tuple[int | str, ...], kind: str, message: str) -> str:
    if kind == "missing" and (why := REQUIRED.get(tuple(loc))):
        return why
    return message.removeprefix("Value error, ")


def field_path(loc: Iterable[int | str]) -> str:
    """A pydantic location as a field name: ``("files", 1, "name")`` → ``files[1].name``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def parse_submission(raw: object, policy: LimitPolicy) -> Submission:
    """Validate a decoded JSON request body and resolve its limits; ``InvalidRequest`` if bad."""
    if not isinstance(raw, dict):
        raise InvalidRequest([FieldProblem("", "the submission must be a JSON object")])
    try:
        request = SubmissionRequest.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None
    problems = _file_name_problems(request.files) + _test_problems(request, policy)
    if problems := problems + _interactive_problems(request):
        raise InvalidRequest(problems)
    limits = resolve_limits(request.limits, policy, [t.limits for t in request.tests or ()])
    if problems := _files_over_disk(request, limits) + _tests_over_time(request, limits, policy):
        raise InvalidRequest(problems)
    return Submission(request=request, limits=limits)


def _interactive_problems(request: SubmissionRequest) -> list[FieldProblem]:
    """What interactive stdin and a terminal cannot go with."""
    problems = []
    if request.stdin_mode == "interactive":
        if request.tests is not None:
            problems.append(FieldProblem(
                "stdin_mode", "tests run with their own stdin: interactive stdin cannot go "
                "with tests",
            ))  # fmt: skip
        if request.stdin:
            problems.append(FieldProblem(
                "stdin", "with stdin_mode interactive, stdin comes over the WebSocket "
                "('stdin' messages): leave stdin out",
            ))  # fmt: skip
    elif request.tty:
        problems.append(FieldProblem("tty", 'a terminal needs "stdin_mode": "interactive"'))
    if request.tty_size is not None and not request.tty:
        problems.append(FieldProblem("tty_size", 'is the size of a terminal: give "tty": true'))
    return problems


def _test_problems(request: SubmissionRequest, policy: LimitPolicy) -> list[FieldProblem]:
    """A checker without tests, more tests than the cap, and test names given twice."""
    tests = request.tests or []
    problems = []
    if request.checker is not None and not tests:
        problems.append(FieldProblem("checker", "a checker judges tests: give tests with it"))
    cap = policy.grading.max_tests
    if len(tests) > cap:
        problems.append(FieldProblem(
            "tests", f"{len(tests)} tests are more than the {cap} this service runs at once"
        ))  # fmt: skip
    return problems + _repeated_names("tests", [test.name for test in tests])


def _repeated_names(field: str, names: list[str]) -> list[FieldProblem]:
    """``field[i].name`` for each name given a second time, naming the first."""
    problems = []
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            again = f"{name!r} is given twice, also as {field}[{first[name]}]"
            problems.append(FieldProblem(f"{field}[{i}].name", again))
        first.setdefault(name, i)
    return problems


def _tests_over_time(
    request: SubmissionRequest, limits: ResolvedLimits, policy: LimitPolicy
) -> list[FieldProblem]:
    """The tests' wall-time limits together must fit the configured cap; a checker's run after
    each test counts with the run stage's own wall_time."""
    total = sum(t.wall_time for t in limits.tests)
    if request.checker is not None:
        total += len(limits.tests) * limits.run.wall_time
    cap = policy.grading.max_tests_wall_time
    if total <= cap:
        return []
    checkers = " with their checker's runs" if request.checker is not None else ""
    return [FieldProblem(
        "tests", f"the tests' wall_time limits{checkers} add up to {total:g} s, over the "
        f"{cap:g} s this service allows one submission's tests; run fewer tests or lower their "
        "wall_time",
    )]  # fmt: skip


#: What a file takes on disk beyond its bytes, at the least: one block for its metadata.
FILE_OVERHEAD = 4096


def _files_over_disk(request: SubmissionRequest, limits: ResolvedLimits) -> list[FieldProblem]:
    """The files stay in the working directory through every stage: each stage's disk cap
    must hold them (a file's size rounded up to blocks, plus its metadata)."""
    used = sum(-(-len(f.data()) // 4096) * 4096 + FILE_OVERHEAD for f in request.files)
    stages = ("compile", "run") if request.compile is not None else ("run",)
    caps = [(f"limits.{stage}", getattr(limits, stage)) for stage in stages]
    caps += [(f"tests[{i}].limits", test) for i, test in enumerate(limits.tests)]
    return [
        FieldProblem(
            "files",
            f"the files take about {used} bytes on disk, over {where}.disk "
            f"({stage.disk} bytes); send fewer or smaller files, or raise it",
        )
        for where, stage in caps
        if used > stage.disk
    ]


def _file_name_problems(files: list[FileSpec]) -> list[FieldProblem]:
    """Names that repeat, or that are both a file and a folder, each named by its index."""
    problems = _repeated_names("files", [f.name for f in files])
    first: dict[str, int] = {}
    for i, f in enumerate(files):
        first.setdefault(f.name, i)
    for i, f in enumerate(files):
        parts = f.name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in first:
                problems.append(FieldProblem(
                    f"files[{i}].name",
                    f"{folder!r} is both a file and a folder (the file is files[{first[folder]}])",
                ))  # fmt: skip
    return problems
