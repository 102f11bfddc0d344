"""One stage run in the sandbox with its output streaming live as events."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from pathlib import Path

from cellblock.executor.sandbox import Sandbox, StageOutcome, StageSpec
from cellblock.service.protocol import STREAMS, Event, OutputEvent, StageName, Stream

Emit = Callable[[Event], None]


async def run_streaming(
    sandbox: Sandbox,
    stage: StageName,
    spec: StageSpec,
    emit: Emit,
    *,
    test: int | None = None,
    arm_next: bool = False,
    then: Path | None = None,
) -> StageOutcome:
    """Run one stage (or one test, by index) in ``sandbox``, emitting its output as it comes.

    Cancellation is ``Sandbox.run``'s: the stage is killed before ``CancelledError`` propagates.
    """
    # Live output is text; a character split across two reads is decoded whole. (The final
    # result carries the exact bytes, base64 when they are not UTF-8.)
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS}

    def output(stream: Stream, data: bytes) -> None:
        text = decoders[stream].decode(data)
        if text:
            emit(OutputEvent(stage=stage, stream=stream, data=text, test=test))

    return await sandbox.run(spec, output, arm_next=arm_next, then=then)
