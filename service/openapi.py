"""The OpenAPI description of the API, generated from the protocol models."""

from __future__ import annotations

from functools import cache
from importlib import metadata
from typing import Any

from cellblock.service.protocol import (
    RLIMITS,
    SANDBOX_LIMITS,
    PackagesRequest,
    SubmissionRequest,
)


def _version() -> str:
    """The installed distribution's version. Not ``cellblock.__version__``: wherever a folder
    named ``cellblock`` without an ``__init__.py`` comes first on the path (the test folder
    tests/cellblock under pytest), ``cellblock`` imports as a namespace package without it,
    and this document would answer 500."""
    try:
        return metadata.version("cellblock")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@cache
def document() -> dict[str, Any]:
    request = SubmissionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = request.pop("$defs", {})
    limit_value = {
        "oneOf": [
            {"type": "integer", "minimum": 0},
            {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "minItems": 2,
                "maxItems": 2,
            },
        ]
    }
    stage_limits = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **{name: limit_value for name in RLIMITS},
            **{
                name: {"type": "number" if name == "wall_time" else "integer", "minimum": 0}
                for name in SANDBOX_LIMITS
            },
        },
    }
    request["properties"]["limits"] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "compile": _ref("StageLimits"),
            "run": _ref("StageLimits"),
            "deps": {"type": "object", "properties": {"wall_time": {"type": "number"}}},
        },
    }
    error = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "field": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        },
                    },
                },
            }
        },
    }
    errors = {
        "400": _json(_ref("Error"), "The body is not JSON."),
        "401": _json(_ref("Error"), "No valid token."),
        "404": _json(_ref("Error"), "Unknown id, or someone else's."),
        "413": _json(_ref("Error"), "The body is too large."),
        "422": _json(_ref("Error"), "The request does not fit the protocol; details name fields."),
        "429": _json(_ref("Error"), "The queue is full; retry after Retry-After seconds."),
    }
    submission = {"type": "object", "description": "The submission document (PROTOCOL.md)."}
    sid = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    obj = {"type": "object"}
    query = {
        name: {"name": name, "in": "query", "schema": {"type": kind}}
        for name, kind in (
            ("wait", "boolean"),
            ("timeout", "number"),
            ("limit", "integer"),
            ("since", "integer"),
        )
    }
    body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("SubmissionRequest")}},
    }
    sse = {"description": "Server-sent events.", "content": {"text/event-stream": {}}}
    packages_body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("PackagesRequest")}},
    }
    paths = {
        "/api/v1/health": {"get": _op({"200": _json(obj, "Alive.")}, security=[])},
        "/api/v1/submissions": {
            "post": _op(
                {
                    "201": _json(_ref("Submission"), "Accepted (all of it with wait=true)."),
                    **errors,
                },
                parameters=[query["wait"], query["timeout"]],
                requestBody=body,
            ),
            "get": _op({"200": _json(obj, "Recent submissions.")}, parameters=[query["limit"]]),
        },
        "/api/v1/submissions/{id}": {
            "parameters": [sid],
            "get": _op({"200": _json(_ref("Submission"), "The submission."), "404": errors["404"]}),
            "delete": _op(
                {
                    "200": _json(obj, "Cancelled."),
                    "404": errors["404"],
                    "409": _json(_ref("Error"), "It has ended."),
                }
            ),
        },
        "/api/v1/submissions/{id}/events": {
            "parameters": [sid, query["since"]],
            "get": _op({"200": sse}),
        },
        "/api/v1/ws": {"get": _op({"101": {"description": "The WebSocket (PROTOCOL.md)."}})},
        "/api/v1/packages": {
            "get": _op({"200": _json(obj, "Cached packages.")}),
            "post": _op(
                {
                    "200": _json(obj, "Every package is cached already."),
                    "202": _json(obj, "Building; the answer's id is the build to watch."),
                    "400": errors["400"],
                    "422": errors["422"],
                    "503": _json(_ref("Error"), "No cache builder has started yet."),
                },
                requestBody=packages_body,
            ),
        },
        "/api/v1/packages/builds/{id}": {
            "parameters": [sid],
            "get": _op({"200": _json(obj, "A build's status."), "404": errors["404"]}),
        },
        "/api/v1/workers": {"get": _op({"200": _json(obj, "Live workers (admin).")})},
        "/api/v1/workers/{id}": {
            "parameters": [sid],
            "delete": _op({"202": _json(obj, "Draining (admin).")}),
        },
        "/api/v1/admin/scale": {"post": _op({"202": _json(obj, "Scaling (admin).")})},
        "/api/v1/openapi.json": {"get": _op({"200": _json(obj, "This document.")})},
        "/metrics": {"get": _op({"200": {"description": "Prometheus text format (admin)."}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cellblock", "version": _version()},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                **definitions,
                "SubmissionRequest": request,
                "PackagesRequest": PackagesRequest.model_json_schema(),
                "StageLimits": stage_limits,
                "Submission": submission,
                "Error": error,
            },
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _op(responses: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"responses": responses, **fields}
