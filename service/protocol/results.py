"""Stage results: how the deps stage and each sandboxed stage (compile, run) ended.

Results are immutable pydantic models. Their JSON (``wire()``) is the protocol's, field for
field and in the protocol's order; fields this version does not know are kept (``extra``),
so a result written by a newer executor reaches clients whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellblock.service.protocol.content import Encoding
from cellblock.service.protocol.limits import StageLimits

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
#: How the deps stage ended.
DepsStatus = Literal["ok", "failed", "time_limit", "skipped"]
#: ``hit``: the environment was cached; ``miss``: a builder built it.
CacheOutcome = Literal["hit", "miss"]
SKIPPED_MESSAGE = "skipped: an earlier stage did not succeed"


def absent_if_none(value: object) -> bool:
    """For ``Field(exclude_if=...)``: a field the protocol leaves out rather than sends null."""
    return value is None


class WireModel(BaseModel):
    """A protocol document: frozen, and unknown fields kept rather than refused or dropped."""

    model_config = ConfigDict(frozen=True, extra="allow")

    def wire(self) -> dict[str, Any]:
        """The document as JSON-ready data, as clients see it."""
        return self.model_dump(mode="json")


class OutputFile(WireModel):
    """A file the run stage left in the working directory, brought back (``outputs``)."""

    name: str
    content: str
    encoding: Encoding = "base64"
    #: The file's whole size; ``content`` holds less when ``truncated``.
    size: int
    media_type: str
    truncated: bool = False


class SandboxResult(WireModel):
    """The result of a compile or run stage (or of one that did not run: ``skipped``)."""

    status: StageStatus
    exit_code: int | None = None
    signal: int | None = None
    signal_name: str | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_encoding: Encoding = "utf8"
    stderr_encoding: Encoding = "utf8"
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    #: Seconds and bytes measured; ``None`` from a runner that could not measure them.
    wall_time: float | None = 0.0
    cpu_time: float | None = 0.0
    memory: int | None = 0
    #: The limits the stage ran under, as ``StageLimits.as_json`` gives them.
    limits: Mapping[str, Any] | None = None
    #: Why the stage ended the way it did, in words (an extension field).
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    #: The output files brought back, and the patterns that matched none (``outputs`` only).
    files: list[OutputFile] | None = Field(default=None, exclude_if=absent_if_none)
    missing: list[str] | None = Field(default=None, exclude_if=absent_if_none)

    @classmethod
    def skipped(cls) -> SandboxResult:
        """A stage that did not run because an earlier one failed."""
        return cls(status="skipped", message=SKIPPED_MESSAGE)

    @classmethod
    def refused(cls, status: SandboxStatus, limits: StageLimits, message: str) -> SandboxResult:
        """A stage the executor ended before its sandbox ran anything, and why."""
        return cls(status=status, limits=limits.as_json(), message=message)


class DepsResult(WireModel):
    """The result of the deps stage: the packages installed, from the cache or a build."""

    started_at: str | None = None
    finished_at: str | None = None
    status: DepsStatus
    #: ``None``: the stage ended before the cache was asked.
    cache: CacheOutcome | None = None
    packages: list[dict[str, Any]] = Field(default_factory=list)
    log: str = ""
    message: str | None = Field(default=None, exclude_if=absent_if_none)
    wall_time: float = 0.0


#: How one test of a submission with ``tests`` went (PROTOCOL.md v1.1).
Verdict = Literal[
    "passed",
    "wrong_answer",
    "time_limit",
    "memory_limit",
    "output_limit",
    "disk_limit",
    "runtime_error",
    "skipped",
    "error",
]


class TestResult(SandboxResult):
    """One test's run: every field of a stage result, plus how it was judged."""

    __test__: ClassVar[bool] = False  # not a test case, whatever pytest guesses from the name
    name: str
    verdict: Verdict
    #: Points earned, of ``max_points``.
    points: float = 0.0
    max_points: float = 1.0
    #: The expected stdout as the test gave it (``None``: the test had none).
    expected_output: str | None = None


class Score(WireModel):
    """A submission's score over its tests."""

    passed: int
    total: int
    points: float
    max_points: float


StageResult = SandboxResult | DepsResult


def stage_result(stage: str, data: Mapping[str, Any]) -> StageResult:
    """A stage's result from its JSON: the deps stage has a shape of its own."""
    if stage == "deps":
        return DepsResult.model_validate(data)
    return SandboxResult.model_validate(data)
