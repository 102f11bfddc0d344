"""The WebSocket's messages (``/api/v1/ws``), besides the events it relays.

A client sends ``submit``, ``watch``, ``status``, ``cancel`` or ``packages``, each with an
optional ``request_id`` that the answer echoes. ``parse_client_message`` validates one and names
the first bad field the way every Cellblock error does; ``encode_message`` is the JSON of an
answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError

from cellblock.errors import FieldProblem, InvalidRequest
from cellblock.service.protocol.results import WireModel, absent_if_none

CLIENT_TYPES = ("submit", "watch", "status", "cancel", "packages")
#: What each field must be, in the words an ``error`` answer uses.
_FIELD_RULES = {
    "submission": "must be a submission object",
    "id": "must be a submission id",
    "since": "must be a whole number",
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


ClientMessage = Submit | Watch | StatusQuery | Cancel | PackagesQuery
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
        field = str(exc.errors(include_url=False)[0]["loc"][1])
        raise InvalidRequest(
            [FieldProblem(field, _FIELD_RULES.get(field, "is not valid"))]
        ) from None


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


Answer = Accepted | Cancelled | SubmissionAnswer | PackagesAnswer | ErrorAnswer


def encode_message(message: Answer | ClientMessage) -> str:
    """A message's JSON: ``type`` first, ``request_id`` last, as the protocol has always sent."""
    # The request id goes in as the client sent it: it is any JSON value, however deeply
    # nested, and only json.dumps takes as deep a value as json.loads gave.
    data = message.model_dump(mode="json", exclude={"request_id"})
    head = {"type": data.pop("type")}
    tail = {} if message.request_id is None else {"request_id": message.request_id}
    return json.dumps({**head, **data, **tail})
