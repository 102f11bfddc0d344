"""``GET /api/v1/openapi.json``: an OpenAPI 3.1 description that matches what is served."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import tornado.routing
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from cellblock import config as config_module
from cellblock.service.auth import Principal, Tokens
from cellblock.service.protocol import RLIMITS, SANDBOX_LIMITS
from cellblock.service.server import make_app
from cellblock.service.store import Store

ALICE, ADMIN = "alice-token", "admin-token"
METHODS = ("get", "post", "put", "patch", "delete")
#: The protocol's submission request fields (PROTOCOL.md, "Submission request").
REQUEST_FIELDS = {"files", "dependencies", "compile", "run", "env", "stdin", "stdin_encoding",
                  "args", "limits", "tests", "checker", "outputs",
                  "stdin_mode", "tty", "tty_size"}  # fmt: skip
#: The fields of one test (PROTOCOL.md v1.1, "Tests").
TEST_FIELDS = {"name", "stdin", "stdin_encoding", "args", "expected_output", "compare", "points",
               "limits"}  # fmt: skip
#: An example from PROTOCOL.md, which the schema must accept.
EXAMPLE = {
    "files": [
        {"name": "main.c", "content": "int main(void){return 0;}", "encoding": "utf8"},
        {"name": "data/blob.bin", "content": "00ff10", "encoding": "hex"},
        {"name": "run.sh", "content": "ZWNobyBoaQo=", "encoding": "base64", "executable": True},
    ],
    "dependencies": ["gcc", "python3"],
    "compile": "gcc -O2 -o main main.c",
    "run": './main "$@"',
    "env": {"GREETING": "hello"},
    "stdin": "3 4\n",
    "stdin_encoding": "utf8",
    "args": ["--fast", "x y"],
    "limits": {
        "compile": {"cpu": 10, "as": 1073741824, "wall_time": 20},
        "run": {"cpu": 2, "as": 268435456, "nproc": 32, "fsize": 1048576, "wall_time": 5,
                "output": 65536, "stack": [8388608, 16777216]},
    },
}  # fmt: skip


async def fetch(service: Any, path: str, token: str | None = ALICE, **kwargs: Any) -> HTTPResponse:
    client = AsyncHTTPClient(force_instance=True)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        return await client.fetch(service.url + path, headers=headers, raise_error=False, **kwargs)
    finally:
        client.close()


@pytest.fixture
async def document(service: Any) -> AsyncIterator[dict[str, Any]]:
    response = await fetch(service, "/api/v1/openapi.json")
    assert response.code == 200, response.body
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    yield json.loads(response.body)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


async def test_the_document_needs_a_token(service: Any) -> None:
    assert (await fetch(service, "/api/v1/openapi.json", token=None)).code == 401
    assert (await fetch(service, "/api/v1/openapi.json", token=ADMIN)).code == 200


async def test_it_is_a_well_formed_openapi_3_1_document(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] and document["info"]["version"] == version("cellblock")
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer"}  # fmt: skip
    assert document["security"] == [{"bearer": []}]
    all_refs = list(refs(document))
    assert all_refs and all(resolve(document, ref) is not None for ref in all_refs)
    for path, item in document["paths"].items():
        assert path.startswith("/")
        operations = {k: v for k, v in item.items() if k in METHODS}
        assert operations and set(item) <= {*METHODS, "parameters"}, path
        for method, operation in operations.items():
            assert operation["responses"], (path, method)
            for code, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5][0-9][0-9]", code), (path, method, code)
                assert response["description"], (path, method, code)
            # Every {name} in the path is declared as a required path parameter.
            declared = {
                p["name"]
                for p in [*item.get("parameters", []), *operation.get("parameters", [])]
                if p["in"] == "path" and p["required"] is True
            }
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (path, method)
    # Health alone needs no token.
    open_ops = [
        (path, method)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS and operation.get("security") == []
    ]
    assert open_ops == [("/api/v1/health", "get")]


async def test_the_submission_request_schema_is_the_protocols(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    request = schemas["SubmissionRequest"]
    assert request["type"] == "object" and request["additionalProperties"] is False
    assert set(request["properties"]) == REQUEST_FIELDS
    assert request["required"] == ["run"]
    [post] = [document["paths"]["/api/v1/submissions"]["post"]]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert resolve(document, body["$ref"]) == request
    for code in ("201", "400", "401", "413", "422", "429"):
        assert code in post["responses"]
    file_spec = resolve(document, request["properties"]["files"]["items"]["$ref"])
    assert set(file_spec["properties"]) == {"name", "content", "encoding", "executable"}
    assert set(file_spec["required"]) == {"name", "content"}
    assert file_spec["properties"]["encoding"]["enum"] == ["utf8", "hex", "base64"]
    assert request["properties"]["stdin_encoding"]["enum"] == ["utf8", "hex", "base64"]
    limits = request["properties"]["limits"]["properties"]
    for stage in ("compile", "run"):
        stage_limits = resolve(document, limits[stage]["$ref"])
        assert set(stage_limits["properties"]) == {*RLIMITS, *SANDBOX_LIMITS}
        assert stage_limits["additionalProperties"] is False
    assert set(limits["deps"]["properties"]) == {"wall_time"}
    error = schemas["Error"]["properties"]["error"]["properties"]
    assert set(error) == {"code", "message", "details"}
    assert set(error["details"]["items"]["properties"]) == {"field", "message"}


async def test_the_protocols_example_fits_the_schema(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    request = schemas["SubmissionRequest"]
    assert set(EXAMPLE) <= set(request["properties"])
    file_spec = resolve(document, request["properties"]["files"]["items"]["$ref"])
    for spec in EXAMPLE["files"]:  # type: ignore[attr-defined]
        assert set(file_spec["required"]) <= set(spec) <= set(file_spec["properties"])
        assert spec.get("encoding", "utf8") in file_spec["properties"]["encoding"]["enum"]
    for stage, limits in EXAMPLE["limits"].items():  # type: ignore[attr-defined]
        stage_schema = resolve(
            document, request["properties"]["limits"]["properties"][stage]["$ref"]
        )
        assert set(limits) <= set(stage_schema["properties"]), stage
    packages = schemas["PackagesRequest"]
    assert packages["required"] == ["names"] and packages["additionalProperties"] is False
    post = document["paths"]["/api/v1/packages"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert resolve(document, schema["$ref"]) == packages


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def served(state_dir: Path, store: Store) -> set[tuple[str, str]]:
    """Every (path, method) the application routes, read from the application itself."""
    app = make_app(
        store, config_module.load(state_dir, environ={}), Tokens({"t": Principal("t", "admin")})
    )
    found = set()
    for rule in app.wildcard_router.rules:
        matcher = rule.matcher
        assert isinstance(matcher, tornado.routing.PathMatches)
        template = matcher._path  # "/api/v1/submissions/%s"
        assert template is not None
        path = template % (("{id}",) * template.count("%s"))
        handler = rule.target
        for method in METHODS:
            own = getattr(handler, method, None)
            if own is not None and own is not getattr(tornado.web.RequestHandler, method):
                found.add((path, method))
    return found


async def test_every_route_served_is_documented_and_the_reverse(
    document: dict[str, Any], state_dir: Path, store: Store, service: Any
) -> None:
    routes = served(state_dir, store)
    assert ("/api/v1/submissions", "post") in routes  # the introspection finds something
    assert routes - documented(document) == set(), "served but not documented"
    assert documented(document) - routes == set(), "documented but not served"
    # And over HTTP: no documented operation falls through to "no endpoint".
    for path, method in sorted(documented(document)):
        body = None if method in ("get", "delete") else "{}"
        response = await fetch(service, path.replace("{id}", "0a1b"), token=ADMIN,
                               method=method.upper(), body=body)  # fmt: skip
        assert response.code not in (404, 405) or b"no endpoint" not in response.body, path
        assert response.code != 405, (path, method)


async def test_every_refusal_the_service_answers_is_documented(document: dict[str, Any]) -> None:
    """Found undocumented by fuzzing: the 401 of every operation but health, the admin
    operations' 403, the 422 of bad query parameters and the Retry-After of 429 and 503."""
    admin = {("/api/v1/workers", "get"), ("/api/v1/workers/{id}", "delete"),
             ("/api/v1/admin/scale", "post"), ("/metrics", "get")}  # fmt: skip
    for path, method in documented(document):
        responses = document["paths"][path][method]["responses"]
        if (path, method) != ("/api/v1/health", "get"):
            assert "401" in responses, (path, method)
        assert ("403" in responses) == ((path, method) in admin), (path, method)
        for code in ("429", "503"):
            if code in responses:
                assert responses[code]["headers"]["Retry-After"]["required"] is True
    for path in ("/api/v1/submissions", "/api/v1/submissions/{id}/events"):
        assert "422" in document["paths"][path]["get"]["responses"], path


