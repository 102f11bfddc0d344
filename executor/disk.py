"""The working directories' disk: a btrfs image of a fixed size, one subvolume per working
directory, each capped by its own quota group.

Why btrfs: a per-stage cap on a directory's total size needs quotas that count everything in
it, uploaded files included, and that can change between stages. This kernel has no ext4 or
XFS quota formats and no tmpfs quotas, and a size-capped tmpfs would count files against the
stage's memory; a btrfs subvolume's quota group is made, limited and dropped with one ioctl
each. The image itself is all of the host's disk that sandboxes can ever fill, whatever the
caps add up to. Subvolumes also snapshot in O(1): each test of a submission starts from a
snapshot of the working directory as its compile stage left it (``snapshot``).

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
