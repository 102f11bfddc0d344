"""The input of interactive run stages, in Redis: what clients send a stage (interactive.py),
queued per submission for the executor that runs it.

Keys (prefix ``cb``): ``cb:stdin:ID``, a list of encoded inputs in the order they came, and
``cb:stdin-bytes:ID``, the bytes queued so far, which ``put`` keeps under the per-stage cap
atomically (several service processes may take one submission's messages). Every input counts
at least ``MIN_CHARGE`` bytes, so that signals and resizes cannot pile up for free before the
stage runs. The executor drops both at the stage's end (``discard``) and leaves
``cb:stdin-closed:ID``, after which ``put`` refuses: input nobody read is not kept, and none
comes after. The store drops them when the submission ends however it ends (a compile that
failed, a cancel).

Concurrency: any number of ``put`` callers; one ``take`` caller, the executor of the stage.
Cancelling ``take`` may lose what its pop was receiving: cancel it only when the stage ends,
and its input is discarded anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cellblock.errors import ErrorCode, ErrorResponse
from cellblock.service.protocol.interactive import (
    Input,
    StdinData,
    decode_input,
    encode_input,
)

#: What an input costs of the per-stage cap, at the least.
MIN_CHARGE = 64
#: KEYS: the list, the bytes, the closing mark. ARGV: the input, its charge, the cap, the TTL.
#: Queue the input unless the stage's input has ended (-2) or it takes the stage past its cap
#: (-1); else the new total.
PUT_INPUT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
local total = tonumber(redis.call('GET', KEYS[2]) or '0') + tonumber(ARGV[2])
if total > tonumber(ARGV[3]) then return -1 end
redis.call('SET', KEYS[2], total, 'EX', ARGV[4])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return total
"""


class StageInputs:
    """The queued input of one submission's interactive run stage."""

    def __init__(self, redis: Any, put: Any, prefix: str, sid: str, retention: int) -> None:
        self.redis, self.sid, self.retention = redis, sid, retention
        self.key, self.bytes_key = f"{prefix}:stdin:{sid}", f"{prefix}:stdin-bytes:{sid}"
        self.closed_key = f"{prefix}:stdin-closed:{sid}"
        self._put = put  # PUT_INPUT, registered once by the store

    @property
    def keys(self) -> list[str]:
        """The keys that hold queued input (not the closing mark)."""
        return [self.key, self.bytes_key]

    async def put(self, item: Input, stage_cap: int) -> None:
        """Queue ``item``; 409 once the stage's input has ended, 413 if it takes the stage's
        input past ``stage_cap``."""
        size = max(len(item.data) if isinstance(item, StdinData) else 0, MIN_CHARGE)
        args = [encode_input(item), size, stage_cap, self.retention]
        answer = await self._put(keys=[*self.keys, self.closed_key], args=args)
        if answer == -2:
            message = f"the run stage of {self.sid} has ended: it takes no more input"
            raise ErrorResponse(409, ErrorCode.CONFLICT, message)
        if answer == -1:
            raise ErrorResponse(
                413, ErrorCode.LIMIT_EXCEEDED,
                f"the run stage of {self.sid} takes at most {stage_cap} bytes of stdin "
                "(the service's interactive.max_stage_input)",
            )  # fmt: skip

    async def take(self, timeout: float) -> Sequence[Input]:
        """What was queued since the last call, waiting up to ``timeout`` seconds for the
        first of it (nothing, if none came)."""
        first = await self.redis.blpop([self.key], timeout=timeout)
        if first is None:
            return []
        rest = await self.redis.lpop(self.key, 1000) or []
        return [decode_input(raw) for raw in [first[1], *rest]]

    async def discard(self) -> None:
        """Drop what nobody read, and refuse any more."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*self.keys)
            pipe.set(self.closed_key, 1, ex=self.retention)
            await pipe.execute()
