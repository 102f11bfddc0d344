"""The working directories' disk: a btrfs image of a fixed size, one subvolume per working
directory, each capped by its own quota group.

Why btrfs: a per-stage cap on a directory's total size needs quotas that count everything in
it, uploaded files included, and that can change between stages. This kernel has no ext4 or
XFS quota formats and no tmpfs quotas, and a size-capped tmpfs would count files against the
stage's memory; a btrfs subvolume's quota group is made, limited and dropped with one ioctl
each. The image itself is all of the host's disk that sandboxes can ever fill, whatever the
caps add up to.

Each test of a submission starts from the working directory as its compile stage left it, in
a new subvolume of its own. A snapshot (``snapshot``) makes one in O(1) of the data, but it
waits for a transaction commit: milliseconds of the host's CPU, paid by every test. A typical
compiled directory (a source file and a binary) is copied into a new subvolume in a tenth of
that (``copy``), so a small tree (``copyable``: at most ``COPY_MAX_ENTRIES`` entries and
``COPY_MAX_BYTES`` bytes of plain files, directories and symlinks) is copied and a larger or
stranger one snapshotted. The copy writes the bytes (sendfile), never reflinks them: a
reflink's shared extents would not be counted in the new quota group until the next commit.

Inside the sandbox, btrfs's own ioctls are refused by the seccomp policy (see seccomp.py): a
program could otherwise make a subvolume of its own, which no quota group would cap. So are
reflinks (and copy_file_range, which reflinks here): their back references live in the extent
tree, which no quota group counts. The image keeps one copy of its metadata, as the quota
groups count it.

Hitting the cap makes writes fail with EDQUOT. Whether a stage ended because of it is told by
trying, after the stage, to reserve a little more room in the directory (``full``).

Several executors of one host share the image: ``attach`` mounts it once (under a file lock)
and later callers find it mounted. It stays mounted when they exit, like their cgroups.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cellblock.errors import SandboxError

#: The ioctls, from linux/btrfs.h (type 0x94).
SNAP_CREATE = 0x50009401  # _IOW(0x94, 1, struct btrfs_ioctl_vol_args)
SUBVOL_CREATE = 0x5000940E  # _IOW(0x94, 14, struct btrfs_ioctl_vol_args)
SNAP_DESTROY = 0x5000940F  # _IOW(0x94, 15, struct btrfs_ioctl_vol_args)
QUOTA_CTL = 0xC0109428  # _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args)
QGROUP_LIMIT = 0x8030942B  # _IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args)
QUOTA_ENABLE = 1
LIMIT_MAX_RFER = 1
VOL_ARGS = struct.Struct("q4088s")
#: What ``full`` tries to reserve: a stage that cannot have this much more was stopped by
#: its cap, not merely near it.
HEADROOM = 64 * 1024
IMAGE_NAME = "disk.img"
#: The largest tree ``copy`` copies (entries, root excluded; bytes of files): past about this,
#: writing the bytes costs more than a snapshot's commit (bench/grading.py measures both).
COPY_MAX_ENTRIES = 64
COPY_MAX_BYTES = 1024 * 1024
#: What ``copy`` opens a file of the source with: never through a symlink, never waiting on
#: a FIFO planted where a file was.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class NotCopyable(SandboxError):
    """A tree ``copy`` does not copy: too large, or holding what only a snapshot keeps as it
    is (a FIFO, a device, a socket, a hard link, an extended attribute)."""


class WorkDisk:
    """The mounted image at ``root``, where working directories are made."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def attach(cls, sandbox_root: Path, size: int) -> WorkDisk:
        """The disk at ``sandbox_root/work``: mounted already, or made (once) and mounted now
        from ``sandbox_root/disk.img`` of ``size`` bytes. ``SandboxError`` says what failed."""
        root = sandbox_root / "work"
        with (sandbox_root / "disk.lock").open("wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _is_btrfs_mount(root):
                _mount(sandbox_root / IMAGE_NAME, root, size)
        root.chmod(0o711)
        return cls(root)

    def create(self, name: str, uid: int) -> Path:
        """A new, empty working directory ``name`` owned by ``uid``, mode 0700."""
        path = self.root / name
        with _directory(self.root) as parent:
            fcntl.ioctl(parent, SUBVOL_CREATE, _vol_args(name))
        try:
            os.chown(path, uid, uid)
            path.chmod(0o700)
        except BaseException:
            self.remove(path)
            raise
        return path

    def snapshot(self, source: Path, name: str) -> Path:
        """A new working directory ``name`` holding what ``source`` holds now, sharing its
        extents until either is written (copy on write), with its own quota group.

        Nothing in ``source`` is opened or followed: the snapshot is of the subvolume as a
        whole, so a symlink or a FIFO the sandbox planted there is copied as what it is.
        """
        with _directory(source) as fd, _directory(self.root) as parent:
            args = bytearray(VOL_ARGS.pack(fd, os.fsencode(_vol_name(name))))
            fcntl.ioctl(parent, SNAP_CREATE, args)
        return self.root / name

    def copyable(self, source: Path) -> bool:
        """Whether ``copy`` copies the working directory ``source``, as it is now."""
        try:
            with _directory(source) as fd:
                _plain(fd)
                _Tree(None).walk(fd)
        except (NotCopyable, OSError):  # OSError: the tree changed under the walk
            return False
        return True

    def copy(self, source: Path, name: str) -> Path:
        """A new working directory ``name``, a subvolume with its own quota group, holding a
        copy of what ``source`` holds now: the same names, bytes, owners, modes and times (a
        file's holes are written out: ``COPY_MAX_BYTES`` counts them).
        ``NotCopyable`` if ``source`` is not ``copyable``, or if it changed or the copy
        failed on the way (then nothing is left behind, and a snapshot is the way).

        ``source`` is the sandbox's: it is read through descriptors, opening nothing through
        a symlink (symlinks are made anew from their text, never followed) and nothing that
        is not a plain file or a directory when opened.
        """
        path = self.root / name
        with _directory(self.root) as parent:
            fcntl.ioctl(parent, SUBVOL_CREATE, _vol_args(name))
        try:
            with _directory(source) as fd, _directory(path) as target:
                _Tree(target).walk(fd)
                _attributes(fd, target)
        except BaseException as exc:
            self.remove(path)
            if isinstance(exc, OSError):
                raise NotCopyable(f"cannot copy {source.name}: {exc}") from exc
            raise
        return path

    def limit(self, path: Path, size: int) -> None:
        """Cap what the working directory ``path`` holds at ``size`` bytes from now on."""
        args = struct.pack("QQQQQQ", 0, LIMIT_MAX_RFER, size, 0, 0, 0)  # 0: path's own qgroup
        with _directory(path) as fd:
            fcntl.ioctl(fd, QGROUP_LIMIT, args)

    def full(self, path: Path) -> bool:
        """Whether the working directory ``path`` is at its cap: it cannot take ``HEADROOM``
        more bytes. Tried through a file with no name, so nothing the sandbox planted in the
        directory is opened or followed."""
        with _directory(path) as parent:
            try:
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600, dir_fd=parent)
            except OSError as exc:
                return exc.errno == errno.EDQUOT
            try:
                os.posix_fallocate(fd, 0, HEADROOM)
            except OSError as exc:
                # ENOSPC would be the whole image full: the host's pool, not this cap.
                return exc.errno == errno.EDQUOT
            finally:
                os.close(fd)
        return False

    def remove(self, path: Path) -> None:
        """Delete the working directory ``path`` and all it holds (btrfs frees it in the
        background). A plain directory, left by an older version, is removed as such, and a
        link (a series', see sandbox.py) is unlinked."""
        if path.is_symlink():
            path.unlink(missing_ok=True)
            return
        with _directory(path.parent) as parent:
            try:
                fcntl.ioctl(parent, SNAP_DESTROY, _vol_args(path.name))
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOTTY and exc.errno != errno.EINVAL:
                    raise
                shutil.rmtree(path, ignore_errors=True)

    def detach(self) -> None:
        """Unmount the disk (lazily: once no jail uses it). For a host's own end, benches and
        tests; executors leave it mounted for the others."""
        _run(["umount", "--lazy", str(self.root)], "unmount the working disk")

    def names(self, prefix: str) -> list[Path]:
        """The working directories whose names start with ``prefix``."""
        return sorted(self.root.glob(f"{prefix}*"))


