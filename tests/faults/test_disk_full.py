"""The disk under `cellblock up`'s state directory fills up (a small tmpfs here) while
submissions come in. Redis, its append-only file synced at every write, cannot write: it
exits rather than answer a write it could not keep, and `cellblock up` starts it again. Until
there is room, the service answers 503 with Retry-After (never a 500) and the workers wait;
once there is room, every submission that was accepted (a 201 is given only after Redis
synced it) ends exactly once, finished, with its own output."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from loadio import all_ended, check_each_finished_once
from restio import Rest
from upio import cellblock_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_a_full_disk_under_the_state_directory_loses_nothing_accepted(
    tmp_path: Path, sandbox_root: Path, until: Any
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(state)],
                   check=True)  # fmt: skip
    try:
        with cellblock_up(tmp_path, sandbox_root, uid_base=260000) as up:
            url = (up / "url").read_text().strip()
            rest = Rest(url)
            try:
                await _fill_and_free(rest, up, url, until)
            finally:
                rest.close()
    finally:
        subprocess.run(["umount", "--lazy", str(state)], check=False)


async def _fill_and_free(rest: Rest, up: Path, url: str, until: Any) -> None:
    token = (up / "token").read_text().strip()
    accepted: list[str] = []
    codes: list[int] = []

    async def submit(i: int) -> None:
        response = await rest.request(
            "POST", "/api/v1/submissions", {"run": f"sleep 0.3; echo {i}"}, token=token
        )
        codes.append(response.code)
        if response.code == 201:
            accepted.append(json.loads(response.body)["id"])
        else:
            assert response.code == 503, (response.code, response.body)
            assert response.headers["Retry-After"]

    for _ in range(50):  # in flight when the disk fills
        await submit(len(accepted))
    assert len(accepted) == 50, codes
    filler = up / "filler"
    with filler.open("wb") as f:  # all the room there is
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for _ in range(30):
        await submit(len(accepted))
        await asyncio.sleep(0.1)
    assert 503 in codes, codes  # the store could not keep what it was sent
    filler.unlink()
    await until(lambda: _answers(rest, token), "the service to answer again", timeout=90)
    for _ in range(10):
        await submit(len(accepted))
    await until(
        lambda: all_ended(rest, accepted, token), "every accepted submission to end", timeout=120
    )
    ws_url = url.replace("http://", "ws://") + "/api/v1/ws"
    await check_each_finished_once(rest, ws_url, accepted, token)


async def _answers(rest: Rest, token: str) -> bool:
    return (await rest.request("GET", "/api/v1/health", token=None)).code == 200
