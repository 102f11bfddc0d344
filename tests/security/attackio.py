"""The sandbox attack suites' view of their target: one service with one real executor, reached
over REST as an attacker reaches it, and what the host sees of the executor's slots. A module of
its own because test modules cannot import conftest.py (its fixtures are in conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.websocket
from probeio import still_serves, submit
from restio import ALICE, Rest
from wsio import Socket

from cellblock.executor.sandbox import INIT_PATH

#: The first slot uid of these suites' executors: a range of this test session's own (the
#: default base is 200000), so that what the tests count on the host by uid is theirs alone,
#: not the sandboxes of other test sessions on this machine.
UID_BASE = 300_000 + os.getpid() % 4096 * 1000
#: ``start_executor`` (tests/conftest.py) gives a test's first executor the uid offset 100.
FIRST_OFFSET = 100

Until = Callable[..., Awaitable[Any]]  # the until fixture of tests/conftest.py


def processes_of(uids: Sequence[int]) -> list[int]:
    """Host pids of the live (not zombie) processes whose real uid is one of ``uids``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            lines = (entry / "status").read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        status = dict(line.split(":", 1) for line in lines if ":" in line)
        if int(status["Uid"].split()[0]) in uids and status["State"].split()[0] not in "ZX":
            found.append(int(entry.name))
    return found


def command_of(pid: int) -> str:
    """The command line of ``pid``, its arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Target:
    """One service with one registered executor."""

    rest: Rest
    ws_url: str
    until: Until
    #: The host uids of the executor's slots, slot 0 first.
    uids: list[int]
    #: Where the executor makes its working directories (see executor/disk.py).
    work_root: Path

    async def submit(
        self, request: dict[str, Any], timeout: float = 60, token: str = ALICE
    ) -> dict[str, Any]:
        """Submit and wait (``?wait=true``) for the finished submission."""
        if token == ALICE:
            return await submit(self.rest, request, timeout)
        path = f"/api/v1/submissions?wait=true&timeout={timeout}"
        answer: dict[str, Any] = await self.rest.call(
            "POST", path, request, token=token, expect=201, timeout=timeout + 10
        )
        assert answer["status"] == "finished", answer
        return answer

    async def run(self, script: str, **fields: Any) -> dict[str, Any]:
        """The run stage's result of a submission of ``script`` and the other ``fields``."""
        answer = await self.submit({"run": script, **fields})
        result: dict[str, Any] = answer["stages"]["run"]
        return result

    async def start(self, request: dict[str, Any], token: str = ALICE) -> str:
        """Submit without waiting; the id."""
        answer = await self.rest.call(
            "POST", "/api/v1/submissions", request, token=token, expect=201
        )
        sid: str = answer["id"]
        return sid

    async def running(self, sid: str, token: str = ALICE) -> None:
        """Wait until the submission ``sid`` runs its run stage."""

        async def check() -> bool:
            state = await self.rest.call("GET", f"/api/v1/submissions/{sid}", token=token)
            return bool(state["status"] == "running" and state["stage"] == "run")

        await self.until(check, f"submission {sid} to run")

    async def printed(self, sid: str, text: str, token: str = ALICE) -> None:
        """Wait until the run stage of the submission ``sid`` has printed ``text`` (watched
        over the WebSocket, as the output streams)."""
        conn = await tornado.websocket.websocket_connect(f"{self.ws_url}?token={token}")
        ws = Socket(conn)
        try:
            await ws.send({"type": "watch", "id": sid, "since": 0})
            seen = ""
            while text not in seen:
                event = await ws.receive()
                assert event["type"] != "finished", event
                if event["type"] == "output" and event["stage"] == "run":
                    seen += event["data"]
        finally:
            await ws.close()

    async def cancel(self, sid: str, token: str = ALICE) -> None:
        await self.rest.call("DELETE", f"/api/v1/submissions/{sid}", token=token, expect=200)

    async def still_serves(self) -> None:
        """The service and its executor still run ``echo ok``."""
        await still_serves(self.rest)

    def sandboxed(self) -> list[int]:
        """Host pids of every process of this executor's slots."""
        return processes_of(self.uids)

    async def settled(self, timeout: float = 15) -> None:
        """Wait until each slot holds nothing but its armed jail's init (one process, whose
        command line is init's): every process of ended stages is gone from the host."""

        def only_init(uid: int) -> bool:
            pids = processes_of([uid])
            return len(pids) <= 1 and all(command_of(pid).startswith(INIT_PATH) for pid in pids)

        await self.until(
            lambda: all(only_init(uid) for uid in self.uids),
            "the slots to hold nothing but their armed jails",
            timeout=timeout,
        )

    def workdirs(self) -> list[Path]:
        """The working directories of this executor's slots on the host now (each idle slot
        keeps one ready for its next submission); not the links a series binds ``/box`` from."""
        found = [p for uid in self.uids for p in self.work_root.glob(f"{uid}-*")]
        return [p for p in found if not p.is_symlink()]


#: ``await open_target(slots=1, **env)``: the open_target fixture of conftest.py.
OpenTarget = Callable[..., Awaitable[Target]]
