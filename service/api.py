"""The REST API and server-sent events (shared/PROTOCOL.md), as Tornado handlers.

Handlers are thin: they authenticate, decode, call ``Submissions`` (service/submissions.py, which
the WebSocket shares) or the store, and turn Cellblock's errors into the protocol's error
documents through Tornado's public hooks (``write_error``, ``log_exception``). The service keeps
no state of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import tornado.iostream
import tornado.web

from cellblock.config import Config
from cellblock.errors import ErrorCode, ErrorResponse, FieldProblem, InvalidRequest
from cellblock.outage import STORE_DOWN
from cellblock.service.auth import Principal, Tokens
from cellblock.service.metrics import Metrics
from cellblock.service.protocol import SubmissionState, encode_event
from cellblock.service.store import Store
from cellblock.service.streams import LiveStreams
from cellblock.service.submissions import Submissions

log = logging.getLogger("cellblock.service")
DEFAULT_WAIT = 60.0
#: Bytes past the body limit that are read and dropped so that the 413 reaches its client,
#: and the seconds that may take.
DRAIN_LIMIT = 64 * 1024 * 1024
DRAIN_TIMEOUT = 30.0
_DROPPING: set[asyncio.Task[None]] = set()
#: Seconds a client is asked to wait while the store is unreachable.
STORE_RETRY_AFTER = 5
STORE_DOWN_MESSAGE = "the service's store (Redis) is unreachable: nothing was done; try again"
MAX_WAIT = 3600.0


@dataclass(frozen=True)
class Services:
    """What every handler needs, handed over through the application's settings."""

    store: Store
    config: Config
    tokens: Tokens
    metrics: Metrics
    submissions: Submissions
    streams: LiveStreams = field(default_factory=LiveStreams)


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
            raise ErrorResponse(
                401,
                ErrorCode.UNAUTHORIZED,
                "a valid token is required (Authorization: Bearer)",
                headers={"WWW-Authenticate": 'Bearer realm="cellblock"'},
            )
        if admin and not principal.is_admin:
            raise ErrorResponse(403, ErrorCode.FORBIDDEN, "this needs an admin token")
        self.principal = principal
        return principal

    def send_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        # Set here, not only in set_default_headers: a handler with other defaults (the event
        # stream) still answers its errors as JSON.
        self.set_header("Content-Type", "application/json; charset=utf-8")
        body: dict[str, Any]
        # Tornado answers every exception but its own HTTPError with 500: the protocol's
        # errors carry their status, set here before anything is written.
        if isinstance(exc, ErrorResponse):
            self.set_status(exc.status)
            for name, value in exc.headers.items():
                self.set_header(name, value)
            body = exc.as_json()
        elif isinstance(exc, InvalidRequest):
            self.set_status(422)
            body = exc.as_json()
        elif isinstance(exc, tornado.web.HTTPError):
            reason = exc.log_message or self._reason
            body = {"error": {"code": ErrorCode.HTTP, "message": reason, "details": []}}
        elif isinstance(exc, STORE_DOWN):
            self.set_status(503)
            self.set_header("Retry-After", str(STORE_RETRY_AFTER))
            body = {"error": {"code": ErrorCode.UNAVAILABLE, "message": STORE_DOWN_MESSAGE,
                              "details": []}}  # fmt: skip
        else:
            body = {
                "error": {"code": ErrorCode.INTERNAL, "message": "internal error", "details": []}
            }
        self.finish(json.dumps(body))

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A refused request is the client's error, answered in full: no traceback in the log;
        # nor for the store's outage, which is not this request's and has one line of its own.
        if isinstance(value, STORE_DOWN):
            log.warning("store unreachable", extra={"path": self.request.path, "error": str(value)})
        elif not isinstance(value, ErrorResponse | InvalidRequest):
            super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        self.services.metrics.request(
            self.request.method or "", type(self).__name__, self.get_status()
        )

    async def visible_state(self, sid: str) -> SubmissionState:
        """The submission, if this principal may see it; else 404 exactly as for an unknown id."""
        return await self.services.submissions.visible(sid, self.principal)

    def json_body(self) -> Any:
        try:
            return json.loads(self.request.body or b"null")
        # RecursionError: nesting deeper than the parser's stack ([[[... a million deep).
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ErrorResponse(
                400, ErrorCode.INVALID_JSON, f"the body is not JSON: {exc}"
            ) from None


