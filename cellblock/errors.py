"""The named errors of Cellblock.

Each carries what its receiver needs: a protocol ``code``, a sentence for people, and for
input errors the list of offending fields, so that an HTTP 422, a WebSocket ``error`` message,
a kernel cell error and a CLI message all say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """Every ``code`` of an error document or WebSocket ``error`` message (shared/PROTOCOL.md),
    and the codes the client gives to failures of its own. A ``StrEnum``: each member is the
    string that goes on the wire."""

    # Input that does not fit the protocol (HTTP 400, 413, 422).
    INVALID_REQUEST = "invalid_request"
    LIMIT_EXCEEDED = "limit_exceeded"
    INVALID_JSON = "invalid_json"
    BODY_TOO_LARGE = "body_too_large"
    NOT_WEBSOCKET = "not_websocket"
    WEBSOCKET_VERSION = "websocket_version"
    # Who may do what (401, 403).
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    # What the request names (404, 409, 429).
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    NOT_SUPERVISED = "not_supervised"
    QUEUE_FULL = "queue_full"
    NO_BUILDER = "no_builder"
    # The service's own failures (500, 502) and Tornado's bare HTTP errors.
    INTERNAL = "internal"
    HTTP = "http"
    BAD_GATEWAY = "bad_gateway"
    # Raised inside the system, never answered as such.
    REJECTED = "rejected"
    CONFIG = "config"
    SANDBOX = "sandbox"
    NIX = "nix"
    # The client's: the service cannot be reached, redirects, or breaks the protocol; and the
    # service's when its store cannot be (503).
    CLIENT = "client"
    UNAVAILABLE = "unavailable"
    REDIRECT = "redirect"
    PROTOCOL = "protocol"


@dataclass(frozen=True)
class FieldProblem:
    """One thing wrong with one field, e.g. ``files[1].name``: "must be relative"."""

    field: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class CellblockError(Exception):
    """Base of every error Cellblock raises on purpose."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "details": []}}


class InvalidRequest(CellblockError):
    """The client's input does not fit the protocol; ``problems`` names every bad field."""

    code: str = ErrorCode.INVALID_REQUEST

    def __init__(self, problems: list[FieldProblem], message: str | None = None) -> None:
        if message is None:
            first = problems[0] if problems else FieldProblem("", "invalid")
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            message = f"{first.field}: {first.message}{more}" if first.field else first.message
        super().__init__(message)
        self.problems = problems

    def as_json(self) -> dict[str, object]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "details": [p.as_json() for p in self.problems],
            }
        }


class ErrorResponse(CellblockError):
    """What the service answers a request it cannot serve: an HTTP status with the error
    document (over the WebSocket, an ``error`` message with the same code and message)."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        # Headers belong on the error answer itself: an answer to an error starts from a clean
        # slate (Tornado's send_error clears every header set before it).
        self.headers = dict(headers or {})


class LimitExceeded(InvalidRequest):
    """A requested limit is above the administrator's maximum (never silently lowered)."""

    code: str = ErrorCode.LIMIT_EXCEEDED


class ConfigError(CellblockError):
    """The configuration file or a ``CELLBLOCK_*`` variable is wrong."""

    code: str = ErrorCode.CONFIG


class SandboxError(CellblockError):
    """The sandbox itself could not run a stage (not the program's fault)."""

    code: str = ErrorCode.SANDBOX
