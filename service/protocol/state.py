"""The submission document and the status state machine that events drive (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cellblock.service.protocol.events import (
    Event,
    FinishedEvent,
    InputWantedEvent,
    OutputEvent,
    StageFinishedEvent,
    StageStartedEvent,
    Status,
    StatusEvent,
    TestFinishedEvent,
    TestStartedEvent,
)
from cellblock.service.protocol.grading import score, skipped_test
from cellblock.service.protocol.limits import STAGES
from cellblock.service.protocol.request import SubmissionRequest
from cellblock.service.protocol.results import (
    SKIPPED_MESSAGE,
    Score,
    StageResult,
    TestResult,
    stage_result,
)

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


class InvalidTransition(ValueError):
    """An event that cannot follow the submission's current state (a bug or a stale writer)."""


CANCELLED_MESSAGE = "skipped: the submission was cancelled"


@dataclass(frozen=True)
class PlannedTest:
    """What the document knows of a test before it runs, so that one that never runs still
    has its result (``skipped``, or ``error`` when the system failed the submission)."""

    __test__ = False
    name: str
    max_points: float = 1.0
    expected_output: str | None = None

    def unrun(self, message: str, verdict_error: bool = False) -> TestResult:
        result = skipped_test(self.name, self.max_points, self.expected_output, message)
        if verdict_error:
            return result.model_copy(update={"status": "error", "verdict": "error"})
        return result


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
    stages: Mapping[str, StageResult | None] = field(default_factory=lambda: dict.fromkeys(STAGES))
    error: str | None = None
    attempts: int = 0
    #: Which stages the request has; a stage it lacks counts as done from the start.
    has_dependencies: bool = True
    has_compile: bool = True
    #: The run stage's stdin comes from the client (``stdin_mode: "interactive"``).
    interactive: bool = False
    tty: bool = False
    #: The closing ``finished`` event came: nothing more is taken.
    closed: bool = False
    #: The request's tests, and each one's result once it has one (a submission with tests).
    test_plan: tuple[PlannedTest, ...] = ()
    tests: tuple[TestResult | None, ...] = ()

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
            interactive=request.stdin_mode == "interactive",
            tty=request.tty,
            test_plan=tuple(
                PlannedTest(t.name, t.points, t.expected_output) for t in request.tests or ()
            ),
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
            tests=(None,) * len(self.test_plan),
        )

    @property
    def score(self) -> Score | None:
        """The score over the tests so far; ``None`` without tests."""
        if not self.test_plan:
            return None
        return score(self.tests, [t.max_points for t in self.test_plan])

    def with_unrun_tests(self, message: str, verdict_error: bool = False) -> SubmissionState:
        """Every test without a result given one: it did not run, and ``message`` says why."""
        tests = tuple(
            result if result is not None else plan.unrun(message, verdict_error)
            for plan, result in zip(self.test_plan, self.tests, strict=True)
        )
        return replace(self, tests=tests)

    def as_json(self) -> dict[str, Any]:
        stages: dict[str, Any] = {
            s: (r.wire() if r is not None else None) for s, r in self.stages.items()
        }
        document: dict[str, Any] = {}
        if score := self.score:
            stages["tests"] = [r.wire() if r is not None else None for r in self.tests]
            document["score"] = score.wire()
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
            "stages": stages,
            "error": self.error,
            "attempts": self.attempts,
            **document,
        }

    def as_record(self) -> dict[str, Any]:
        """The whole state, for storage; ``as_json`` is the client's view of it."""
        return {
            **self.as_json(),
            "has_dependencies": self.has_dependencies,
            "has_compile": self.has_compile,
            "interactive": self.interactive,
            "tty": self.tty,
            "closed": self.closed,
            "test_plan": [
                {"name": t.name, "max_points": t.max_points, "expected_output": t.expected_output}
                for t in self.test_plan
            ],
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> SubmissionState:
        """The state from ``as_record`` (or the client's ``as_json``) data."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        stages = dict(fields.get("stages") or {})
        tests = stages.pop("tests", None) or []
        if "stages" in fields:
            fields["stages"] = {
                stage: None if result is None else stage_result(stage, result)
                for stage, result in stages.items()
            }
        fields["tests"] = tuple(None if t is None else TestResult.model_validate(t) for t in tests)
        plan = data.get("test_plan")
        if plan is None:  # the client's view: what it knows of the plan is in the results
            plan = [t or {"name": f"tests[{i}]"} for i, t in enumerate(tests)]
        fields["test_plan"] = tuple(
            PlannedTest(p["name"], p.get("max_points", 1.0), p.get("expected_output")) for p in plan
        )
        return cls(**fields)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def apply_event(state: SubmissionState, event: Event) -> SubmissionState:
    """The state machine: the submission after ``event``. Pure; raises ``InvalidTransition``."""
    kind = event.type
    if state.closed or (state.done and kind != "finished"):
        raise InvalidTransition(f"{state.id} is {state.status}; it takes no {kind} event")
    if isinstance(event, OutputEvent):
        return state
    if isinstance(event, InputWantedEvent):
        if state.status != "running" or state.stage != "run" or not state.interactive:
            raise InvalidTransition(f"{state.id}: only an interactive run stage wants input")
        return state
    if isinstance(event, StatusEvent):
        new = event.status
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
                worker=event.worker,
                started_at=event.time or now(),
                attempts=state.attempts + 1,
            )
        finished_at = event.time or now()
        if new == "cancelled":
            state = state.with_unrun_tests(CANCELLED_MESSAGE)
        elif new == "error":
            state = state.with_unrun_tests(f"the system failed the submission: {event.error}", True)
        else:  # finished, by a status event rather than the closing event
            state = state.with_unrun_tests(SKIPPED_MESSAGE)
        return replace(state, status=new, stage=None, finished_at=finished_at, error=event.error)
    if isinstance(event, TestStartedEvent | TestFinishedEvent):
        if state.status != "running" or state.stage != "run":
            raise InvalidTransition(f"{state.id}: a test runs inside the run stage only")
        if not 0 <= event.test < len(state.tests):
            raise InvalidTransition(f"{state.id} has no test {event.test}")
        if isinstance(event, TestStartedEvent):
            return state
        tests = (*state.tests[: event.test], event.result, *state.tests[event.test + 1 :])
        return replace(state, tests=tests)
    if isinstance(event, StageStartedEvent):
        if state.status != "running":
            raise InvalidTransition(f"{state.id}: a stage cannot start while {state.status}")
        return replace(state, stage=event.stage)
    if isinstance(event, StageFinishedEvent):
        if state.status != "running":
            raise InvalidTransition(f"{state.id}: a stage cannot finish while {state.status}")
        stage, result = event.stage, event.result
        stages = {**state.stages, stage: result}
        ok = result.status == "ok"
        changes: dict[str, Any] = {"stages": stages, "stage": stage}
        if stage == "deps":
            changes["dependencies_installed"] = ok
        elif stage == "compile":
            changes["compiled"] = ok
        else:
            changes["ran"] = result.status not in ("skipped", "error")
            if result.status == "error":  # the sandbox failed the stage, not the program
                state = state.with_unrun_tests(f"the run stage failed: {result.message}", True)
            else:
                state = state.with_unrun_tests(SKIPPED_MESSAGE)
        return replace(state, **changes)
    assert isinstance(event, FinishedEvent)
    if state.status == "queued":
        raise InvalidTransition(f"{state.id} is queued; it cannot finish before it runs")
    if state.status != "running":
        # The closing event after a cancellation or a system error: it only closes.
        return replace(state, closed=True)
    return replace(
        state.with_unrun_tests(SKIPPED_MESSAGE),
        status="finished",
        stage=None,
        finished_at=event.time or now(),
        closed=True,
    )


class EventRecorder:
    """Numbers one submission's events (1, 2, 3 … without gaps) and keeps its state current.

    Not thread-safe: one recorder per submission, used by one writer at a time.
    """

    def __init__(self, state: SubmissionState, seq: int = 0) -> None:
        self.state = state
        self.seq = seq

    def record(self, body: Event) -> Event:
        """The numbered event for ``body``, with its time; advances the state."""
        event = body.model_copy(
            update={"id": self.state.id, "seq": self.seq + 1, "time": body.time or now()}
        )
        self.state = apply_event(self.state, event)
        if isinstance(event, FinishedEvent):
            event = event.model_copy(update={"submission": self.state.as_json()})
        self.seq += 1
        return event
