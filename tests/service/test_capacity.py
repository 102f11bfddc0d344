"""``GET /api/v1/capacity``: what any client may know of the service's workers (counts, slots,
busy slots, the queue), against the real service, Redis and a real executor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from restio import ADMIN, ALICE, Rest

from cellblock.service.client import Client

Until = Callable[..., Awaitable[Any]]  # the until fixture of tests/conftest.py
Launch = Callable[..., Awaitable[Any]]  # the launch fixture of tests/conftest.py


@pytest.fixture
async def rest(service: Any) -> AsyncIterator[Rest]:
    client = Rest(service.url)
    yield client
    client.close()


async def test_capacity_needs_a_valid_token(rest: Rest) -> None:
    for token in (None, "wrong-token"):
        answer = await rest.call("GET", "/api/v1/capacity", token=token, expect=401)
        assert answer["error"]["code"] == "unauthorized"


async def test_capacity_counts_executors_slots_busy_slots_and_the_queue(
    rest: Rest, service: Any, launch: Launch, until: Until
) -> None:
    empty = {"executors": 0, "builders": 0, "slots": 0, "busy": 0, "queued": 0}
    assert await rest.call("GET", "/api/v1/capacity", token=ALICE) == empty
    await rest.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201)
    assert (await rest.call("GET", "/api/v1/capacity"))["queued"] == 1

    await launch(slots=2)
    sleeping = await rest.call("POST", "/api/v1/submissions", {"run": "sleep 30"}, expect=201)

    async def one_busy() -> dict[str, Any] | None:
        answer: dict[str, Any] = await rest.call("GET", "/api/v1/capacity", token=ALICE)
        return answer if answer["busy"] == 1 and answer["queued"] == 0 else None

    capacity = await until(one_busy, "the executor to run the sleeping submission")
    assert capacity == {"executors": 1, "builders": 0, "slots": 2, "busy": 1, "queued": 0}
    # An admin sees the same numbers; the library's call answers them too.
    assert await rest.call("GET", "/api/v1/capacity", token=ADMIN) == capacity
    async with Client(service.url, ALICE) as alice:
        assert await alice.capacity() == capacity
        await alice.cancel(sleeping["id"])


async def test_the_openapi_description_names_what_capacity_answers(rest: Rest) -> None:
    document = await rest.call("GET", "/api/v1/openapi.json")
    operation = document["paths"]["/api/v1/capacity"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    answer = await rest.call("GET", "/api/v1/capacity")
    assert schema["required"] == list(answer) == list(schema["properties"])
    assert "401" in operation["responses"] and "security" not in operation