class _Tree:
    """One walk of a source tree under the copy's budget, copying it into ``target`` (a
    directory's descriptor), or with ``None`` only checking that it fits."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.entries = 0
        self.room = COPY_MAX_BYTES

    def walk(self, source: int) -> None:
        """Copy the entries of the directory ``source`` into ``self.target``."""
        for name in os.listdir(source):
            info = os.stat(name, dir_fd=source, follow_symlinks=False)
            self.entries += 1
            if self.entries > COPY_MAX_ENTRIES:
                raise NotCopyable(f"more than {COPY_MAX_ENTRIES} entries")
            if stat.S_ISLNK(info.st_mode):
                self._symlink(source, name, info)
            elif stat.S_ISDIR(info.st_mode):
                self._directory(source, name)
            elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                self._file(source, name, info.st_size)
            else:
                raise NotCopyable(f"{name!r} is not a plain file, directory or symlink")

    def _symlink(self, source: int, name: str, info: os.stat_result) -> None:
        if self.target is not None:
            os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=self.target)
            os.chown(name, info.st_uid, info.st_gid, dir_fd=self.target, follow_symlinks=False)
            os.utime(name, ns=_times(info), dir_fd=self.target, follow_symlinks=False)

    def _directory(self, source: int, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _READ, dir_fd=source)
        try:
            if self.target is None:
                _plain(fd)
                self.walk(fd)
                return
            os.mkdir(name, 0o700, dir_fd=self.target)
            made = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _READ, dir_fd=self.target)
            try:
                outer, self.target = self.target, made
                try:
                    self.walk(fd)
                finally:
                    self.target = outer
                _attributes(fd, made)
            finally:
                os.close(made)
        finally:
            os.close(fd)

    def _file(self, source: int, name: str, size: int) -> None:
        if size > self.room:
            raise NotCopyable(f"more than {COPY_MAX_BYTES} bytes")
        fd = os.open(name, _READ, dir_fd=source)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > self.room:
                raise NotCopyable(f"{name!r} changed while it was copied")
            self.room -= info.st_size
            if self.target is None:
                _plain(fd)
                return
            out = os.open(name, _WRITE, 0o600, dir_fd=self.target)
            try:
                copied = 0
                while sent := os.sendfile(out, fd, None, info.st_size + 1 - copied):
                    copied += sent
                    if copied > info.st_size:
                        raise NotCopyable(f"{name!r} grew while it was copied")
                _attributes(fd, out)
            finally:
                os.close(out)
        finally:
            os.close(fd)


def _plain(fd: int) -> None:
    """Refuse what has extended attributes (an ACL among them): the copy would not keep them."""
    if os.listxattr(fd):
        raise NotCopyable("an entry has extended attributes")


def _attributes(source: int, target: int) -> None:
    """Give ``target`` the owner, mode and times of ``source`` (both descriptors). The mode
    after the owner: a change of owner clears the setuid and setgid bits."""
    _plain(source)
    info = os.fstat(source)
    os.fchown(target, info.st_uid, info.st_gid)
    os.fchmod(target, stat.S_IMODE(info.st_mode))
    os.utime(target, ns=_times(info))


def _times(info: os.stat_result) -> tuple[int, int]:
    return info.st_atime_ns, info.st_mtime_ns


def _vol_name(name: str) -> str:
    encoded = os.fsencode(name)
    if b"/" in encoded or len(encoded) >= 4088 or name in ("", ".", ".."):
        raise ValueError(f"not a working directory name: {name!r}")
    return name


def _vol_args(name: str) -> bytearray:
    # Mutable: fcntl.ioctl copies an immutable argument into a buffer of only 1024 bytes.
    return bytearray(VOL_ARGS.pack(0, os.fsencode(_vol_name(name))))


@contextlib.contextmanager
def _directory(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _is_btrfs_mount(path: Path) -> bool:
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as mounts:
        for line in mounts:
            before, _, after = line.partition(b" - ")
            fields = before.split()
            mount_point = fields[4].replace(b"\\040", b" ")
            if mount_point == target and after.split()[0] == b"btrfs":
                return True
    return False


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SandboxError(
            f"cannot {what}: {argv[0]} is missing (apt-get install btrfs-progs util-linux)"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise SandboxError(f"cannot {what}: {exc.stderr.strip() or exc}") from None


def _mount(image: Path, root: Path, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise SandboxError(
            f"cannot mount the working directories' disk on {root}: it is not empty (left by "
            "a version of Cellblock without a disk cap?); remove what it holds"
        )
    if not image.exists():
        partial = image.with_name(f".{image.name}.{os.getpid()}")
        with partial.open("wb") as f:
            f.truncate(size)  # sparse: the host's disk is taken as the sandboxes write
        # One copy of metadata (mkfs's default keeps two): a quota group counts one, so with
        # two a stage would take twice its cap of the image.
        mkfs = ["mkfs.btrfs", "--quiet", "--force", "--metadata", "single", "--data", "single"]
        _run([*mkfs, str(partial)], "make the working disk")
        os.replace(partial, image)
    # nodev and nosuid: nothing a sandbox writes there is ever a device or setuid on the host.
    # discard: space the sandboxes free goes back to the host's disk.
    options = "loop,nodev,nosuid,noatime,discard=async"
    _run(["mount", "-t", "btrfs", "-o", options, str(image), str(root)], "mount the working disk")
    with _directory(root) as fd:
        fcntl.ioctl(fd, QUOTA_CTL, struct.pack("QQ", QUOTA_ENABLE, 0))
