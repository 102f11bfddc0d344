"""The input of interactive run stages, in Redis: what clients send a stage (interactive.py),
queued per submission for the executor that runs it.

Keys (prefix ``cb``): ``cb:stdin:ID``, a list of encoded inputs in the order they came, and
``cb:stdin-bytes:ID``, the stdin bytes queued so far, which ``put`` keeps under the per-stage
cap atomically (several service processes may take one submission's messages). Both expire
with the submission; the executor drops them at the stage's end (``discard``): input nobody
read is not kept.

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

#: Queue the input unless it takes the stage's stdin past its cap (ARGV[3]); the new total,
#: or -1 if refused.
_PUT = """
local total = redis.call('INCRBY', KEYS[2], ARGV[2])
if total > tonumber(ARGV[3]) then
    redis.call('DECRBY', KEYS[2], ARGV[2])
    return -1
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return total
"""


class StageInputs:
    """The queued input of one submission's interactive run stage."""

    def __init__(self, redis: Any, prefix: str, sid: str, retention: int) -> None:
        self.redis, self.sid, self.retention = redis, sid, retention
        self.key, self.bytes_key = f"{prefix}:stdin:{sid}", f"{prefix}:stdin-bytes:{sid}"
        self._put = redis.register_script(_PUT)

    async def put(self, item: Input, stage_cap: int) -> None:
        """Queue ``item``; 413 if its bytes take the stage's stdin past ``stage_cap``."""
        size = len(item.data) if isinstance(item, StdinData) else 0
        args = [encode_input(item), size, stage_cap, self.retention]
        if await self._put(keys=[self.key, self.bytes_key], args=args) == -1:
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
        await self.redis.delete(self.key, self.bytes_key)
