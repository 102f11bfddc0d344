"""The WebSocket API: ``submit``, ``watch``, ``status``, ``cancel`` and ``packages``.

Each ``submit`` or ``watch`` starts a task that relays that submission's events until its
``finished`` event; several can run on one connection. Answers echo the client's ``request_id``.
A malformed message answers an ``error`` message and the connection stays open. Closing the
connection cancels its relay tasks (the submissions themselves go on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import tornado.websocket

from cellblock.cachebuilder.environments import EnvironmentCache
from cellblock.errors import CellblockError, ErrorCode, FieldProblem, InvalidRequest
from cellblock.service.api import BaseHandler, ErrorResponse, follow_events, new_submission_id
from cellblock.service.protocol import parse_submission
from cellblock.service.store import QueueAtCapacity, Rejected

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

    def check_origin(self, origin: str) -> bool:
        # Tokens, not cookies, authenticate here, so another origin gains nothing a script
        # with the token would not have anyway.
        return True

    def on_close(self) -> None:
        for task in self._relays:
            task.cancel()

    async def on_message(self, message: str | bytes) -> None:
        request_id = None
        try:
            try:
                msg = json.loads(message)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                raise InvalidRequest([FieldProblem("", "the message is not JSON")]) from None
            if not isinstance(msg, dict):
                raise InvalidRequest([FieldProblem("", "the message must be a JSON object")])
            request_id = msg.get("request_id")
            await self._dispatch(msg, request_id)
        except InvalidRequest as exc:
            body = exc.as_json()["error"]
            self._send({"type": "error", **body}, request_id)  # type: ignore[dict-item]
        except ErrorResponse as exc:
            self._send({"type": "error", "code": exc.code, "message": exc.message}, request_id)
        except CellblockError as exc:
            self._send({"type": "error", "code": exc.code, "message": exc.message}, request_id)

    async def _dispatch(self, msg: dict[str, Any], request_id: Any) -> None:
        kind = msg.get("type")
        store = self.services.store
        if kind == "submit":
            if not isinstance(msg.get("submission"), dict):
                raise InvalidRequest([FieldProblem("submission", "must be a submission object")])
            submission = parse_submission(msg["submission"], self.services.config.limits)
            sid = new_submission_id()
            try:
                await store.submit(sid, submission, self.principal.name)
            except QueueAtCapacity as exc:
                raise ErrorResponse(429, exc.code, exc.message) from None
            log.info("submission accepted", extra={"submission": sid, "owner": self.principal.name})
            self._send({"type": "accepted", "id": sid}, request_id)
            self._relay(sid, 0)
        elif kind == "watch":
            sid = _id(msg)
            since = msg.get("since", 0)
            if isinstance(since, bool) or not isinstance(since, int) or since < 0:
                raise InvalidRequest([FieldProblem("since", "must be a whole number")])
            state = await self.visible_state(sid)
            self._relay(sid, since, ended=state.done)
        elif kind == "status":
            state = await self.visible_state(_id(msg))
            self._send({"type": "submission", "submission": state.as_json()}, request_id)
        elif kind == "cancel":
            sid = _id(msg)
            await self.visible_state(sid)
            try:
                await store.cancel(sid)
            except Rejected as exc:
                raise ErrorResponse(
                    409, ErrorCode.CONFLICT, f"cannot cancel: {exc.message}"
                ) from None
            self._send({"type": "cancelled", "id": sid}, request_id)
        elif kind == "packages":
            # What GET /api/v1/packages answers, for clients that only hold the socket.
            packages = await EnvironmentCache(store).packages()
            self._send({"type": "packages", "packages": packages}, request_id)
        else:
            known = "submit, watch, status, cancel, packages"
            raise InvalidRequest(
                [FieldProblem("type", f"unknown message type {kind!r}; use {known}")]
            )

    def _relay(self, sid: str, since: int, ended: bool = False) -> None:
        task = asyncio.create_task(self._relay_events(sid, since, ended))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay_events(self, sid: str, since: int, ended: bool) -> None:
        async for events in follow_events(self.services.store, sid, since, ended):
            for event in events:
                self._send(event, None)

    def _send(self, message: dict[str, Any], request_id: Any) -> None:
        if request_id is not None:
            message = {**message, "request_id": request_id}
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(json.dumps(message))

    def on_finish(self) -> None:
        pass  # a WebSocket is not an HTTP request for the metrics


def _id(msg: dict[str, Any]) -> str:
    sid = msg.get("id")
    if not isinstance(sid, str) or not sid:
        raise InvalidRequest([FieldProblem("id", "must be a submission id")])
    return sid
