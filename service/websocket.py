"""The WebSocket API: ``submit``, ``watch``, ``status``, ``cancel`` and ``packages``; and
``stdin``, ``signal`` and ``resize`` for a running interactive stage, answered only if refused.

Each ``submit`` or ``watch`` starts a task that relays that submission's events until its
``finished`` event; several can run on one connection. Answers echo the client's ``request_id``.
A malformed message answers an ``error`` message and the connection stays open. Closing the
connection cancels its relay tasks (the submissions themselves go on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import tornado.websocket

from cellblock.cachebuilder.environments import EnvironmentCache
from cellblock.errors import CellblockError, ErrorCode, ErrorResponse, InvalidRequest
from cellblock.outage import STORE_DOWN
from cellblock.service.api import STORE_DOWN_MESSAGE, STORE_RETRY_AFTER, BaseHandler
from cellblock.service.protocol import encode_event
from cellblock.service.protocol.messages import (
    Accepted,
    Answer,
    Cancel,
    Cancelled,
    ClientMessage,
    ErrorAnswer,
    PackagesAnswer,
    StageMessage,
    StatusQuery,
    SubmissionAnswer,
    Submit,
    Watch,
    encode_message,
    parse_client_message,
    request_id_of,
    stage_input,
)

log = logging.getLogger("cellblock.service")


class WebSocketHandler(tornado.websocket.WebSocketHandler, BaseHandler):
    async def get(self, *args: Any, **kwargs: Any) -> None:
        self.authenticate()  # before the upgrade: a bad token answers 401, not a socket
        self._check_upgrade()
        self._relays: set[asyncio.Task[None]] = set()
        await super().get(*args, **kwargs)

    def _check_upgrade(self) -> None:
        """Refuse what Tornado would refuse, but with the protocol's error body: Tornado answers
        a request that is no upgrade with bare text, and an unknown version with no body."""
        headers = self.request.headers
        connection = {part.strip().lower() for part in headers.get("Connection", "").split(",")}
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection:
            message = "this endpoint takes a WebSocket upgrade (Upgrade: websocket)"
            raise ErrorResponse(400, ErrorCode.NOT_WEBSOCKET, message)
        if headers.get("Sec-WebSocket-Version") != "13":
            raise ErrorResponse(
                426,
                ErrorCode.WEBSOCKET_VERSION,
                "the WebSocket version must be 13",
                headers={"Sec-WebSocket-Version": "13"},
            )

    def open(self, *args: Any, **kwargs: Any) -> None:
        # Events are small messages sent one by one: without TCP_NODELAY, Nagle's algorithm
        # holds each behind the client's delayed ACK of the one before (about 40 ms here).
        self.set_nodelay(True)
        self.services.streams.opened(self)

    def check_origin(self, origin: str) -> bool:
        # Tokens, not cookies, authenticate here, so another origin gains nothing a script
        # with the token would not have anyway.
        return True

    def on_close(self) -> None:
        self.services.streams.closed(self)
        for task in self._relays:
            task.cancel()

    async def on_message(self, message: str | bytes) -> None:
        try:
            await self._dispatch(parse_client_message(message))
        except CellblockError as exc:
            # Input errors name their fields; ErrorResponse and the store's errors have none.
            problems = exc.problems if isinstance(exc, InvalidRequest) else None
            details = None if problems is None else [p.as_json() for p in problems]
            request_id = request_id_of(message)
            retry = exc.headers.get("Retry-After") if isinstance(exc, ErrorResponse) else None
            self._send(
                ErrorAnswer(
                    code=exc.code, message=exc.message, details=details, request_id=request_id,
                    retry_after=int(retry) if retry and retry.isdigit() else None,
                )
            )  # fmt: skip
        except STORE_DOWN as exc:
            log.warning("store unreachable", extra={"path": self.request.path, "error": str(exc)})
            self._send(
                ErrorAnswer(
                    code=ErrorCode.UNAVAILABLE, message=STORE_DOWN_MESSAGE,
                    request_id=request_id_of(message), retry_after=STORE_RETRY_AFTER,
                )
            )  # fmt: skip

    async def _dispatch(self, msg: ClientMessage) -> None:
        submissions = self.services.submissions
        if isinstance(msg, Submit):
            state = await submissions.accept(submissions.parse(msg.submission), self.principal)
            self._send(Accepted(id=state.id, request_id=msg.request_id))
            self._relay(state.id, 0)
        elif isinstance(msg, Watch):
            state = await self.visible_state(msg.id)
            self._relay(msg.id, msg.since, ended=state.done)
        elif isinstance(msg, StatusQuery):
            state = await self.visible_state(msg.id)
            self._send(SubmissionAnswer(submission=state.as_json(), request_id=msg.request_id))
        elif isinstance(msg, StageMessage):
            await submissions.send_input(msg.id, self.principal, stage_input(msg))
        elif isinstance(msg, Cancel):
            await submissions.cancel(msg.id, self.principal)
            self._send(Cancelled(id=msg.id, request_id=msg.request_id))
        else:
            # What GET /api/v1/packages answers, for clients that only hold the socket.
            packages = await EnvironmentCache(self.services.store).packages()
            self._send(PackagesAnswer(packages=packages, request_id=msg.request_id))

    def _relay(self, sid: str, since: int, ended: bool = False) -> None:
        task = asyncio.create_task(self._relay_events(sid, since, ended))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay_events(self, sid: str, since: int, ended: bool) -> None:
        try:
            async for events in self.services.submissions.follow(sid, since, ended):
                for event in events:
                    with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                        self.write_message(encode_event(event))
        except STORE_DOWN as exc:
            # 1013, try again later: the client reconnects and resumes where its events stopped.
            log.warning("store unreachable", extra={"submission": sid, "error": str(exc)})
            self.close(1013, "the service's store is unreachable: reconnect and resume")

    def _send(self, answer: Answer) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(encode_message(answer))

    def on_finish(self) -> None:
        pass  # a WebSocket is not an HTTP request for the metrics
