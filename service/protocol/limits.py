"""Per-stage limits: what each limit is, and their resolution against the administrator's policy.

``LIMITS`` is the one description of every limit a stage takes: the request's validation here,
the OpenAPI schema (service/openapi.py) and the notebook's ``%%limits`` parser (kernel/sections.py)
all read it, so a new limit is one line of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cellblock.errors import FieldProblem, InvalidRequest, LimitExceeded


class Unit(StrEnum):
    """What a limit's number counts, which is also how the notebook reads a value with a unit."""

    BYTES = "bytes"
    SECONDS = "seconds"
    MICROSECONDS = "microseconds"
    COUNT = "count"


@dataclass(frozen=True)
class Limit:
    """One limit a sandboxed stage takes."""

    name: str
    unit: Unit
    description: str
    #: A kernel rlimit, set with prlimit: it takes ``[soft, hard]`` and ``"unlimited"``.
    rlimit: bool = True
    #: Whole numbers only (every limit but ``wall_time``).
    whole: bool = True
    #: The smallest value the service takes (``wall_time`` must be above 0).
    minimum: int = 0


B, S, US, N = Unit.BYTES, Unit.SECONDS, Unit.MICROSECONDS, Unit.COUNT
LIMITS: tuple[Limit, ...] = (
    # Every Linux prlimit resource, by its prlimit(1) name in lower case.
    Limit("as", B, "address space (virtual memory) of each process"),
    Limit("core", B, "largest core dump"),
    Limit("cpu", S, "CPU seconds of each process"),
    Limit("data", B, "data segment of each process"),
    Limit("fsize", B, "largest file a process may write"),
    Limit("locks", N, "file locks"),
    Limit("memlock", B, "locked memory"),
    Limit("msgqueue", B, "POSIX message queue bytes"),
    Limit("nice", N, "nice ceiling (20 minus the value)"),
    Limit("nofile", N, "open file descriptors of each process"),
    Limit("nproc", N, "processes of the sandbox user"),
    Limit("rss", B, "resident set (Linux does not enforce it)"),
    Limit("rtprio", N, "real-time priority ceiling"),
    Limit("rttime", US, "real-time CPU microseconds without a blocking call"),
    Limit("sigpending", N, "queued signals"),
    Limit("stack", B, "stack of each process"),
    # The limits Cellblock enforces itself, on the whole stage.
    Limit("wall_time", S, "wall-clock seconds of the stage", rlimit=False, whole=False),
    Limit("memory", B, "memory of the whole stage (its cgroup)", rlimit=False, minimum=1),
    Limit("pids", N, "processes and threads at once (its cgroup)", rlimit=False, minimum=1),
    Limit("output", B, "stdout and stderr bytes kept, each", rlimit=False),
    Limit("disk", B, "bytes the working directory holds, files included", rlimit=False, minimum=1),
)  # fmt: skip
LIMIT_BY_NAME: Mapping[str, Limit] = {limit.name: limit for limit in LIMITS}
RLIMITS: tuple[str, ...] = tuple(limit.name for limit in LIMITS if limit.rlimit)
#: The limits Cellblock enforces itself, outside the kernel's rlimits.
SANDBOX_LIMITS: tuple[str, ...] = tuple(limit.name for limit in LIMITS if not limit.rlimit)
#: Of those, the sizes and counts: whole numbers.
SIZE_LIMITS: tuple[str, ...] = tuple(name for name in SANDBOX_LIMITS if LIMIT_BY_NAME[name].whole)
SANDBOXED_STAGES: tuple[str, ...] = ("compile", "run")
STAGES: tuple[str, ...] = ("deps", "compile", "run")
#: The only limit of the deps stage, which runs no sandbox.
DEPS_LIMITS: tuple[str, ...] = ("wall_time",)
UNLIMITED = "unlimited"
#: The largest finite limit: rlim_t is 64 bits and its top value means "unlimited".
MAX_LIMIT = 2**63 - 1

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
        out.update({name: getattr(self, name) for name in SANDBOX_LIMITS})
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


KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class GradingPolicy:
    """The administrator's caps on a submission's tests and on the output files it brings back."""

    #: Tests in one submission, and the sum of their wall-time limits.
    max_tests: int = 200
    max_tests_wall_time: float = 2000.0
    #: Bytes of output files returned, each and all of a result's files together.
    output_file_size: int = 4 * MiB
    output_total_size: int = 16 * MiB


@dataclass(frozen=True)
class InteractivePolicy:
    """The administrator's caps on what a client types into an interactive stage."""

    #: Bytes of one ``stdin`` message, and of all the stdin one run stage is sent.
    max_message: int = 64 * KiB
    max_stage_input: int = MiB


