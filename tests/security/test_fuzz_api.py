"""Fuzzing the REST API with schemathesis, against the OpenAPI description the service serves.

Every documented operation gets cases that fit its description and cases that break it, sent
with the token it needs, then a few with no token, a wrong one, and a client's on an admin
operation. Every answer must be documented (status, content type, headers, body schema); none
is a 5xx but a documented 503 with Retry-After; every 4xx carries the protocol's error body.

Schemathesis sends blocking requests while the service runs in the test's event loop, so the
cases run in a worker thread; its pytest plugin is not used. No executor runs: each accepted
submission is cancelled at once, so the queue never fills.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from restio import ADMIN, ALICE, Rest
from schemathesis import Case, GenerationMode, Response
from schemathesis.specs.openapi import checks

from cellblock.service.api import MAX_WAIT
from cellblock.service.openapi import document as openapi_document

#: Cases per operation and mode: about a second per operation on a 2-core machine.
EXAMPLES = 40
#: Cases for each wrong credential, and for the {id} of a submission that exists.
FEW = 8
WRONG_TOKEN = "not-a-token"
METHODS = ("get", "post", "put", "patch", "delete")
#: The answer's conformance to its description; a 5xx and the error body are checked apart.
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
OPERATIONS = [
    (path, method)
    for path, item in openapi_document()["paths"].items()
    for method in item
    if method in METHODS
]


def run(strategy: SearchStrategy[Case], examples: int, test: Callable[[Case], object]) -> None:
    """``test`` on ``examples`` derandomized cases, with no example database."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        # No explain phase: it re-sends many cases, and a failure is reported without it.
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                               HealthCheck.data_too_large, HealthCheck.large_base_example],
    )  # fmt: skip
    @given(case=strategy)
    def each(case: Case) -> None:
        test(case)

    each()


def bound_wait(case: Case) -> None:
    """``wait=true`` holds the answer until the submission ends, which with no executor is
    never: such a case waits 0 s instead, unless its timeout is one the service refuses."""
    query = case.query
    if not query or "wait" not in query:
        return
    timeout = query.get("timeout")
    try:
        refused = timeout is not None and not 0 <= float(timeout) <= MAX_WAIT
    except (TypeError, ValueError):
        # A list is several values, of which the service reads the last: replace them all.
        refused = not isinstance(timeout, list)
    if not refused:
        query["timeout"] = 0


def assert_error_body(response: Response) -> None:
    """The protocol's error document: {"error": {"code": "...", "message": "...", ...}}."""
    where = f"{response.request.method} {response.request.url} answered {response.status_code}"
    try:
        body = json.loads(response.content)
    except ValueError:
        body = f"{response.content[:200]!r}"
        raise AssertionError(f"{where} with a body that is not JSON: {body}") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"{where} without an error object: {body!r}"
    for key in ("code", "message"):
        assert isinstance(error.get(key), str) and error[key], f"{where} without {key}: {body!r}"


class Fuzzer:
    """Sends one operation's cases to the service at ``url`` and checks every answer."""

    def __init__(self, url: str, session: requests.Session) -> None:
        self.url = url
        self.session = session

    def send(self, case: Case, token: str | None) -> Response:
        bound_wait(case)
        if case.headers:  # whatever credentials the case made up give way to ``token``
            case.headers = {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = case.call(base_url=self.url, session=self.session, headers=headers, timeout=10)
        case.validate_response(response, checks=CHECKS, headers=headers)
        status, text = response.status_code, response.content[:500]
        # Schemathesis keeps the headers' names in lower case.
        retry_after = "retry-after" in response.headers
        assert status < 500 or (status == 503 and retry_after), (status, text)
        assert status not in (429, 503) or retry_after, (status, text)
        if status >= 400:
            assert_error_body(response)
        if status == 201 and case.method == "POST" and case.path == "/api/v1/submissions":
            self.cancel(json.loads(response.content)["id"], headers)
        return response

    def cancel(self, sid: str, headers: dict[str, str]) -> None:
        """Cancelled, a submission leaves the queue: the queue cannot fill up."""
        url = f"{self.url}/api/v1/submissions/{sid}"
        response = self.session.delete(url, headers=headers, timeout=10)
        assert response.status_code == 200, response.text

    def expect(self, case: Case, token: str | None, status: int) -> None:
        response = self.send(case, token)
        assert response.status_code == status, (token, response.status_code, response.text)


def fuzz(operation: Any, spec: dict[str, Any], url: str, known_id: str | None) -> None:
    """Every kind of case for ``operation`` (whose description is ``spec``)."""
    # The description marks admin operations by their 403 and open ones by no security.
    admin = "403" in spec["responses"]
    secured = spec.get("security") != []
    token = ADMIN if admin else ALICE
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    with requests.Session() as session:
        fuzzer = Fuzzer(url, session)
        run(positive, EXAMPLES, lambda case: fuzzer.send(case, token))
        try:
            negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            run(negative, EXAMPLES, lambda case: fuzzer.send(case, token))
        except Unsatisfiable:
            # Nothing to break: no parameter and no body.
            assert not spec.get("parameters") and "requestBody" not in spec
        if known_id is not None:
            existing = operation.as_strategy(path_parameters={"id": known_id})
            run(existing, FEW, lambda case: fuzzer.send(case, token))
        if secured:
            run(positive, FEW, lambda case: fuzzer.expect(case, None, 401))
            run(positive, FEW, lambda case: fuzzer.expect(case, WRONG_TOKEN, 401))
        if admin:
            run(positive, FEW, lambda case: fuzzer.expect(case, ALICE, 403))


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
async def test_every_answer_is_documented_and_no_error_lacks_its_body(
    service: Any, path: str, method: str
) -> None:
    rest = Rest(service.url)
    try:
        served = await rest.call("GET", "/api/v1/openapi.json")
        known_id = None
        if path.startswith("/api/v1/submissions/{id}"):
            # A submission of alice's that exists (and has ended), beside the made-up ids.
            accepted = await rest.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201)
            known_id = accepted["id"]
            await rest.call("DELETE", f"/api/v1/submissions/{known_id}")
    finally:
        rest.close()
    schema = schemathesis.openapi.from_dict(served)
    operation = schema[path][method.upper()]
    spec = served["paths"][path][method]
    await asyncio.to_thread(fuzz, operation, spec, service.url, known_id)
