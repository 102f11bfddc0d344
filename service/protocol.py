"""The Cellblock wire protocol (shared/PROTOCOL.md) as plain data and pure functions.

Everything that defines the shape of a message lives here: the submission request and its
validation, per-stage limits and their resolution against the administrator's policy, stage
results, the submission status document, events, and the status state machine that turns a
sequence of events into the submission document. No I/O happens in this module; the service,
the executor, the kernel and the CLI are adapters around it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from cellblock.errors import FieldProblem, InvalidRequest, LimitExceeded

# -- limits -----------------------------------------------------------------------------------

#: Every Linux prlimit resource, by its prlimit(1) name in lower case.
RLIMITS: tuple[str, ...] = (
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue",
    "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip
#: The limits Cellblock enforces itself, outside the kernel's rlimits.
SANDBOX_LIMITS: tuple[str, ...] = ("wall_time", "memory", "pids", "output", "disk")
#: Of those, the sizes and counts: positive integers.
SIZE_LIMITS: tuple[str, ...] = ("memory", "pids", "output", "disk")
SANDBOXED_STAGES: tuple[str, ...] = ("compile", "run")
STAGES: tuple[str, ...] = ("deps", "compile", "run")
#: One argv or environment string ("NAME=value"), which Linux caps at MAX_ARG_STRLEN (128 KiB
#: with its NUL): a longer one can never start. A stage script travels as one argv string.
MAX_ARG_BYTES = 128 * 1024 - 1
MAX_SCRIPT_BYTES = MAX_ARG_BYTES
TOO_LONG = "Linux passes no longer string to a program: send data as a file or stdin"
UNLIMITED = "unlimited"
#: The largest finite limit: rlim_t is 64 bits and its top value means "unlimited".
MAX_LIMIT = 2**63 - 1

Encoding = Literal["utf8", "hex", "base64"]
StageName = Literal["deps", "compile", "run"]
#: One rlimit: (soft, hard), ``None`` meaning RLIM_INFINITY.
Rlimit = tuple[int | None, int | None]


@dataclass(frozen=True)
class StageLimits:
    """The limits applied to one stage, every one of them resolved to a value."""

    rlimits: Mapping[str, Rlimit]
    wall_time: float
    memory: int
    pids: int
    output: int
    #: Bytes the working directory may hold, uploaded files included.
    disk: int

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: _rlimit_json(self.rlimits[name]) for name in RLIMITS}
        out.update(wall_time=self.wall_time, memory=self.memory, pids=self.pids, output=self.output)
        out.update(disk=self.disk)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StageLimits:
        return cls(
            rlimits={name: parse_rlimit(data[name]) for name in RLIMITS},
            wall_time=float(data["wall_time"]),
            memory=int(data["memory"]),
            pids=int(data["pids"]),
            output=int(data["output"]),
            # A job queued before the disk cap existed gets the default of that time.
            disk=int(data.get("disk", LEGACY_DISK)),
        )


#: The disk cap of a stored job that predates it.
LEGACY_DISK = 256 * 1024 * 1024


@dataclass(frozen=True)
class StagePolicy:
    """The administrator's defaults and maxima for one stage, from the configuration."""

    defaults: StageLimits
    maxima: StageLimits


@dataclass(frozen=True)
class LimitPolicy:
    compile: StagePolicy
    run: StagePolicy
    deps_wall_time: float
    deps_max_wall_time: float

    def stage(self, name: str) -> StagePolicy:
        policy: StagePolicy = getattr(self, name)
        return policy


