"""The REST API and server-sent events (shared/PROTOCOL.md), as Tornado handlers.

Handlers are thin: they authenticate, decode, call the protocol module and the store, and turn
Cellblock's errors into the protocol's error documents. The service keeps no state of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import tornado.web

from cellblock.config import Config
from cellblock.errors import CellblockError, FieldProblem, InvalidRequest
from cellblock.service.auth import Principal, Tokens
from cellblock.service.metrics import Metrics
from cellblock.service.protocol import SubmissionState, parse_submission
from cellblock.service.store import QueueFull, Rejected, Store

log = logging.getLogger("cellblock.service")
#: Seconds a client is asked to wait before retrying when the queue is full.
RETRY_AFTER = 5
DEFAULT_WAIT = 60.0
MAX_WAIT = 3600.0


@dataclass(frozen=True)
class Services:
    """What every handler needs, handed over through the application's settings."""

    store: Store
    config: Config
    tokens: Tokens
    metrics: Metrics


class ApiError(CellblockError):
    """An error with its HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def new_submission_id() -> str:
    """144 random bits, URL-safe: unguessable, so ids cannot be probed."""
    return secrets.token_urlsafe(18)


class BaseHandler(tornado.web.RequestHandler):
    principal: Principal

    @property
    def services(self) -> Services:
        services: Services = self.settings["services"]
        return services

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")

    def authenticate(self, admin: bool = False) -> Principal:
        header = self.request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        token = token or self.get_query_argument("token", None)
        principal = self.services.tokens.authenticate(token)
        if principal is None:
            self.set_header("WWW-Authenticate", 'Bearer realm="cellblock"')
            raise ApiError(401, "unauthorized", "a valid token is required (Authorization: Bearer)")
        if admin and not principal.is_admin:
            raise ApiError(403, "forbidden", "this needs an admin token")
        self.principal = principal
        return principal

    def send_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        body: dict[str, Any]
        if isinstance(exc, ApiError):
            body = {"error": {"code": exc.code, "message": exc.message, "details": []}}
        elif isinstance(exc, InvalidRequest):
            body = exc.as_json()
        elif isinstance(exc, tornado.web.HTTPError):
            reason = exc.log_message or self._reason
            body = {"error": {"code": "http", "message": reason, "details": []}}
        else:
            body = {"error": {"code": "internal", "message": "internal error", "details": []}}
        self.finish(json.dumps(body))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ApiError):
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
        elif isinstance(e, InvalidRequest):
            self.send_error(422, exc_info=(type(e), e, e.__traceback__))
        else:
            super()._handle_request_exception(e)

    def on_finish(self) -> None:
        self.services.metrics.request(
            self.request.method or "", type(self).__name__, self.get_status()
        )

    async def visible_state(self, sid: str) -> SubmissionState:
        """The submission, if this principal may see it; else 404 exactly as for an unknown id."""
        store = self.services.store
        owner, state = await asyncio.gather(store.owner(sid), store.state(sid))
        if state is None or (owner != self.principal.name and not self.principal.is_admin):
            raise ApiError(404, "not_found", f"no submission {sid}")
        return state

    def json_body(self) -> Any:
        try:
            return json.loads(self.request.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None


class HealthHandler(BaseHandler):
    async def get(self) -> None:
        store = self.services.store
        workers, queued = await asyncio.gather(store.workers(), store.queued())
        self.send_json(
            200,
            {
                "status": "ok",
                "executors": sum(w["kind"] == "executor" for w in workers),
                "builders": sum(w["kind"] == "builder" for w in workers),
                "queued": queued,
            },
        )


@tornado.web.stream_request_body
class SubmissionsHandler(BaseHandler):
    """POST a submission (body size checked as it streams in); GET the caller's recent ones."""

    def prepare(self) -> Awaitable[None] | None:
        self._chunks: list[bytes] = []
        self._size = 0
        if self.request.method != "POST":
            return None
        limit = self.services.config.max_body_size
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "body_too_large", f"the body is over {limit} bytes")
        self.request.connection.set_max_body_size(limit + 1)  # type: ignore[union-attr]
        return None

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.services.config.max_body_size:
            raise ApiError(
                413,
                "body_too_large",
                f"the body is over {self.services.config.max_body_size} bytes",
            )
        self._chunks.append(chunk)

    async def post(self) -> None:
        principal = self.authenticate()
        self.request.body = b"".join(self._chunks)
        raw = self.json_body()
        submission = parse_submission(raw, self.services.config.limits)
        sid = new_submission_id()
        try:
            state = await self.services.store.submit(sid, submission, principal.name)
        except QueueFull as exc:
            self.set_header("Retry-After", str(RETRY_AFTER))
            raise ApiError(429, exc.code, exc.message) from None
        log.info("submission accepted", extra={"submission": sid, "owner": principal.name})
        if self.get_query_argument("wait", "false").lower() in ("true", "1", "yes"):
            timeout = self._timeout()
            state = await wait_until_done(self.services.store, sid, timeout) or state
            self.send_json(201, state.as_json())
            return
        self.send_json(201, {"id": sid, "status": state.status})

    def _timeout(self) -> float:
        text = self.get_query_argument("timeout", None)
        if text is None:
            return DEFAULT_WAIT
        try:
            value = float(text)
        except ValueError:
            value = -1
        if not 0 <= value <= MAX_WAIT:
            raise InvalidRequest(
                [FieldProblem("timeout", f"must be seconds from 0 to {MAX_WAIT:g}")]
            )
        return value

    async def get(self) -> None:
        principal = self.authenticate()
        text = self.get_query_argument("limit", "20")
        if not text.isdigit() or not 1 <= int(text) <= 1000:
            raise InvalidRequest([FieldProblem("limit", "must be a whole number from 1 to 1000")])
        owner = (
            None
            if principal.is_admin and self.get_query_argument("all", "") == "true"
            else principal.name
        )
        states = await self.services.store.recent(owner, int(text))
        self.send_json(200, {"submissions": [s.as_json() for s in states]})