async def test_events_and_websocket_messages_are_described_from_the_protocols_models(
    document: dict[str, Any],
) -> None:
    def types_of(union: str) -> set[str]:
        schema = document["components"]["schemas"][union]
        members = [resolve(document, member["$ref"]) for member in schema["anyOf"]]
        return {member["properties"]["type"]["const"] for member in members}

    assert types_of("Event") == {
        "status", "stage_started", "output", "input_wanted", "stage_finished", "test_started",
        "test_finished", "finished"}  # fmt: skip
    assert types_of("ClientMessage") == {
        "submit", "watch", "status", "cancel", "packages", "stdin", "signal", "resize"}  # fmt: skip
    assert types_of("Answer") == {"accepted", "cancelled", "submission", "packages", "error"}
    finished = document["components"]["schemas"]["StageFinishedEvent"]["properties"]["result"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in finished["anyOf"]} == {
        "SandboxResult", "DepsResult"}  # fmt: skip


def ref_name(node: dict[str, Any]) -> str:
    return str(node["$ref"]).rsplit("/", 1)[1]


def items_of(schema: dict[str, Any]) -> dict[str, Any]:
    """The item schema of an array that may also be null (pydantic's ``list[X] | None``)."""
    [array] = [option for option in schema.get("anyOf", [schema]) if option.get("type") == "array"]
    items: dict[str, Any] = array["items"]
    return items


