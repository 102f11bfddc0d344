"""Output files (executor/outputs.py) read from a directory laid out the way a hostile stage
could leave it: symlinks, FIFOs, devices, folders reached through symlinks, huge files."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from cellblock.executor import outputs
from cellblock.executor.outputs import collect, open_beneath
from cellblock.service.protocol import SandboxResult

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
MiB = 1024 * 1024


def content(file: object) -> bytes:
    return base64.b64decode(file.content)  # type: ignore[attr-defined]


def test_files_come_back_with_their_media_types(tmp_path: Path) -> None:
    (tmp_path / "plot.png").write_bytes(PNG)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.csv").write_text("x,y\n1,2\n")
    (tmp_path / "results" / "b.csv").write_text("x,y\n")
    (tmp_path / "results" / "c.txt").write_text("no")
    (tmp_path / "picture.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    got = collect(tmp_path, ["plot.png", "results/*.csv", "picture.svg"], MiB, 4 * MiB)
    assert [(f.name, f.media_type, f.size, f.truncated) for f in got.files] == [
        ("plot.png", "image/png", len(PNG), False),
        ("results/a.csv", "text/csv", 8, False),
        ("results/b.csv", "text/csv", 4, False),
        ("picture.svg", "image/svg+xml", 41, False),
    ]
    assert content(got.files[0]) == PNG
    assert got.files[0].encoding == "base64"
    assert got.missing == []


def test_a_pattern_that_matches_nothing_is_missing_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("here")
    got = collect(tmp_path, ["here.txt", "absent.png", "*.gif", "no/such/*"], MiB, MiB)
    assert [f.name for f in got.files] == ["here.txt"]
    assert got.missing == ["absent.png", "*.gif", "no/such/*"]


def test_a_file_named_twice_comes_back_once(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    got = collect(tmp_path, ["a.txt", "*.txt"], MiB, MiB)
    assert [f.name for f in got.files] == ["a.txt"]
    assert got.missing == []


def test_wildcards_skip_dotfiles_as_glob_does(tmp_path: Path) -> None:
    (tmp_path / ".hidden.txt").write_text("h")
    (tmp_path / "seen.txt").write_text("s")
    assert [f.name for f in collect(tmp_path, ["*.txt"], MiB, MiB).files] == ["seen.txt"]
    assert [f.name for f in collect(tmp_path, [".*.txt"], MiB, MiB).files] == [".hidden.txt"]


def test_a_symlink_is_never_followed_to_a_host_file(tmp_path: Path) -> None:
    os.symlink("/etc/passwd", tmp_path / "plot.png")
    os.symlink("/etc", tmp_path / "etc")
    (tmp_path / "inner").mkdir()
    os.symlink("../inner", tmp_path / "inner" / "loop")
    got = collect(tmp_path, ["plot.png", "etc/passwd", "etc/*", "*", "inner/loop/*"], MiB, MiB)
    assert got.files == []
    assert got.missing == ["plot.png", "etc/passwd", "etc/*", "*", "inner/loop/*"]


def test_a_symlinked_working_directory_itself_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(OSError) as raised:
        collect(tmp_path / "link", ["*"], MiB, MiB)
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_openat2_refuses_escapes_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "box").mkdir()
    os.symlink("/etc/passwd", tmp_path / "box" / "link")
    root = os.open(tmp_path / "box", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for path, code in (("../box/link", errno.EXDEV), ("link", errno.ELOOP),
                           ("/etc/passwd", errno.EXDEV)):  # fmt: skip
            with pytest.raises(OSError) as raised:
                open_beneath(root, path, os.O_RDONLY)
            assert raised.value.errno == code, path
    finally:
        os.close(root)


def test_a_fifo_or_a_device_is_skipped_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "plot.png")
    os.mkfifo(tmp_path / "data.txt")
    finished = threading.Event()

    def read() -> None:
        got = collect(tmp_path, ["plot.png", "*.txt"], MiB, MiB)
        assert got.files == []
        finished.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    assert finished.is_set(), "opening a FIFO blocked the reader"


def test_a_directory_named_by_a_pattern_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "out.png").mkdir()
    assert collect(tmp_path, ["out.png"], MiB, MiB).missing == ["out.png"]


def test_a_file_over_the_cap_is_cut_and_marked_truncated(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"\xff" * (3 * MiB))
    [big] = collect(tmp_path, ["big.bin"], MiB, 16 * MiB).files
    assert (big.size, big.truncated, len(content(big))) == (3 * MiB, True, MiB)
    assert big.media_type == "application/octet-stream"


def test_the_total_cap_cuts_the_files_after_it(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_bytes(name.encode() * 600)
    got = collect(tmp_path, ["*.txt"], 1000, 1000)
    assert [(f.name, len(content(f)), f.truncated) for f in got.files] == [
        ("a.txt", 600, False),
        ("b.txt", 400, True),
        ("c.txt", 0, True),
    ]


def test_a_sparse_file_of_a_terabyte_costs_only_the_cap(tmp_path: Path) -> None:
    with (tmp_path / "huge.dat").open("wb") as f:
        f.truncate(1 << 40)
    [huge] = collect(tmp_path, ["huge.dat"], MiB, MiB).files
    assert (huge.size, huge.truncated, len(content(huge))) == (1 << 40, True, MiB)


def test_a_folder_of_many_entries_is_looked_at_only_so_far(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "MAX_ENTRIES", 50)  # the real cap, scaled down for speed
    for i in range(200):
        (tmp_path / f"{i:03}.txt").write_text("x")
    assert len(collect(tmp_path, ["*.txt"], MiB, MiB).files) == 50


def test_a_name_that_is_not_utf8_is_skipped(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"bad\xff.txt")).write_text("x")
    (tmp_path / "good.txt").write_text("x")
    assert [f.name for f in collect(tmp_path, ["*.txt"], MiB, MiB).files] == ["good.txt"]


def test_a_socket_or_a_name_too_long_is_not_a_file_and_no_failure(tmp_path: Path) -> None:
    """Opening a UNIX socket fails with ENXIO, a path past PATH_MAX with ENAMETOOLONG: the
    sandbox plants either to make the host fail the whole submission."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "x.png"))
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(20):  # 20 x 250 bytes: past PATH_MAX when named from the top
            os.mkdir("d" * 250, dir_fd=fd)
            deeper = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.close(fd)
        pattern = "/".join(["*"] * 21)
        got = collect(tmp_path, ["*.png", "x.png", pattern], MiB, MiB)
    assert got.files == []
    assert got.missing == ["*.png", "x.png", pattern]
    shutil.rmtree(tmp_path / ("d" * 250))