async def wait_until_done(store: Store, sid: str, timeout: float) -> SubmissionState | None:
    """Wait for the submission to end, or ``timeout`` seconds; its state then."""
    deadline = time.monotonic() + timeout
    since = 0
    while (remaining := deadline - time.monotonic()) > 0:
        events = await store.events(sid, since, block=min(remaining, 5.0))
        for event in events:
            since = event["seq"]
            if event["type"] == "finished":
                return SubmissionState.from_record(event["submission"])
    return await store.state(sid)


class SubmissionHandler(BaseHandler):
    async def get(self, sid: str) -> None:
        self.authenticate()
        self.send_json(200, (await self.visible_state(sid)).as_json())

    async def delete(self, sid: str) -> None:
        self.authenticate()
        await self.visible_state(sid)
        try:
            state = await self.services.store.cancel(sid)
        except Rejected as exc:
            raise ApiError(409, "conflict", f"cannot cancel: {exc.message}") from None
        log.info("submission cancelled", extra={"submission": sid, "by": self.principal.name})
        self.send_json(200, {"id": sid, "status": state.status})


class EventsHandler(BaseHandler):
    """Server-sent events of one submission, from ``since`` (or Last-Event-ID) to its end."""

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    async def get(self, sid: str) -> None:
        self.authenticate()
        await self.visible_state(sid)
        since_text = self.get_query_argument("since", None) or self.request.headers.get(
            "Last-Event-ID", "0"
        )
        if not since_text.isdigit():
            raise InvalidRequest([FieldProblem("since", "must be a whole number")])
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")
        since = int(since_text)
        store = self.services.store
        while True:
            events = await store.events(sid, since, block=15.0)
            if not events:
                if await store.state(sid) is None:  # expired under us
                    break
                self.write(": keep-alive\n\n")
                await self.flush()
                continue
            for event in events:
                since = event["seq"]
                self.write(f"id: {since}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n")
            await self.flush()
            if events[-1]["type"] == "finished":
                break
        self.finish()

    def on_connection_close(self) -> None:
        # The loop above notices on its next flush; nothing to release here.
        pass


class WorkersHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate(admin=True)
        self.send_json(200, {"workers": await self.services.store.workers()})


class WorkerHandler(BaseHandler):
    async def delete(self, worker_id: str) -> None:
        self.authenticate(admin=True)
        if not await self.services.store.request_drain(worker_id):
            raise ApiError(404, "not_found", f"no live worker {worker_id}")
        log.info("worker drain requested", extra={"worker": worker_id})
        self.send_json(202, {"id": worker_id, "status": "draining"})


class ScaleHandler(BaseHandler):
    async def post(self) -> None:
        self.authenticate(admin=True)
        raw = self.json_body()
        if not isinstance(raw, dict) or not raw:
            raise InvalidRequest([FieldProblem("", 'give {"executors": N, "builders": M}')])
        problems = []
        for key, value in raw.items():
            if key not in ("executors", "builders"):
                problems.append(FieldProblem(key, "unknown; scale executors and builders"))
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
                problems.append(FieldProblem(key, "must be a whole number from 0 to 64"))
        if problems:
            raise InvalidRequest(problems)
        store = self.services.store
        if not await store.supervised():
            message = "scaling starts local processes: it needs a `cellblock up` deployment"
            raise ApiError(409, "not_supervised", message)
        await store.set_scale(raw)
        log.info("scale requested", extra=raw)
        self.send_json(202, {**await store.scale(), "status": "scaling"})


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate(admin=True)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(await self.services.metrics.render(self.services.store))


class OpenApiHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate()
        from cellblock.service.openapi import document

        self.send_json(200, document())


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise ApiError(404, "not_found", f"no endpoint {self.request.path}")
