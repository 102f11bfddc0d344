"""The executor process: N slots, each taking jobs from the queue and running them.

A slot takes a new job, or reclaims one whose executor stopped heartbeating for a lease. While
it runs a job it renews the lease, and polls the submission's status, so a cancellation stops
the running stage within a fraction of a second. Events go to Redis in order through one
publisher per job; an event the store refuses (the submission was cancelled, or the job was
reclaimed by a newer attempt) stops the job.

When the store is unreachable, each slot backs off and tries again (cellblock/outage.py);
the executor never exits of it.

Drain (SIGTERM, SIGINT, or ``DELETE /api/v1/workers/{id}``): no slot takes new work, running jobs
finish and are published, the worker unregisters and ``run`` returns. Cancelling ``run`` instead
stops at once; unfinished jobs are then reclaimed by another executor after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import EnvironmentCache
from cellblock.errors import CellblockError
from cellblock.executor.deps import NixDependencies
from cellblock.executor.host import SandboxHost
from cellblock.executor.runner import DependencyProvider, SubmissionRunner
from cellblock.outage import STORE_DOWN, Outage
from cellblock.presence import Presence, WorkerInfo
from cellblock.service.protocol import (
    Event,
    FinishedEvent,
    OutputEvent,
    StatusEvent,
    Submission,
    TestFinishedEvent,
    TestStartedEvent,
)
from cellblock.service.store import EventLog, Lease, Rejected, Store

log = logging.getLogger("cellblock.executor")
#: Seconds between polls of a running submission's status (cancellation latency).
STATUS_POLL = 0.2
#: Seconds a slot waits on the queue before looking again (drain latency).
TAKE_BLOCK = 1.0
#: Seconds between a slot's looks for jobs to reclaim (a dead executor's, after their lease).
RECLAIM_EVERY = 1.0
#: Seconds live output may wait for more events before it is published.
OUTPUT_LINGER = 0.01


class Executor:
    def __init__(
        self,
        store: Store,
        host: SandboxHost,
        *,
        worker_id: str,
        slots: int,
        uid_offset: int = 0,
        dependencies: DependencyProvider | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.config = host.config
        self.presence = Presence(
            store, WorkerInfo(id=worker_id, kind="executor", slots=slots), self.config.lease_timeout
        )
        self.info = self.presence.info
        if dependencies is None:
            cache = EnvironmentCache(store)
            netrc = None
            if self.config.substituter and self.config.substituter_token:
                netrc = nix.write_netrc(
                    self.config.state_dir / "substituter.netrc",
                    self.config.substituter, self.config.substituter_token,
                )  # fmt: skip
            dependencies = NixDependencies(
                cache, self.config.substituter, netrc, self.config.state_dir / "nix-cache"
            )
        self.runners = [
            SubmissionRunner(host.sandbox(uid_offset + slot), dependencies) for slot in range(slots)
        ]
        stale = host.cgroups.remove_stale([runner.sandbox.uid for runner in self.runners])
        if stale:
            log.info("stale cgroups removed", extra={"worker": worker_id, "count": stale})

    async def run(self) -> None:
        """Work until drained. See the module docstring for cancellation."""
        outage = Outage(self.info.id, "start")
        while True:
            try:
                await self.store.jobs.ensure_group()
                await self.presence.register()
                break
            except STORE_DOWN as exc:
                await outage.wait(exc)
        outage.over()
        log.info("executor started", extra={"worker": self.info.id, "slots": self.info.slots})
        presence = asyncio.create_task(self.presence.keep())
        try:
            await asyncio.gather(*(self._slot(runner) for runner in self.runners))
        finally:
            presence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await presence
            log.info("executor stopped", extra={"worker": self.info.id})

    async def _slot(self, runner: SubmissionRunner) -> None:
        consumer = self.info.id
        next_reclaim = 0.0
        outage = Outage(consumer, "slot")
        try:
            while not self.presence.draining.is_set():
                self._prepare(runner)
                try:
                    job = None
                    if time.monotonic() >= next_reclaim:
                        next_reclaim = time.monotonic() + RECLAIM_EVERY
                        job = await self.store.jobs.reclaim(consumer, self.config.lease_timeout)
                    if job is None:
                        job = await self.store.jobs.take(consumer, block=TAKE_BLOCK)
                    outage.over()
                    if job is None:
                        continue
                    if self.presence.draining.is_set():
                        # The drain began while this slot waited on the queue: the job goes
                        # back, for another executor's next look, rather than run here.
                        await self.store.jobs.release(consumer, job)
                        continue
                    self.info.busy += 1
                    try:
                        await self._process(job, runner)
                    finally:
                        self.info.busy -= 1
                except STORE_DOWN as exc:
                    # A job this slot held is reclaimed after its lease (see outage.py).
                    await outage.wait(exc)
        finally:
            await runner.aclose()

    def _prepare(self, runner: SubmissionRunner) -> None:
        """Get the slot's next jail started while it waits; a job finds it ready."""
        try:
            runner.prepare()
        except (OSError, CellblockError) as exc:  # the job then starts its own, and says why
            log.warning("slot not prepared", extra={"worker": self.info.id, "error": str(exc)})

    async def _process(self, job: Lease, runner: SubmissionRunner) -> None:
        sid = job.submission_id
        fields = {"submission": sid, "worker": self.info.id}
        opened = await self.store.open_job(sid)
        state = opened[0].state if opened else None
        if opened is None or state is None or state.done:
            log.info("job skipped", extra={**fields, "status": state and state.status})
            await self.store.jobs.done(job)
            return
        events, submission = opened
        if job.deliveries > self.config.max_attempts:
            message = (
                f"gave up after {job.deliveries - 1} attempts: the executors running it stopped"
            )
            log.warning("job abandoned", extra={**fields, "attempts": job.deliveries - 1})
            with contextlib.suppress(Rejected):
                await events.append([StatusEvent(status="error", error=message), FinishedEvent()])
            await self.store.jobs.done(job)
            return
        if job.deliveries > 1 and submission.request.stdin_mode == "interactive":
            # A person was typing to the program that stopped: run afresh, it would take what
            # they type next as the answers to its first questions.
            message = (
                "the executor running this interactive program stopped; a conversation cannot "
                "be resumed: submit it again"
            )
            log.warning("interactive job not retried", extra=fields)
            with contextlib.suppress(Rejected):
                await events.append([StatusEvent(status="error", error=message), FinishedEvent()])
            await self.store.jobs.done(job)
            return
        try:
            await events.append([StatusEvent(status="running", worker=self.info.id)])
        except Rejected:
            await self.store.jobs.done(job)
            return
        attempt = state.attempts + 1
        log.info("job started", extra={**fields, "attempt": attempt})
        outcome = await self._run_job(job, runner, events, submission, attempt)
        log.info("job ended", extra={**fields, "attempt": attempt, "outcome": outcome})
        await self.store.jobs.done(job)

    async def _run_job(
        self,
        job: Lease,
        runner: SubmissionRunner,
        events: EventLog,
        submission: Submission,
        attempt: int,
    ) -> str:
        sid = events.sid
        pending: asyncio.Queue[Event | None] = asyncio.Queue()
        interactive = submission.request.stdin_mode == "interactive"
        inputs = self.store.inputs(sid) if interactive else None
        work = asyncio.create_task(runner.run(submission, pending.put_nowait, inputs))
        # A person waits on each output of an interactive stage: none lingers for more.
        linger = 0.0 if interactive else OUTPUT_LINGER
        publisher = asyncio.create_task(self._publish(events, attempt, pending, linger))
        watcher = asyncio.create_task(self._watch(job, sid, work))
        outcome = "finished"
        try:
            try:
                await work
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise  # the executor itself is being stopped
                outcome = "cancelled"
            except CellblockError as exc:
                outcome = "error"
                pending.put_nowait(StatusEvent(status="error", error=exc.message))
            except Exception as exc:
                log.exception("job crashed", extra={"submission": sid})
                outcome = "error"
                error = f"the executor failed: {exc!r}"
                pending.put_nowait(StatusEvent(status="error", error=error))
            # Before the watcher is stopped (which takes the loop a turn or two), so that the
            # publisher, which yields once before it takes a batch, sends it with the last
            # events of the stage.
            if outcome != "cancelled":
                pending.put_nowait(FinishedEvent())
            pending.put_nowait(None)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if not await publisher:
            outcome = "rejected"
        return outcome

    async def _publish(
        self,
        events: EventLog,
        attempt: int,
        pending: asyncio.Queue[Event | None],
        linger: float,
    ) -> bool:
        """Publish events in order until the end marker, in batches (see ``next_batch``);
        False if the store refused one."""
        accepted, ended = True, False
        while not ended:
            batch, ended = await next_batch(pending, linger)
            if not accepted or not batch:
                continue
            try:
                await events.append(batch, attempt)
            except Rejected as exc:
                log.info("events refused", extra={"submission": events.sid, "reason": exc.message})
                accepted = False
        return accepted

    async def _watch(self, job: Lease, sid: str, work: asyncio.Task[None]) -> None:
        """Renew the lease and stop the job when its submission is cancelled."""
        renew_every = max(0.2, self.config.lease_timeout / 3)
        since_renewal = 0.0
        while not work.done():
            await asyncio.sleep(STATUS_POLL)
            since_renewal += STATUS_POLL
            try:
                if since_renewal >= renew_every:
                    await self.store.jobs.heartbeat(self.info.id, job)
                    since_renewal = 0.0
                status = await self.store.status(sid)
            except STORE_DOWN:
                # The next poll may reach it; away past the lease, the job is another
                # attempt's, and this one's events are refused.
                continue
            if status in ("cancelled", "error", None):
                log.info("job cancelled", extra={"submission": sid})
                work.cancel()
                return


