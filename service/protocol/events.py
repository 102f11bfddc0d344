"""A submission's events, and their one JSON codec.

Every event has ``type``, the submission's ``id``, ``seq`` (1, 2, 3 … without gaps) and
``time``. Whoever produces an event (an executor, ``cellblock exec``, a cancel) builds its body
with the constructors here; ``EventRecorder`` (state.py) numbers it. ``encode_event`` and
``decode_event`` are the only way events become JSON and back: the store, the REST and
WebSocket handlers and the clients all use them, so the wire order of fields is kept in one
place (``type`` and its fields, then ``id``, ``time``, ``submission`` and ``seq``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, model_validator

from cellblock.service.protocol.results import (
    StageResult,
    TestResult,
    WireModel,
    absent_if_none,
    stage_result,
)

Status = Literal["queued", "running", "finished", "cancelled", "error"]
StageName = Literal["deps", "compile", "run"]
Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, ...] = ("stdout", "stderr")
#: The fields every event has, which go last on the wire, in this order.
_ENVELOPE = ("id", "time")


class EventBase(WireModel):
    """What every event carries once recorded; a body not yet recorded has ``seq`` 0."""

    id: str = ""
    time: str | None = None
    seq: int = 0

    def wire(self, numbered: bool = True) -> dict[str, Any]:
        """The event as clients see it; ``numbered=False`` leaves out ``seq``, which the store
        keeps as the position of the event, not in it."""
        data = self.model_dump(mode="json", exclude={"id", "time", "seq"})
        for name in _ENVELOPE:
            data[name] = getattr(self, name)
        if "submission" in data:
            data["submission"] = data.pop("submission")
        if numbered:
            data["seq"] = self.seq
        return data


class StatusEvent(EventBase):
    """The submission's status changed (``queued`` opens every submission's events)."""

    type: Literal["status"] = "status"
    status: Status
    #: The executor that picked it up (``running`` only).
    worker: str | None = Field(default=None, exclude_if=absent_if_none)
    #: What went wrong (``error`` only).
    error: str | None = Field(default=None, exclude_if=absent_if_none)


class StageStartedEvent(EventBase):
    type: Literal["stage_started"] = "stage_started"
    stage: StageName


class OutputEvent(EventBase):
    """Live output of a running stage, as text (the stage result has the exact bytes)."""

    type: Literal["output"] = "output"
    stage: StageName
    stream: Stream
    data: str
    #: The test that wrote it, by index (a submission with tests only).
    test: int | None = Field(default=None, exclude_if=absent_if_none)


class InputWantedEvent(EventBase):
    """The interactive run stage's program is blocked reading its stdin, nothing buffered;
    every output before it has been sent."""

    type: Literal["input_wanted"] = "input_wanted"
    stage: Literal["run"] = "run"


class StageFinishedEvent(EventBase):
    type: Literal["stage_finished"] = "stage_finished"
    stage: StageName
    result: StageResult

    @model_validator(mode="before")
    @classmethod
    def _result_of_its_stage(cls, data: Any) -> Any:
        # The deps stage's result has a shape of its own: pick the model by stage, not by
        # guessing from the fields.
        if isinstance(data, Mapping) and isinstance(data.get("result"), Mapping):
            return {**data, "result": stage_result(str(data.get("stage")), data["result"])}
        return data


class TestStartedEvent(EventBase):
    """One test of a submission with tests starts (inside the run stage)."""

    __test__: ClassVar[bool] = False
    type: Literal["test_started"] = "test_started"
    stage: Literal["run"] = "run"
    test: int
    name: str


class TestFinishedEvent(EventBase):
    """One test ended and was judged."""

    __test__: ClassVar[bool] = False
    type: Literal["test_finished"] = "test_finished"
    stage: Literal["run"] = "run"
    test: int
    result: TestResult


class FinishedEvent(EventBase):
    """The last event of every submission; once recorded it holds the submission document."""

    type: Literal["finished"] = "finished"
    submission: dict[str, Any] | None = Field(default=None, exclude_if=absent_if_none)


Event = (
    StatusEvent
    | StageStartedEvent
    | OutputEvent
    | InputWantedEvent
    | StageFinishedEvent
    | TestStartedEvent
    | TestFinishedEvent
    | FinishedEvent
)
_EVENT: TypeAdapter[Event] = TypeAdapter(Annotated[Event, Field(discriminator="type")])


def encode_event(event: Event, numbered: bool = True) -> str:
    """The event as JSON text (see ``EventBase.wire``)."""
    return json.dumps(event.wire(numbered))


def decode_event(raw: str | bytes | Mapping[str, Any], seq: int | None = None) -> Event:
    """An event from its JSON text or decoded JSON; ``seq`` when it is kept outside the event.
    Raises ``pydantic.ValidationError`` (a ``ValueError``) for anything that is no event."""
    data = json.loads(raw) if isinstance(raw, str | bytes) else dict(raw)
    if seq is not None:
        data["seq"] = seq
    return _EVENT.validate_python(data)
