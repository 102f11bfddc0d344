"""Attacks on the kernel through system calls a program never needs: io_uring, the new mount
API, personas without ASLR, NUMA placement, ptrace's relatives, exotic socket families and
netlink protocols, btrfs's ioctls (the working directory is a btrfs subvolume) and terminal
input injection. Each is refused with the errno programs already handle, and what programs do
need keeps working."""

from __future__ import annotations

import pytest
from probeio import probe, program_file, still_serves, submit
from restio import Rest

pytestmark = pytest.mark.timeout(90)


async def expect(rest: Rest, refused: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Run every attack of ``refused`` in one submission; each fails with its errno."""
    run, seen = await probe(rest, *refused)
    assert run["status"] == "ok", run
    assert {name: seen[name] for name in refused} == {
        name: (-1, err) for name, err in refused.items()
    }
    return seen


async def test_io_uring_is_off(rest: Rest) -> None:
    """io_uring_setup, _enter and _register answer ENOSYS, as on a kernel without io_uring,
    so runtimes that probe for it (libuv, tokio, liburing) fall back to plain system calls."""
    await expect(
        rest,
        {"io_uring_setup": "ENOSYS", "io_uring_enter": "ENOSYS", "io_uring_register": "ENOSYS"},
    )
    await still_serves(rest)


async def test_mounting_and_the_new_mount_api_are_refused(rest: Rest) -> None:
    await expect(rest, {"mount": "EPERM", "fsopen": "EPERM", "open_tree": "EPERM"})


async def test_personas_that_weaken_the_address_space_are_refused(rest: Rest) -> None:
    """ADDR_NO_RANDOMIZE would turn ASLR off for the exploit; the default persona and the
    query stay allowed, and garbage in the upper half of the argument does not slip past."""
    await expect(rest, {"personality_no_aslr": "EPERM", "personality_upper_bits": "EPERM"})
    _, seen = await probe(rest, "personality_query")
    assert seen["personality_query"][0] >= 0


async def test_numa_placement_is_refused(rest: Rest) -> None:
    await expect(
        rest,
        {"mbind": "EPERM", "set_mempolicy": "EPERM", "get_mempolicy": "EPERM",
         "migrate_pages": "EPERM", "move_pages": "EPERM"},
    )  # fmt: skip


async def test_ptrace_relatives_and_rare_kernel_paths_are_refused(rest: Rest) -> None:
    await expect(
        rest,
        {"pidfd_getfd": "EPERM", "process_madvise": "EPERM", "kcmp": "EPERM",
         "modify_ldt": "EPERM", "fanotify_init": "EPERM"},
    )  # fmt: skip


async def test_exotic_sockets_and_netfilter_netlink_are_refused(rest: Rest) -> None:
    """AF_ALG, AF_VSOCK and AF_PACKET are refused as if the kernel lacked them (also with
    garbage in the family's upper half); of netlink only NETLINK_ROUTE, which getaddrinfo
    uses, opens. Unix and inet sockets work."""
    await expect(
        rest,
        {"socket_alg": "EAFNOSUPPORT", "socket_vsock": "EAFNOSUPPORT",
         "socket_packet": "EAFNOSUPPORT", "socket_family_upper_bits": "EAFNOSUPPORT",
         "netlink_netfilter": "EPROTONOSUPPORT"},
    )  # fmt: skip
    _, seen = await probe(rest, "netlink_route", "socket_inet", "socket_unix")
    assert all(seen[name][0] >= 0 for name in ("netlink_route", "socket_inet", "socket_unix"))


async def test_btrfs_ioctls_cannot_make_a_subvolume_outside_the_disk_cap(rest: Rest) -> None:
    """A subvolume made inside the working directory would have no disk cap of its own: the
    ioctl answers ENOTTY, as on a file system without it."""
    await expect(rest, {"btrfs_subvolume": "ENOTTY"})


async def test_reflinks_are_refused_and_copies_still_work(rest: Rest) -> None:
    """A reflink's back reference lives in btrfs's extent tree, which no quota group counts:
    FICLONE and FICLONERANGE answer EOPNOTSUPP (as on ext4), copy_file_range, which reflinks on
    btrfs, answers ENOSYS; cp and Python's shutil then copy the plain way."""
    await expect(
        rest,
        {"ficlone": "EOPNOTSUPP", "ficlonerange": "EOPNOTSUPP", "copy_file_range": "ENOSYS"},
    )
    script = (
        "head -c 100000 /dev/urandom > a && ! cp --reflink=always a r 2>/dev/null && "
        'cp a b && cmp a b && python3 -c \'import shutil; shutil.copy("a", "c")\' && '
        "cmp a c && echo copied"
    )
    answer = await submit(rest, {"run": script})
    assert answer["stages"]["run"]["stdout"] == "copied\n", answer["stages"]["run"]


async def test_terminal_input_cannot_be_faked(rest: Rest) -> None:
    """TIOCSTI would type commands into a terminal the program shares; refused, whatever the
    request's upper half holds."""
    await expect(rest, {"tiocsti": "EPERM", "tiocsti_upper_bits": "EPERM"})


async def test_toolchains_still_work_under_the_policy(rest: Rest) -> None:
    """What programs do need: gcc, threads, processes, pipes, sockets on loopback, getaddrinfo."""
    script = (
        "printf 'int main(void){return 0;}' > t.c && gcc -o t t.c && ./t && python3 toolchain.py"
    )
    answer = await submit(rest, {"files": [program_file("toolchain.py")], "run": script})
    run = answer["stages"]["run"]
    assert (run["status"], run["stdout"]) == ("ok", "thread\n6\npiped\n"), run