async def capacity(store: Store) -> dict[str, int]:
    """The service's capacity as any client may see it: how many executors and builders live,
    the executors' slots and how many of them are busy, the queue's length. No worker's id or
    host: those are for admins (``GET /api/v1/workers``)."""
    workers, queued = await asyncio.gather(store.workers(), store.queued())
    executors = [w for w in workers if w["kind"] == "executor"]
    return {
        "executors": len(executors),
        "builders": sum(w["kind"] == "builder" for w in workers),
        "slots": sum(w["slots"] for w in executors),
        "busy": sum(w["busy"] for w in executors),
        "queued": queued,
    }


class HealthHandler(BaseHandler):
    async def get(self) -> None:
        try:
            counts = await capacity(self.services.store)
        except STORE_DOWN:
            # What is down, for a load balancer or an operator: this process is up.
            self.set_header("Retry-After", str(STORE_RETRY_AFTER))
            self.send_json(503, {"status": "unavailable", "down": ["redis"],
                                 "message": STORE_DOWN_MESSAGE})  # fmt: skip
            return
        # Without a token, the counts only: slots and busy slots need one (/capacity).
        health = {name: counts[name] for name in ("executors", "builders", "queued")}
        self.send_json(200, {"status": "ok", **health})


class CapacityHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate()
        self.send_json(200, await capacity(self.services.store))