@dataclass(frozen=True)
class ResolvedLimits:
    compile: StageLimits
    run: StageLimits
    deps_wall_time: float

    def as_json(self) -> dict[str, Any]:
        return {
            "deps": {"wall_time": self.deps_wall_time},
            "compile": self.compile.as_json(),
            "run": self.run.as_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResolvedLimits:
        return cls(
            compile=StageLimits.from_json(data["compile"]),
            run=StageLimits.from_json(data["run"]),
            deps_wall_time=float(data["deps"]["wall_time"]),
        )


def _rlimit_json(value: Rlimit) -> Any:
    soft, hard = (UNLIMITED if v is None else v for v in value)
    return soft if soft == hard else [soft, hard]


def parse_rlimit(value: Any) -> Rlimit:
    """Parse a configured rlimit: ``n``, ``"unlimited"`` or ``[soft, hard]`` of those."""
    pair = value if isinstance(value, list | tuple) else (value, value)
    if len(pair) != 2:
        raise ValueError('must be an integer, "unlimited" or [soft, hard]')
    soft, hard = (_limit_number(v, allow_unlimited=True) for v in pair)
    if hard is not None and (soft is None or soft > hard):
        raise ValueError(f"soft limit {soft} is above the hard limit {hard}")
    return soft, hard


def _limit_number(value: Any, *, allow_unlimited: bool) -> int | None:
    if allow_unlimited and value == UNLIMITED:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    if value > MAX_LIMIT:
        raise ValueError(f"{value} is larger than any limit the kernel holds ({MAX_LIMIT})")
    return value


def resolve_limits(requested: Mapping[str, Any], policy: LimitPolicy) -> ResolvedLimits:
    """Merge a request's ``limits`` over the policy's defaults, refusing anything above a maximum.

    Raises ``InvalidRequest`` for a malformed limit and ``LimitExceeded`` (a subclass) when every
    problem is a value above its maximum; either way each problem names its field.
    """
    malformed: list[FieldProblem] = []
    too_high: list[FieldProblem] = []
    for stage in requested:
        if stage not in STAGES:
            malformed.append(
                FieldProblem(f"limits.{stage}", f"unknown stage; stages are {', '.join(STAGES)}")
            )
    deps_wall = policy.deps_wall_time
    deps = requested.get("deps") or {}
    for name, value in deps.items():
        where = f"limits.deps.{name}"
        if name != "wall_time":
            malformed.append(FieldProblem(where, "the deps stage takes wall_time only"))
            continue
        try:
            deps_wall = parse_seconds(value)
        except ValueError as exc:
            malformed.append(FieldProblem(where, str(exc)))
            continue
        if deps_wall > policy.deps_max_wall_time:
            too_high.append(_above(where, value, policy.deps_max_wall_time))
    stages = {
        stage: _resolve_stage(
            stage, requested.get(stage) or {}, policy.stage(stage), malformed, too_high
        )
        for stage in SANDBOXED_STAGES
    }
    if malformed:
        raise InvalidRequest(malformed + too_high)
    if too_high:
        raise LimitExceeded(too_high)
    return ResolvedLimits(compile=stages["compile"], run=stages["run"], deps_wall_time=deps_wall)


def _resolve_stage(
    stage: str,
    requested: Mapping[str, Any],
    policy: StagePolicy,
    malformed: list[FieldProblem],
    too_high: list[FieldProblem],
) -> StageLimits:
    rlimits = dict(policy.defaults.rlimits)
    scalars: dict[str, Any] = {
        "wall_time": policy.defaults.wall_time,
        "memory": policy.defaults.memory,
        "pids": policy.defaults.pids,
        "output": policy.defaults.output,
        "disk": policy.defaults.disk,
    }
    for name, value in requested.items():
        where = f"limits.{stage}.{name}"
        try:
            if name in RLIMITS:
                soft, hard = _requested_rlimit(value)
                ceiling = policy.maxima.rlimits[name][1]
                if ceiling is not None and hard > ceiling:
                    too_high.append(_above(where, value, ceiling))
                rlimits[name] = (soft, hard)
            elif name == "wall_time":
                scalars[name] = parse_seconds(value)
                if scalars[name] > policy.maxima.wall_time:
                    too_high.append(_above(where, value, policy.maxima.wall_time))
            elif name in SANDBOX_LIMITS:
                number = _limit_number(value, allow_unlimited=False)
                assert number is not None
                if name in ("memory", "pids", "disk") and number < 1:
                    raise ValueError(f"{name} must be at least 1")
                scalars[name] = number
                ceiling_n: int = getattr(policy.maxima, name)
                if number > ceiling_n:
                    too_high.append(_above(where, value, ceiling_n))
            else:
                known = ", ".join((*RLIMITS, *SANDBOX_LIMITS))
                raise ValueError(f"unknown limit; known limits are {known}")
        except ValueError as exc:
            malformed.append(FieldProblem(where, str(exc)))
    return StageLimits(rlimits=rlimits, **scalars)


def _requested_rlimit(value: Any) -> tuple[int, int]:
    if isinstance(value, list):
        if len(value) != 2:
            raise ValueError("must be a non-negative integer or [soft, hard]")
        soft, hard = (_limit_number(v, allow_unlimited=False) for v in value)
        assert soft is not None and hard is not None
        if soft > hard:
            raise ValueError(f"soft limit {soft} is above the hard limit {hard}")
        return soft, hard
    number = _limit_number(value, allow_unlimited=False)
    assert number is not None
    return number, number


def parse_seconds(value: Any) -> float:
    """A positive, finite number of seconds; ``ValueError`` says what is wrong."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number of seconds")
    if (isinstance(value, int) and value > MAX_LIMIT) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number of seconds")
    if value <= 0:
        raise ValueError("wall_time must be above 0 seconds")
    return float(value)


def _above(where: str, value: Any, ceiling: float) -> FieldProblem:
    return FieldProblem(where, f"{value} exceeds the maximum {ceiling}")


# -- the submission request -------------------------------------------------------------------

DEPENDENCY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_+-]*(\.[A-Za-z_][A-Za-z0-9_+-]*){0,3}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FILES = 1000
MAX_DEPENDENCIES = 64
#: Far above any nixpkgs attribute path, and short enough that a name never floods a key,
#: a log line or nix's command line.
MAX_DEPENDENCY_NAME = 255


def decode(content: str, encoding: str) -> bytes:
    """Decode file or stdin content; ``ValueError`` says what is wrong with it."""
    if encoding == "utf8":
        return content.encode("utf-8", errors="surrogatepass")
    if encoding == "hex":
        try:
            return bytes.fromhex(content)
        except ValueError:
            raise ValueError("is not valid hex (pairs of 0-9, a-f)") from None
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
    raise ValueError(f"unknown encoding {encoding!r}; use utf8, hex or base64")


def encode_output(data: bytes) -> tuple[str, Encoding]:
    """Program output for JSON: UTF-8 text when it is valid, else base64."""
    try:
        return data.decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


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
    args: list[str] = Field(default_factory=list, max_length=1024)
    limits: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("compile", "run")
    @classmethod
    def _script(cls, script: str | None) -> str | None:
        if script is None:
            return None
        _no_nul(script)
        if len(script.encode()) > MAX_SCRIPT_BYTES:
            raise ValueError(f"is longer than {MAX_SCRIPT_BYTES} bytes; put code in files")
        return script

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

    @field_validator("args")
    @classmethod
    def _args(cls, args: list[str]) -> list[str]:
        for i, arg in enumerate(args):
            _no_nul(arg)
            if len(arg.encode()) > MAX_ARG_BYTES:
                raise ValueError(f"args[{i}] is longer than {MAX_ARG_BYTES} bytes; {TOO_LONG}")
        return args

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


def _invalid(exc: ValidationError) -> InvalidRequest:
    return InvalidRequest(
        [
            FieldProblem(field_path(e["loc"]), e["msg"].removeprefix("Value error, "))
            for e in exc.errors(include_url=False)
        ]
    )


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
    if problems := _file_name_problems(request.files):
        raise InvalidRequest(problems)
    limits = resolve_limits(request.limits, policy)
    if problems := _files_over_disk(request, limits):
        raise InvalidRequest(problems)
    return Submission(request=request, limits=limits)


#: What a file takes on disk beyond its bytes, at the least: one block for its metadata.
FILE_OVERHEAD = 4096


def _files_over_disk(request: SubmissionRequest, limits: ResolvedLimits) -> list[FieldProblem]:
    """The files stay in the working directory through every stage: each stage's disk cap
    must hold them (a file's size rounded up to blocks, plus its metadata)."""
    used = sum(-(-len(f.data()) // 4096) * 4096 + FILE_OVERHEAD for f in request.files)
    stages = ("compile", "run") if request.compile is not None else ("run",)
    return [
        FieldProblem(
            "files",
            f"the files take about {used} bytes on disk, over limits.{stage}.disk "
            f"({getattr(limits, stage).disk} bytes); send fewer or smaller files, or raise it",
        )
        for stage in stages
        if used > getattr(limits, stage).disk
    ]


def _file_name_problems(files: list[FileSpec]) -> list[FieldProblem]:
    """Names that repeat, or that are both a file and a folder, each named by its index."""
    problems = []
    first: dict[str, int] = {}
    for i, f in enumerate(files):
        if f.name in first:
            again = f"{f.name!r} is given twice, also as files[{first[f.name]}]"
            problems.append(FieldProblem(f"files[{i}].name", again))
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


# -- status, stage results and events ---------------------------------------------------------

Status = Literal["queued", "running", "finished", "cancelled", "error"]
#: How a stage that ran in the sandbox ended.
SandboxStatus = Literal[
    "ok",
    "failed",
    "signaled",
    "time_limit",
    "memory_limit",
    "output_limit",
    "disk_limit",
    "error",
]
StageStatus = Literal[SandboxStatus, "skipped"]
TERMINAL: frozenset[str] = frozenset({"finished", "cancelled", "error"})
#: Which status may follow which; ``running`` → ``running`` is a reclaim by another executor.
TRANSITIONS: Mapping[str, frozenset[str]] = {
    # The first event of every submission says it is queued; it changes nothing.
    "queued": frozenset({"queued", "running", "cancelled", "error"}),
    "running": frozenset({"running", "finished", "cancelled", "error"}),
    "finished": frozenset(),
    "cancelled": frozenset(),
    "error": frozenset(),
}


def now() -> str:
    """The current time as an RFC 3339 UTC timestamp."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def skipped_stage() -> dict[str, Any]:
    """The result of a stage that did not run because an earlier one failed."""
    return {
        "status": "skipped",
        "exit_code": None,
        "signal": None,
        "signal_name": None,
        "stdout": "",
        "stderr": "",
        "stdout_encoding": "utf8",
        "stderr_encoding": "utf8",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "wall_time": 0.0,
        "cpu_time": 0.0,
        "memory": 0,
        "limits": None,
        "message": "skipped: an earlier stage did not succeed",
        "started_at": None,
        "finished_at": None,
    }


class InvalidTransition(ValueError):
    """An event that cannot follow the submission's current state (a bug or a stale writer)."""


@dataclass(frozen=True)
class SubmissionState:
    """The submission document of ``GET /api/v1/submissions/{id}``, as immutable data."""

    id: str
    status: Status = "queued"
    stage: str | None = None
    picked_up: bool | None = None
    worker: str | None = None
    dependencies_installed: bool | None = None
    compiled: bool | None = None
    ran: bool | None = None
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    stages: Mapping[str, Mapping[str, Any] | None] = field(
        default_factory=lambda: dict.fromkeys(STAGES)
    )
    error: str | None = None
    attempts: int = 0
    #: Which stages the request has; a stage it lacks counts as done from the start.
    has_dependencies: bool = True
    has_compile: bool = True
    #: The closing ``finished`` event came: nothing more is taken.
    closed: bool = False

    @classmethod
    def new(
        cls, id: str, request: SubmissionRequest, created_at: str | None = None
    ) -> SubmissionState:
        """A freshly queued submission."""
        return cls(
            id=id,
            created_at=created_at or now(),
            has_dependencies=bool(request.dependencies),
            has_compile=request.compile is not None,
        ).restarted()

    def restarted(self) -> SubmissionState:
        """Every stage back to not-yet-known, as when an executor (re)starts the submission."""
        return replace(
            self,
            stage=None,
            stages=dict.fromkeys(STAGES),
            ran=None,
            dependencies_installed=None if self.has_dependencies else True,
            compiled=None if self.has_compile else True,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "stage": self.stage,
            "picked_up": self.picked_up,
            "worker": self.worker,
            "dependencies_installed": self.dependencies_installed,
            "compiled": self.compiled,
            "ran": self.ran,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "stages": {s: (dict(r) if r is not None else None) for s, r in self.stages.items()},
            "error": self.error,
            "attempts": self.attempts,
        }

    def as_record(self) -> dict[str, Any]:
        """The whole state, for storage; ``as_json`` is the client's view of it."""
        return {
            **self.as_json(),
            "has_dependencies": self.has_dependencies,
            "has_compile": self.has_compile,
            "closed": self.closed,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> SubmissionState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def apply_event(state: SubmissionState, event: Mapping[str, Any]) -> SubmissionState:
    """The state machine: the submission after ``event``. Pure; raises ``InvalidTransition``."""
    kind = event["type"]
    if state.closed or (state.done and kind != "finished"):
        raise InvalidTransition(f"{state.id} is {state.status}; it takes no {kind} event")
    if kind == "output":
        return state
    if kind == "status":
        new = event["status"]
        if new not in TRANSITIONS[state.status]:
            raise InvalidTransition(f"{state.id}: {state.status} cannot become {new}")
        if new == "queued":
            return state
        if new == "running":
            # Picked up (again, after a reclaim): every stage starts over.
            return replace(
                state.restarted(),
                status="running",
                picked_up=True,
                worker=event.get("worker"),
                started_at=event.get("time") or now(),
                attempts=state.attempts + 1,
            )
        finished_at = event.get("time") or now()
        return replace(
            state, status=new, stage=None, finished_at=finished_at, error=event.get("error")
        )
    if kind == "stage_started":
        if state.status != "running":
            raise InvalidTransition(f"{state.id}: a stage cannot start while {state.status}")
        return replace(state, stage=event["stage"])
    if kind == "stage_finished":
        if state.status != "running":
            raise InvalidTransition(f"{state.id}: a stage cannot finish while {state.status}")
        stage, result = event["stage"], event["result"]
        stages = {**state.stages, stage: result}
        ok = result["status"] == "ok"
        changes: dict[str, Any] = {"stages": stages, "stage": stage}
        if stage == "deps":
            changes["dependencies_installed"] = ok
        elif stage == "compile":
            changes["compiled"] = ok
        else:
            changes["ran"] = result["status"] not in ("skipped", "error")
        return replace(state, **changes)
    if kind == "finished":
        if state.status == "queued":
            raise InvalidTransition(f"{state.id} is queued; it cannot finish before it runs")
        if state.status != "running":
            # The closing event after a cancellation or a system error: it only closes.
            return replace(state, closed=True)
        return replace(
            state,
            status="finished",
            stage=None,
            finished_at=event.get("time") or now(),
            closed=True,
        )
    raise InvalidTransition(f"unknown event type {kind!r}")


class EventRecorder:
    """Numbers one submission's events (1, 2, 3 … without gaps) and keeps its state current.

    Not thread-safe: one recorder per submission, used by one writer at a time.
    """

    def __init__(self, state: SubmissionState, seq: int = 0) -> None:
        self.state = state
        self.seq = seq

    def record(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The full event for ``body`` (which has ``type`` and its fields); advances the state."""
        event = {**body, "id": self.state.id, "seq": self.seq + 1}
        event.setdefault("time", now())
        self.state = apply_event(self.state, event)
        if event["type"] == "finished":
            event["submission"] = self.state.as_json()
        self.seq += 1
        return event
