"""Attacks that make a namespace: the door of the nf_tables escalations (CVE-2024-1086,
CVE-2023-32233, CVE-2022-1015). A new user namespace gives its creator every capability inside
it, CAP_NET_ADMIN over a new network namespace included, and with it netfilter's netlink socket.
The seccomp policy refuses every way in (unshare, setns, clone with namespace flags, clone3),
and the jail's own user namespace is sealed (its max_user_namespaces is 0) behind it."""

from __future__ import annotations

from pathlib import Path

import pytest
from probeio import probe, program_file, still_serves, submit
from restio import Rest

pytestmark = pytest.mark.timeout(90)


async def test_nested_user_namespace_never_reaches_netfilter(rest: Rest) -> None:
    """clone(CLONE_NEWUSER), then clone(CLONE_NEWNET | CLONE_NEWNS) inside it, then a
    NETLINK_NETFILTER socket: refused at the first step, so the inner steps never run."""
    run, seen = await probe(rest, "clone_newuser", "clone_newnet", "clone_newpid")
    assert run["status"] == "ok", run
    assert seen["clone_newuser"] == (-1, "EPERM")
    assert seen["clone_newnet"] == (-1, "EPERM")
    assert seen["clone_newpid"] == (-1, "EPERM")
    assert "nested_netlink_netfilter" not in seen and "nested_clone_newnet" not in seen
    await still_serves(rest)


async def test_clone_flags_hidden_in_the_upper_half_are_refused(rest: Rest) -> None:
    """clone's flags are 64 bits wide: garbage above CLONE_NEWUSER must not slip past."""
    _, seen = await probe(rest, "clone_upper_bits")
    assert seen["clone_upper_bits"][0] == -1


async def test_clone3_answers_enosys_so_libc_falls_back(rest: Rest) -> None:
    """clone3 carries its flags in memory, out of seccomp's sight: it answers ENOSYS, as
    Docker's profile does, so libc falls back to clone (whose flags are checked). Threads
    and processes still start: glibc's pthread_create and fork use clone3 first."""
    _, seen = await probe(rest, "clone3_newuser", "clone3_plain")
    assert seen["clone3_newuser"] == (-1, "ENOSYS")
    assert seen["clone3_plain"] == (-1, "ENOSYS")
    threads = await submit(
        rest, {"files": [program_file("toolchain.py")], "run": "python3 toolchain.py"}
    )
    assert threads["stages"]["run"]["stdout"] == "thread\n6\npiped\n"


async def test_unshare_and_setns_are_refused(rest: Rest) -> None:
    """unshare(2) and setns(2) directly, and the unshare(1) tool."""
    _, seen = await probe(rest, "unshare_user", "unshare_net", "setns")
    assert seen["unshare_user"] == (-1, "EPERM")
    assert seen["unshare_net"] == (-1, "EPERM")
    assert seen["setns"] == (-1, "EPERM")
    tool = await submit(rest, {"run": "unshare -Urn id"})
    assert tool["stages"]["run"]["status"] == "failed"
    assert "Operation not permitted" in tool["stages"]["run"]["stderr"]


async def test_the_jails_user_namespace_is_sealed_and_the_program_holds_no_capability(
    rest: Rest,
) -> None:
    """The second door: the jail's own user.max_user_namespaces is 0 (so a nested user
    namespace fails even past seccomp), the host's limit is untouched, and the program holds
    no capability at all (init had CAP_SYS_RESOURCE for the seal and dropped it)."""
    host_limit = Path("/proc/sys/user/max_user_namespaces").read_text()
    answer = await submit(
        rest, {"run": "cat /.cellblock/userns; grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status"}
    )
    out = answer["stages"]["run"]["stdout"].splitlines()
    assert out[0] == "0"
    assert [line.split()[1] for line in out[1:]] == ["0000000000000000"] * 4
    assert Path("/proc/sys/user/max_user_namespaces").read_text() == host_limit
    assert int(host_limit) > 0
    refused = await submit(rest, {"run": "echo 5 > /.cellblock/userns"})
    assert refused["stages"]["run"]["status"] == "failed"


async def test_the_32_bit_abi_cannot_go_around_the_policy(rest: Rest) -> None:
    """`int 0x80` from a 64-bit program reaches the i386 system call table, whose numbers the
    policy's names do not cover: the filter kills such a process (SIGSYS)."""
    run, seen = await probe(rest, "int80_unshare")
    assert run["status"] == "signaled" and run["signal_name"] == "SIGSYS", run
    assert "int80_unshare" not in seen
    await still_serves(rest)
