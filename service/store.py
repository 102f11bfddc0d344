"""Submissions, events, the job queue and the worker registry, kept in Redis.

Everything the system remembers lives here, so that service processes hold no state and any
number of them can run side by side. Keys (``{p}`` is the prefix, ``cb`` by default):

- ``{p}:sub:{id}``: a hash: ``job`` (the validated submission), ``owner``, ``state`` (the
  submission document), ``status``, ``attempts``, ``version`` and ``seq``.
- ``{p}:events:{id}``: a stream of the submission's events; entry ``0-N`` is event ``seq`` N, so
  sequence numbers are gap-free by construction and ``since`` is a stream position.
- ``{p}:jobs``: the job stream, read by executors through the consumer group ``executors``:
  one executor per job, the pending-entries list is the lease, ``XCLAIM`` is the heartbeat and
  ``XAUTOCLAIM`` the reclaim of a job whose executor stopped heartbeating.
- ``{p}:queued``: the set of queued ids, for the queue-size limit.
- ``{p}:owner:{name}``: a sorted set of a token's submission ids by creation time.
- ``{p}:worker:{id}``: a worker's registration, expiring unless refreshed.

Appending events is atomic (a Lua script): the state machine runs in Python on the current
state, and the script applies the result only if nobody changed the state meanwhile (its
``version``), else the append is retried. A writer's ``EventLog`` appends a batch of events in
one round trip. A writer names the attempt it works for; an executor
whose job was reclaimed by another (a newer attempt) is refused, so the final result is written
once. Concurrency: every method is safe to call from many tasks and processes at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from cellblock.errors import CellblockError, ErrorCode
from cellblock.service import connection, metrics
from cellblock.service.inputs import PUT_INPUT, StageInputs
from cellblock.service.protocol import (
    TERMINAL,
    Event,
    EventRecorder,
    FinishedEvent,
    StatusEvent,
    Submission,
    SubmissionState,
    decode_event,
    encode_event,
)

JOBS_GROUP = "executors"
#: The largest ``since`` a read of events passes to Redis (see ``Store.events``).
MAX_SINCE = 2**64 - 2
log = logging.getLogger("cellblock.service")


class QueueAtCapacity(CellblockError):
    code: str = ErrorCode.QUEUE_FULL


class UnknownSubmission(CellblockError):
    code: str = ErrorCode.NOT_FOUND


class Rejected(CellblockError):
    """An event the submission no longer takes: it ended, or another attempt owns it now."""

    code: str = ErrorCode.REJECTED


# KEYS: sub, events, queued, jobs, owner index, counters. ARGV: id, job, owner, state,
# created (score), queue size, first event, retention.
_SUBMIT = """
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[6]) then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[2], 'owner', ARGV[3], 'state', ARGV[4],
           'status', 'queued', 'attempts', 0, 'version', 1, 'seq', 1)
redis.call('XADD', KEYS[2], '0-1', 'e', ARGV[7])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[8])
redis.call('XADD', KEYS[4], '*', 'id', ARGV[1])
redis.call('HINCRBY', KEYS[6], 'submitted', 1)
return 1
"""

# KEYS: sub, events, queued, counters, metrics, then the interactive input's keys (inputs.py),
# dropped when the submission ends. ARGV: expected version, attempt ('' for any),
# new state ('' when only outputs were added: it did not change), new status, new attempts,
# retention ('' unless the submission ends), id, what the events add to the metrics (a JSON
# object of field -> amount, '' for nothing: service/metrics.py), then the events in order.
# Returns the last event's seq, or -1 (version conflict: read again), -3 (stale attempt),
# -4 (unknown).
_APPEND = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'status', 'attempts', 'seq')
if not cur[1] then return -4 end
if ARGV[2] ~= '' and cur[3] ~= ARGV[2] then return -3 end
if cur[1] ~= ARGV[1] then return -1 end
local seq = tonumber(cur[4])
for i = 9, #ARGV do
  seq = seq + 1
  redis.call('XADD', KEYS[2], '0-' .. seq, 'e', ARGV[i])
end
redis.call('HSET', KEYS[1], 'version', tonumber(cur[1]) + 1, 'seq', seq)
if ARGV[8] ~= '' then
  for field, amount in pairs(cjson.decode(ARGV[8])) do
    redis.call('HINCRBY', KEYS[5], field, amount)
  end
end
if ARGV[3] == '' then return seq end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'status', ARGV[4], 'attempts', ARGV[5])
if ARGV[4] ~= 'queued' then redis.call('SREM', KEYS[3], ARGV[7]) end
if ARGV[6] ~= '' and cur[2] ~= ARGV[4] then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('DEL', KEYS[6], KEYS[7])
  redis.call('HINCRBY', KEYS[4], 'ended:' .. ARGV[4], 1)
end
return seq
"""