@dataclass(frozen=True)
class LimitPolicy:
    compile: StagePolicy
    run: StagePolicy
    deps_wall_time: float
    deps_max_wall_time: float
    grading: GradingPolicy = GradingPolicy()
    interactive: InteractivePolicy = InteractivePolicy()

    def stage(self, name: str) -> StagePolicy:
        policy: StagePolicy = getattr(self, name)
        return policy


@dataclass(frozen=True)
class ResolvedLimits:
    compile: StageLimits
    run: StageLimits
    deps_wall_time: float
    #: Each test's run-stage limits, in the order of the request's ``tests``.
    tests: tuple[StageLimits, ...] = ()
    #: Caps on the output files brought back (each file, all of one result's files).
    output_file_size: int = GradingPolicy.output_file_size
    output_total_size: int = GradingPolicy.output_total_size

    def as_json(self) -> dict[str, Any]:
        return {
            "deps": {"wall_time": self.deps_wall_time},
            "compile": self.compile.as_json(),
            "run": self.run.as_json(),
            "tests": [limits.as_json() for limits in self.tests],
            "outputs": {"file_size": self.output_file_size, "total_size": self.output_total_size},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResolvedLimits:
        # A job stored before tests and output files existed has neither key.
        outputs = data.get("outputs", {})
        return cls(
            compile=StageLimits.from_json(data["compile"]),
            run=StageLimits.from_json(data["run"]),
            deps_wall_time=float(data["deps"]["wall_time"]),
            tests=tuple(StageLimits.from_json(t) for t in data.get("tests", ())),
            output_file_size=int(outputs.get("file_size", GradingPolicy.output_file_size)),
            output_total_size=int(outputs.get("total_size", GradingPolicy.output_total_size)),
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


def resolve_limits(
    requested: Mapping[str, Any],
    policy: LimitPolicy,
    tests_requested: Sequence[Mapping[str, Any]] = (),
) -> ResolvedLimits:
    """Merge a request's ``limits`` over the policy's defaults, refusing anything above a maximum;
    then each test's ``limits`` (``tests_requested``, in order) over the run stage's.

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
        if name not in DEPS_LIMITS:
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
            f"limits.{stage}",
            requested.get(stage) or {},
            policy.stage(stage).defaults,
            policy.stage(stage).maxima,
            malformed,
            too_high,
        )
        for stage in SANDBOXED_STAGES
    }
    # A test's own limits go over the submission's run limits, under the same maxima.
    tests = tuple(
        _resolve_stage(
            f"tests[{i}].limits", test, stages["run"], policy.run.maxima, malformed, too_high
        )
        for i, test in enumerate(tests_requested)
    )
    if malformed:
        raise InvalidRequest(malformed + too_high)
    if too_high:
        raise LimitExceeded(too_high)
    grading = policy.grading
    return ResolvedLimits(
        compile=stages["compile"],
        run=stages["run"],
        deps_wall_time=deps_wall,
        tests=tests,
        output_file_size=grading.output_file_size,
        output_total_size=grading.output_total_size,
    )


def _resolve_stage(
    prefix: str,
    requested: Mapping[str, Any],
    base: StageLimits,
    maxima: StageLimits,
    malformed: list[FieldProblem],
    too_high: list[FieldProblem],
) -> StageLimits:
    """``requested`` over ``base``; each problem is named ``prefix.<limit>``."""
    rlimits = dict(base.rlimits)
    scalars: dict[str, Any] = {name: getattr(base, name) for name in SANDBOX_LIMITS}
    for name, value in requested.items():
        where = f"{prefix}.{name}"
        try:
            if name in RLIMITS:
                soft, hard = _requested_rlimit(value)
                ceiling = maxima.rlimits[name][1]
                if ceiling is not None and hard > ceiling:
                    too_high.append(_above(where, value, ceiling))
                rlimits[name] = (soft, hard)
            elif name == "wall_time":
                scalars[name] = parse_seconds(value)
                if scalars[name] > maxima.wall_time:
                    too_high.append(_above(where, value, maxima.wall_time))
            elif name in SANDBOX_LIMITS:
                number = _limit_number(value, allow_unlimited=False)
                assert number is not None
                if number < LIMIT_BY_NAME[name].minimum:
                    raise ValueError(f"{name} must be at least {LIMIT_BY_NAME[name].minimum}")
                scalars[name] = number
                ceiling_n: int = getattr(maxima, name)
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