@tornado.web.stream_request_body
class SubmissionsHandler(BaseHandler):
    """POST a submission (body size checked as it streams in); GET the caller's recent ones."""

    def prepare(self) -> Awaitable[None] | None:
        self._chunks: list[bytes] = []
        self._size = 0
        if self.request.method != "POST":
            return None
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._body_limit():
            if int(length) > self._body_limit() + DRAIN_LIMIT:
                raise self._too_large()  # the client gets a reset if it is still sending
            self._answer_and_drop(int(length))
            return None
        # The connection keeps the server's larger bound: lowered to the limit, Tornado itself
        # would refuse a chunked body that outgrows it with a bare 400 before data_received
        # could answer 413.
        return None

    def _body_limit(self) -> int:
        return self.services.config.max_body_size

    def _answer_and_drop(self, length: int) -> None:
        """Answer 413 now, then read the body and drop it before closing. Closing a socket
        with unread data resets it: a client that sends all of its body before it reads
        (urllib, requests) would get that reset instead of the 413; one that waits for the
        answer first (Expect: 100-continue, or reading) gets it at once either way."""
        error = self._too_large()
        body = json.dumps(error.as_json()).encode()
        head = (
            f"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.services.metrics.request("POST", type(self).__name__, 413)
        stream = self.detach()  # no more HTTP: what is left of the body is only read
        task = asyncio.create_task(_drop_then_close(stream, head + body, length))
        _DROPPING.add(task)
        task.add_done_callback(_DROPPING.discard)

    def _too_large(self) -> ErrorResponse:
        return ErrorResponse(
            413, ErrorCode.BODY_TOO_LARGE, f"the body is over {self._body_limit()} bytes"
        )

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._size += len(chunk)
        if self._size > self._body_limit():
            # A chunked body (no Content-Length) grew too large. Raising here would only make
            # Tornado log the error and drop the connection unanswered; answering now makes
            # it close the connection once the 413 is sent, without reading the rest.
            self._chunks.clear()
            error = self._too_large()
            self.send_error(error.status, exc_info=(type(error), error, None))
            return
        self._chunks.append(chunk)

    async def post(self) -> None:
        if self._finished:  # answered 413 while the body streamed in
            return
        principal = self.authenticate()
        self.request.body = b"".join(self._chunks)
        submissions = self.services.submissions
        submission = submissions.parse(self.json_body())
        if submission.request.stdin_mode == "interactive":
            raise InvalidRequest([FieldProblem(
                "stdin_mode", "interactive stdin is typed over the WebSocket (/api/v1/ws): "
                "submit there, or give stdin with the submission",
            )])  # fmt: skip
        # Every query parameter is checked before the submission is stored: a bad one must
        # not leave an accepted submission behind its 422.
        wait = self.get_query_argument("wait", "false").lower() in ("true", "1", "yes")
        timeout = self._timeout() if wait else DEFAULT_WAIT
        state = await submissions.accept(submission, principal)
        if wait:
            state = await submissions.wait(state.id, timeout) or state
            self.send_json(201, state.as_json())
            return
        self.send_json(201, {"id": state.id, "status": state.status})

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


class SubmissionHandler(BaseHandler):
    async def get(self, sid: str) -> None:
        self.authenticate()
        self.send_json(200, (await self.visible_state(sid)).as_json())

    async def delete(self, sid: str) -> None:
        principal = self.authenticate()
        state = await self.services.submissions.cancel(sid, principal)
        self.send_json(200, {"id": sid, "status": state.status})


class EventsHandler(BaseHandler):
    """Server-sent events of one submission, from ``since`` (or Last-Event-ID) to its end."""

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    async def get(self, sid: str) -> None:
        self.authenticate()
        state = await self.visible_state(sid)
        since_text = self.get_query_argument("since", None) or self.request.headers.get(
            "Last-Event-ID", "0"
        )
        if not since_text.isdigit():
            raise InvalidRequest([FieldProblem("since", "must be a whole number")])
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("X-Accel-Buffering", "no")
        relay = asyncio.create_task(self._relay(sid, int(since_text), state.done))
        self.services.streams.relaying(relay)
        try:
            await asyncio.wait([relay])
        finally:
            relay.cancel()  # this request itself was cancelled
        if relay.cancelled() or relay.result():
            # Ended by the stream or by the service stopping (the client resumes from its
            # Last-Event-ID): either way a clean end of the response.
            self.finish()

    async def _relay(self, sid: str, since: int, ended: bool) -> bool:
        """Write the events until the last; ``False`` if the client went away first."""
        async for events in self.services.submissions.follow(sid, since, ended=ended):
            for event in events:
                self.write(f"id: {event.seq}\nevent: {event.type}\ndata: {encode_event(event)}\n\n")
            if not events:
                self.write(": keep-alive\n\n")
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                return False  # nobody to answer
        return True

    def on_connection_close(self) -> None:
        # The relay notices on its next flush; nothing to release here.
        pass


class WorkersHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate(admin=True)
        self.send_json(200, {"workers": await self.services.store.workers()})


class WorkerHandler(BaseHandler):
    async def delete(self, worker_id: str) -> None:
        self.authenticate(admin=True)
        if not await self.services.store.request_drain(worker_id):
            raise ErrorResponse(404, ErrorCode.NOT_FOUND, f"no live worker {worker_id}")
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
            raise ErrorResponse(409, ErrorCode.NOT_SUPERVISED, message)
        await store.set_scale(raw)
        log.info("scale requested", extra=raw)
        self.send_json(202, {**await store.scale(), "status": "scaling"})


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate(admin=True)
        # The format the scraper asks for: Prometheus itself prefers OpenMetrics.
        accept = self.request.headers.get("Accept", "")
        body, content_type = await self.services.metrics.render(accept)
        self.set_header("Content-Type", content_type)
        self.finish(body)


class OpenApiHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate()
        from cellblock.service.openapi import document

        self.send_json(200, document())


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise ErrorResponse(404, ErrorCode.NOT_FOUND, f"no endpoint {self.request.path}")


async def _drop_then_close(stream: tornado.iostream.IOStream, answer: bytes, length: int) -> None:
    """Write ``answer``, read up to ``length`` bytes and drop them, then close ``stream``."""
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await stream.write(answer)
            while length > 0:
                length -= len(await stream.read_bytes(min(length, 1 << 20), partial=True))
    except (tornado.iostream.StreamClosedError, TimeoutError):
        pass
    finally:
        stream.close()
