"""A red-team review of the three latest closures: nested namespaces (seccomp and the sealed
user namespace), the seccomp policy, and the btrfs disk cap. Each test is one attack, run as a C
program compiled in the sandbox and submitted through the real service and executor.

It found two holes, both closed: the image's metadata was DUP, so N bytes of metadata that a
stage's quota group counted took 2N of the shared image (the image now keeps one copy); and
reflinks' back references live in the extent tree, which no quota group counts (reflinks and
copy_file_range are now refused: tests/security/test_attacks_syscalls.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from attackio import Target

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024

HEADER = """#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/fs.h>
#define SHOW(name, expr) do { errno = 0; long r_ = (long)(expr); \\
    printf("%s %ld %d\\n", name, r_ < 0 ? -1L : r_, r_ < 0 ? errno : 0); } while (0)
"""


def program(body: str, limits: dict[str, Any], args: str = "") -> dict[str, Any]:
    """A submission that compiles ``body`` (C, after HEADER) and runs it with ``args``."""
    return {
        "files": [{"name": "x.c", "content": HEADER + body}],
        "compile": "gcc -O -o x x.c",
        "run": f"./x {args}",
        "limits": {"run": limits},
    }


def results(stdout: str) -> dict[str, tuple[int, int]]:
    """``NAME RET ERRNO`` lines of SHOW as {name: (ret, errno)}."""
    seen = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            seen[parts[0]] = (int(parts[1]), int(parts[2]))
    return seen


def btrfs_used(root: Path) -> tuple[int, int]:
    """(bytes the image's file system uses on its device, its logical bytes in use): raw
    counts both copies of a DUP profile, logical counts one."""
    usage = subprocess.run(
        ["btrfs", "filesystem", "usage", "-b", str(root)], capture_output=True, text=True
    ).stdout
    raw = next(int(line.split()[1]) for line in usage.splitlines() if line.strip()[:5] == "Used:")
    df = subprocess.run(
        ["btrfs", "filesystem", "df", "-b", str(root)], capture_output=True, text=True
    ).stdout
    logical = sum(
        int(line.split("used=")[1])
        for line in df.splitlines()
        if line.split(",")[0] in ("Data", "Metadata", "System")
    )
    return raw, logical


def counted(target: Target) -> int:
    """The largest referenced size that the quota group of a live working directory of the
    target's slots counts now (stale groups of deleted directories are left out)."""
    names = {path.name for path in target.workdirs()}
    show = subprocess.run(
        ["btrfs", "qgroup", "show", "--raw", str(target.work_root)], capture_output=True, text=True
    ).stdout
    sizes = [
        int(fields[1])
        for fields in (line.split() for line in show.splitlines())
        if fields and fields[0].startswith("0/") and fields[-1] in names
    ]
    return max(sizes, default=0)


async def while_paused(target: Target, request: dict[str, Any]) -> tuple[int, int, int]:
    """Run ``request``, whose program prints READY (after a sync) and then sleeps, and return
    how much ``btrfs_used`` grew by then and what the directory's quota group counted; wait
    for the submission to finish."""
    before = btrfs_used(target.work_root)
    sid = await target.start(request)
    await target.printed(sid, "READY")
    after = btrfs_used(target.work_root)
    rfer = counted(target)

    async def finished() -> bool:
        state = await target.rest.call("GET", f"/api/v1/submissions/{sid}")
        return bool(state["status"] == "finished")

    await target.until(finished, f"submission {sid} to finish", timeout=30)
    return after[0] - before[0], after[1] - before[1], rfer


async def test_x32_and_out_of_range_syscall_numbers_reach_nothing(target: Target) -> None:
    """The x32 bit (0x40000000) on unshare, clone and x32's own ioctl (514), and numbers with
    the top bit or upper-half garbage, would escape a filter that matches x86-64 numbers
    by name. This kernel has no x32 ABI, so each answers ENOSYS, or the number's lower half is
    unshare and the policy refuses it (EPERM): no namespace, no ioctl, the process lives."""
    body = """
int main(void) {
    SHOW("x32_unshare", syscall(0x40000000 | 272, 0x10000000));
    SHOW("x32_clone", syscall(0x40000000 | 56, 0x10000000 | 17, 0, 0, 0, 0));
    SHOW("x32_ioctl", syscall(0x40000000 | 514, 0, 0x5412, "a"));
    SHOW("top_bit_unshare", syscall(0x80000000UL | 272, 0x10000000));
    SHOW("upper_half_unshare", syscall(0xffffffff00000000UL | 272, 0x10000000));
    puts("alive");
    return 0;
}
"""
    answer = await target.submit(program(body, {}))
    run = answer["stages"]["run"]
    assert run["status"] == "ok" and "alive" in run["stdout"], run
    assert results(run["stdout"]) == {
        "x32_unshare": (-1, 38),
        "x32_clone": (-1, 38),
        "x32_ioctl": (-1, 38),
        "top_bit_unshare": (-1, 38),
        "upper_half_unshare": (-1, 1),
    }


async def test_the_seal_cannot_be_reopened_and_no_capability_comes_back(target: Target) -> None:
    """Raise the sealed limit again: /.cellblock/userns and /proc/sys/user/max_user_namespaces
    opened for writing, the bounding set's CAP_SYS_RESOURCE raised into the ambient set, and a
    CLONE_NEWUSER clone with CLONE_VFORK|CLONE_VM (vfork's path). All refused."""
    body = """
#include <sched.h>
#include <sys/prctl.h>
int main(void) {
    SHOW("open_seal", open("/.cellblock/userns", O_WRONLY));
    SHOW("open_sysctl", open("/proc/sys/user/max_user_namespaces", O_WRONLY));
    SHOW("ambient_raise", prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, 24, 0, 0));
    long flags = CLONE_VFORK | CLONE_VM | CLONE_NEWUSER | 17;
    SHOW("vfork_newuser", syscall(SYS_clone, flags, 0, 0, 0, 0));
    return 0;
}
"""
    answer = await target.submit(program(body, {}))
    run = answer["stages"]["run"]
    seen = results(run["stdout"])
    assert seen["open_seal"] == (-1, 13) and seen["open_sysctl"] == (-1, 13), run
    assert seen["ambient_raise"] == (-1, 1) and seen["vfork_newuser"] == (-1, 1), run


async def test_nothing_planted_stops_the_subvolume_delete(target: Target) -> None:
    """Immutable and append-only flags (FS_IOC_SETFLAGS, FS_IOC_FSSETXATTR) on the working
    directory and a file would make the host's subvolume delete fail and leak the directory;
    they are refused (CAP_LINUX_IMMUTABLE is the host's). The rest is planted too (a FIFO, a
    symlink to /, a whiteout from RENAME_WHITEOUT, a 255-byte name, an open O_TMPFILE, a mode
    000 directory): after the submission its directory is gone from the disk."""
    body = """
#include <sys/stat.h>
int main(void) {
    int dir = open("/box", O_RDONLY | O_DIRECTORY);
    int file = open("/box/f", O_CREAT | O_RDWR, 0600);
    int flag = FS_IMMUTABLE_FL;
    SHOW("immutable_dir", ioctl(dir, FS_IOC_SETFLAGS, &flag));
    SHOW("immutable_file", ioctl(file, FS_IOC_SETFLAGS, &flag));
    flag = FS_APPEND_FL;
    SHOW("append_dir", ioctl(dir, FS_IOC_SETFLAGS, &flag));
    struct fsxattr fx = {0};
    ioctl(file, FS_IOC_FSGETXATTR, &fx);
    fx.fsx_xflags |= FS_XFLAG_IMMUTABLE;
    SHOW("xflag_immutable", ioctl(file, FS_IOC_FSSETXATTR, &fx));
    mkfifo("/box/fifo", 0600);
    symlink("/", "/box/root");
    syscall(SYS_renameat2, AT_FDCWD, "/box/f", AT_FDCWD, "/box/g", 4);
    char name[300] = "/box/";
    memset(name + 5, 'A', 255);
    SHOW("long_name", open(name, O_CREAT | O_WRONLY, 0600));
    SHOW("tmpfile", open("/box", O_TMPFILE | O_RDWR, 0600));
    mkdir("/box/locked", 0700);
    close(open("/box/locked/x", O_CREAT | O_WRONLY, 0600));
    chmod("/box/locked", 0);
    chmod("/box", 0);
    return 0;
}
"""
    answer = await target.submit(program(body, {}))
    run = answer["stages"]["run"]
    seen = results(run["stdout"])
    for name in ("immutable_dir", "immutable_file", "append_dir", "xflag_immutable"):
        assert seen[name] == (-1, 1), (name, run)
    assert seen["long_name"][0] >= 0 and seen["tmpfile"][0] >= 0, run
    kept = set(target.workdirs())
    await target.settled()
    await target.until(
        lambda: len(set(target.workdirs())) <= 1, "the old working directory to go", timeout=15
    )
    assert len(kept) <= 2
    await target.still_serves()


async def test_mmap_fallocate_direct_io_and_parallel_writers_stop_at_the_cap(
    target: Target,
) -> None:
    """Ways around write(2)'s quota check: dirtying a 1 GiB shared mapping of a sparse file
    (SIGBUS at the cap), fallocate of 1 GiB with and without KEEP_SIZE, O_DIRECT writes and
    eight processes writing at once. The directory holds no more than its 16 MiB cap."""
    body = """
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
static sigjmp_buf jump;
static void on_bus(int s) { (void)s; siglongjmp(jump, 1); }
int main(void) {
    signal(SIGBUS, on_bus);
    int m = open("m", O_CREAT | O_RDWR, 0600);
    ftruncate(m, 1L << 30);
    char *p = mmap(0, 1L << 30, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    volatile long at = 0;
    if (!sigsetjmp(jump, 1)) for (at = 0; at < (1L << 30); at += 4096) p[at] = 1;
    printf("mapped_mib %ld 0\\n", at >> 20);
    munmap(p, 1L << 30);
    close(m);
    unlink("m");
    int f = open("fa", O_CREAT | O_RDWR, 0600);
    SHOW("fallocate", fallocate(f, 0, 0, 1L << 30));
    SHOW("fallocate_keep", fallocate(f, FALLOC_FL_KEEP_SIZE, 0, 1L << 30));
    void *buf;
    posix_memalign(&buf, 4096, 1 << 20);
    int d = open("direct", O_CREAT | O_WRONLY | O_DIRECT, 0600);
    for (int k = 0; k < 8; k++)
        if (!fork()) {
            static char b[1 << 20];
            char n[8] = {'p', (char)('0' + k)};
            int w = open(n, O_CREAT | O_WRONLY, 0600);
            while (write(w, b, sizeof b) > 0) {}
            _exit(0);
        }
    while (wait(0) > 0) {}
    SHOW("direct", write(d, buf, 1 << 20));
    sync();
    return 0;
}
"""
    request = program(body, {"disk": 16 * MiB, "fsize": 1024 * MiB})
    request["run"] += "; du -sk . | cut -f1"
    answer = await target.submit(request)
    run = answer["stages"]["run"]
    seen = results(run["stdout"])
    assert seen["mapped_mib"][0] <= 16, run
    assert seen["fallocate"] == (-1, 122) and seen["fallocate_keep"] == (-1, 122), run
    assert seen["direct"] == (-1, 122), run
    assert int(run["stdout"].split()[-1]) <= 16 * 1024 + 64, run


async def test_a_metadata_flood_takes_no_more_of_the_image_than_its_cap(target: Target) -> None:
    """Files with 100 xattrs of 15.8 KB each, until EDQUOT: all metadata. The quota group
    stops it at the 64 MiB cap, but the shared image must also lose no more than about the
    cap, or stages that each stay under their caps fill it for every other slot."""
    body = """
#include <sys/xattr.h>
int main(void) {
    static char value[15800];
    char file[32], name[32];
    for (int f = 0;; f++) {
        sprintf(file, "f%d", f);
        close(open(file, O_CREAT | O_WRONLY, 0600));
        for (int k = 0; k < 100; k++) {
            sprintf(name, "user.%d", k);
            if (setxattr(file, name, value, sizeof value, 0)) goto full;
        }
    }
full:
    sync();
    puts("READY");
    fflush(stdout);
    sleep(4);
    return 0;
}
"""
    cap = 64 * MiB
    raw, _, rfer = await while_paused(target, program(body, {"disk": cap, "wall_time": 30}))
    assert rfer >= cap * 0.9  # the flood reached its cap
    assert raw <= cap * 1.25, f"the image lost {raw / MiB:.0f} MiB for a {cap // MiB} MiB cap"
