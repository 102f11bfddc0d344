"""Attacks on the host's disk. `fsize` caps one file, so forty 60 MB files once put 2.4 GB on
the host in 3 s, and a few such submissions would fill the disk under Redis's AOF. Now every
working directory is a btrfs subvolume with a cap of its stage's `disk` limit, on an image
whose size bounds everything sandboxes can write (executor/disk.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from probeio import still_serves, submit
from restio import Rest

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024


def host_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


async def test_forty_big_files_stop_at_the_cap(rest: Rest, sandbox_root: Path) -> None:
    """Forty 60 MB files (each under fsize): the directory stops at its 32 MiB cap, the stage
    says disk_limit, and the host's disk lost no more than the cap."""
    before = host_free(sandbox_root)
    script = "for i in $(seq 1 40); do head -c 60000000 /dev/zero > f$i; done"
    limits = {"run": {"disk": 32 * MiB, "fsize": 64 * MiB}}
    answer = await submit(rest, {"run": script, "limits": limits})
    run = answer["stages"]["run"]
    assert run["status"] == "disk_limit", run
    assert run["message"] == f"disk limit of {32 * MiB} bytes for the working directory reached"
    assert "Disk quota exceeded" in run["stderr"]
    assert before - host_free(sandbox_root) < 64 * MiB
    await still_serves(rest)


async def test_one_big_file_stops_at_the_cap(rest: Rest) -> None:
    """One file, with fsize far above the disk cap: the cap, not fsize, ends it."""
    limits = {"run": {"disk": 16 * MiB, "fsize": 1024 * MiB}}
    answer = await submit(rest, {"run": "head -c 200000000 /dev/zero > big", "limits": limits})
    assert answer["stages"]["run"]["status"] == "disk_limit", answer["stages"]["run"]


async def test_many_small_files_count_too(rest: Rest) -> None:
    """Empty files take no data, but their metadata counts against the cap, so a flood of
    them cannot exhaust the shared file system's metadata."""
    script = 'python3 -c \'import os\nfor i in range(1000000): open(f"f{i}", "w").close()\''
    answer = await submit(rest, {"run": script, "limits": {"run": {"disk": 4 * MiB}}})
    run = answer["stages"]["run"]
    assert run["status"] == "disk_limit", run
    await still_serves(rest)


async def test_uploaded_files_count_and_a_request_over_the_cap_is_refused(rest: Rest) -> None:
    """Files the request uploads are in the directory too: a request whose files exceed a
    stage's cap answers 422 naming it; files that fit leave only the rest for the program."""
    blob = {"name": "blob", "content": "00" * (400 * 1024), "encoding": "hex"}
    response = await rest.call(
        "POST",
        "/api/v1/submissions",
        {"files": [blob], "run": "true", "limits": {"run": {"disk": 256 * 1024}}},
        expect=422,
    )
    [problem] = response["error"]["details"]
    assert problem["field"] == "files" and "limits.run.disk" in problem["message"]
    compiled = await rest.call(
        "POST",
        "/api/v1/submissions",
        {"files": [blob], "compile": "true", "run": "true",
         "limits": {"compile": {"disk": 256 * 1024}}},
    expect=422)  # fmt: skip
    assert "limits.compile.disk" in compiled["error"]["details"][0]["message"]
    fits = await submit(
        rest,
        {"files": [blob], "run": "head -c 800000 /dev/zero > more",
         "limits": {"run": {"disk": 1 * MiB}}},
    )  # fmt: skip
    assert fits["stages"]["run"]["status"] == "disk_limit"


async def test_the_cap_is_per_stage_and_what_compile_left_counts(rest: Rest) -> None:
    """Compile may write up to its own cap; the run stage's smaller cap then holds what
    compile left, so the run stage can add nothing more."""
    answer = await submit(
        rest,
        {"compile": "head -c 6000000 /dev/zero > build", "run": "echo x > more",
         "limits": {"compile": {"disk": 16 * MiB}, "run": {"disk": 4 * MiB}}},
    )  # fmt: skip
    assert answer["stages"]["compile"]["status"] == "ok"
    assert answer["stages"]["run"]["status"] == "disk_limit", answer["stages"]["run"]


async def test_a_cap_over_the_maximum_is_refused(rest: Rest) -> None:
    response = await rest.call(
        "POST", "/api/v1/submissions", {"run": "true", "limits": {"run": {"disk": 2**40}}},
        expect=422,
    )  # fmt: skip
    assert response["error"]["details"][0]["field"] == "limits.run.disk"


async def test_the_next_submission_in_the_slot_starts_empty(rest: Rest) -> None:
    """A submission that filled its directory leaves nothing behind: the next one in the same
    slot has the whole of its own cap."""
    await submit(
        rest, {"run": "head -c 50000000 /dev/zero > f", "limits": {"run": {"disk": 8 * MiB}}}
    )
    answer = await submit(
        rest,
        {"run": "ls -A; head -c 6000000 /dev/zero > g && echo fits",
         "limits": {"run": {"disk": 8 * MiB}}},
    )  # fmt: skip
    assert answer["stages"]["run"]["stdout"] == "fits\n", answer["stages"]["run"]
