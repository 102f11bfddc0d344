"""``/metrics``: the whole deployment's numbers, written by prometheus_client.

Whichever service process a load balancer sends the scrape to must answer the same totals,
and most of what is counted happens in other processes (executors, builders), perhaps on other
hosts. So every number lives in Redis, recorded atomically where it happens, and a scrape reads
them into prometheus_client's metric families (a custom collector), which prometheus_client
writes out (text format, or OpenMetrics when the scraper asks for it):

- What a submission's events tell is worked out here from the events an ``EventLog`` appends
  (``event_increments``) and added by the same ``_APPEND`` script that stores them
  (service/store.py): no extra round trip on the hot path, and counted exactly once, since an
  append that is retried (another writer came first) or refused adds nothing.
- Submissions accepted and ended, by final status, are counted by the store's own scripts
  (``{p}:counters``, ``Store.counters``).
- Builds: a builder adds a build's start, and at its end its outcome and duration, one small
  transaction each (builds take seconds; the round trip does not matter there).
- HTTP requests: each service process counts its own in memory and adds them to Redis in one
  transaction at most every ``FLUSH_EVERY`` seconds, and before it answers a scrape; so a
  scrape sees its own process's requests exactly and the others' at most that late. Not
  prometheus_client's multiprocess mode: that sums the processes of one host through files
  in a shared directory, not service processes on several hosts behind one load balancer.
- Gauges (queued submissions, live workers, slots) are read from the queue and the worker
  registry at scrape time, as before.

Metrics (``_total`` counters; histograms have ``_bucket``, ``_sum`` and ``_count``):

- ``cellblock_queued``, ``cellblock_workers{kind}``, ``cellblock_slots{state}``: gauges.
- ``cellblock_submissions_total``; ``cellblock_submissions_ended_total{status}``.
- ``cellblock_queue_wait_seconds``: acceptance to first pick-up by an executor. From
  ``created_at`` (the service's clock) to the ``running`` event (the executor's): clock skew
  between hosts shows in it, and a negative difference counts as 0.
- ``cellblock_stage_duration_seconds{stage}``: the wall time in each stage's result, for
  stages that ran (a skipped stage did not).
- ``cellblock_deps_cache_total{result}``: deps stages whose environment was cached (``hit``)
  or had to be built (``miss``).
- ``cellblock_builds_started_total``; ``cellblock_build_duration_seconds{outcome}``, whose
  ``_count`` is the builds ended, ``ok`` or ``failed``. Started less ended is what is being
  built or was lost with a builder (then it is reclaimed and starts again).
- ``cellblock_http_requests_total{method,handler,code}``.

In Redis, the hash ``{p}:metrics``: a counter's field is ``name|label values``; a histogram has
per series a count per bucket (``name|label values|le``: not cumulative, so one observation
adds to one field) and ``name|label values|sum``, in microseconds; a scrape adds the buckets
up into Prometheus' cumulative ones, and their total is the count. Every field is an integer,
added to with HINCRBY: cheaper than HINCRBYFLOAT (which counts on the hot path), and exact
however much is added. Label values never hold ``|``: they come from fixed sets (a client's
HTTP method is one of Tornado's, else ``other``).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import tornado.web
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from redis.exceptions import RedisError

from cellblock.service.protocol import (
    STAGES,
    DepsResult,
    Event,
    StageFinishedEvent,
    StatusEvent,
    SubmissionState,
)

if TYPE_CHECKING:  # the store imports this module to record what its events tell
    from cellblock.service.store import Store

log = logging.getLogger("cellblock.service")
#: Seconds a service process keeps its request counts before adding them to Redis.
FLUSH_EVERY = 1.0
_SEP = "|"
_INF = float("inf")
#: A histogram's sum is kept in microseconds.
_MICRO = 1_000_000


@dataclass(frozen=True)
class Family:
    """A metric kept in Redis: a counter, or a histogram when it has buckets."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    #: A histogram's upper bounds, ascending (``+Inf`` is implied).
    buckets: tuple[float, ...] = ()
    #: Label values reported, as zero, before anything is recorded: a series exists from the
    #: first scrape, so that ``rate()`` and ``increase()`` see its first increment.
    always: tuple[tuple[str, ...], ...] = ()

    def bucket_of(self, value: float) -> str:
        """The ``le`` of the bucket that ``value`` falls in (bounds are inclusive)."""
        index = bisect.bisect_left(self.buckets, value)
        return _le(self.buckets[index] if index < len(self.buckets) else _INF)


def _le(bound: float) -> str:
    """A bucket's bound as prometheus_client's own histograms write it (``1.0``, ``+Inf``)."""
    return "+Inf" if bound == _INF else repr(float(bound))


# Deps hits take milliseconds and builds minutes; compile and run anything in between.
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BUILD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

