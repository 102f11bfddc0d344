"""What a client does with submissions (accept, look up, cancel, wait for, follow), once, for
the REST handlers (service/api.py) and the WebSocket (service/websocket.py) alike.

Everything goes through the store, so any number of service processes may serve the same
submissions. Errors are ``ErrorResponse`` (the protocol's code, with its HTTP status) and the
protocol's ``InvalidRequest``; each handler answers them in its own way.

Cancellation: cancelling ``wait`` or a ``follow`` iterator only stops reading; the submission
goes on. Only ``cancel`` stops a submission.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

from cellblock.errors import ErrorCode, ErrorResponse
from cellblock.service.auth import Principal
from cellblock.service.protocol import (
    Event,
    FinishedEvent,
    LimitPolicy,
    Submission,
    SubmissionState,
    parse_submission,
)
from cellblock.service.protocol.interactive import Input, Resize, SignalInput, StdinData
from cellblock.service.store import QueueAtCapacity, Rejected, Store

log = logging.getLogger("cellblock.service")
#: Seconds a client is asked to wait before retrying when the queue is full.
RETRY_AFTER = 5
#: Seconds one blocking read of a submission's events waits before a quiet stream sends a
#: keep-alive and checks that the submission still exists.
EVENTS_BLOCK = 4.0
#: Seconds to wait for more events of a submission that has ended: its closing events are
#: appended back to back, so any still to come arrive at once.
ENDED_GRACE = 1.0


def new_submission_id() -> str:
    """144 random bits, URL-safe: unguessable, so ids cannot be probed."""
    return secrets.token_urlsafe(18)


class Submissions:
    """The submissions of one store, as the service's clients see them. Safe for concurrent
    use by any number of handlers."""

    def __init__(self, store: Store, policy: LimitPolicy) -> None:
        self.store = store
        self.policy = policy

    def parse(self, raw: object) -> Submission:
        """A request body (decoded JSON) as a submission; ``InvalidRequest`` names each bad
        field."""
        return parse_submission(raw, self.policy)

    async def accept(self, submission: Submission, owner: Principal) -> SubmissionState:
        """Store and queue ``submission``; 429 when the queue is full (nothing was stored)."""
        sid = new_submission_id()
        try:
            state = await self.store.submit(sid, submission, owner.name)
        except QueueAtCapacity as exc:
            raise ErrorResponse(
                429, ErrorCode.QUEUE_FULL, exc.message, headers={"Retry-After": str(RETRY_AFTER)}
            ) from None
        log.info("submission accepted", extra={"submission": sid, "owner": owner.name})
        return state

    async def visible(self, sid: str, principal: Principal) -> SubmissionState:
        """The submission, if ``principal`` may see it; else 404, exactly as for an unknown id
        (ids cannot be probed)."""
        owner, state = await asyncio.gather(self.store.owner(sid), self.store.state(sid))
        if state is None or (owner != principal.name and not principal.is_admin):
            raise ErrorResponse(404, ErrorCode.NOT_FOUND, f"no submission {sid}")
        return state

    async def cancel(self, sid: str, principal: Principal) -> SubmissionState:
        """Cancel a queued or running submission ``principal`` may see; 409 when it has ended."""
        await self.visible(sid, principal)
        try:
            state = await self.store.cancel(sid)
        except Rejected as exc:
            message = f"cannot cancel: {exc.message}"
            raise ErrorResponse(409, ErrorCode.CONFLICT, message) from None
        log.info("submission cancelled", extra={"submission": sid, "by": principal.name})
        return state

    async def send_input(self, sid: str, principal: Principal, item: Input) -> None:
        """Queue input for the interactive run stage of a submission ``principal`` owns (404
        for anyone else, exactly as for an unknown id); 409 if it has no such stage to come,
        413 over a cap. Input sent before the run stage starts waits for it."""
        owner, state = await asyncio.gather(self.store.owner(sid), self.store.state(sid))
        if state is None or owner != principal.name:
            raise ErrorResponse(404, ErrorCode.NOT_FOUND, f"no submission {sid}")
        if not state.interactive:
            message = f"{sid} is not interactive: its stdin was given with it"
            raise ErrorResponse(409, ErrorCode.CONFLICT, message)
        if state.done or state.stages.get("run") is not None:
            message = f"the run stage of {sid} has ended: it takes no more input"
            raise ErrorResponse(409, ErrorCode.CONFLICT, message)
        if isinstance(item, SignalInput | Resize) and state.stage != "run":
            # Else it would wait for a stage that may never come, and hit a program that
            # never saw what it was sent for.
            message = f"{sid} is not running its program yet: a {_kind(item)} goes to a running one"
            raise ErrorResponse(409, ErrorCode.CONFLICT, message)
        if isinstance(item, Resize) and not state.tty:
            message = f"{sid} runs without a terminal: there is nothing to resize"
            raise ErrorResponse(409, ErrorCode.CONFLICT, message)
        caps = self.policy.interactive
        if isinstance(item, StdinData) and len(item.data) > caps.max_message:
            raise ErrorResponse(
                413, ErrorCode.LIMIT_EXCEEDED,
                f"a stdin message holds at most {caps.max_message} bytes, this one "
                f"{len(item.data)}: send it in parts",
            )  # fmt: skip
        await self.store.inputs(sid).put(item, caps.max_stage_input)

    async def wait(self, sid: str, timeout: float) -> SubmissionState | None:
        """Wait for the submission to end, or ``timeout`` seconds; its state then."""
        deadline = time.monotonic() + timeout
        since = 0
        while (remaining := deadline - time.monotonic()) > 0:
            events = await self.store.events(sid, since, block=min(remaining, EVENTS_BLOCK))
            for event in events:
                since = event.seq
                if isinstance(event, FinishedEvent) and event.submission is not None:
                    return SubmissionState.from_record(event.submission)
        return await self.store.state(sid)

    async def follow(self, sid: str, since: int, ended: bool = False) -> AsyncIterator[list[Event]]:
        """Batches of the submission's events after ``since``, up to its ``finished`` event,
        and an empty batch whenever nothing came for a while (time for a keep-alive).

        ``ended``: the submission had ended already. The stream also ends when the submission
        has ended and nothing follows ``since`` (a client resuming after the last event, which
        would otherwise wait for events that never come), and when the submission expires.
        """
        store = self.store
        while True:
            events = await store.events(sid, since, block=ENDED_GRACE if ended else EVENTS_BLOCK)
            if not events:
                if ended:
                    return
                state = await store.state(sid)
                if state is None:  # expired under us
                    return
                ended = state.done
                yield []
                continue
            for i, event in enumerate(events):
                if isinstance(event, FinishedEvent):  # the last event: nothing follows it
                    yield events[: i + 1]
                    return
            yield events
            since = events[-1].seq


def _kind(item: SignalInput | Resize) -> str:
    return "signal" if isinstance(item, SignalInput) else "resize"
