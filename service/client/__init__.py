"""The Python client of the Cellblock service (shared/PROTOCOL.md): what the CLI, the Jupyter
kernel and the tests use to talk to it.

    async with Client.from_environment() as client:
        submission = await client.run({"run": "echo hi"}, on_event=print)

Everything is asynchronous: REST calls on Tornado's ``AsyncHTTPClient`` (rest.py), a
submission's events on the WebSocket through the ``websockets`` library (stream.py,
websocket.py). The service's server-sent events are for curl and browsers; this client follows
events over the WebSocket only.

**Concurrency.** A ``Client`` belongs to the event loop that first uses it and is not
thread-safe (``close`` excepted: it may be awaited on another thread's event loop, as ipykernel
does on shutdown, and closes the connections on their own loop). Within that loop any number of
calls and streams may run at once: up to 64 REST calls run at a time (more wait their turn), and
every ``Stream`` has a connection of its own while it runs. A stream that ends with its
``finished`` event leaves its WebSocket open for the next stream to submit on (a few, for
``IDLE_REUSE`` seconds), which then skips the TCP and WebSocket handshakes. One ``Stream`` is
meant for one consuming task at a time.

**Cancellation.** Nothing this client does on its own ever cancels a submission: cancelling the
task that awaits a call or consumes a stream, breaking out of the loop, or closing the client only
closes connections, and the submission goes on running on the service. Only ``Client.cancel(id)``
(``DELETE /api/v1/submissions/{id}``) stops a submission; the kernel calls it on interrupt.
A call cancelled after its request left may still have taken effect on the service (a cancelled
``submit`` may have queued the submission). A call or stream cancelled while it connects leaves
no socket behind.

**Errors.** Everything raised about the service is a ``ClientError`` (a ``CellblockError``):
``ServiceUnavailable`` when the service cannot be reached (its message names the URL), else an
``ApiError`` carrying the protocol's error document: ``Unauthorized`` (401; ``Forbidden``, 403, is
one), ``NotFound`` (404), ``Conflict`` (409), ``QueueFull`` (429, or 503 with ``Retry-After``)
with ``retry_after``, and ``BadRequest`` (400, 413, 422), which is also a
``cellblock.errors.InvalidRequest`` whose ``problems`` are the document's ``details``. The
WebSocket's handshake answers the same statuses as REST and raises the same errors.
"""

from __future__ import annotations

from cellblock.service.client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    NotFound,
    QueueFull,
    ServiceUnavailable,
    StreamInterrupted,
    Unauthorized,
    api_error,
)
from cellblock.service.client.rest import Client, Document, Documents, EventCallback
from cellblock.service.client.stream import Stream

__all__ = [
    "ApiError",
    "BadRequest",
    "Client",
    "ClientError",
    "Conflict",
    "Document",
    "Documents",
    "EventCallback",
    "Forbidden",
    "NotFound",
    "QueueFull",
    "ServiceUnavailable",
    "Stream",
    "StreamInterrupted",
    "Unauthorized",
    "api_error",
]
