"""``GET /metrics``: Prometheus text, admin only, with totals that live in Redis, so that every
service process answers the same ones; recorded where they happen (the store's appends, the
builders, each service process's requests), against the real service, executors and builders."""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
from restio import ADMIN, ALICE, Rest

from cellblock import config as config_module
from cellblock.service.auth import Principal, Tokens
from cellblock.service.metrics import Metrics
from cellblock.service.protocol import (
    DepsResult,
    SandboxResult,
    StageFinishedEvent,
    StageStartedEvent,
    StatusEvent,
    parse_submission,
)
from cellblock.service.server import make_app
from cellblock.service.store import EventLog, Store

SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? "
    r"(?P<value>-?[0-9.e+]+|[+-]Inf|NaN)"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
#: The samples each type of family has besides its own name, as Prometheus reads them.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def family_of(name: str, types: dict[str, str]) -> str:
    if name in types:
        return name
    for family, kind in types.items():
        if any(name == family + suffix for suffix in SUFFIXES.get(kind, ())):
            return family
    raise AssertionError(f"{name} has no TYPE")


def parse(text: str) -> Samples:
    """Prometheus text format, checked as a scraper would: HELP and TYPE once per family,
    before its samples; every other line a well-formed sample; a histogram's buckets
    cumulative, up to ``+Inf`` which is its count."""
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
            assert name not in types and kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            family = family_of(name, types)
            assert family in help_seen, f"{name} has no HELP"
            labels = frozenset(LABEL.findall(match["labels"] or ""))
            key = (name, labels)
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(match["value"])
    for name, kind in types.items():
        if kind == "histogram":
            check_histogram(name, samples)
    return samples


def check_histogram(name: str, samples: Samples) -> None:
    """Each series' buckets are cumulative and end at ``+Inf``, which is its count."""
    buckets: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
    for (sample, labels), count in samples.items():
        if sample == f"{name}_bucket":
            le = dict(labels)["le"]
            buckets.setdefault(labels - {("le", le)}, []).append((float(le), count))
    for (sample, labels), count in samples.items():
        if sample == f"{name}_count":
            series = sorted(buckets.get(labels, []))
            assert series and series[-1][0] == math.inf, (name, labels)
            counts = [c for _, c in series]
            assert counts == sorted(counts) and counts[-1] == count, (name, labels, series)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def family(samples: Samples, *names: str) -> Samples:
    return {k: v for k, v in samples.items() if k[0] in names}


def answered(samples: Samples) -> Samples:
    """The request counts but the scrapes': a scrape is counted once it is answered, so
    each one moves them on."""
    found = family(samples, "cellblock_http_requests_total")
    return {k: v for k, v in found.items() if ("handler", "MetricsHandler") not in k[1]}


async def scrape(store: Store) -> Samples:
    """What a service process of its own (this test's) answers a scrape with."""
    body, _ = await Metrics(store).render()
    return parse(body.decode())


