"""Persistence, end to end through the real service and a real executor running real nsjail:
daemons that try to outlive their stage, and leftovers a submission hopes the next one in the
same slot will see. The executor has one slot, so submissions in a row share it. Each test
asserts that nothing survives into the next stage or submission, on the host or inside, and
that the service still serves afterwards."""

from __future__ import annotations

from typing import Any

import pytest
from attackio import Target

pytestmark = pytest.mark.timeout(90)

#: A daemon by the book: fork, setsid, fork again, ignore every catchable signal, keep
#: stdout open, and write a heartbeat into the working directory ten times a second.
DAEMON = """
import os, signal, sys, time
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE):
    signal.signal(sig, signal.SIG_IGN)
while True:
    with open("/box/heartbeat", "a") as beat:
        beat.write(".")
    time.sleep(0.1)
"""
#: What is alive: the command line of every process the program sees but init, itself and
#: its shell.
ALIVE = (
    "python3 -c \"import os; [print(open(f'/proc/{p}/cmdline').read().replace(chr(0), ' '))"
    " for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid(),"
    ' os.getppid())]"'
)


async def test_a_daemon_is_gone_when_its_stage_ends(target: Target) -> None:
    """The compile stage starts a double-forked, setsid daemon that ignores SIGTERM and
    SIGHUP and holds stdout, and a ``setsid sleep`` in the background. The compile stage
    still ends at once (``ok``); the run stage sees neither process and no new heartbeat;
    the host holds none of them; the next submission sees nothing either."""
    answer = await target.submit(
        {
            "files": [{"name": "daemon.py", "content": DAEMON}],
            "compile": "python3 daemon.py; (setsid sleep 1000 &); sleep 0.5; echo started",
            "run": f"a=$(wc -c < heartbeat); sleep 0.5; b=$(wc -c < heartbeat);"
            f" test $a = $b && echo still; {ALIVE}",
        }
    )
    compiled, ran = answer["stages"]["compile"], answer["stages"]["run"]
    assert (compiled["status"], compiled["stdout"]) == ("ok", "started\n"), compiled
    assert compiled["wall_time"] < 3, compiled
    assert (ran["status"], ran["stdout"]) == ("ok", "still\n"), ran
    await target.settled(timeout=5)
    after = await target.run(f"{ALIVE}; true")
    assert after["stdout"] == "", after
    await target.still_serves()


async def test_a_respawning_daemon_does_not_outrun_the_end_of_its_stage(target: Target) -> None:
    """A detached loop that forks a new short-lived child every few milliseconds, so that a
    killer walking the process list always meets new pids: the run stage ends ``ok`` when
    its shell exits, and the whole tree is gone from the host and from the next
    submission."""
    ran = await target.run(
        "setsid bash -c 'while :; do (exec -a respawner sleep 0.01 &); done' &"
        " sleep 0.3; echo spawning"
    )
    assert (ran["status"], ran["stdout"]) == ("ok", "spawning\n"), ran
    await target.settled(timeout=5)
    after = await target.run(f"{ALIVE}; true")
    assert after["stdout"] == "", after
    await target.still_serves()


#: Abstract and TCP sockets only live as long as a process holds them: a daemon holds them.
HOLD_SOCKETS = DAEMON.replace(
    "while True:",
    "import socket\nheld = [socket.socket(socket.AF_UNIX), socket.socket()]\n"
    "held[0].bind('\\0cellblock-left')\nheld[1].bind(('127.0.0.1', 5555))\n"
    "for s in held:\n    s.listen()\nwhile True:",
)
CONNECT = (
    "import socket\nfor family, address in [(socket.AF_UNIX, '\\0cellblock-left'),"
    " (socket.AF_INET, ('127.0.0.1', 5555))]:\n    try:\n"
    "        socket.socket(family).connect(address)\n        print('connected')\n"
    "    except OSError as exc:\n        print(exc.strerror)\n"
)
#: Each leftover: the first submission, which plants it (and shows that it did), and what
#: the next one in the same slot runs to look for it, which must print exactly the expected.
LEFTOVERS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "tmp": (
        {"run": "echo left > /tmp/left && mkdir /tmp/.d && ls -A /tmp"},
        {"run": "ls -A /tmp"},
        "",
    ),
    "dev-shm": (
        # POSIX shared memory objects and named semaphores are files there.
        {"run": "echo left > /dev/shm/left && : > /dev/shm/sem.left && ls -A /dev/shm"},
        {"run": "ls -A /dev/shm"},
        "",
    ),
    "working-directory": (
        {"run": "echo left > left && mkdir -p .hidden/deep && echo x > .hidden/deep/y && ls -A"},
        {"run": "ls -A"},
        "",
    ),
    "sysv-ipc": (
        {"run": "ipcmk -M 4096 && ipcmk -Q && ipcmk -S 1"},
        {"run": "ipcs | grep -c ^0x"},
        "0\n",
    ),
    "sockets": (
        {
            "files": [{"name": "hold.py", "content": HOLD_SOCKETS}],
            "run": "python3 hold.py && sleep 0.3 && grep -c cellblock-left /proc/net/unix",
        },
        {"files": [{"name": "connect.py", "content": CONNECT}], "run": "python3 connect.py"},
        "Connection refused\nConnection refused\n",
    ),
}


@pytest.mark.parametrize("kind", list(LEFTOVERS))
async def test_leftovers_are_not_seen_by_the_next_submission_in_the_slot(
    target: Target, kind: str
) -> None:
    """A submission leaves files in /tmp, /dev/shm (where POSIX shared memory lives) or its
    working directory, SysV IPC objects, or an abstract unix socket and a TCP listener held
    by a daemon; the next submission, in the same slot and uid, finds none of them."""
    plant, look, expected = LEFTOVERS[kind]
    planted = (await target.submit(plant))["stages"]["run"]
    assert planted["status"] == "ok" and planted["stdout"], planted
    seen = (await target.submit(look))["stages"]["run"]
    assert seen["stdout"] == expected, seen
    await target.settled(timeout=5)


async def test_the_next_submission_in_the_slot_is_measured_alone(target: Target) -> None:
    """Stages in a row in one slot share its series' cgroup (sandbox.py): one that takes
    200 MiB and spins for a second of CPU leaves none of that in the peak memory or CPU time
    reported for the next one."""
    heavy = (await target.submit({"run": (
        "python3 -c \"import time; b = bytearray(200 << 20); t = time.process_time()\n"
        "while time.process_time() - t < 1: pass\""
    )}))["stages"]["run"]  # fmt: skip
    assert heavy["status"] == "ok" and heavy["memory"] > 200 << 20, heavy
    assert heavy["cpu_time"] >= 1, heavy
    light = (await target.submit({"run": "true"}))["stages"]["run"]
    assert light["status"] == "ok", light
    assert light["memory"] < 32 << 20 and light["cpu_time"] < 0.5, light
    await target.settled(timeout=5)