#: The idle time of a released job: past every lease.
RELEASED_IDLE_MS = 10**12


@dataclass(frozen=True)
class Lease:
    """A job on loan from a queue: its stream entry (the lease itself) and that entry's fields."""

    entry: str
    fields: Mapping[str, str]
    deliveries: int

    @property
    def submission_id(self) -> str:
        return self.fields["id"]


class JobQueue:
    """A Redis stream read through one consumer group: each entry goes to one consumer.

    The consumer group's pending entry is the lease on a job, ``heartbeat`` renews it, and
    ``reclaim`` takes over a job whose holder stopped renewing it. Executors (submissions) and
    cache builders (builds) each read one.
    """

    def __init__(self, redis: Any, key: str, group: str) -> None:
        self.redis = redis
        self.key = key
        self.group = group

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def take(self, consumer: str, block: float) -> Lease | None:
        """The next new job for ``consumer``, waiting up to ``block`` seconds."""
        reply = await self.redis.xreadgroup(
            self.group, consumer, {self.key: ">"}, count=1, block=max(1, int(block * 1000))
        )
        for _, entries in reply or []:
            for entry_id, fields in entries:
                return Lease(entry_id, fields, 1)
        return None

    async def reclaim(self, consumer: str, lease: float) -> Lease | None:
        """A job whose holder has not heartbeaten for ``lease`` seconds, now ``consumer``'s."""
        _, claimed, deleted = await self.redis.xautoclaim(
            self.key, self.group, consumer, int(lease * 1000), "0-0", count=1
        )
        for entry_id in deleted or []:
            await self.redis.xack(self.key, self.group, entry_id)
        for entry_id, fields in claimed:
            info = await self.redis.xpending_range(self.key, self.group, entry_id, entry_id, 1)
            deliveries = int(info[0]["times_delivered"]) if info else 1
            return Lease(entry_id, fields, deliveries)
        return None

    async def heartbeat(self, consumer: str, job: Lease) -> None:
        """Renew the lease on ``job`` (resets its idle time; keeps the delivery count)."""
        await self.redis.xclaim(self.key, self.group, consumer, 0, [job.entry], justid=True)

    async def release(self, consumer: str, job: Lease) -> None:
        """Give ``job`` back untried: idle past any lease, so that the next ``reclaim`` of any
        consumer takes it at once, and with its delivery count as before it was taken (a
        release is no attempt)."""
        await self.redis.xclaim(
            self.key, self.group, consumer, 0, [job.entry], idle=RELEASED_IDLE_MS,
            retrycount=job.deliveries - 1, justid=True,
        )  # fmt: skip

    async def done(self, job: Lease) -> None:
        """Release ``job`` for good: acknowledged and removed from the stream."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.key, self.group, job.entry)
            pipe.xdel(self.key, job.entry)
            await pipe.execute()


def _event_from_entry(entry_id: str, fields: Mapping[str, str]) -> Event:
    return decode_event(fields["e"], seq=int(entry_id.split("-")[1]))


class Store:
    """Cellblock's state in one Redis. See the module docstring for keys and guarantees."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "cb",
        retention: float = 7 * 24 * 3600,
        queue_size: int = 1000,
    ) -> None:
        # Typed loosely on purpose: redis-py annotates every reply as bytes-or-str, and this
        # client decodes (decode_responses=True), so the replies here are str.
        self.redis: Any = redis
        self.p = prefix
        self.retention = max(1, int(retention))
        self.queue_size = queue_size
        self._submit = redis.register_script(_SUBMIT)
        self._append = redis.register_script(_APPEND)
        self._put_input = redis.register_script(PUT_INPUT)
        self.jobs = JobQueue(redis, f"{prefix}:jobs", JOBS_GROUP)
        #: Replicas an admission waits for (``connect`` sets it for a Sentinel URL).
        self.replicas = 0
        self._reached: connection.Reached | None = None

    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> Store:
        """The store at ``url`` (service/connection.py says which URLs)."""
        reached = connection.connect(url)
        store = cls(reached.redis, **kwargs)
        store.replicas, store._reached = reached.replicas, reached
        return store

    async def close(self) -> None:
        if self._reached is not None:
            await self._reached.close()
        else:
            await self.redis.aclose()

    def inputs(self, sid: str) -> StageInputs:
        """The queued input of the submission's interactive run stage."""
        return StageInputs(self.redis, self._put_input, self.p, sid, self.retention)

    def _sub(self, sid: str) -> str:
        return f"{self.p}:sub:{sid}"

    def _events(self, sid: str) -> str:
        return f"{self.p}:events:{sid}"

    @property
    def jobs_key(self) -> str:
        return self.jobs.key

    # -- submissions ---------------------------------------------------------------------------

    async def submit(self, sid: str, submission: Submission, owner: str) -> SubmissionState:
        """Store and queue a submission, all or nothing; ``QueueAtCapacity`` when it is full."""
        state = SubmissionState.new(sid, submission.request)
        recorder = EventRecorder(state)
        first = recorder.record(StatusEvent(status="queued"))
        created = time.time()
        ok = await self._submit(
            keys=[self._sub(sid), self._events(sid), f"{self.p}:queued", self.jobs_key,
                  f"{self.p}:owner:{owner}", f"{self.p}:counters"],
            args=[sid, json.dumps(submission.as_json()), owner,
                  json.dumps(recorder.state.as_record()), created, self.queue_size,
                  encode_event(first, numbered=False), self.retention],
        )  # fmt: skip
        if not ok:
            raise QueueAtCapacity(
                f"the queue is full ({self.queue_size} submissions wait); retry later"
            )
        if self.replicas:
            await self._replicate(sid)
        return recorder.state

    async def _replicate(self, sid: str) -> None:
        """Wait until a replica holds the submission: a failover must not lose it with the
        master. Only while one is attached, in sync or still syncing (which ``ROLE`` would
        leave out): after a failover the replica left is the master, and a wait for none would
        hold every admission for the whole ``REPLICA_WAIT_MS``, to accept it all the same."""
        attached = int((await self.redis.info("replication")).get("connected_slaves", 0))
        copies = 0
        if attached >= self.replicas:
            copies = await self.redis.wait(self.replicas, connection.REPLICA_WAIT_MS)
        if copies < self.replicas:
            log.warning("submission not replicated", extra={"submission": sid,
                                                           "replicas": copies})  # fmt: skip

    async def state(self, sid: str) -> SubmissionState | None:
        raw = await self.redis.hget(self._sub(sid), "state")
        return None if raw is None else SubmissionState.from_record(json.loads(raw))

    async def open_job(self, sid: str) -> tuple[EventLog, Submission] | None:
        """The submission's job, and an event log that knows its current state, in one round
        trip: what an executor reads before it starts a job. ``None`` if it is gone."""
        fields = ["state", "job", "version", "seq"]
        state, job, version, seq = await self.redis.hmget(self._sub(sid), fields)
        if state is None or job is None:
            return None
        known = (SubmissionState.from_record(json.loads(state)), version, int(seq))
        return EventLog(self, sid, known), Submission.from_json(json.loads(job))

    async def owner(self, sid: str) -> str | None:
        owner: str | None = await self.redis.hget(self._sub(sid), "owner")
        return owner

    async def job(self, sid: str) -> Submission | None:
        raw = await self.redis.hget(self._sub(sid), "job")
        return None if raw is None else Submission.from_json(json.loads(raw))

    async def recent(self, owner: str | None, limit: int) -> list[SubmissionState]:
        """The newest submissions of ``owner`` (every owner's when ``None``), newest first."""
        if owner is None:
            keys = [k async for k in self.redis.scan_iter(f"{self.p}:owner:*")]
        else:
            keys = [f"{self.p}:owner:{owner}"]
        horizon = time.time() - self.retention
        ids: list[tuple[str, float]] = []
        for key in keys:
            await self.redis.zremrangebyscore(key, "-inf", horizon)
            ids += await self.redis.zrevrange(key, 0, limit - 1, withscores=True)
        ids.sort(key=lambda pair: pair[1], reverse=True)
        states = []
        for sid, _ in ids[:limit]:
            if (state := await self.state(sid)) is not None:
                states.append(state)
        return states

    async def status(self, sid: str) -> str | None:
        """Just the status: cheap enough to poll while a submission runs."""
        status: str | None = await self.redis.hget(self._sub(sid), "status")
        return status

    async def cancel(self, sid: str) -> SubmissionState:
        """Cancel a queued or running submission (an executor running it notices and stops).
        ``Rejected`` when it has ended already."""
        await EventLog(self, sid).append([StatusEvent(status="cancelled"), FinishedEvent()])
        state = await self.state(sid)
        assert state is not None
        return state

    async def queued(self) -> int:
        count: int = await self.redis.scard(f"{self.p}:queued")
        return count

    # -- events --------------------------------------------------------------------------------

    async def append(self, sid: str, body: Event, attempt: int | None = None) -> Event:
        """Append one event, applying it to the state. ``attempt``: the writer's attempt number,
        checked so that a reclaimed executor's late events are refused with ``Rejected``."""
        [event] = await EventLog(self, sid).append([body], attempt)
        return event

    @staticmethod
    def _check(sid: str, seq: int) -> int:
        if seq == -3:
            raise Rejected(f"submission {sid} belongs to a newer attempt")
        if seq == -4:
            raise UnknownSubmission(f"no submission {sid}")
        return seq

    async def events(self, sid: str, since: int = 0, block: float | None = None) -> list[Event]:
        """Events after ``since``; with ``block`` seconds, wait that long for one to come."""
        # A stream id's sequence is 64 bits and an exclusive range needs one above it; Redis
        # refuses anything larger. No submission has that many events, so after the bound
        # means what any larger ``since`` means: after all of them.
        since = min(since, MAX_SINCE)
        if block is None:
            entries = await self.redis.xrange(self._events(sid), f"(0-{since}", "+")
            return [_event_from_entry(i, f) for i, f in entries]
        reply = await self.redis.xread(
            {self._events(sid): f"0-{since}"}, block=max(1, int(block * 1000))
        )
        return [_event_from_entry(i, f) for _, entries in reply for i, f in entries]

    # -- workers -------------------------------------------------------------------------------

    async def register_worker(self, info: Mapping[str, Any], ttl: float) -> None:
        await self.redis.set(
            f"{self.p}:worker:{info['id']}", json.dumps(dict(info)), px=int(ttl * 1000)
        )

    async def unregister_worker(self, worker_id: str) -> None:
        await self.redis.delete(f"{self.p}:worker:{worker_id}", f"{self.p}:drain:{worker_id}")

    async def workers(self) -> list[dict[str, Any]]:
        found = []
        async for key in self.redis.scan_iter(f"{self.p}:worker:*"):
            raw = await self.redis.get(key)
            if raw is not None:
                found.append(json.loads(raw))
        return sorted(found, key=lambda w: (w["kind"], w["id"]))

    async def request_drain(self, worker_id: str) -> bool:
        """Ask a worker to finish what it runs and stop; False when no such worker lives."""
        if not await self.redis.exists(f"{self.p}:worker:{worker_id}"):
            return False
        await self.redis.set(f"{self.p}:drain:{worker_id}", "1", ex=3600)
        return True

    async def drain_requested(self, worker_id: str) -> bool:
        return bool(await self.redis.exists(f"{self.p}:drain:{worker_id}"))

    async def counters(self) -> dict[str, int]:
        """Totals since the store was made: ``submitted`` and ``ended:<status>``."""
        raw = await self.redis.hgetall(f"{self.p}:counters")
        return {k: int(v) for k, v in raw.items()}

    async def supervise(self, ttl: float) -> None:
        """Say that a `cellblock up` supervisor acts on scale requests (for ``ttl`` seconds)."""
        await self.redis.set(f"{self.p}:supervisor", "1", px=int(ttl * 1000))

    async def supervised(self) -> bool:
        return bool(await self.redis.exists(f"{self.p}:supervisor"))

    async def set_scale(self, counts: Mapping[str, int]) -> None:
        await self.redis.hset(f"{self.p}:scale", mapping={k: str(v) for k, v in counts.items()})

    async def scale(self) -> dict[str, int]:
        raw = await self.redis.hgetall(f"{self.p}:scale")
        return {k: int(v) for k, v in raw.items()}