class Http(Rest):
    async def metrics(self) -> Samples:
        response = await self.request("GET", "/metrics", token=ADMIN)
        assert response.code == 200, response.body
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(response.body.decode())

    async def run(self, request: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        """Submit and wait: the ended submission."""
        response = await self.request(
            "POST", f"/api/v1/submissions?wait=true&timeout={timeout}", request,
            timeout=timeout + 10,
        )  # fmt: skip
        assert response.code == 201, response.body
        state: dict[str, Any] = json.loads(response.body)
        assert state["status"] == "finished", state
        return state


@pytest.fixture
async def http(service: Any) -> AsyncIterator[Http]:
    client = Http(service.url)
    yield client
    client.close()


@pytest.fixture
async def second_service(service: Any) -> AsyncIterator[Http]:
    """A second service process on the same Redis (an app of its own, with its own store and
    metrics), as behind a load balancer; its client."""
    cfg = config_module.load(service.state_dir, environ={})
    store = Store.connect(service.redis_url, retention=cfg.retention, queue_size=cfg.queue_size)
    tokens = Tokens({ALICE: Principal("alice", "client"), ADMIN: Principal("admin", "admin")})
    server = tornado.httpserver.HTTPServer(make_app(store, cfg, tokens))
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets([sock])
    client = Http(f"http://127.0.0.1:{sock.getsockname()[1]}")
    yield client
    client.close()
    server.stop()
    await server.close_all_connections()
    await store.close()


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


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
    # Every series a dashboard needs is there from the start, at zero.
    assert value(samples, "cellblock_queue_wait_seconds_count") == 0
    assert value(samples, "cellblock_queue_wait_seconds_bucket", le="+Inf") == 0
    for stage in ("deps", "compile", "run"):
        assert value(samples, "cellblock_stage_duration_seconds_count", stage=stage) == 0
        assert value(samples, "cellblock_stage_duration_seconds_sum", stage=stage) == 0
    for result in ("hit", "miss"):
        assert value(samples, "cellblock_deps_cache_total", result=result) == 0
    assert value(samples, "cellblock_builds_started_total") == 0
    for outcome in ("ok", "failed"):
        assert value(samples, "cellblock_build_duration_seconds_count", outcome=outcome) == 0


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
    # A cancelled submission never ran: it waited in the queue, but was never picked up.
    assert value(samples, "cellblock_queue_wait_seconds_count") == 0

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
    assert value(samples, "cellblock_queue_wait_seconds_count") == 2

    # Everything but the gauges lives in Redis: any process reports the same totals, the
    # requests included (but for the scrapes since, which the service counts as they end).
    elsewhere = await scrape(store)
    redis_families = ("cellblock_submissions_total", "cellblock_submissions_ended_total",
                      "cellblock_queue_wait_seconds_count", "cellblock_queue_wait_seconds_sum",
                      "cellblock_stage_duration_seconds_count")  # fmt: skip
    assert family(elsewhere, *redis_families) == family(samples, *redis_families)
    assert answered(elsewhere) == answered(samples)
    assert len(answered(samples)) == 4


async def test_the_stages_that_ran_are_timed_and_the_wait_for_an_executor_too(
    http: Http, launch: Any
) -> None:
    await launch(slots=1)
    state = await http.run({"compile": "echo built", "run": "echo hi"})
    failed = await http.run({"compile": "exit 3", "run": "echo never"})
    assert failed["stages"]["run"]["status"] == "skipped"

    samples = await http.metrics()
    stage = "cellblock_stage_duration_seconds"
    assert value(samples, f"{stage}_count", stage="compile") == 2
    assert value(samples, f"{stage}_count", stage="run") == 1  # the skipped one did not run
    assert value(samples, f"{stage}_count", stage="deps") == 0
    compile_times = (
        state["stages"]["compile"]["wall_time"] + failed["stages"]["compile"]["wall_time"]
    )
    assert value(samples, f"{stage}_sum", stage="compile") == pytest.approx(compile_times)
    run_time = state["stages"]["run"]["wall_time"]
    assert value(samples, f"{stage}_sum", stage="run") == pytest.approx(run_time)
    # The run took well under a second: in every bucket from 1 s up, as Prometheus counts.
    assert run_time < 1
    assert value(samples, f"{stage}_bucket", stage="run", le="1.0") == 1
    assert value(samples, f"{stage}_bucket", stage="run", le="+Inf") == 1

    wait = "cellblock_queue_wait_seconds"
    assert value(samples, f"{wait}_count") == 2
    waits = [seconds_between(s["created_at"], s["started_at"]) for s in (state, failed)]
    assert value(samples, f"{wait}_sum") == pytest.approx(sum(waits))
    assert value(samples, "cellblock_submissions_ended_total", status="finished") == 2


async def test_a_reclaim_and_a_retried_append_count_once(store: Store) -> None:
    """Recorded by the append that stores the events: a second pick-up (a reclaim) is no wait
    in the queue, and an append retried after another writer came first counts once."""
    policy = config_module.load(Path("/nonexistent"), environ={}).limits
    await store.submit("s1", parse_submission({"run": "true"}, policy), owner="alice")
    first = EventLog(store, "s1")
    await first.append([StatusEvent(status="running", worker="w1")])
    await first.append([StatusEvent(status="running", worker="w2")])  # reclaimed
    other = EventLog(store, "s1")
    await other.append([StageStartedEvent(stage="run")])
    # ``first`` remembers a version that is no longer current: its append is retried.
    result = SandboxResult(status="ok", wall_time=0.25)
    await first.append([StageFinishedEvent(stage="run", result=result)])

    samples = await scrape(store)
    assert value(samples, "cellblock_queue_wait_seconds_count") == 1
    assert value(samples, "cellblock_stage_duration_seconds_count", stage="run") == 1
    assert value(samples, "cellblock_stage_duration_seconds_sum", stage="run") == 0.25
    assert value(samples, "cellblock_stage_duration_seconds_bucket", stage="run", le="0.1") == 0
    assert value(samples, "cellblock_stage_duration_seconds_bucket", stage="run", le="0.25") == 1
    # A deps result without a cache outcome (it ended before the cache was asked) is timed,
    # but neither a hit nor a miss.
    deps = DepsResult(status="time_limit", wall_time=2.0)
    await first.append([StageFinishedEvent(stage="deps", result=deps)])
    samples = await scrape(store)
    assert value(samples, "cellblock_stage_duration_seconds_count", stage="deps") == 1
    assert value(samples, "cellblock_deps_cache_total", result="hit") == 0
    assert value(samples, "cellblock_deps_cache_total", result="miss") == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="builds need root (the single-user Nix store)")
