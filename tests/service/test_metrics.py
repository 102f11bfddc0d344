"""``GET /metrics``: Prometheus text, admin only, with totals that live in Redis."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from restio import ADMIN, ALICE, Rest

from cellblock.service.metrics import Metrics
from cellblock.service.store import Store

SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>-?[0-9.e+]+|NaN)"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Prometheus text format, checked as a scraper would: HELP and TYPE once per family,
    before its samples; every other line a well-formed sample."""
    assert text.endswith("\n")
    samples: Samples = {}
    help_seen: set[str] = set()
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in help_seen, line
            help_seen.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types and kind in ("counter", "gauge"), line
            types[name] = kind
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name in types and name in help_seen, f"{name} has no TYPE or HELP"
            labels = frozenset(LABEL.findall(match["labels"] or ""))
            key = (name, labels)
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(match["value"])
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class Http(Rest):
    async def metrics(self) -> Samples:
        response = await self.request("GET", "/metrics", token=ADMIN)
        assert response.code == 200, response.body
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(response.body.decode())


@pytest.fixture
async def http(service: Any) -> AsyncIterator[Http]:
    client = Http(service.url)
    yield client
    client.close()


async def test_metrics_needs_an_admin_token(http: Http) -> None:
    assert (await http.request("GET", "/metrics", token=None)).code == 401
    assert (await http.request("GET", "/metrics", token="wrong")).code == 401
    response = await http.request("GET", "/metrics", token=ALICE)
    assert response.code == 403
    assert json.loads(response.body)["error"]["code"] == "forbidden"


async def test_a_fresh_service_reports_zeroes(http: Http) -> None:
    samples = await http.metrics()
    assert value(samples, "cellblock_queued") == 0
    assert value(samples, "cellblock_submissions_total") == 0
    for status in ("finished", "cancelled", "error"):
        assert value(samples, "cellblock_submissions_ended_total", status=status) == 0
    for kind in ("executor", "builder"):
        assert value(samples, "cellblock_workers", kind=kind) == 0
    assert value(samples, "cellblock_slots", state="busy") == 0
    assert value(samples, "cellblock_slots", state="total") == 0


async def test_metrics_count_submissions_requests_and_workers(
    http: Http, store: Store, start_executor: Any, until: Any
) -> None:
    ids = []
    for _ in range(3):
        response = await http.request("POST", "/api/v1/submissions", {"run": "echo hi"})
        assert response.code == 201
        ids.append(json.loads(response.body)["id"])
    assert (await http.request("DELETE", f"/api/v1/submissions/{ids[0]}")).code == 200
    assert (await http.request("POST", "/api/v1/submissions", {})).code == 422
    assert (await http.request("GET", "/api/v1/nowhere")).code == 404

    samples = await http.metrics()
    assert value(samples, "cellblock_submissions_total") == 3
    assert value(samples, "cellblock_queued") == 2
    assert value(samples, "cellblock_submissions_ended_total", status="cancelled") == 1
    assert value(samples, "cellblock_submissions_ended_total", status="finished") == 0
    requests = "cellblock_http_requests_total"
    labels = {"method": "POST", "handler": "SubmissionsHandler"}
    assert value(samples, requests, **labels, code="201") == 3
    assert value(samples, requests, **labels, code="422") == 1
    assert value(samples, requests, method="DELETE", handler="SubmissionHandler", code="200") == 1
    assert value(samples, requests, method="GET", handler="NotFoundHandler", code="404") == 1
    # The scrape itself is counted once it has been answered.
    scrapes = {"method": "GET", "handler": "MetricsHandler", "code": "200"}
    assert (requests, frozenset(scrapes.items())) not in samples
    assert value(await http.metrics(), requests, **scrapes) == 1

    # An executor runs the two that wait; the totals follow.
    start_executor(slots=3)

    async def both_finished() -> Samples | None:
        samples = await http.metrics()
        finished = value(samples, "cellblock_submissions_ended_total", status="finished")
        return samples if finished == 2 else None

    samples = await until(both_finished, "the executor to run the submissions")
    assert value(samples, "cellblock_queued") == 0
    assert value(samples, "cellblock_workers", kind="executor") == 1
    assert value(samples, "cellblock_slots", state="total") == 3
    assert value(samples, "cellblock_submissions_total") == 3

    # The submission totals live in Redis: any service process reports the same ones.
    elsewhere = parse(await Metrics().render(store))
    for name in ("cellblock_submissions_total", "cellblock_submissions_ended_total"):
        assert {k: v for k, v in elsewhere.items() if k[0] == name} == {
            k: v for k, v in samples.items() if k[0] == name
        }
    assert not any(k[0] == "cellblock_http_requests_total" for k in elsewhere)


def test_the_parser_refuses_what_prometheus_would() -> None:
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 2\n'
    assert parse(good) == {("a_total", frozenset({("x", "1")})): 2.0}
    for bad in (
        "a_total 2\n",  # no TYPE
        good + 'a_total{x="1"} 3\n',  # duplicate sample
        good + "# TYPE a_total counter\n",  # TYPE twice
        good.rstrip("\n"),  # no final newline
        good + "a_total two\n",
    ):
        with pytest.raises(AssertionError):
            parse(bad)
