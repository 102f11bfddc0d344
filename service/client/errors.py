"""What the client raises about the service, and which error an answer of the service is.

Plain data and pure functions: no I/O, so nothing here waits or can be cancelled. The REST
calls (rest.py) and the WebSocket handshake (websocket.py) both turn an HTTP error answer into
an exception with ``http_error``; an ``error`` message on the WebSocket goes through
``api_error`` with no status.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cellblock import errors
from cellblock.errors import ErrorCode


class ClientError(errors.CellblockError):
    """Base of every error this client raises about the service."""

    code: str = ErrorCode.CLIENT


class ServiceUnavailable(ClientError):
    """The service cannot be reached (refused, unresolvable, silent, or the connection broke)."""

    code: str = ErrorCode.UNAVAILABLE

    def __init__(self, url: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"cannot reach the Cellblock service at {url}: {reason}")
        self.url = url
        self.reason = reason


class StreamInterrupted(ServiceUnavailable):
    """Following a submission's events failed after every reconnection attempt. The submission
    itself goes on: ``watch(submission_id, since=last_seq)`` picks up where this left off."""

    def __init__(self, url: str, reason: str, submission_id: str, last_seq: int) -> None:
        super().__init__(
            url,
            reason,
            f"lost the connection to the Cellblock service at {url} while following submission "
            f"{submission_id} ({reason}); it goes on running: watch it again or cancel it",
        )
        self.submission_id = submission_id
        self.last_seq = last_seq


class ApiError(ClientError):
    """The service answered with an error document. ``status`` is the HTTP status (``None`` for
    an ``error`` message on the WebSocket), ``code`` and ``message`` come from the document."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        # Not super(): BadRequest below also derives from cellblock.errors.InvalidRequest,
        # whose constructor takes other arguments.
        errors.CellblockError.__init__(self, message)
        self.status = status
        self.code = code
        self.details = [dict(d) for d in details]

    def as_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class Unauthorized(ApiError):
    """401: no token, or one the service does not know."""


class Forbidden(Unauthorized):
    """403: the token is valid but its role may not do this (an admin token is needed)."""


class NotFound(ApiError):
    """404: no such submission (or someone else's: ids cannot be probed), worker or endpoint."""


class Conflict(ApiError):
    """409: e.g. cancelling a submission that has ended, or scaling without ``cellblock up``."""


class QueueFull(ApiError):
    """429 (or 503): the queue is full and nothing was accepted; retry after ``retry_after``
    seconds (``None`` when the service did not say)."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, details)
        self.retry_after = retry_after


class BadRequest(ApiError, errors.InvalidRequest):
    """400, 413 or 422: the request does not fit the protocol. ``details`` is the protocol's list
    of ``{"field", "message"}``; ``problems`` holds the same as ``FieldProblem`` values, as
    every ``cellblock.errors.InvalidRequest`` does."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(status, code, message, details)
        self.problems = [
            errors.FieldProblem(str(d.get("field", "")), str(d.get("message", "")))
            for d in self.details
        ]


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: BadRequest, 422: BadRequest, 429: QueueFull,
}  # fmt: skip
_BY_CODE: dict[str, type[ApiError]] = {
    ErrorCode.INVALID_REQUEST: BadRequest, ErrorCode.LIMIT_EXCEEDED: BadRequest,
    ErrorCode.INVALID_JSON: BadRequest, ErrorCode.BODY_TOO_LARGE: BadRequest,
    ErrorCode.UNAUTHORIZED: Unauthorized, ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound, ErrorCode.CONFLICT: Conflict,
    ErrorCode.QUEUE_FULL: QueueFull,
}  # fmt: skip


def api_error(status: int | None, document: object, retry_after: float | None = None) -> ApiError:
    """The error for an error document ``{"error": {"code", "message", "details"}}`` (or the
    fields of a WebSocket ``error`` message), chosen by HTTP status, else by code."""
    fields = document.get("error", document) if isinstance(document, dict) else None
    if not isinstance(fields, dict):
        fields = {}
    code = str(fields.get("code") or ErrorCode.HTTP)
    message = str(fields.get("message") or f"the service answered HTTP {status}")
    raw_details = fields.get("details")
    details = (
        [d for d in raw_details if isinstance(d, dict)] if isinstance(raw_details, list) else []
    )
    cls = _BY_STATUS.get(status or 0) or _BY_CODE.get(code, ApiError)
    if status == 503 and (retry_after is not None or code == ErrorCode.QUEUE_FULL):
        cls = QueueFull
    if cls is QueueFull:
        return QueueFull(status, code, message, details, retry_after=retry_after)
    return cls(status, code, message, details)


def http_error(url: str, status: int, headers: Mapping[str, str], body: bytes) -> ClientError:
    """The error for an HTTP answer other than success from the service at ``url``: a gateway's
    502, 503 (without a JSON body) and 504 mean the service is out of reach; a redirect is not
    followed (a token must not go where the user did not point it)."""
    if status in (502, 504) or (status == 503 and not _is_json(body)):
        return ServiceUnavailable(url, f"HTTP {status} from a gateway")
    if 300 <= status < 400:
        where = headers.get("Location", "elsewhere")
        return ApiError(status, ErrorCode.REDIRECT, f"the service at {url} redirects to {where}")
    try:
        document = json.loads(body)
    except ValueError:
        text = body[:200].decode("utf-8", "replace")
        document = {"error": {"code": ErrorCode.HTTP, "message": f"HTTP {status}: {text}"}}
    return api_error(status, document, _retry_after(headers.get("Retry-After")))


def protocol_error(status: int | None, what: str) -> ApiError:
    """The service answered something the protocol does not allow."""
    return ApiError(status, ErrorCode.PROTOCOL, what)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True