def test_a_file_past_the_total_cap_still_has_its_media_type(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "b.png").write_bytes(PNG)
    got = collect(tmp_path, ["a.txt", "b.png"], MiB, 100)
    assert [(f.name, f.media_type, f.truncated, f.content) for f in got.files][1] == (
        "b.png", "image/png", True, ""
    )  # fmt: skip
    assert got.kept == 100


def test_a_pattern_naming_more_files_than_a_result_returns_is_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "MAX_FILES", 3)
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("x")
    got = collect(tmp_path, ["*.txt", "0.txt"], MiB, MiB)
    assert len(got.files) == 3 and got.missing == []


async def test_a_cancel_waits_for_the_reading_thread_before_the_directory_may_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reading runs in a thread, which no cancel stops: ``attach`` lets it end before it
    gives up, so its caller never removes a directory still being read. (The slow ``collect``
    is a fake, to make the thread's timing certain.)"""
    done = threading.Event()

    def slow_collect(*args: object) -> outputs.Collected:
        time.sleep(0.3)
        done.set()
        return outputs.Collected([], [])

    monkeypatch.setattr(outputs, "collect", slow_collect)
    result = SandboxResult(status="ok")
    task = asyncio.ensure_future(outputs.attach(result, tmp_path, ["*"], MiB, MiB))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()
