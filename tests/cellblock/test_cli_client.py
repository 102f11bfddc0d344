"""``cellblock submit``, ``workers`` and ``scale`` against the real service (in this test's event
loop, so ``main``, which calls ``asyncio.run``, runs in a thread).

Exit statuses as for ``cellblock exec``: 0 all well, 1 a stage did not succeed, 2 bad input (the
protocol's error document on stderr), 3 the service or the system failed (one line on stderr).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellblock import cli
from cellblock.service.client import Client
from cellblock.service.store import Store


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CELLBLOCK_* variable of the caller's leaks in; the root logger that ``main``
    reconfigures is put back."""
    for name in list(os.environ):
        if name.startswith("CELLBLOCK_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def alice(service: Any) -> AsyncIterator[Client]:
    async with Client(service.url, "alice-token") as client:
        yield client


class Cellblock:
    """Runs ``cellblock.cli.main`` against the test service, as alice unless told otherwise."""

    def __init__(self, service: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.service = service
        self.tmp_path = tmp_path
        self.capsys = capsys
        self.stdout = ""
        self.stderr = ""

    async def __call__(self, *argv: str, token: str | None = "alice-token") -> int:
        self.capsys.readouterr()
        options = ["--url", self.service.url] + (["--token", token] if token else [])
        status = await asyncio.to_thread(cli.main, [*argv, *options])
        self.stdout, self.stderr = self.capsys.readouterr()
        assert "Traceback" not in self.stderr
        return status

    def file(self, request: object) -> str:
        path = self.tmp_path / "submission.json"
        path.write_text(json.dumps(request))
        return str(path)

    def json(self) -> Any:
        return json.loads(self.stdout)

    def message(self) -> str:
        """The command's one message on stderr (the in-process service logs there too)."""
        [line] = [line for line in self.stderr.splitlines() if line.startswith("cellblock:")]
        return line

    def error_document(self) -> dict[str, Any]:
        [line] = [line for line in self.stderr.splitlines() if line.startswith('{"error"')]
        error: dict[str, Any] = json.loads(line)["error"]
        return error


@pytest.fixture
def cellblock(service: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cellblock:
    return Cellblock(service, tmp_path, capsys)


# -- submit -------------------------------------------------------------------------------------


async def test_submit_wait(cellblock: Cellblock, executor: Any) -> None:
    request = {"run": 'echo "hello $1"', "args": ["world"]}
    assert await cellblock("submit", cellblock.file(request), "--wait") == cli.EXIT_OK
    submission = cellblock.json()
    assert submission["status"] == "finished"
    assert submission["stages"]["run"]["stdout"] == "hello world\n"


async def test_submit_stream(cellblock: Cellblock, executor: Any) -> None:
    request = {"run": "echo one; sleep 0.2; echo two"}
    assert await cellblock("submit", cellblock.file(request), "--stream") == cli.EXIT_OK
    events = [json.loads(line) for line in cellblock.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "finished"
    output = "".join(e["data"] for e in events if e["type"] == "output")
    assert output == "one\ntwo\n"


async def test_submit_a_failing_program(cellblock: Cellblock, executor: Any) -> None:
    request = {"run": "echo bad >&2; exit 3"}
    assert await cellblock("submit", cellblock.file(request), "--wait") == cli.EXIT_STAGE_FAILED
    run = cellblock.json()["stages"]["run"]
    assert (run["status"], run["exit_code"], run["stderr"]) == ("failed", 3, "bad\n")


async def test_submit_without_waiting(cellblock: Cellblock, alice: Client) -> None:
    assert await cellblock("submit", cellblock.file({"run": "true"})) == cli.EXIT_OK
    answer = cellblock.json()
    assert answer["status"] == "queued"
    assert (await alice.get(answer["id"]))["status"] == "queued"


async def test_submit_from_stdin(
    cellblock: Cellblock, alice: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"run": "true"})))
    assert await cellblock("submit", "-") == cli.EXIT_OK
    assert (await alice.get(cellblock.json()["id"]))["id"] == cellblock.json()["id"]


async def test_submit_bad_input(cellblock: Cellblock) -> None:
    request = {"run": "true", "limits": {"run": {"cpu": 10**6}}}
    for options in ([], ["--wait"], ["--stream"]):
        assert await cellblock("submit", cellblock.file(request), *options) == cli.EXIT_BAD_INPUT
        error = cellblock.error_document()
        assert error["code"] == "limit_exceeded"
        assert error["details"][0]["field"] == "limits.run.cpu"
        assert cellblock.stdout == ""
    not_json = cellblock.tmp_path / "broken.json"
    not_json.write_text("{")
    assert await cellblock("submit", str(not_json)) == cli.EXIT_BAD_INPUT
    assert cellblock.error_document()["message"].startswith("not JSON")
    assert await cellblock("submit", cellblock.file([1, 2])) == cli.EXIT_BAD_INPUT


async def test_submit_to_an_unreachable_service(cellblock: Cellblock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    status = await asyncio.to_thread(
        cli.main, ["submit", cellblock.file({"run": "true"}), "--url", url, "--token", "t"]
    )
    _, stderr = cellblock.capsys.readouterr()
    assert status == cli.EXIT_SYSTEM
    assert stderr == f"cellblock: cannot reach the Cellblock service at {url}: Connection refused\n"


async def test_submit_with_a_wrong_token(cellblock: Cellblock) -> None:
    for options in ([], ["--stream"]):
        request = cellblock.file({"run": "true"})
        assert await cellblock("submit", request, *options, token="nope") == cli.EXIT_SYSTEM
        assert cellblock.message().startswith("cellblock: a valid token is required")


async def test_submit_finds_the_service_in_the_state_dir(
    cellblock: Cellblock, service: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "up-state"
    state.mkdir()
    (state / "url").write_text(service.url + "\n")
    (state / "token").write_text("alice-token\n")
    argv = ["submit", cellblock.file({"run": "true"}), "--state-dir", str(state)]
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["status"] == "queued"
    (state / "token").unlink()
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_SYSTEM
    assert "CELLBLOCK_TOKEN" in capsys.readouterr().err


async def test_interrupting_submit_wait_cancels_the_submission(
    cellblock: Cellblock, alice: Client, executor: Any
) -> None:
    # In a thread, Ctrl-C cannot reach asyncio.run; cancelling the command's task is what
    # asyncio.run does on Ctrl-C.
    argv = ["submit", cellblock.file({"run": "echo started; sleep 30"}), "--stream"]
    args = cli.build_parser().parse_args([*argv, "--url", cellblock.service.url,
                                          "--token", "alice-token"])  # fmt: skip
    task = asyncio.create_task(cli._client_command(args, Path(".")))
    while (
        not (submissions := await alice.list())
        or submissions[0]["ran"] is not None
        or (submissions[0]["stage"] != "run")
    ):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await alice.get(submissions[0]["id"]))["status"] == "cancelled"
    assert f"cancelled submission {submissions[0]['id']}" in cellblock.capsys.readouterr().err


# -- workers and scale --------------------------------------------------------------------------


async def test_workers_and_drain(cellblock: Cellblock, executor: Any) -> None:
    for _ in range(200):
        assert await cellblock("workers", token="admin-token") == cli.EXIT_OK
        if cellblock.json()["workers"]:
            break
        await asyncio.sleep(0.05)
    [worker] = cellblock.json()["workers"]
    assert worker["id"] == executor.worker_id
    # Alice is no admin: she sees the capacity, and no worker's id.
    assert await cellblock("workers") == cli.EXIT_OK
    capacity = {"executors": 1, "builders": 0, "slots": 2, "busy": 0, "queued": 0}
    assert cellblock.json() == {"capacity": capacity}
    assert await cellblock("workers", "--drain", worker["id"]) == cli.EXIT_SYSTEM
    assert cellblock.message() == "cellblock: this needs an admin token"
    drain = ["workers", "--drain", worker["id"]]
    assert await cellblock(*drain, token="admin-token") == cli.EXIT_OK
    assert cellblock.json() == {"id": worker["id"], "status": "draining"}
    assert await cellblock("workers", "--drain", "nobody", token="admin-token") == cli.EXIT_SYSTEM
    assert "nobody" in cellblock.message()


async def test_with_only_a_client_token_workers_shows_the_capacity_and_packages_lists(
    cellblock: Cellblock, tmp_path: Path
) -> None:
    # A state directory such as the embedded deployment's kernels get: no admin-token in it.
    state = tmp_path / "client-state"
    state.mkdir()
    (state / "token").write_text("alice-token\n")
    options = ["--state-dir", str(state)]
    assert await cellblock("packages", *options, token=None) == cli.EXIT_OK
    assert cellblock.json() == []
    assert await cellblock("workers", *options, token=None) == cli.EXIT_OK
    assert cellblock.json() == {
        "capacity": {"executors": 0, "builders": 0, "slots": 0, "busy": 0, "queued": 0}
    }
    # Draining is for admins only: no admin token, no call.
    assert await cellblock("workers", "--drain", "x", *options, token=None) == cli.EXIT_SYSTEM
    assert "no admin token" in cellblock.message()


async def test_scale(cellblock: Cellblock, redis_url: str) -> None:
    assert await cellblock("scale", token="admin-token") == cli.EXIT_BAD_INPUT
    assert "--executors" in cellblock.error_document()["message"]
    assert await cellblock("scale", "--executors", "2", token="admin-token") == cli.EXIT_SYSTEM
    assert "cellblock up" in cellblock.message()  # this service is not supervised
    store = Store.connect(redis_url, retention=60, queue_size=50)
    try:
        await store.supervise(ttl=30)
        argv = ["scale", "--executors", "2", "--builders", "0"]
        assert await cellblock(*argv, token="admin-token") == cli.EXIT_OK
        assert cellblock.json()["status"] == "scaling"
        assert await store.scale() == {"executors": 2, "builders": 0}
    finally:
        await store.close()
    assert await cellblock("scale", "--executors", "-1", token="admin-token") == 2
    assert cellblock.error_document()["details"][0]["field"] == "executors"
