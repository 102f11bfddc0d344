"""The WebSocket's messages (``/api/v1/ws``), besides the events it relays.

A client sends ``submit``, ``watch``, ``status``, ``cancel`` or ``packages``, each with an
optional ``request_id`` that the answer echoes; and, to an interactive submission's running
stage, ``stdin``, ``signal`` and ``resize`` (interactive.py), answered only when refused.
``parse_client_message`` validates one and names the first bad field the way every Cellblock
error does; ``encode_message`` is the JSON of an answer.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from cellblock.errors import FieldProblem, InvalidRequest
from cellblock.service.protocol.interactive import (
    MAX_TTY_SIDE,
    SIGNALS,
    TTY_SIZE_RULE,
    Input,
    Resize,
    SignalInput,
    StdinData,
    StdinEnd,
)
from cellblock.service.protocol.results import WireModel, absent_if_none

CLIENT_TYPES = ("submit", "watch", "status", "cancel", "packages", "stdin", "signal", "resize")
#: What each field must be, in the words an ``error`` answer uses.
_FIELD_RULES = {
    "submission": "must be a submission object",
    "id": "must be a submission id",
    "since": "must be a whole number",
    "data": 'must be a string: the input (UTF-8 text, or base64 with "encoding": "base64")',
    "encoding": "must be utf8 or base64",
    "eof": "must be true (to close stdin) or left out",
    "signal": f"must be one of {', '.join(SIGNALS)}",
    "tty_size": TTY_SIZE_RULE,
}


class _ClientMessage(BaseModel):
    # Fields a client adds beyond these are ignored, as they always were.
    model_config = ConfigDict(frozen=True, extra="ignore")

    #: Any JSON value the client chose; echoed as it came.
    request_id: Any = Field(default=None, exclude_if=absent_if_none)


class Submit(_ClientMessage):
    type: Literal["submit"] = "submit"
    submission: dict[str, Any]


class Watch(_ClientMessage):
    type: Literal["watch"] = "watch"
    id: Annotated[str, Field(min_length=1)]
    since: Annotated[StrictInt, Field(ge=0)] = 0


class StatusQuery(_ClientMessage):
    type: Literal["status"] = "status"
    id: Annotated[str, Field(min_length=1)]


class Cancel(_ClientMessage):
    type: Literal["cancel"] = "cancel"
    id: Annotated[str, Field(min_length=1)]


class PackagesQuery(_ClientMessage):
    type: Literal["packages"] = "packages"


class StdinMessage(_ClientMessage):
    """Input for the running stage (``data``), or the end of it (``eof``)."""

    type: Literal["stdin"] = "stdin"
    id: Annotated[str, Field(min_length=1)]
    data: StrictStr | None = None
    encoding: Literal["utf8", "base64"] = "utf8"
    eof: Literal[True] | None = None

    @model_validator(mode="after")
    def _data_or_eof(self) -> StdinMessage:
        if (self.data is None) == (self.eof is None):
            raise ValueError("give either data or eof")
        if self.data == "":
            raise ValueError("data is empty: send some input, or eof")
        if self.data is not None and self.encoding == "utf8":
            try:
                self.data.encode()
            except UnicodeEncodeError:  # a lone surrogate: JSON can carry it, UTF-8 cannot
                raise ValueError("data is not text that UTF-8 can carry") from None
        if self.data is not None and self.encoding == "base64":
            try:
                base64.b64decode(self.data, validate=True)
            except binascii.Error:
                raise ValueError("data is not base64") from None
        return self

    def input(self) -> StdinData | StdinEnd:
        if self.data is None:
            return StdinEnd()
        raw = self.data.encode()
        return StdinData(base64.b64decode(raw) if self.encoding == "base64" else raw)


class SignalMessage(_ClientMessage):
    type: Literal["signal"] = "signal"
    id: Annotated[str, Field(min_length=1)]
    signal: Literal["SIGINT", "SIGTERM", "SIGQUIT", "SIGKILL"]


class ResizeMessage(_ClientMessage):
    """The terminal of the running stage takes a new size (its programs get SIGWINCH)."""

    type: Literal["resize"] = "resize"
    id: Annotated[str, Field(min_length=1)]
    tty_size: tuple[
        Annotated[StrictInt, Field(ge=1, le=MAX_TTY_SIDE)],
        Annotated[StrictInt, Field(ge=1, le=MAX_TTY_SIDE)],
    ]


ClientMessage = (
    Submit
    | Watch
    | StatusQuery
    | Cancel
    | PackagesQuery
    | StdinMessage
    | SignalMessage
    | ResizeMessage
)
#: The messages that go to a running stage: as what they arrive there.
StageMessage = StdinMessage | SignalMessage | ResizeMessage
_CLIENT: TypeAdapter[ClientMessage] = TypeAdapter(
    Annotated[ClientMessage, Field(discriminator="type")]
)


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """One message from a client; ``InvalidRequest`` names its first bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise InvalidRequest([FieldProblem("", "the message is not JSON")]) from None
    if not isinstance(data, dict):
        raise InvalidRequest([FieldProblem("", "the message must be a JSON object")])
    kind = data.get("type")
    if kind not in CLIENT_TYPES:
        known = ", ".join(CLIENT_TYPES)
        raise InvalidRequest([FieldProblem("type", f"unknown message type {kind!r}; use {known}")])
    try:
        return _CLIENT.validate_python(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if len(error["loc"]) < 2:  # a rule across fields (StdinMessage's)
            raise InvalidRequest(
                [FieldProblem("data", str(error["msg"]).removeprefix("Value error, "))]
            ) from None
        field = str(error["loc"][1])
        raise InvalidRequest(
            [FieldProblem(field, _FIELD_RULES.get(field, "is not valid"))]
        ) from None


def stage_input(message: StageMessage) -> Input:
    """What a stage message hands the running stage."""
    if isinstance(message, StdinMessage):
        return message.input()
    if isinstance(message, SignalMessage):
        return SignalInput(message.signal)
    return Resize(*message.tty_size)


def request_id_of(raw: str | bytes) -> Any:
    """The ``request_id`` of a message that may not parse, so its error answer can echo it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data.get("request_id") if isinstance(data, dict) else None


class _Answer(WireModel):
    request_id: Any = Field(default=None, exclude_if=absent_if_none)


class Accepted(_Answer):
    type: Literal["accepted"] = "accepted"
    id: str


class Cancelled(_Answer):
    type: Literal["cancelled"] = "cancelled"
    id: str


class SubmissionAnswer(_Answer):
    type: Literal["submission"] = "submission"
    submission: dict[str, Any]


class PackagesAnswer(_Answer):
    type: Literal["packages"] = "packages"
    packages: list[dict[str, Any]]


class ErrorAnswer(_Answer):
    """What an ``error`` answer says; ``details`` only for input errors, naming the fields."""

    type: Literal["error"] = "error"
    code: str
    message: str
    details: list[Mapping[str, str]] | None = Field(default=None, exclude_if=absent_if_none)
    #: Seconds to wait before trying again (a full queue, an unreachable store): what REST
    #: says in Retry-After.
    retry_after: int | None = Field(default=None, exclude_if=absent_if_none)


Answer = Accepted | Cancelled | SubmissionAnswer | PackagesAnswer | ErrorAnswer


def encode_message(message: Answer | ClientMessage) -> str:
    """A message's JSON: ``type`` first, ``request_id`` last, as the protocol has always sent."""
    # The request id goes in as the client sent it: it is any JSON value, however deeply
    # nested, and only json.dumps takes as deep a value as json.loads gave.
    data = message.model_dump(mode="json", exclude={"request_id"})
    head = {"type": data.pop("type")}
    tail = {} if message.request_id is None else {"request_id": message.request_id}
    return json.dumps({**head, **data, **tail})
