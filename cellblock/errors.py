"""The named errors of Cellblock.

Each carries what its receiver needs: a protocol ``code``, a sentence for people, and for
input errors the list of offending fields, so that an HTTP 422, a WebSocket ``error`` message,
a kernel cell error and a CLI message all say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One thing wrong with one field, e.g. ``files[1].name``: "must be relative"."""

    field: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class CellblockError(Exception):
    """Base of every error Cellblock raises on purpose."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def as_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "details": []}}


class InvalidRequest(CellblockError):
    """The client's input does not fit the protocol; ``problems`` names every bad field."""

    code = "invalid_request"

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


class LimitExceeded(InvalidRequest):
    """A requested limit is above the administrator's maximum (never silently lowered)."""

    code = "limit_exceeded"


class ConfigError(CellblockError):
    """The configuration file or a ``CELLBLOCK_*`` variable is wrong."""

    code = "config"


class SandboxError(CellblockError):
    """The sandbox itself could not run a stage (not the program's fault)."""

    code = "sandbox"
