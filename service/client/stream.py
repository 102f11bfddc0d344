"""One submission's events over the WebSocket, and the one loop that reconnects and resumes
them when the connection drops.

**Concurrency.** A ``Stream`` is meant for one consuming task at a time; it holds one
WebSocket of its client's (websocket.py) while it runs, and gives it back to be reused when the
``finished`` event has come.

**Cancellation.** Cancelling the consuming task, leaving the loop or ``aclose()`` closes the
stream's WebSocket and nothing else: the submission goes on running on the service
(``Client.cancel`` stops it). A stream cancelled while it submits may have queued the
submission.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection

from cellblock.errors import ErrorCode
from cellblock.service.client.errors import (
    ServiceUnavailable,
    StreamInterrupted,
    api_error,
    protocol_error,
)
from cellblock.service.client.websocket import Dropped, receive, send
from cellblock.service.protocol.messages import (
    ClientMessage,
    ResizeMessage,
    SignalMessage,
    StdinMessage,
    Submit,
    Watch,
)

if TYPE_CHECKING:
    from cellblock.service.client.rest import Client

log = logging.getLogger("cellblock.client")

Document = dict[str, Any]
MAX_BACKOFF = 5.0


class Stream:
    """One submission's events over the WebSocket: an async iterator, best used as an async
    context manager (which closes its connection however the block ends).

    - Every event comes exactly once, in ``seq`` order without gaps (from ``since + 1``), and the
      iteration ends after the ``finished`` event; ``submission`` is then its document.
    - When the WebSocket drops, or the service says its store is unreachable, the stream
      reconnects (``reconnect_attempts`` in a row, with backoff) and resumes with
      ``{"type": "watch", "id", "since": last_seq}``; events seen before are dropped by ``seq``.
      After the last failed attempt: ``StreamInterrupted``.
    - ``id`` is set once the service has accepted the submission (before the first event).
      Losing the connection before that raises ``ServiceUnavailable``: the submission may or
      may not have been queued. Failing to connect at all raises ``ServiceUnavailable`` at once;
      a refused handshake raises the ``ApiError`` of its answer (``Unauthorized`` for a bad
      token).
    - Cancelling the consuming task, leaving the loop or ``aclose()`` closes the WebSocket and
      nothing else: the submission goes on. ``Client.cancel(stream.id)`` stops it.
    - ``connection`` is the current WebSocket (``None`` between connections), ``reconnects``
      how many reconnection attempts the stream has made.
    - An interactive submission's stage takes input from ``send_stdin``, ``close_stdin``,
      ``send_signal`` and ``resize`` once ``id`` is set. Each goes over the current connection
      (waiting up to the client's timeout for one while the stream reconnects) and is not
      acknowledged: the service only answers a refusal (the stage has ended, a cap), which
      the stream ignores, as the stage may end at any moment.
    """

    def __init__(
        self,
        client: Client,
        *,
        request: Document | None = None,
        id: str | None = None,
        since: int = 0,
    ) -> None:
        self.client = client
        self.request = request
        self.id = id
        self.submission: Document | None = None
        self.connection: ClientConnection | None = None
        self.reconnects = 0
        self._sequence = _Sequence(id or "", since)
        self._events = self._follow()

    async def send_stdin(self, data: str | bytes) -> None:
        """Write ``data`` to the running stage's stdin (text as UTF-8)."""
        if isinstance(data, str):
            await self._to_stage(lambda i, r: StdinMessage(id=i, data=data, request_id=r))
        else:
            text = base64.b64encode(data).decode()
            await self._to_stage(
                lambda i, r: StdinMessage(id=i, data=text, encoding="base64", request_id=r)
            )

    async def close_stdin(self) -> None:
        """End the stage's stdin (on a terminal: its end-of-file character)."""
        await self._to_stage(lambda i, r: StdinMessage(id=i, eof=True, request_id=r))

    async def send_signal(self, name: str) -> None:
        """Send the signal ``name`` (SIGINT, SIGTERM, SIGQUIT, SIGKILL) to the stage."""
        await self._to_stage(lambda i, r: SignalMessage(id=i, signal=name, request_id=r))

    async def resize(self, rows: int, cols: int) -> None:
        """Give the stage's terminal a new size."""
        await self._to_stage(lambda i, r: ResizeMessage(id=i, tty_size=(rows, cols), request_id=r))

    async def _to_stage(self, message: Callable[[str, str], ClientMessage]) -> None:
        if self.id is None:
            raise ValueError("the submission has no id yet: send input after its first event")
        request_id = self.client._websockets.request_id()  # its refusal is not the stream's
        async with asyncio.timeout(self.client.timeout):
            while True:
                while self.connection is None:
                    await asyncio.sleep(0.05)
                try:
                    await send(self.connection, message(self.id, request_id))
                    return
                except Dropped:
                    await asyncio.sleep(0.05)  # the stream reconnects as it is read

    @property
    def last_seq(self) -> int:
        """The sequence number of the last event handed out."""
        return self._sequence.last

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Document:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop following: close the connection. The submission goes on."""
        await self._events.aclose()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _follow(self) -> AsyncGenerator[Document, None]:
        """The reconnect-and-resume loop."""
        pool = self.client._websockets
        backoff = _Backoff(self.client, self._sequence)
        connected = False
        while True:
            try:
                websocket = await pool.take()
            except ServiceUnavailable as exc:
                if not connected:
                    raise
                await backoff.pause(exc.reason)
                self.reconnects += 1
                continue
            connected = True
            self.connection = websocket
            try:
                async for event in self._relay(websocket):
                    backoff.reset()
                    if self._sequence.take(event):
                        if event.get("type") == "finished":
                            self.submission = _document(event.get("submission"))
                        yield event
                        if self.submission is not None:
                            return
            except Dropped as exc:
                reason = exc.reason
            finally:
                self.connection = None
                if self.submission is not None:
                    pool.keep(websocket)
                else:
                    pool.discard(websocket)
            await backoff.pause(reason)
            self.reconnects += 1

    async def _relay(self, websocket: ClientConnection) -> AsyncGenerator[Document, None]:
        """The events this connection brings, after submitting or asking to watch."""
        request_id = self.client._websockets.request_id()
        if self.id is None:
            self.id = await self._submit(websocket, request_id)
            self._sequence.id = self.id
        else:
            await send(websocket, Watch(id=self.id, since=self.last_seq, request_id=request_id))
        while True:
            message = await receive(websocket)
            if message.get("type") == "error" and message.get("request_id") in (request_id, None):
                if message.get("code") == ErrorCode.UNAVAILABLE:  # its store is away: wait it out
                    raise Dropped(str(message.get("message")))
                raise api_error(None, message)
            if "seq" in message and message.get("id") == self.id:
                yield message

    async def _submit(self, websocket: ClientConnection, request_id: str) -> str:
        """Send the submission; its id once accepted."""
        url = self.client.url
        try:
            await send(websocket, Submit(submission=self.request, request_id=request_id))
            async with asyncio.timeout(self.client.timeout):
                while True:
                    message = await receive(websocket)
                    if message.get("request_id") != request_id:
                        continue
                    if message.get("type") == "accepted" and isinstance(message.get("id"), str):
                        sid: str = message["id"]
                        return sid
                    raise api_error(None, message)
        except (Dropped, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, Dropped) else "no answer to the submission"
            raise ServiceUnavailable(
                url,
                reason,
                f"lost the connection to the Cellblock service at {url} before it "
                f"acknowledged the submission ({reason}); it may or may not have been queued",
            ) from None


class _Sequence:
    """Hands each event out once, in order: drops repeats, calls a gap a broken connection."""

    def __init__(self, id: str, since: int) -> None:
        self.id = id
        self.last = since

    def take(self, event: Mapping[str, Any]) -> bool:
        seq = event.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise protocol_error(None, f"an event without a sequence number: {event}")
        if seq <= self.last:
            return False
        if seq > self.last + 1:
            raise Dropped(f"event {seq} came after event {self.last}")
        self.last = seq
        return True


class _Backoff:
    """Bounded reconnection: ``pause`` waits longer each time, then gives up."""

    def __init__(self, client: Client, sequence: _Sequence) -> None:
        self.client = client
        self.sequence = sequence
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    async def pause(self, reason: str) -> None:
        self.client._check_open()
        self.failures += 1
        sequence = self.sequence
        if self.failures > self.client.reconnect_attempts:
            raise StreamInterrupted(self.client.url, reason, sequence.id, sequence.last)
        delay = min(self.client.reconnect_delay * 2 ** (self.failures - 1), MAX_BACKOFF)
        log.info(
            "reconnecting",
            extra={"submission": sequence.id, "since": sequence.last, "reason": reason,
                   "attempt": self.failures, "delay": delay},
        )  # fmt: skip
        await asyncio.sleep(delay)


def _document(value: object) -> Document:
    if not isinstance(value, dict):
        raise protocol_error(None, f"a finished event without its submission: {value!r}")
    return value