@pytest.mark.timeout(120)
async def test_deps_hits_and_misses_and_the_builds_behind_them(
    http: Http, launch: Any, start_builder: Any, until: Any
) -> None:
    await start_builder().started()
    await launch(slots=1)
    request = {"dependencies": ["busybox"], "run": "busybox true"}
    miss = await http.run(request)
    hit = await http.run(request)
    unknown = await http.run({"dependencies": ["nosuch"], "run": "true"})
    assert [s["stages"]["deps"]["cache"] for s in (miss, hit, unknown)] == ["miss", "hit", "miss"]
    assert unknown["stages"]["deps"]["status"] == "failed"

    # The builder counts a build's end before it tells the executor: all are in by now.
    samples = await http.metrics()
    assert value(samples, "cellblock_deps_cache_total", result="hit") == 1
    assert value(samples, "cellblock_deps_cache_total", result="miss") == 2
    assert value(samples, "cellblock_stage_duration_seconds_count", stage="deps") == 3
    assert value(samples, "cellblock_builds_started_total") == 2
    builds = "cellblock_build_duration_seconds"
    assert value(samples, f"{builds}_count", outcome="ok") == 1
    assert value(samples, f"{builds}_count", outcome="failed") == 1
    # A build takes longer than the deps stage that found its environment built.
    built = value(samples, f"{builds}_sum", outcome="ok")
    assert built > hit["stages"]["deps"]["wall_time"]
    assert built < miss["stages"]["deps"]["wall_time"] + 0.001  # (the builder rounds to ms)
    assert value(samples, "cellblock_workers", kind="builder") == 1


async def test_every_service_process_answers_the_same_totals(
    http: Http, second_service: Http, until: Any
) -> None:
    """Two service processes behind one address: each counts its own requests, and either
    one's scrape shows both's."""
    for client in (http, second_service, second_service):
        response = await client.request("POST", "/api/v1/submissions", {"run": "true"})
        assert response.code == 201
    assert (await second_service.request("GET", "/api/v1/nowhere")).code == 404
    requests = "cellblock_http_requests_total"

    async def both_agree() -> tuple[Samples, Samples] | None:
        one, two = await http.metrics(), await second_service.metrics()
        return (one, two) if answered(one) == answered(two) and len(answered(one)) == 2 else None

    # Each process writes its request counts to Redis at most a second late.
    one, two = await until(both_agree, "both processes' request counts", timeout=5)
    created = {"method": "POST", "handler": "SubmissionsHandler", "code": "201"}
    assert value(one, requests, **created) == 3
    assert value(one, requests, method="GET", handler="NotFoundHandler", code="404") == 1
    for samples in (one, two):
        assert value(samples, "cellblock_submissions_total") == 3
        assert value(samples, "cellblock_queued") == 3


async def test_a_client_made_up_method_is_no_series_of_its_own(http: Http) -> None:
    assert (await http.request("BREW", "/api/v1/health")).code == 405
    samples = await http.metrics()
    labels = {"method": "other", "handler": "HealthHandler", "code": "405"}
    assert value(samples, "cellblock_http_requests_total", **labels) == 1
    assert not [k for k in samples if ("method", "BREW") in k[1]]


async def test_openmetrics_for_a_scraper_that_asks_for_it(http: Http) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    response = await http.request("GET", "/metrics", token=ADMIN, headers={"Accept": accept})
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    text = response.body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE cellblock_submissions counter\n" in text
    assert "# TYPE cellblock_stage_duration_seconds histogram\n" in text


def test_the_parser_refuses_what_prometheus_would() -> None:
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1"} 2\n'
    assert parse(good) == {("a_total", frozenset({("x", "1")})): 2.0}
    histogram = (
        "# HELP h H.\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\n'
    )
    assert value(parse(histogram), "h_bucket", le="+Inf") == 2
    for bad in (
        "a_total 2\n",  # no TYPE
        good + 'a_total{x="1"} 3\n',  # duplicate sample
        good + "# TYPE a_total counter\n",  # TYPE twice
        good.rstrip("\n"),  # no final newline
        good + "a_total two\n",
        good + "a_bucket 1\n",  # a histogram's sample of a counter
        histogram.replace("h_count 2", "h_count 3"),  # +Inf is not the count
        histogram.replace('le="1.0"} 1', 'le="1.0"} 5'),  # not cumulative
        histogram.replace('h_bucket{le="+Inf"} 2\n', ""),  # no +Inf
    ):
        with pytest.raises(AssertionError):
            parse(bad)
