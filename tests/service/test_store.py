"""The Redis store against a real redis-server: admission, events, leases, fencing, workers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from upio import free_port

from cellblock import config as config_module
from cellblock.service import connection
from cellblock.service.protocol import Submission, decode_event, parse_submission
from cellblock.service.store import EventLog, QueueAtCapacity, Rejected, Store, UnknownSubmission


async def append_json(
    store: Store, sid: str, body: dict[str, Any], attempt: int | None = None
) -> Any:
    """``Store.append`` fed and read as JSON, as events travel."""
    return (await store.append(sid, decode_event(body), attempt)).wire()


async def events_json(store: Store, sid: str, since: int = 0, block: float | None = None) -> Any:
    return [event.wire() for event in await store.events(sid, since, block)]


async def log_append_json(
    log: EventLog, bodies: list[dict[str, Any]], attempt: int | None = None
) -> Any:
    return [event.wire() for event in await log.append([decode_event(b) for b in bodies], attempt)]


def submission(**request: object) -> Submission:
    policy = config_module.load(Path("/nonexistent"), environ={}).limits
    return parse_submission({"run": "echo hi", **request}, policy)


async def test_submit_stores_queues_and_emits_the_first_event(store: Store) -> None:
    state = await store.submit("s1", submission(compile="true"), owner="alice")
    assert (state.status, state.compiled, state.dependencies_installed) == ("queued", None, True)
    assert (await store.state("s1")) == state
    assert await store.owner("s1") == "alice"
    assert (await store.job("s1")) == submission(compile="true")
    events = await events_json(store, "s1")
    assert [(e["seq"], e["type"], e["status"]) for e in events] == [(1, "status", "queued")]
    assert await store.queued() == 1


async def test_a_full_queue_refuses_and_stores_nothing(store: Store) -> None:
    store.queue_size = 5
    for i in range(5):
        await store.submit(f"s{i}", submission(), owner="a")
    with pytest.raises(QueueAtCapacity, match="queue is full"):
        await store.submit("s5", submission(), owner="a")
    assert await store.state("s5") is None
    assert await events_json(store, "s5") == []
    assert await store.redis.xlen(store.jobs_key) == 5


async def test_events_are_numbered_without_gaps_and_replay_from_since(store: Store) -> None:
    await store.submit("s1", submission(), owner="a")
    await append_json(store, "s1", {"type": "status", "status": "running", "worker": "w"})
    await append_json(store, "s1", {"type": "stage_started", "stage": "run"})
    for i in range(3):
        await append_json(
            store, "s1", {"type": "output", "stage": "run", "stream": "stdout", "data": f"{i}"}
        )
    await append_json(store, "s1", {"type": "finished"})
    events = await events_json(store, "s1")
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6, 7]
    assert [e["seq"] for e in await events_json(store, "s1", since=4)] == [5, 6, 7]
    assert events[-1]["submission"]["status"] == "finished"
    state = await store.state("s1")
    assert state is not None and state.status == "finished" and state.picked_up
    assert await store.queued() == 0
    assert 0 < await store.redis.ttl("cb:sub:s1") <= 3600  # retention starts when it ends
    assert 0 < await store.redis.ttl("cb:events:s1") <= 3600


async def test_a_blocking_read_wakes_on_the_next_event(store: Store) -> None:
    await store.submit("s1", submission(), owner="a")
    waiter = asyncio.create_task(events_json(store, "s1", since=1, block=5))
    await asyncio.sleep(0.1)
    await append_json(store, "s1", {"type": "status", "status": "running", "worker": "w"})
    events = await asyncio.wait_for(waiter, 2)
    assert [e["seq"] for e in events] == [2]
    assert await events_json(store, "s1", since=2, block=0.05) == []


async def test_a_stale_attempt_is_fenced_off(store: Store) -> None:
    await store.submit("s1", submission(), owner="a")
    await append_json(store, "s1", {"type": "status", "status": "running", "worker": "old"})
    await append_json(
        store, "s1", {"type": "status", "status": "running", "worker": "new"}
    )  # reclaim
    with pytest.raises(Rejected, match="newer attempt"):
        await append_json(store, "s1", {"type": "stage_started", "stage": "run"}, attempt=1)
    with pytest.raises(Rejected, match="newer attempt"):
        await append_json(
            store,
            "s1",
            {"type": "output", "stage": "run", "stream": "stdout", "data": "x"},
            attempt=1,
        )
    await append_json(store, "s1", {"type": "stage_started", "stage": "run"}, attempt=2)
    state = await store.state("s1")
    assert state is not None and (state.worker, state.attempts, state.stage) == ("new", 2, "run")


async def test_the_final_result_is_written_once(store: Store) -> None:
    await store.submit("s1", submission(), owner="a")
    await append_json(store, "s1", {"type": "status", "status": "running", "worker": "w"})
    results = await asyncio.gather(
        *(append_json(store, "s1", {"type": "finished"}) for _ in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, Rejected) for r in results if isinstance(r, BaseException))
    assert [e["type"] for e in await events_json(store, "s1")].count("finished") == 1


async def test_cancel_ends_a_queued_submission_and_refuses_later_events(store: Store) -> None:
    await store.submit("s1", submission(), owner="a")
    state = await store.cancel("s1")
    assert state.status == "cancelled" and state.finished_at
    assert [e["type"] for e in await events_json(store, "s1")] == ["status", "status", "finished"]
    assert await store.queued() == 0
    with pytest.raises(Rejected, match="cancelled"):
        await store.cancel("s1")
    with pytest.raises(Rejected, match="is cancelled; it takes no output"):
        await append_json(
            store, "s1", {"type": "output", "stage": "run", "stream": "stdout", "data": "x"}
        )


OUTPUT = {"type": "output", "stage": "run", "stream": "stdout", "data": "x"}


async def test_an_event_log_writes_a_batch_at_once_and_notices_other_writers(
    store: Store,
) -> None:
    await store.submit("s1", submission(), owner="a")
    log = EventLog(store, "s1")
    await log_append_json(log, [{"type": "status", "status": "running", "worker": "w"}])
    calls: list[object] = []
    real = store.redis.execute_command

    async def counted(*args: object, **kwargs: object) -> object:
        calls.append(args[0])
        return await real(*args, **kwargs)

    store.redis.execute_command = counted
    batch = [{"type": "stage_started", "stage": "run"}, OUTPUT, OUTPUT]
    assert [e["seq"] for e in await log_append_json(log, batch, attempt=1)] == [3, 4, 5]
    assert len(calls) == 1  # one script call: the log knew the state it had written
    before = await store.redis.hget("cb:sub:s1", "state")
    assert [e["seq"] for e in await log_append_json(log, [OUTPUT], attempt=1)] == [6]
    assert await store.redis.hget("cb:sub:s1", "state") == before  # output changes no state
    await append_json(store, "s1", OUTPUT)  # another writer: this log's version is stale now
    assert [e["seq"] for e in await log_append_json(log, [OUTPUT], attempt=1)] == [8]
    with pytest.raises(Rejected, match="newer attempt"):
        await log_append_json(EventLog(store, "s1"), [OUTPUT], attempt=2)
    await store.cancel("s1")
    finished = {"type": "stage_finished", "stage": "run", "result": {"status": "ok"}}
    with pytest.raises(Rejected, match="cancelled"):
        await log_append_json(log, [OUTPUT, finished], attempt=1)
    seqs = [e["seq"] for e in await events_json(store, "s1")]
    assert seqs == list(range(1, 11))  # nothing of the refused batches went in


async def test_unknown_submissions(store: Store) -> None:
    assert await store.state("nope") is None
    with pytest.raises(UnknownSubmission):
        await append_json(store, "nope", {"type": "finished"})
    with pytest.raises(UnknownSubmission):
        await append_json(
            store, "nope", {"type": "output", "stage": "run", "stream": "stdout", "data": ""}
        )


async def test_jobs_go_to_one_consumer_and_a_silent_one_loses_its_lease(store: Store) -> None:
    await store.submit("s1", submission(), owner="a")
    job = await store.jobs.take("exec-a", block=1)
    assert job is not None and job.submission_id == "s1" and job.deliveries == 1
    assert await store.jobs.take("exec-b", block=0.05) is None
    assert await store.jobs.reclaim("exec-b", lease=0.5) is None  # exec-a holds a fresh lease
    await asyncio.sleep(0.3)
    await store.jobs.heartbeat("exec-a", job)
    await asyncio.sleep(0.3)
    assert await store.jobs.reclaim("exec-b", lease=0.5) is None  # the heartbeat renewed it
    await asyncio.sleep(0.6)
    taken = await store.jobs.reclaim("exec-b", lease=0.5)
    assert taken is not None and taken.submission_id == "s1" and taken.deliveries == 2
    await store.jobs.done(taken)
    assert await store.jobs.reclaim("exec-c", lease=0) is None
    assert await store.redis.xlen(store.jobs_key) == 0


async def test_a_released_job_goes_at_once_to_the_next_reclaim_as_untried(
    store: Store,
) -> None:
    """What a draining slot does with a job it took after the drain began."""
    await store.submit("s1", submission(), owner="a")
    job = await store.jobs.take("exec-a", block=1)
    assert job is not None
    await store.jobs.release("exec-a", job)
    taken = await store.jobs.reclaim("exec-b", lease=3600)  # however long the lease
    assert taken is not None and taken.submission_id == "s1" and taken.deliveries == 1
    assert await store.jobs.reclaim("exec-c", lease=3600) is None  # exec-b's now


async def test_recent_lists_an_owners_submissions_newest_first(store: Store) -> None:
    for i in range(3):
        await store.submit(f"a{i}", submission(), owner="alice")
    await store.submit("b0", submission(), owner="bob")
    assert [s.id for s in await store.recent("alice", 10)] == ["a2", "a1", "a0"]
    assert [s.id for s in await store.recent("alice", 2)] == ["a2", "a1"]
    assert {s.id for s in await store.recent(None, 10)} == {"a0", "a1", "a2", "b0"}


async def test_worker_registry_drain_and_scale(store: Store) -> None:
    await store.register_worker({"id": "w1", "kind": "executor"}, ttl=0.3)
    await store.register_worker({"id": "b1", "kind": "builder"}, ttl=10)
    assert [w["id"] for w in await store.workers()] == ["b1", "w1"]
    assert await store.request_drain("w1") and await store.drain_requested("w1")
    assert not await store.request_drain("ghost")
    await asyncio.sleep(0.4)
    assert [w["id"] for w in await store.workers()] == ["b1"]  # w1 stopped refreshing
    await store.unregister_worker("b1")
    assert await store.workers() == []
    await store.set_scale({"executors": 3, "builders": 1})
    assert await store.scale() == {"executors": 3, "builders": 1}


async def test_admission_waits_for_a_replica_in_full_only_while_one_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no replica attached (after a failover the replica is the master) an admission does
    not wait; with one, it waits until the replica has the submission."""
    monkeypatch.setattr(connection, "REPLICA_WAIT_MS", 1000)
    master, replica = free_port(), free_port()
    procs = {}

    def start(port: int, *more: str) -> None:
        (tmp_path / str(port)).mkdir(exist_ok=True)
        procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(tmp_path / str(port)), *more], stdout=subprocess.DEVNULL,
        )  # fmt: skip

    async def admission(sid: str) -> float:
        start = time.monotonic()
        await store.submit(sid, submission(), owner="alice")
        return time.monotonic() - start

    async def replicated() -> None:
        while (await store.redis.info("replication")).get("connected_slaves") != 1:
            await asyncio.sleep(0.05)

    start(master)
    store = Store.connect(f"redis://127.0.0.1:{master}", retention=3600, queue_size=50)
    store.replicas = 1
    try:
        while True:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                await store.redis.ping()
                break
            await asyncio.sleep(0.02)
        assert await admission("alone") < 0.5
        start(replica, "--replicaof", "127.0.0.1", str(master))
        await asyncio.wait_for(replicated(), 20)
        assert await store.redis.wait(1, 10000) == 1  # in sync
        assert await admission("replicated") < 0.5
        async with redis.asyncio.Redis(port=replica) as copy:
            assert await copy.keys("*replicated*")  # accepted, and the replica has it
        procs[replica].send_signal(signal.SIGSTOP)  # attached, and answering nothing
        try:
            assert await admission("stalled") >= 1.0
        finally:
            procs[replica].send_signal(signal.SIGCONT)
    finally:
        await store.close()
        for proc in procs.values():
            proc.kill()
            proc.wait()