QUEUE_WAIT = Family(
    "cellblock_queue_wait_seconds",
    "Time from a submission's acceptance to its first pick-up by an executor.",
    buckets=_QUEUE_BUCKETS,
    always=((),),
)
STAGE_DURATION = Family(
    "cellblock_stage_duration_seconds",
    "Wall time of each stage that ran, from its result.",
    ("stage",),
    _STAGE_BUCKETS,
    always=tuple((stage,) for stage in STAGES),
)
DEPS_CACHE = Family(
    "cellblock_deps_cache_total",
    "Deps stages whose environment was cached (hit) or had to be built (miss).",
    ("result",),
    always=(("hit",), ("miss",)),
)
BUILDS_STARTED = Family(
    "cellblock_builds_started_total",
    "Builds a builder started (a build reclaimed from a lost builder starts again).",
    always=((),),
)
BUILD_DURATION = Family(
    "cellblock_build_duration_seconds",
    "Duration of the builds that ended, by outcome (its count: the builds ended).",
    ("outcome",),
    _BUILD_BUCKETS,
    always=(("ok",), ("failed",)),
)
HTTP_REQUESTS = Family(
    "cellblock_http_requests_total",
    "HTTP requests answered by the service, all its processes together.",
    ("method", "handler", "code"),
)
FAMILIES = (QUEUE_WAIT, STAGE_DURATION, DEPS_CACHE, BUILDS_STARTED, BUILD_DURATION, HTTP_REQUESTS)
_BY_NAME = {family.name: family for family in FAMILIES}


def key(store: Store) -> str:
    """The Redis hash of the recorded metrics (see the module docstring)."""
    return f"{store.p}:metrics"


class Increments:
    """Additions to the recorded metrics, gathered to be written together."""

    def __init__(self) -> None:
        self.amounts: dict[str, int] = {}

    def _add(self, field: str, amount: int) -> None:
        self.amounts[field] = self.amounts.get(field, 0) + amount

    def count(self, family: Family, *labels: str) -> None:
        self._add(_SEP.join((family.name, *labels)), 1)

    def observe(self, family: Family, value: float, *labels: str) -> None:
        self._add(_SEP.join((family.name, *labels, family.bucket_of(value))), 1)
        self._add(_SEP.join((family.name, *labels, "sum")), round(value * _MICRO))

    def merge(self, other: Increments) -> None:
        for field, amount in other.amounts.items():
            self._add(field, amount)

    def argument(self) -> str:
        """The increments as ``_APPEND`` takes them: a JSON object of field → amount (a string,
        passed to HINCRBY as it is), or ``''`` for none."""
        return json.dumps({f: str(a) for f, a in self.amounts.items()}) if self.amounts else ""

    async def record(self, store: Store) -> None:
        """Add them to Redis, all or nothing (a scrape never sees a bucket without its sum)."""
        if not self.amounts:
            return
        async with store.redis.pipeline(transaction=True) as pipe:
            for field, amount in self.amounts.items():
                pipe.hincrby(key(store), field, amount)
            await pipe.execute()


def _seconds_between(start: str, end: str) -> float:
    elapsed = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return max(0.0, elapsed)


def event_increments(state: SubmissionState, events: Sequence[Event]) -> str:
    """What appending ``events`` to a submission in ``state`` adds to the metrics, as the
    ``_APPEND`` script takes it (``Increments.argument``)."""
    increments = Increments()
    status = state.status
    for event in events:
        if isinstance(event, StatusEvent):
            # Only the first pick-up ends the wait in the queue: running → running is a
            # reclaim, after a lease timeout, not time spent queued.
            if event.status == "running" and status == "queued" and event.time is not None:
                increments.observe(QUEUE_WAIT, _seconds_between(state.created_at, event.time))
            status = event.status
        elif isinstance(event, StageFinishedEvent):
            result = event.result
            if result.status != "skipped" and result.wall_time is not None:
                increments.observe(STAGE_DURATION, result.wall_time, event.stage)
            if isinstance(result, DepsResult) and result.cache is not None:
                increments.count(DEPS_CACHE, result.cache)
    return increments.argument()


async def build_started(store: Store) -> None:
    increments = Increments()
    increments.count(BUILDS_STARTED)
    await increments.record(store)


async def build_ended(store: Store, ok: bool, seconds: float) -> None:
    increments = Increments()
    increments.observe(BUILD_DURATION, seconds, "ok" if ok else "failed")
    await increments.record(store)


@dataclass
class _Series:
    """One recorded series: a counter's value, or a histogram's bucket counts and sum."""

    value: float = 0.0
    buckets: list[float] | None = None


