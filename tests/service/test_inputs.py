"""Interactive stdin (PROTOCOL.md, "Interactive standard input") end to end: the real service,
Redis, an executor and nsjail; a program that prompts, on a terminal and on a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from restio import BOB, Rest
from wsio import Conversation, Socket

Connect = Callable[..., Awaitable[Socket]]  # the connect fixture of conftest.py

pytestmark = pytest.mark.timeout(90)

#: Asks twice, on one line each, with printf (no newline, no fflush): on a pipe the prompt
#: stays in stdio's buffer until the program ends; on a terminal it shows before the read.
GUESS_C = r"""
#include <stdio.h>
int main(void) {
    int a, b;
    printf("first? ");
    if (scanf("%d", &a) != 1) return 1;
    for (volatile long i = 0; i < 300000000; i++) {}  /* computes a while: wants nothing */
    printf("second? ");
    if (scanf("%d", &b) != 1) return 1;
    printf("sum %d\n", a + b);
    return 0;
}
"""


def interactive(run: str, *, tty: bool = True, **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"run": run, "stdin_mode": "interactive", **fields}
    if tty:
        request["tty"] = True
    return request


def guess(tty: bool) -> dict[str, Any]:
    return interactive(
        "./guess", tty=tty, files=[{"name": "guess.c", "content": GUESS_C}],
        compile="gcc -O0 -o guess guess.c",
    )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """The CPU time of the process ``pid`` so far (user and system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
async def session(connect: Connect, launch: Any) -> AsyncIterator[Any]:
    executor = await launch()

    async def start(request: dict[str, Any]) -> Conversation:
        ws = await connect()
        answer = await ws.ask({"type": "submit", "submission": request})
        assert answer["type"] == "accepted", answer
        return Conversation(ws, answer["id"])

    start.executor = executor  # type: ignore[attr-defined]
    yield start


async def test_on_a_terminal_each_prompt_shows_before_its_input_is_wanted(session: Any) -> None:
    s = await session(guess(tty=True))
    before = await s.until("input_wanted")
    assert s.output(before).endswith("first? ")  # the prompt came first, then the wish
    await s.type("40\n")
    between = await s.until("input_wanted")
    # Once per scanf: not again while it computes, and the terminal echoes what was typed.
    assert [e["type"] for e in between].count("input_wanted") == 1
    assert s.output(between) == "40\r\nsecond? "
    # No second wish while it waits: keystrokes of a line not yet ended (echoed), a resize.
    await s.type("2")
    await s.ws.send({"type": "resize", "id": s.sid, "tty_size": [30, 90]})
    meanwhile = []
    with contextlib.suppress(TimeoutError):
        while True:
            meanwhile.append(await s.next(timeout=1.0))
    assert [(e["type"], e.get("data")) for e in meanwhile] == [("output", "2")]
    await s.type("\n")
    rest = await s.until("finished")
    assert "input_wanted" not in [e["type"] for e in rest]
    run = rest[-1]["submission"]["stages"]["run"]
    assert run["status"] == "ok" and run["stdout"] == "first? 40\r\nsecond? 2\r\nsum 42\r\n"
    assert run["stderr"] == ""


async def test_on_a_pipe_the_prompts_stay_buffered_but_input_is_still_wanted(
    session: Any,
) -> None:
    s = await session(guess(tty=False))
    before = await s.until("input_wanted")
    assert s.output(before) == ""  # stdio holds "first? " back on a pipe
    await s.type("40\n")
    await s.until("input_wanted")
    await s.type("2\n")
    rest = await s.until("finished")
    assert rest[-1]["submission"]["stages"]["run"]["stdout"] == "first? second? sum 42\n"


async def test_eof_ends_a_cat(session: Any) -> None:
    for tty in (False, True):
        s = await session(interactive("cat", tty=tty))
        await s.until("input_wanted")
        await s.type("hello\n")
        await s.until("input_wanted")
        await s.ws.send({"type": "stdin", "id": s.sid, "eof": True})
        rest = await s.until("finished")
        run = rest[-1]["submission"]["stages"]["run"]
        assert run["status"] == "ok", run
        assert run["stdout"] == ("hello\r\nhello\r\n" if tty else "hello\n")


async def test_ctrl_c_on_the_terminal_ends_a_loop_as_sigint(session: Any) -> None:
    s = await session(interactive("while :; do sleep 0.1; done"))
    await s.until("stage_started")
    await asyncio.sleep(0.5)
    await s.type("\x03")
    rest = await s.until("finished")
    run = rest[-1]["submission"]["stages"]["run"]
    assert (run["status"], run["signal_name"]) == ("signaled", "SIGINT"), run


async def test_a_signal_message_reaches_the_program_not_init(session: Any) -> None:
    """SIGKILL, which init would not survive either: the stage still ends with init's own
    report of the program's death."""
    s = await session(interactive("cat; echo never", tty=False))
    await s.until("input_wanted")
    await s.ws.send({"type": "signal", "id": s.sid, "signal": "SIGKILL"})
    rest = await s.until("finished")
    run = rest[-1]["submission"]["stages"]["run"]
    assert (run["status"], run["signal_name"], run["stdout"]) == ("signaled", "SIGKILL", ""), run


async def test_a_signal_is_not_held_up_by_input_the_program_does_not_read(session: Any) -> None:
    """A megabyte of input for a program that never reads fills the pipe; the signal sent
    after it still arrives at once."""
    s = await session(interactive("trap 'echo got INT; exit 7' INT; while :; do sleep 0.1; done",
                                  tty=False))  # fmt: skip
    await s.until("stage_started")
    for _ in range(4):
        await s.type("x" * 60000)
    await s.ws.send({"type": "signal", "id": s.sid, "signal": "SIGINT"})
    rest = await s.until("finished", timeout=8)
    run = rest[-1]["submission"]["stages"]["run"]
    assert (run["status"], run["exit_code"], run["stdout"]) == ("failed", 7, "got INT\n"), run


async def test_a_read_of_dev_tty_wants_input_too(session: Any) -> None:
    s = await session(interactive('read -r x < /dev/tty; echo "read $x"'))
    await s.until("input_wanted")
    await s.type("it\n")
    rest = await s.until("finished")
    assert rest[-1]["submission"]["stages"]["run"]["stdout"].endswith("read it\r\n")


async def test_input_typed_ahead_during_compile_reaches_the_program(session: Any) -> None:
    s = await session(interactive("read a; read b; echo \"$a $b\"", tty=False,
                                  compile="sleep 1"))  # fmt: skip
    await s.until("stage_started")  # compile's
    await s.type("typed\n")
    await s.type("ahead\n")
    rest = await s.until("finished")
    assert rest[-1]["submission"]["stages"]["run"]["stdout"] == "typed ahead\n"


async def test_a_program_that_never_reads_gets_no_input_wanted(session: Any) -> None:
    s = await session(interactive("for i in 1 2 3; do echo $i; sleep 0.3; done"))
    events = await s.until("finished")
    assert "input_wanted" not in [e["type"] for e in events]
    assert s.output(events) == "1\r\n2\r\n3\r\n"


async def test_a_program_waiting_forever_ends_at_its_wall_time_without_cpu(
    session: Any, service: Any, until: Any
) -> None:
    """Its slot counts busy meanwhile (as the executor's next heartbeat says), the executor
    spends next to no CPU on it (no polling once the wait is announced), and only wall_time
    ends it."""
    s = await session(interactive("read x", limits={"run": {"wall_time": 4}}))
    started = time.monotonic()
    await s.until("input_wanted")
    before = cpu_seconds(session.executor.proc.pid)
    await asyncio.sleep(2)
    assert cpu_seconds(session.executor.proc.pid) - before < 0.25
    rest_api = Rest(service.url)

    async def busy() -> bool:
        capacity = await rest_api.call("GET", "/api/v1/capacity")
        return bool(capacity["busy"] == 1)

    try:
        await until(busy, "the slot to count busy", timeout=3)
    finally:
        rest_api.close()
    rest = await s.until("finished")
    run = rest[-1]["submission"]["stages"]["run"]
    assert run["status"] == "time_limit", run
    assert time.monotonic() - started >= 3.5
    assert run["cpu_time"] < 0.2


async def test_the_conversation_survives_a_dropped_websocket(
    session: Any, connect: Connect
) -> None:
    s = await session(guess(tty=True))
    await s.until("input_wanted")
    await s.type("40\n")
    await s.ws.close()
    again = Conversation(await connect(), s.sid)
    await again.ws.send({"type": "watch", "id": s.sid, "since": s.events[-1]["seq"]})
    await again.until("input_wanted")
    await again.type("2\n")
    rest = await again.until("finished")
    assert rest[-1]["submission"]["stages"]["run"]["stdout"].endswith("sum 42\r\n")


async def test_a_terminal_has_its_size_and_is_the_controlling_one(session: Any) -> None:
    """/dev/tty is it, the program's process group is in its foreground; and no devpts is
    mounted: the host's terminals have no name in the sandbox (``tty`` says so)."""
    script = (
        "stty size; echo $TERM; tty; echo hi > /dev/tty; python3 -c 'import os;"
        " print(os.tcgetpgrp(0) == os.getpgrp(), os.getsid(0) != os.getsid(1))'"
    )
    s = await session(interactive(script, tty_size=[30, 100]))
    rest = await s.until("finished")
    out = rest[-1]["submission"]["stages"]["run"]["stdout"].replace("\r\n", "\n")
    assert out.splitlines() == ["30 100", "xterm", "not a tty", "hi", "True True"], out


async def test_output_past_the_cap_is_cut_and_the_program_not_blocked(session: Any) -> None:
    s = await session(interactive("yes | head -c 3000000; echo done >&2", tty=True,
                                  limits={"run": {"output": 10000}}))  # fmt: skip
    rest = await s.until("finished")
    run = rest[-1]["submission"]["stages"]["run"]
    assert run["stdout_truncated"] and len(run["stdout"]) <= 10000
    assert run["status"] in ("ok", "output_limit"), run


# -- bad input: each a clear error, and the program goes on ------------------------------------


async def test_bad_stage_messages_are_refused_and_the_program_goes_on(
    session: Any, connect: Connect, service: Any
) -> None:
    s = await session(interactive("cat", tty=False))
    await s.until("input_wanted")
    bad = [
        ({"type": "signal", "id": s.sid, "signal": "SIGSTOP"}, "signal"),
        ({"type": "stdin", "id": s.sid}, "data"),
        ({"type": "stdin", "id": s.sid, "data": "%%", "encoding": "base64"}, "data"),
        ({"type": "resize", "id": s.sid, "tty_size": [0, 80]}, "tty_size"),
        ({"type": "stdin", "id": s.sid, "data": ""}, "data"),
        ({"type": "stdin", "id": s.sid, "data": "\ud800"}, "data"),  # a lone surrogate
        ({"type": "resize", "id": s.sid, "tty_size": [30, 90]}, None),  # no terminal
        ({"type": "stdin", "id": s.sid, "data": "x" * (64 * 1024 + 1)}, None),
    ]
    for message, field in bad:
        answer = await s.answer(message, 5)
        assert answer["type"] == "error" and answer["request_id"] == 5, answer
        if field is not None:
            assert answer["details"][0]["field"] == field, answer
        elif message["type"] == "resize":
            assert answer["code"] == "conflict" and "without a terminal" in answer["message"]
        else:
            assert answer["code"] == "limit_exceeded" and "65536" in answer["message"]
    # Another token: exactly as an unknown id.
    bob = Conversation(await connect(BOB), s.sid)
    answer = await bob.answer({"type": "stdin", "id": s.sid, "data": "x\n"})
    unknown = await bob.answer({"type": "stdin", "id": "nope", "data": "x\n"})
    assert answer["code"] == unknown["code"] == "not_found"
    assert answer["message"].replace(s.sid, "ID") == unknown["message"].replace("nope", "ID")
    await s.type("still here\n")
    await s.ws.send({"type": "stdin", "id": s.sid, "eof": True})
    rest = await s.until("finished")
    assert rest[-1]["submission"]["stages"]["run"]["stdout"] == "still here\n"
    # The stage has ended: stdin for it is refused.
    answer = await s.answer({"type": "stdin", "id": s.sid, "data": "late\n"})
    assert answer["code"] == "conflict" and "ended" in answer["message"]


async def test_stdin_for_a_submission_that_is_not_interactive_is_refused(
    session: Any, service: Any
) -> None:
    s = await session({"run": "sleep 1"})
    answer = await s.answer({"type": "stdin", "id": s.sid, "data": "x"})
    assert answer["code"] == "conflict" and "not interactive" in answer["message"]


async def test_interactive_requests_that_cannot_be_are_refused_naming_the_field(
    service: Any, connect: Connect
) -> None:
    rest = Rest(service.url)
    try:
        answer = await rest.call("POST", "/api/v1/submissions", interactive("cat"), expect=422)
        assert answer["error"]["details"][0]["field"] == "stdin_mode"
        assert "WebSocket" in answer["error"]["message"]
    finally:
        rest.close()
    ws = await connect()
    cases = [
        (interactive("cat", tests=[{"name": "a"}]), "stdin_mode"),
        (interactive("cat", stdin="typed ahead"), "stdin"),
        ({"run": "cat", "tty": True}, "tty"),
        (interactive("cat", tty=False, tty_size=[24, 80]), "tty_size"),
        (interactive("cat", tty_size=[24, 1001]), "tty_size"),
        (interactive("cat", tty_size="24x80"), "tty_size"),
        ({"run": "cat", "stdin_mode": "typed"}, "stdin_mode"),
        ({"run": "cat", "stdin_mode": "interactive", "tty": "yes"}, "tty"),
    ]
    for request, field in cases:
        answer = await ws.ask({"type": "submit", "submission": request})
        assert answer["type"] == "error", (request, answer)
        assert answer["details"][0]["field"] == field, (request, answer)


async def test_an_interactive_program_whose_executor_died_is_not_run_again(
    connect: Connect, launch: Any
) -> None:
    """Run afresh, the program would take what the person types next as the answers to its
    first questions: the submission ends in error, saying why."""
    first = await launch(slots=1)
    ws = await connect()
    answer = await ws.ask({"type": "submit", "submission": interactive("read a; read b")})
    s = Conversation(ws, answer["id"])
    await s.until("input_wanted")
    first.proc.kill()
    first.proc.wait()
    await launch(slots=1)
    rest = await s.until("finished", timeout=60)
    document = rest[-1]["submission"]
    assert document["status"] == "error" and "cannot be resumed" in document["error"], document


async def test_input_for_a_run_that_never_comes_is_refused_then_dropped(
    session: Any, service: Any
) -> None:
    """While compile runs, a signal has no program to go to; typed input waits for the run,
    and when compile fails, the store drops it with the submission's end."""
    s = await session(interactive("cat", compile="sleep 1; exit 1"))
    await s.until("stage_started")
    answer = await s.answer({"type": "signal", "id": s.sid, "signal": "SIGINT"})
    assert answer["code"] == "conflict" and "not running its program yet" in answer["message"]
    await s.type("typed ahead\n")
    redis = aioredis.Redis.from_url(service.redis_url, decode_responses=True)
    try:
        assert await redis.llen(f"cb:stdin:{s.sid}") == 1
        rest = await s.until("finished")
        assert rest[-1]["submission"]["stages"]["compile"]["status"] == "failed"
        assert await redis.exists(f"cb:stdin:{s.sid}", f"cb:stdin-bytes:{s.sid}") == 0
    finally:
        await redis.aclose()
