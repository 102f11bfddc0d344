"""The working disk (executor/disk.py) against a real btrfs image on a real loop device."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellblock.errors import SandboxError
from cellblock.executor import host
from cellblock.executor.disk import (
    COPY_MAX_BYTES,
    COPY_MAX_ENTRIES,
    HEADROOM,
    NotCopyable,
    WorkDisk,
)

MiB = 1024 * 1024


@pytest.fixture
def disk(sandbox_host: host.SandboxHost) -> WorkDisk:
    return sandbox_host.disk


@pytest.fixture
def directory(disk: WorkDisk) -> Iterator[Path]:
    path = disk.create(f"disk-test-{secrets.token_hex(4)}", 4242)
    yield path
    disk.remove(path)


def fill(path: Path, size: int) -> int:
    """Write up to ``size`` bytes into a new file under ``path``; the bytes written."""
    written = 0
    with (path / secrets.token_hex(4)).open("wb", buffering=0) as f:
        try:
            while written < size:
                written += f.write(b"\0" * min(MiB, size - written))
        except OSError as exc:
            assert exc.errno == errno.EDQUOT
    return written


def test_a_working_directory_is_a_private_subvolume(disk: WorkDisk, directory: Path) -> None:
    info = directory.stat()
    assert info.st_ino == 256  # the root of a btrfs subvolume
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (4242, 4242, 0o700)
    assert directory.parent == disk.root
    assert disk.names("disk-test-") == sorted(disk.root.glob("disk-test-*"))


def test_attaching_again_reuses_the_mounted_disk(sandbox_host: host.SandboxHost) -> None:
    root = sandbox_host.config.sandbox.root
    again = WorkDisk.attach(root, sandbox_host.config.sandbox.disk_size)
    assert again.root == sandbox_host.disk.root
    assert os.stat(again.root).st_dev == os.stat(sandbox_host.disk.root).st_dev


def test_the_cap_holds_even_for_root_and_can_change(disk: WorkDisk, directory: Path) -> None:
    disk.limit(directory, 4 * MiB)
    assert fill(directory, 10 * MiB) < 4 * MiB
    assert disk.full(directory)
    disk.limit(directory, 16 * MiB)  # a later stage's larger cap
    assert not disk.full(directory)
    assert fill(directory, 4 * MiB) == 4 * MiB


def test_a_directory_with_room_is_not_full(disk: WorkDisk, directory: Path) -> None:
    disk.limit(directory, 4 * MiB)
    fill(directory, 4 * MiB - 4 * HEADROOM)
    assert not disk.full(directory)


def test_full_follows_nothing_the_sandbox_planted(disk: WorkDisk, directory: Path) -> None:
    """A FIFO, a symlink out to a host file, and a directory named like a temporary file:
    ``full`` opens none of them (it reserves room in a file with no name)."""
    os.mkfifo(directory / "fifo")
    (directory / "passwd").symlink_to("/etc/passwd")
    (directory / "tmp").mkdir()
    before = Path("/etc/passwd").read_bytes()
    disk.limit(directory, 4 * MiB)
    assert not disk.full(directory)
    assert Path("/etc/passwd").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["fifo", "passwd", "tmp"]


def test_remove_takes_everything_and_is_idempotent(disk: WorkDisk) -> None:
    path = disk.create(f"disk-test-{secrets.token_hex(4)}", 4242)
    (path / "a" / "b").mkdir(parents=True)
    (path / "a" / "b" / "c").write_text("x")
    (path / "out").symlink_to("/etc")
    disk.remove(path)
    assert not path.exists()
    assert Path("/etc/passwd").exists()
    disk.remove(path)  # gone already: nothing to do


def test_remove_takes_a_plain_directory_of_an_older_layout(disk: WorkDisk) -> None:
    path = disk.root / f"disk-test-{secrets.token_hex(4)}"
    (path / "sub").mkdir(parents=True)
    disk.remove(path)
    assert not path.exists()


def test_a_name_with_a_slash_is_refused(disk: WorkDisk) -> None:
    with pytest.raises(ValueError, match="not a working directory name"):
        disk.create("../escape", 4242)


def test_a_non_empty_folder_is_never_mounted_over(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    (root / "work" / "old").write_text("left by an older version")
    with pytest.raises(SandboxError, match="not empty"):
        WorkDisk.attach(root, 256 * MiB)
    assert not (root / "disk.img").exists()


def test_a_snapshot_starts_as_the_source_and_then_goes_its_own_way(
    disk: WorkDisk, directory: Path
) -> None:
    (directory / "kept.txt").write_text("compiled")
    os.symlink("/etc/passwd", directory / "trap")
    os.mkfifo(directory / "fifo")
    copy = disk.snapshot(directory, f"disk-test-{secrets.token_hex(4)}")
    try:
        info = copy.stat()
        assert info.st_ino == 256  # a subvolume of its own, with its own quota group
        assert (info.st_uid, info.st_mode & 0o777) == (4242, 0o700)
        assert (copy / "kept.txt").read_text() == "compiled"
        # Copied as what they are, never followed or opened.
        assert os.readlink(copy / "trap") == "/etc/passwd"
        assert (copy / "fifo").is_fifo()
        (copy / "kept.txt").write_text("changed by a test")
        (copy / "new.txt").write_text("new")
        assert (directory / "kept.txt").read_text() == "compiled"
        assert not (directory / "new.txt").exists()
        disk.limit(copy, 2 * MiB)
        assert 0 < fill(copy, 8 * MiB) <= 2 * MiB
        assert fill(directory, 3 * MiB) == 3 * MiB  # the source's cap is its own
    finally:
        disk.remove(copy)
    assert not copy.exists()


def test_a_snapshot_name_must_be_one_component(disk: WorkDisk, directory: Path) -> None:
    for name in ("a/b", "..", ""):
        with pytest.raises(ValueError):
            disk.snapshot(directory, name)


def test_a_copy_keeps_names_bytes_owners_modes_and_times(disk: WorkDisk, directory: Path) -> None:
    (directory / "main.c").write_text("int main(void) { return 0; }\n")
    (directory / "prog").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    (directory / "sub" / "deeper").mkdir(parents=True)
    (directory / "sub" / "deeper" / "data").write_bytes(b"")
    (directory / "sub").chmod(0o750)
    os.symlink("/etc/passwd", directory / "trap")
    os.symlink("sub/deeper", directory / "inside")
    for path in [directory / "main.c", directory / "prog", directory / "sub"]:
        os.chown(path, 4242, 4343)
    os.chown(directory / "trap", 4242, 4242, follow_symlinks=False)
    (directory / "prog").chmod(0o4755)  # kept as a mode (the disk is nosuid); after chown
    os.utime(directory / "main.c", ns=(1, 1_000_000_123))
    os.utime(directory / "sub", ns=(2, 2_000_000_456))
    assert disk.copyable(directory)
    copy = disk.copy(directory, f"disk-test-{secrets.token_hex(4)}")
    try:
        assert copy.stat().st_ino == 256  # a subvolume of its own, with its own quota group
        assert tree(copy) == tree(directory)
        assert os.readlink(copy / "trap") == "/etc/passwd"  # made anew, never followed
        assert (copy / "prog").stat().st_mode & 0o7777 == 0o4755
        assert (copy / "main.c").stat().st_mtime_ns == 1_000_000_123
        (copy / "main.c").write_text("changed by a test")
        assert (directory / "main.c").read_text().startswith("int main")
        disk.limit(copy, 2 * MiB)
        assert 0 < fill(copy, 8 * MiB) <= 2 * MiB
        assert fill(directory, 3 * MiB) == 3 * MiB  # the source's cap is its own
    finally:
        disk.remove(copy)


def tree(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Each entry under ``root``: its owner, group, mode, mtime (but a symlink's), content."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        link = path.is_symlink()
        content = os.fsencode(os.readlink(path)) if link else (
            path.read_bytes() if path.is_file() else b""
        )  # fmt: skip
        mtime = 0 if link else info.st_mtime_ns
        entries[str(path.relative_to(root))] = (
            info.st_uid, info.st_gid, info.st_mode, mtime, content
        )  # fmt: skip
    return entries


@pytest.mark.parametrize("strange", ["fifo", "hard link", "xattr", "too many", "too large"])
def test_only_a_small_plain_tree_is_copyable(disk: WorkDisk, directory: Path, strange: str) -> None:
    """What a copy would not keep as it is makes the tree a snapshot's, and ``copy`` refuses
    it leaving nothing behind."""
    (directory / "sub").mkdir()
    target = directory / "sub"
    if strange == "fifo":
        os.mkfifo(target / "fifo")
    elif strange == "hard link":
        (target / "a").write_text("x")
        os.link(target / "a", target / "b")
    elif strange == "xattr":
        (target / "a").write_text("x")
        os.setxattr(target / "a", "user.note", b"kept only by a snapshot")
    elif strange == "too many":
        for i in range(COPY_MAX_ENTRIES):
            (target / str(i)).touch()
    else:
        (target / "big").write_bytes(b"x" * (COPY_MAX_BYTES + 1))
    assert not disk.copyable(directory)
    name = f"disk-test-{secrets.token_hex(4)}"
    with pytest.raises(NotCopyable):
        disk.copy(directory, name)
    assert not (disk.root / name).exists()


def test_a_sparse_file_counts_its_size(disk: WorkDisk, directory: Path) -> None:
    """A file of holes would be written out whole by a copy: it counts as its size."""
    with (directory / "holes").open("wb") as f:
        f.truncate(1024 * MiB)
    assert not disk.copyable(directory)