#: Events after which a batch waits a moment for more (see ``next_batch``).
LINGERING = (OutputEvent, TestStartedEvent, TestFinishedEvent)


async def next_batch(
    pending: asyncio.Queue[Event | None], linger: float = OUTPUT_LINGER
) -> tuple[list[Event], bool]:
    """The next events to publish together, and whether the end marker (``None``) came.

    Whatever has queued up goes together, and so does what the same turn of the event loop
    adds (a stage's end and the job's ``finished``). Live output and a test's start and end
    wait up to ``linger`` seconds (``OUTPUT_LINGER``) for what follows: a short stage's output
    then goes in one round trip with its end, a chatty program's lines go a batch at a time,
    and short tests a few at a time (each batch rewrites the stored document, which holds
    every test's result).
    """
    loop = asyncio.get_running_loop()
    linger_until = loop.time() + linger
    batch: list[Event] = []
    body = await pending.get()
    while body is not None:
        batch.append(body)
        if pending.empty():
            await asyncio.sleep(0)
        if pending.empty() and linger > 0 and isinstance(body, LINGERING):
            try:
                body = await asyncio.wait_for(pending.get(), linger_until - loop.time())
            except TimeoutError:
                break
            continue
        if pending.empty():
            break
        body = pending.get_nowait()
    return batch, body is None
