"""The OpenAPI description of the API, generated from the protocol models."""

from __future__ import annotations

from functools import cache
from importlib import metadata
from typing import Any, get_args

from pydantic import TypeAdapter

from cellblock.service.api import MAX_WAIT
from cellblock.service.protocol import (
    DEPS_LIMITS,
    LIMIT_BY_NAME,
    LIMITS,
    STAGES,
    DepsResult,
    Event,
    Limit,
    OutputFile,
    PackagesRequest,
    SandboxResult,
    Score,
    Status,
    SubmissionRequest,
    SubmissionState,
    TestResult,
)
from cellblock.service.protocol.messages import Answer, ClientMessage

REF = "#/components/schemas/{model}"


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
    definitions: dict[str, Any] = {}
    request = _schema(SubmissionRequest, definitions)
    stage_limits = {
        "type": "object",
        "additionalProperties": False,
        "properties": {limit.name: _limit_schema(limit) for limit in LIMITS},
    }
    request["properties"]["limits"] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "compile": _ref("StageLimits"),
            "run": _ref("StageLimits"),
            "deps": {
                "type": "object",
                "additionalProperties": False,
                "properties": {name: _limit_schema(LIMIT_BY_NAME[name]) for name in DEPS_LIMITS},
            },
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
    # Retry-After is a promise to clients that back off: documented, so a fuzzer checks it.
    retry_after = {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}}
    errors = {
        "400": _json(_ref("Error"), "The body is not JSON."),
        "404": _json(_ref("Error"), "Unknown id, or someone else's."),
        "409": _json(_ref("Error"), "It has ended."),
        "413": _json(_ref("Error"), "The body is too large."),
        "422": _json(_ref("Error"), "The request does not fit the protocol; details name fields."),
        "429": {
            **_json(_ref("Error"), "The queue is full; retry after Retry-After seconds."),
            "headers": retry_after,
        },
    }
    maybe_bool = {"type": ["boolean", "null"]}
    maybe_text = {"type": ["string", "null"]}
    results = {
        stage: {"oneOf": [_ref("DepsResult" if stage == "deps" else "SandboxResult"),
                          {"type": "null"}]}
        for stage in STAGES
    }  # fmt: skip
    submission = {
        "type": "object",
        "description": "The submission document (PROTOCOL.md).",
        "required": list(SubmissionState(id="").as_json()),
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": list(get_args(Status))},
            "stage": maybe_text,
            "picked_up": maybe_bool,
            "worker": maybe_text,
            "dependencies_installed": maybe_bool,
            "compiled": maybe_bool,
            "ran": maybe_bool,
            "created_at": {"type": "string"},
            "started_at": maybe_text,
            "finished_at": maybe_text,
            "stages": {
                "type": "object",
                "required": list(STAGES),
                "properties": {
                    **results,
                    # A submission with tests only: one result per test, null until it has one.
                    "tests": {
                        "type": "array",
                        "items": {"oneOf": [_ref("TestResult"), {"type": "null"}]},
                    },
                },
            },
            "error": maybe_text,
            "attempts": {"type": "integer", "minimum": 0},
            # A submission with tests only.
            "score": _ref("Score"),
        },
    }
    # POST answers only id and status, unless it waited (wait=true): then the whole document.
    accepted = {
        "type": "object",
        "required": ["id", "status"],
        "properties": {"id": {"type": "string"}, "status": {"enum": list(get_args(Status))}},
    }
    listed = {
        "type": "object",
        "required": ["submissions"],
        "properties": {"submissions": {"type": "array", "items": _ref("Submission")}},
    }
    count = {"type": "integer", "minimum": 0}
    health = {
        "type": "object",
        "required": ["status", "executors", "builders", "queued"],
        "properties": {
            "status": {"const": "ok"},
            "executors": count,
            "builders": count,
            "queued": count,
        },
    }
    capacity_names = ("executors", "builders", "slots", "busy", "queued")
    capacity = {
        "type": "object",
        "description": "slots and busy count the executors' sandboxes; no worker is named.",
        "required": list(capacity_names),
        "properties": dict.fromkeys(capacity_names, count),
    }
    # The ids the routes match (service/server.py): any other path answers 404 "no endpoint".
    sid = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
    }
    worker_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    build_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{1,32}$"},
    }
    obj = {"type": "object"}
    query = {
        name: {"name": name, "in": "query", "schema": schema}
        for name, schema in (
            ("wait", {"type": "boolean"}),
            ("timeout", {"type": "number", "minimum": 0, "maximum": MAX_WAIT}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            ("since", {"type": "integer", "minimum": 0}),
        )
    }
    body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("SubmissionRequest")}},
    }
    sse = {
        "description": "Server-sent events: each one's data is an Event (components.schemas).",
        "content": {"text/event-stream": {}},
    }
    packages_body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("PackagesRequest")}},
    }
    scale_count = {"type": "integer", "minimum": 0, "maximum": 64}
    scale_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "minProperties": 1,
                    "properties": {"executors": scale_count, "builders": scale_count},
                }
            }
        },
    }
    paths = {
        "/api/v1/health": {"get": _op({"200": _json(health, "Alive.")}, security=[])},
        "/api/v1/capacity": {
            "get": _op({"200": _json(capacity, "Workers, slots, busy slots, queue (any token).")})
        },
        "/api/v1/submissions": {
            "post": _op(
                {
                    "201": _json(accepted, "Accepted (all of it with wait=true)."),
                    **{code: errors[code] for code in ("400", "413", "422", "429")},
                },
                parameters=[query["wait"], query["timeout"]],
                requestBody=body,
            ),
            "get": _op(
                {"200": _json(listed, "Recent submissions."), "422": errors["422"]},
                parameters=[query["limit"]],
            ),
        },
        "/api/v1/submissions/{id}": {
            "parameters": [sid],
            "get": _op({"200": _json(_ref("Submission"), "The submission."), "404": errors["404"]}),
            "delete": _op(
                {"200": _json(obj, "Cancelled."), "404": errors["404"], "409": errors["409"]}
            ),
        },
        "/api/v1/submissions/{id}/events": {
            "parameters": [sid, query["since"]],
            "get": _op({"200": sse, "404": errors["404"], "422": errors["422"]}),
        },
        "/api/v1/ws": {
            "get": _op(
                {
                    "101": {"description": "The WebSocket (PROTOCOL.md)."},
                    "400": _json(_ref("Error"), "Not a WebSocket upgrade request."),
                    "426": _json(_ref("Error"), "A WebSocket version other than 13."),
                }
            )
        },
        "/api/v1/packages": {
            "get": _op({"200": _json(obj, "Cached packages.")}),
            "post": _op(
                {
                    "200": _json(obj, "Every package is cached already."),
                    "202": _json(obj, "Building; the answer's id is the build to watch."),
                    "400": errors["400"],
                    "422": errors["422"],
                    "503": {
                        **_json(_ref("Error"), "No cache builder has started yet."),
                        "headers": retry_after,
                    },
                },
                requestBody=packages_body,
            ),
        },
        "/api/v1/packages/builds/{id}": {
            "parameters": [build_id],
            "get": _op({"200": _json(obj, "A build's status."), "404": errors["404"]}),
        },
        "/api/v1/workers": {"get": _admin({"200": _json(obj, "Live workers (admin).")})},
        "/api/v1/workers/{id}": {
            "parameters": [worker_id],
            "delete": _admin(
                {
                    "202": _json(obj, "Draining (admin)."),
                    "404": _json(_ref("Error"), "No live worker."),
                }
            ),
        },
        "/api/v1/admin/scale": {
            "post": _admin(
                {
                    "202": _json(obj, "Scaling (admin)."),
                    "400": errors["400"],
                    "409": _json(_ref("Error"), "Not a `cellblock up` deployment."),
                    "422": errors["422"],
                },
                requestBody=scale_body,
            )
        },
        "/api/v1/openapi.json": {"get": _op({"200": _json(obj, "This document.")})},
        "/metrics": {
            "get": _admin(
                {
                    "200": {
                        "description": "Prometheus text format (admin).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                }
            )
        },
    }
    # Each model's nested models land in definitions as its schema is made: all of them first.
    models = {
        "PackagesRequest": _schema(PackagesRequest, definitions),
        "SandboxResult": _schema(SandboxResult, definitions),
        "DepsResult": _schema(DepsResult, definitions),
        "TestResult": _schema(TestResult, definitions),
        "OutputFile": _schema(OutputFile, definitions),
        "Score": _schema(Score, definitions),
        "Event": _schema(Event, definitions),
        "ClientMessage": _schema(ClientMessage, definitions),
        "Answer": _schema(Answer, definitions),
    }
    # A test's limits are a run stage's, its comparison one of the modes (number's tolerance is
    # checked by the service), its points not negative: set once every model's schema is made,
    # so that no later one lays the plain TestSpec over this one.
    test_spec = definitions["TestSpec"]["properties"]
    test_spec["limits"] = {**_ref("StageLimits"), "description": "over the submission's limits.run"}
    test_spec["compare"] = {
        "anyOf": [
            {"enum": ["lines", "exact", "tokens"]},
            {"type": "string", "pattern": "^number:", "description": "number:TOL, TOL >= 0"},
        ],
        "default": "lines",
    }
    test_spec["points"] = {**test_spec["points"], "minimum": 0}
    schemas = {
        **definitions,
        "SubmissionRequest": request,
        **models,
        "StageLimits": stage_limits,
        "Submission": submission,
        "Error": error,
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cellblock", "version": _version()},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _schema(kind: Any, definitions: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a model or a union of them (the events, the WebSocket's messages),
    the models it nests gathered into ``definitions``."""
    schema = TypeAdapter(kind).json_schema(ref_template=REF)
    definitions.update(schema.pop("$defs", {}))
    return schema


def _limit_schema(limit: Limit) -> dict[str, Any]:
    """What protocol.resolve_limits takes for ``limit``: a number in its unit, at least its
    minimum (``wall_time`` above 0), and for an rlimit also ``[soft, hard]``."""
    description = f"{limit.description}, in {limit.unit}"
    if not limit.whole:
        return {"type": "number", "exclusiveMinimum": 0, "description": description}
    number = {"type": "integer", "minimum": limit.minimum}
    if not limit.rlimit:
        return {**number, "description": description}
    pair = {"type": "array", "items": number, "minItems": 2, "maxItems": 2}
    return {"oneOf": [number, pair], "description": f"{description}; or [soft, hard]"}


_UNAUTHORIZED = _json(_ref("Error"), "No valid token.")
_FORBIDDEN = _json(_ref("Error"), "The token is not an admin's.")


def _op(responses: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An operation; one that needs a token (all but those with ``security=[]``) also answers
    401."""
    if fields.get("security") != []:
        responses = {**responses, "401": _UNAUTHORIZED}
    return {"responses": responses, **fields}


def _admin(responses: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """An operation for admins: a client's token answers 403."""
    return _op({**responses, "403": _FORBIDDEN}, **fields)