class EventLog:
    """One writer's appends to one submission's events, each batch in one round trip.

    It remembers the state, version and seq it last wrote, so it reads them again only when
    another writer (a cancel, a newer attempt) changed the submission meanwhile. A batch is
    applied whole or not at all. Not for concurrent use: one writer, one log.
    """

    def __init__(
        self, store: Store, sid: str, known: tuple[SubmissionState, str, int] | None = None
    ) -> None:
        self.store, self.sid = store, sid
        self._known = known  # state, version and seq, as this log last saw them

    @property
    def state(self) -> SubmissionState | None:
        """The state as this log last wrote or read it (``None`` before it did either)."""
        return None if self._known is None else self._known[0]

    async def append(self, bodies: Sequence[Event], attempt: int | None = None) -> list[Event]:
        """Append ``bodies`` in order as events (``attempt`` as in ``Store.append``)."""
        store, sid = self.store, self.sid
        expected = "" if attempt is None else str(attempt)
        while True:
            fresh = self._known is None
            state, version, seq = self._known or await self._read()
            recorder = EventRecorder(state, seq)
            try:
                events = [recorder.record(body) for body in bodies]
            except ValueError as exc:  # InvalidTransition
                self._known = None
                if fresh:
                    raise Rejected(str(exc)) from None
                continue  # perhaps only against what this log remembered: read it again
            new = recorder.state
            # An event that changes nothing (output, a test's start) leaves the very same state:
            # the document is then not rewritten.
            changed = new is not state
            last = await store._append(
                keys=[store._sub(sid), store._events(sid), f"{store.p}:queued",
                      f"{store.p}:counters", metrics.key(store), *store.inputs(sid).keys],
                args=[version, expected, json.dumps(new.as_record()) if changed else "",
                      new.status, new.attempts,
                      store.retention if new.status in TERMINAL else "", sid,
                      metrics.event_increments(state, events),
                      *(encode_event(e, numbered=False) for e in events)],
            )  # fmt: skip
            self._known = None
            if last == -1:  # another writer came first
                continue
            store._check(sid, last)
            self._known = (new, str(int(version) + 1), last)
            return events

    async def _read(self) -> tuple[SubmissionState, str, int]:
        fields = await self.store.redis.hmget(
            self.store._sub(self.sid), ["state", "version", "seq"]
        )
        if fields[0] is None:
            raise UnknownSubmission(f"no submission {self.sid}")
        return SubmissionState.from_record(json.loads(fields[0])), fields[1], int(fields[2])