async def test_the_tests_of_a_request_are_described(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    request = schemas["SubmissionRequest"]["properties"]
    test_spec = resolve(document, items_of(request["tests"])["$ref"])
    assert set(test_spec["properties"]) == TEST_FIELDS
    assert test_spec["required"] == ["name"] and test_spec["additionalProperties"] is False
    properties = test_spec["properties"]
    # A test's limits are a run stage's, so they take exactly the run stage's names.
    assert resolve(document, properties["limits"]["$ref"]) == schemas["StageLimits"]
    assert properties["points"]["minimum"] == 0
    assert properties["stdin_encoding"]["enum"] == ["utf8", "hex", "base64"]
    modes = properties["compare"]["anyOf"]
    assert {"enum": ["lines", "exact", "tokens"]} in modes
    assert any(mode.get("pattern") == "^number:" for mode in modes)
    assert items_of(request["outputs"])["type"] == "string"
    assert {option.get("type") for option in request["checker"]["anyOf"]} == {"string", "null"}


async def test_test_results_output_files_and_the_score_are_components(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    result = schemas["TestResult"]["properties"]
    # Every field of a stage result, plus how the test was judged.
    assert set(schemas["SandboxResult"]["properties"]) < set(result)
    assert set(result) - set(schemas["SandboxResult"]["properties"]) == {
        "name", "verdict", "points", "max_points", "expected_output"}  # fmt: skip
    assert set(result["verdict"]["enum"]) == {
        "passed", "wrong_answer", "time_limit", "memory_limit", "output_limit", "disk_limit",
        "runtime_error", "skipped", "error"}  # fmt: skip
    for model in ("SandboxResult", "TestResult"):
        files = items_of(schemas[model]["properties"]["files"])
        assert ref_name(files) == "OutputFile", model
    output_file = schemas["OutputFile"]
    assert set(output_file["properties"]) == {
        "name", "content", "encoding", "size", "media_type", "truncated"}  # fmt: skip
    assert set(schemas["Score"]["properties"]) == {"passed", "total", "points", "max_points"}
    assert set(schemas["Score"]["required"]) == {"passed", "total", "points", "max_points"}
    assert ref_name(schemas["TestFinishedEvent"]["properties"]["result"]) == "TestResult"
    assert schemas["TestStartedEvent"]["properties"]["stage"]["const"] == "run"
    assert set(schemas["TestStartedEvent"]["required"]) >= {"test", "name"}
    output = schemas["OutputEvent"]["properties"]["test"]
    assert {option.get("type") for option in output["anyOf"]} == {"integer", "null"}


async def test_the_submission_document_describes_its_tests_and_score(
    document: dict[str, Any],
) -> None:
    submission = document["components"]["schemas"]["Submission"]
    # Only a submission with tests has them: neither is required.
    assert "score" not in submission["required"]
    assert ref_name(submission["properties"]["score"]) == "Score"
    stages = submission["properties"]["stages"]
    assert "tests" not in stages["required"]
    options = stages["properties"]["tests"]["items"]["oneOf"]
    assert {ref_name(o) for o in options if "$ref" in o} == {"TestResult"}
    assert {"type": "null"} in options


async def test_a_queued_submission_with_tests_fits_its_schema(
    document: dict[str, Any], service: Any
) -> None:
    """The document the service answers has only the fields its schema names, each of the
    kind the schema says (a light check: a full validator is not a dependency)."""
    body = json.dumps({"run": "./sum", "tests": [{"name": "a"}, {"name": "b", "points": 2}]})
    posted = await fetch(service, "/api/v1/submissions", method="POST", body=body)
    assert posted.code == 201, posted.body
    sid = json.loads(posted.body)["id"]
    state = json.loads((await fetch(service, f"/api/v1/submissions/{sid}")).body)
    schema = document["components"]["schemas"]["Submission"]
    assert set(schema["required"]) <= set(state) <= set(schema["properties"])
    assert set(state["stages"]) <= set(schema["properties"]["stages"]["properties"])
    score = document["components"]["schemas"]["Score"]
    assert set(state["score"]) == set(score["properties"])
    assert state["stages"]["tests"] == [None, None]
