"""Exhaustion, end to end through the real service and a real executor running real nsjail:
fork and thread bombs, memory, the size-capped /tmp and /dev/shm, descriptors, output floods
over REST and the WebSocket, huge stdin and environments, and a compiler fed an endless
device. Each test asserts that the stage ends by its limit with an honest status, that the
host gets back what the stage took, and that the service still serves afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
import tornado.websocket
from attackio import Target
from restio import ALICE
from wsio import Socket

from cellblock.service.protocol import MAX_ARG_BYTES

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
MAX_BODY = MiB  # CELLBLOCK_MAX_BODY_SIZE of the service fixture (tests/conftest.py)

FORK_BOMB = "#include <unistd.h>\nint main(void) { for (;;) fork(); }\n"


async def test_a_fork_bomb_is_held_by_the_pids_cap_and_ends_at_its_wall_time(
    target: Target,
) -> None:
    """A C program forks for ever (ignoring every failure) under a pids cap of 64. On the
    host its slot never holds more than the cap; the stage ends ``time_limit`` at its wall
    time, and every process of it is gone from the host at once."""
    request = {
        "files": [{"name": "bomb.c", "content": FORK_BOMB}],
        "compile": "gcc -o bomb bomb.c",
        "run": "./bomb",
        "limits": {"run": {"pids": 64, "wall_time": 3}},
    }
    sid = await target.start(request)
    await target.running(sid)
    most = 0
    while (state := await target.rest.call("GET", f"/api/v1/submissions/{sid}"))[
        "finished_at"
    ] is None:
        most = max(most, len(target.sandboxed()))
        await asyncio.sleep(0.1)
    assert 32 < most <= 64, most  # it did fork, and no further than the cap
    run = state["stages"]["run"]
    assert run["status"] == "time_limit", run
    await target.settled(timeout=5)
    await target.still_serves()


async def test_a_thread_bomb_is_held_by_the_pids_cap(target: Target) -> None:
    """A Python program starts sleeping threads until it cannot: the pids cap of 64 stops
    it, it says how many it got, and exits 0, an honest ``ok``; its threads are gone from the
    host when the stage ends."""
    bomb = (
        "import os, threading, time\nn = 0\ntry:\n    while True:\n"
        "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "        n += 1\nexcept RuntimeError:\n    print(n, flush=True)\nos._exit(0)\n"
    )
    ran = await target.run(
        "python3 bomb.py",
        files=[{"name": "bomb.py", "content": bomb}],
        limits={"run": {"pids": 64}},
    )
    assert ran["status"] == "ok", ran
    assert 50 < int(ran["stdout"]) < 64, ran
    await target.settled(timeout=5)
    await target.still_serves()


async def test_a_memory_hog_ends_memory_limit(target: Target) -> None:
    """A C program touches memory without end under a 64 MiB cap: the stage ends
    ``memory_limit`` with its peak at the cap."""
    hog = (
        "#include <stdlib.h>\n#include <string.h>\nint main(void) {\n"
        "    for (;;) { char *p = malloc(1 << 20); if (p) memset(p, 1, 1 << 20); }\n}\n"
    )
    answer = await target.submit(
        {
            "files": [{"name": "hog.c", "content": hog}],
            "compile": "gcc -o hog hog.c",
            "run": "./hog",
            "limits": {"run": {"memory": 64 * MiB}},
        }
    )
    run = answer["stages"]["run"]
    assert run["status"] == "memory_limit", run
    assert 56 * MiB <= run["memory"] <= 64 * MiB, run
    await target.still_serves()


@pytest.mark.parametrize("folder", ["/tmp", "/dev/shm"])
async def test_filling_a_memory_backed_folder_stops_at_its_size_cap(
    target: Target, folder: str
) -> None:
    """The program writes 200 MiB into /tmp or /dev/shm: the folder's tmpfs is full at its
    64 MiB cap, the write fails with ENOSPC and the shell's exit says so (an honest
    ``failed``, not a memory kill), and the next submission finds the folder empty."""
    ran = await target.run(
        f"head -c 200M /dev/zero > {folder}/fill; status=$?; du -m {folder}/fill; exit $status",
        limits={"run": {"memory": 512 * MiB, "fsize": 1024 * MiB}},
    )
    assert ran["status"] == "failed", ran
    assert "No space left on device" in ran["stderr"], ran
    assert int(ran["stdout"].split()[0]) <= 64, ran
    after = await target.run(f"ls -A {folder}")
    assert (after["status"], after["stdout"]) == ("ok", ""), after


async def test_descriptors_are_capped_by_nofile(target: Target) -> None:
    """The program opens descriptors until it cannot, under nofile 64: EMFILE stops it
    below the cap, and it carries on to an honest ``ok``."""
    opener = (
        "import errno, os\nfds = []\ntry:\n    while True:\n"
        "        fds.append(os.open('/dev/null', os.O_RDONLY))\nexcept OSError as exc:\n"
        "    print(len(fds), errno.errorcode[exc.errno])\n"
    )
    ran = await target.run(
        "python3 open.py",
        files=[{"name": "open.py", "content": opener}],
        limits={"run": {"nofile": 64}},
    )
    assert ran["status"] == "ok", ran
    count, error = ran["stdout"].split()
    assert error == "EMFILE" and 50 < int(count) < 64, ran
    await target.still_serves()


async def test_an_output_flood_over_rest_is_cut_at_the_output_cap(target: Target) -> None:
    """100 MB on stdout and 10 MB on stderr, under an output cap of 64 KiB: each stream
    keeps its first 64 KiB, says ``*_truncated``, the stage is ``ok`` and the whole answer
    stays small."""
    cap = 64 * 1024
    response = await target.rest.request(
        "POST",
        "/api/v1/submissions?wait=true",
        {
            "run": "head -c 100000000 /dev/zero | tr '\\0' o; head -c 10000000 /dev/zero"
            " | tr '\\0' e >&2",
            "limits": {"run": {"output": cap}},
        },
        timeout=60,
    )
    assert response.code == 201, response.body
    assert len(response.body) < 4 * cap
    run = json.loads(response.body)["stages"]["run"]
    assert run["status"] == "ok", run
    assert (run["stdout"], run["stderr"]) == ("o" * cap, "e" * cap)
    assert run["stdout_truncated"] and run["stderr_truncated"]
    await target.still_serves()


async def test_an_output_flood_over_the_websocket_is_cut_at_the_output_cap(
    target: Target,
) -> None:
    """The same flood, endless this time, watched live over the WebSocket: the output
    events carry no more than the cap per stream, the stage ends ``time_limit`` at its
    wall time with ``stdout_truncated``, and the socket still answers afterwards."""
    cap = 64 * 1024
    conn = await tornado.websocket.websocket_connect(f"{target.ws_url}?token={ALICE}")
    ws = Socket(conn)
    try:
        submission = {"run": "yes flood", "limits": {"run": {"output": cap, "wall_time": 2}}}
        accepted = await ws.ask({"type": "submit", "submission": submission})
        assert accepted["type"] == "accepted", accepted
        events = await ws.events_until_finished()
        live = "".join(e["data"] for e in events if e["type"] == "output")
        assert live == ("flood\n" * cap)[:cap]
        run = events[-1]["submission"]["stages"]["run"]
        assert (run["status"], run["stdout_truncated"], len(run["stdout"])) == (
            "time_limit", True, cap,
        )  # fmt: skip
        status = await ws.ask({"type": "status", "id": accepted["id"]})
        assert status["submission"]["status"] == "finished"
    finally:
        await ws.close()
    await target.still_serves()


def request_of_size(size: int) -> bytes:
    """A submission whose JSON body is ``size`` bytes, nearly all of it stdin, which the
    program measures and hashes."""
    body = {"run": "cat > in && wc -c < in && sha256sum < in", "stdin": ""}
    body["stdin"] = "s" * (size - len(json.dumps(body).encode()))
    return json.dumps(body).encode()


async def test_huge_stdin_is_bounded_by_the_body_size(target: Target) -> None:
    """A stdin that takes the body over its configured size answers 413 and queues
    nothing; one that leaves the body a byte under it runs, and the program reads every
    byte of it."""
    over = await target.rest.request(
        "POST", "/api/v1/submissions", raw=request_of_size(MAX_BODY + 1)
    )
    assert over.code == 413, over.body
    assert json.loads(over.body)["error"]["code"]
    assert (await target.rest.call("GET", "/api/v1/submissions"))["submissions"] == []
    body = request_of_size(MAX_BODY - 1)
    response = await target.rest.request(
        "POST", "/api/v1/submissions?wait=true", raw=body, timeout=60
    )
    assert response.code == 201, response.body
    run = json.loads(response.body)["stages"]["run"]
    stdin = json.loads(body)["stdin"].encode()
    assert run["status"] == "ok", run
    assert run["stdout"].split()[:2] == [str(len(stdin)), hashlib.sha256(stdin).hexdigest()]


@pytest.mark.parametrize(("script", "status"), [("exit 0", "ok"), ("sleep 30", "time_limit")])
async def test_huge_stdin_the_program_never_reads_does_not_hold_its_stage(
    target: Target, script: str, status: str
) -> None:
    """Almost a body's worth of stdin, far more than a pipe holds, to a program that never
    reads it: one that exits ends the stage at once, one that sleeps ends it at its wall
    time; neither waits for the executor to finish writing."""
    ran = await target.run(script, stdin="s" * (MAX_BODY - 1000), limits={"run": {"wall_time": 1}})
    assert ran["status"] == status, ran
    assert ran["wall_time"] < 1.5, ran
    await target.still_serves()


async def test_huge_environments_and_arguments_are_refused_or_run_whole(target: Target) -> None:
    """An environment over the body size answers 413. One variable or argument longer than
    Linux passes to a program (MAX_ARG_STRLEN) can never start, so it answers 422 naming the
    field, rather than failing in the sandbox. Many variables that fill the body just
    under its size run, each seen whole by the program."""
    huge = {f"V{i}": "x" * 100_000 for i in range(11)}
    over = await target.rest.request("POST", "/api/v1/submissions", {"run": "env", "env": huge})
    assert over.code == 413, over.body
    too_long = MAX_ARG_BYTES  # with "V=" the string is two bytes over
    for fields, field in [
        ({"env": {"V": "x" * too_long}}, "env"),
        ({"args": ["x", "y" * (MAX_ARG_BYTES + 1)]}, "args"),
    ]:
        refused = await target.rest.request(
            "POST", "/api/v1/submissions", {"run": 'echo "$@"', **fields}
        )
        assert refused.code == 422, refused.body
        error = json.loads(refused.body)["error"]
        assert [d["field"] for d in error["details"]] == [field], error
    assert (await target.rest.call("GET", "/api/v1/submissions"))["submissions"] == []
    # Eight variables of the longest length allowed, and one that takes the body to
    # a few bytes under its size.
    env = {f"V{i}": "x" * (MAX_ARG_BYTES - len(f"V{i}=")) for i in range(7)}
    show = (
        "import os\nfor k, v in sorted(os.environ.items()):\n    if k[0] == 'V': print(k, len(v))"
    )
    request = {"run": f'python3 -c "{show}"', "env": env}
    last = MAX_BODY - 50 - len(json.dumps(request))
    request["env"]["V7"] = "y" * last
    assert MAX_BODY - 60 < len(json.dumps(request)) < MAX_BODY
    started = time.monotonic()
    ran = (await target.submit(request))["stages"]["run"]
    assert ran["status"] == "ok", ran
    lengths = {line.split()[0]: int(line.split()[1]) for line in ran["stdout"].splitlines()}
    assert lengths == {name: len(value) for name, value in env.items()}
    assert time.monotonic() - started < 10
    await target.still_serves()


@pytest.mark.parametrize("device", ["/dev/random", "/dev/zero"])
async def test_including_an_endless_device_in_a_compile_ends_by_a_limit(
    target: Target, device: str
) -> None:
    """``#include "/dev/random"`` (or /dev/zero) has the compiler read without end: the
    compile stage ends ``memory_limit`` within seconds, the run stage is skipped, and the
    executor serves on."""
    started = time.monotonic()
    answer = await target.submit(
        {
            "files": [{"name": "main.c", "content": f'#include "{device}"\nint main;\n'}],
            "compile": "gcc -c main.c",
            "run": "true",
            "limits": {"compile": {"memory": 256 * MiB, "wall_time": 20}},
        }
    )
    compiled = answer["stages"]["compile"]
    assert compiled["status"] == "memory_limit", compiled
    assert answer["stages"]["run"]["status"] == "skipped"
    assert time.monotonic() - started < 15
    await target.still_serves()
