"""Attacks through interactive stdin and the stage's terminal, end to end: the real service and
an executor running real nsjail. The terminal is a pty of the host's: a program must not use it
to inject input, swap its line discipline or reach the host's other terminals; another user
must not type into, signal or resize someone's program; and a flood of input is capped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import tornado.websocket
from attackio import Target
from restio import ALICE, BOB
from wsio import Conversation, Socket

pytestmark = pytest.mark.timeout(120)


Connect = Callable[[str], Awaitable[Socket]]


@pytest.fixture
async def connect(target: Target) -> AsyncIterator[Connect]:
    """WebSockets to the target as a token's user, closed at the end of the test."""
    opened: list[Socket] = []

    async def open_socket(token: str) -> Socket:
        url = f"{target.ws_url}?token={token}"
        opened.append(Socket(await tornado.websocket.websocket_connect(url)))
        return opened[-1]

    yield open_socket
    for ws in opened:
        await ws.close()


async def open_conversation(connect: Connect, request: dict[str, Any]) -> Conversation:
    ws = await connect(ALICE)
    answer = await ws.ask({"type": "submit", "submission": request})
    assert answer["type"] == "accepted", answer
    return Conversation(ws, answer["id"])


async def test_the_terminal_cannot_inject_swap_or_reach_the_hosts_terminals(
    target: Target, connect: Connect
) -> None:
    probe = (
        "import fcntl, os, termios\n"
        "for name, request, arg in [('TIOCSTI', termios.TIOCSTI, b'x'),"
        " ('TIOCSETD', 0x5423, (15).to_bytes(4, 'little')),"
        " ('TIOCLINUX', 0x541C, b'\\x06'), ('TIOCCONS', termios.TIOCCONS, b'')]:\n"
        "    try: fcntl.ioctl(0, request, arg); print(name, 'allowed')\n"
        "    except OSError as e: print(name, e.errno)\n"
        "print(*(os.path.exists(f'/dev/{d}') for d in ('pts', 'ptmx', 'console')))\n"
    )
    s = await open_conversation(connect, {
        "files": [{"name": "probe.py", "content": probe}], "run": "python3 probe.py",
        "stdin_mode": "interactive", "tty": True,
    })  # fmt: skip
    rest = await s.until("finished")
    out = rest[-1]["submission"]["stages"]["run"]["stdout"].replace("\r\n", "\n")
    assert out.splitlines() == ["TIOCSTI 1", "TIOCSETD 1", "TIOCLINUX 1", "TIOCCONS 1",
                                "False False False"], out  # fmt: skip
    await target.still_serves()


async def test_another_user_cannot_type_into_signal_or_resize_the_program(
    target: Target, connect: Connect
) -> None:
    s = await open_conversation(connect, {
        "run": "read line; echo \"got $line\"", "stdin_mode": "interactive", "tty": True,
    })  # fmt: skip
    await s.until("input_wanted")
    bob = Conversation(await connect(BOB), s.sid)
    for message in (
        {"type": "stdin", "id": s.sid, "data": "from bob\n"},
        {"type": "signal", "id": s.sid, "signal": "SIGKILL"},
        {"type": "resize", "id": s.sid, "tty_size": [1, 1]},
        {"type": "watch", "id": s.sid},
    ):
        answer = await bob.answer(message)
        assert answer["code"] == "not_found", answer
    await s.type("from alice\n")
    rest = await s.until("finished")
    run = rest[-1]["submission"]["stages"]["run"]
    assert (run["status"], run["stdout"]) == ("ok", "from alice\r\ngot from alice\r\n"), run


async def test_a_flood_of_input_stops_at_the_stage_cap_and_the_program_goes_on(
    target: Target, connect: Connect
) -> None:
    """The program never reads: what is sent fills its pipe, then waits in the service's queue
    and the executor's writer, until the per-stage cap (1 MiB) refuses more. Every input
    counts, signals too (at least 64 bytes each), so none piles up for free."""
    s = await open_conversation(connect, {
        "run": "sleep 3; echo survived", "stdin_mode": "interactive",
        "limits": {"run": {"wall_time": 10}},
    })  # fmt: skip
    await s.until("stage_started")
    for i in range(20):
        await s.ws.send({"type": "stdin", "id": s.sid, "data": "x" * 65536, "request_id": i})
    refusals = []
    while len(refusals) < 4:
        message = await s.ws.receive()
        if "seq" in message:
            s.events.append(message)
        else:
            refusals.append(message)
    # 16 of 64 KiB fill the 1 MiB exactly; each one past it is refused, naming the cap.
    assert [r["request_id"] for r in refusals] == [16, 17, 18, 19], refusals
    assert all(r["code"] == "limit_exceeded" and "1048576" in r["message"] for r in refusals)
    rest = await s.until("finished")
    assert rest[-1]["submission"]["stages"]["run"]["stdout"] == "survived\n"
    await target.still_serves()