class _Scrape:
    """One scrape's numbers, read from Redis beforehand, as prometheus_client's families
    (a collector's ``collect`` is synchronous, Redis is not)."""

    def __init__(
        self,
        queued: int,
        workers: Sequence[Mapping[str, Any]],
        counters: Mapping[str, int],
        recorded: Mapping[str, str],
    ) -> None:
        self.queued, self.workers, self.counters = queued, workers, counters
        self.recorded = self._parse(recorded)

    @staticmethod
    def _parse(recorded: Mapping[str, str]) -> dict[str, dict[tuple[str, ...], _Series]]:
        found: dict[str, dict[tuple[str, ...], _Series]] = {f.name: {} for f in FAMILIES}
        for field, raw in recorded.items():
            name, *rest = field.split(_SEP)
            family = _BY_NAME.get(name)
            if family is None:  # written by a version that had it, read by one that does not
                continue
            labels, rest = tuple(rest[: len(family.labels)]), rest[len(family.labels) :]
            series = found[name].setdefault(labels, _Series())
            if not family.buckets:
                series.value = int(raw)
                continue
            if series.buckets is None:
                series.buckets = [0.0] * (len(family.buckets) + 1)
            if rest == ["sum"]:
                series.value = int(raw) / _MICRO
            else:
                # By where its bound falls: a bucket recorded under other bounds (before they
                # changed) still lands in one whose bound it does not exceed.
                series.buckets[bisect.bisect_left(family.buckets, float(rest[0]))] += int(raw)
        return found

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily(
            "cellblock_queued", "Submissions waiting for an executor.", value=self.queued
        )
        yield queued
        workers = GaugeMetricFamily("cellblock_workers", "Live workers by kind.", labels=["kind"])
        for kind in ("executor", "builder"):
            workers.add_metric([kind], sum(w["kind"] == kind for w in self.workers))
        yield workers
        executors = [w for w in self.workers if w["kind"] == "executor"]
        slots = GaugeMetricFamily(
            "cellblock_slots", "Sandbox slots of live executors, by state.", labels=["state"]
        )
        slots.add_metric(["busy"], sum(w.get("busy", 0) for w in executors))
        slots.add_metric(["total"], sum(w.get("slots", 0) for w in executors))
        yield slots
        yield CounterMetricFamily(
            "cellblock_submissions_total",
            "Submissions accepted.",
            value=self.counters.get("submitted", 0),
        )
        ended = CounterMetricFamily(
            "cellblock_submissions_ended_total",
            "Submissions ended, by final status.",
            labels=["status"],
        )
        for status in ("finished", "cancelled", "error"):
            ended.add_metric([status], self.counters.get(f"ended:{status}", 0))
        yield ended
        for family in FAMILIES:
            yield self._family(family)

    def _family(self, family: Family) -> Metric:
        recorded = self.recorded[family.name]
        labels = sorted({*family.always, *recorded})
        if not family.buckets:
            counter = CounterMetricFamily(family.name, family.documentation, labels=family.labels)
            for values in labels:
                counter.add_metric(values, recorded.get(values, _Series()).value)
            return counter
        histogram = HistogramMetricFamily(family.name, family.documentation, labels=family.labels)
        bounds = [_le(b) for b in (*family.buckets, _INF)]
        for values in labels:
            series = recorded.get(values, _Series())
            counts = series.buckets or [0.0] * len(bounds)
            histogram.add_metric(
                values, list(zip(bounds, _cumulative(counts), strict=True)), series.value
            )
        return histogram


def _cumulative(counts: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for count in counts:
        total += count
        yield total


class Metrics:
    """A service process's part: it counts its HTTP requests (see the module docstring) and
    answers scrapes."""

    def __init__(self, store: Store, flush_every: float = FLUSH_EVERY) -> None:
        self.store = store
        self.flush_every = flush_every
        self._unflushed = Increments()
        self._flusher: asyncio.Task[None] | None = None

    def request(self, method: str, handler: str, status: int) -> None:
        # Any token is a method to HTTP: only the ones Tornado serves are labels of their own,
        # so that a client cannot make up series (and they never hold the field separator).
        known = method if method in tornado.web.RequestHandler.SUPPORTED_METHODS else "other"
        self._unflushed.count(HTTP_REQUESTS, known, handler, str(status))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.flush_every)
        self._flusher = None  # a request from now on schedules the next flush
        try:
            await self.flush()
        except RedisError:
            log.warning("request counts not written to Redis yet", exc_info=True)

    async def flush(self) -> None:
        """Add the request counts not yet in Redis; kept for the next flush if Redis fails."""
        pending, self._unflushed = self._unflushed, Increments()
        try:
            await pending.record(self.store)
        except RedisError:
            self._unflushed.merge(pending)
            raise

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for a scraper that sent ``accept`` (its Accept header), and its
        content type."""
        await self.flush()  # this process's requests, up to this scrape
        store = self.store
        queued, workers, counters, recorded = await asyncio.gather(
            store.queued(), store.workers(), store.counters(), store.redis.hgetall(key(store))
        )
        registry = CollectorRegistry()
        registry.register(_Scrape(queued, workers, counters, recorded))
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
