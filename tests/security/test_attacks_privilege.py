"""Privilege, end to end through the real service and a real executor running real nsjail:
setuid binaries, the kernel facilities with a history of exploits (bpf, perf, userfaultfd,
keyrings), ptrace, mount, raw sockets, the read-only base, hard limits, the host's cgroup and
kernel files, and kill(-1). The attacks are a C program (programs/escalate.c) that the
submission compiles in its compile stage with the gcc of the sandbox's base; each attack
prints what its call returned and the errno. Each test asserts that the program gains
nothing, that the stage ends honestly, and that the service still serves afterwards."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from attackio import Target

pytestmark = pytest.mark.timeout(90)

PROGRAMS = Path(__file__).with_name("programs")


async def escalate(target: Target, *attacks: str) -> dict[str, tuple[int, str]]:
    """Compile programs/escalate.c in the sandbox and run its ``attacks``: each one's return
    value and errno name."""
    source = (PROGRAMS / "escalate.c").read_text()
    answer = await target.submit(
        {
            "files": [{"name": "escalate.c", "content": source}],
            "compile": "gcc -O -o escalate escalate.c",
            "run": './escalate "$@"',
            "args": list(attacks),
        }
    )
    assert answer["stages"]["compile"]["status"] == "ok", answer["stages"]["compile"]
    run = answer["stages"]["run"]
    assert run["status"] == "ok", run
    seen = {}
    for line in run["stdout"].splitlines():
        name, ret, err = line.split()
        seen[name] = (int(ret), err)
    assert list(seen) == list(attacks), run
    return seen


async def expect_refused(target: Target, refused: dict[str, str]) -> None:
    seen = await escalate(target, *refused)
    assert seen == {name: (-1, err) for name, err in refused.items()}
    await target.still_serves()


async def test_setuid_binaries_give_no_privilege(target: Target) -> None:
    """su and passwd (setuid root on the host), and a setuid copy the program makes of id
    and of su: none raises the program above uid 1000 (the base is mounted nosuid and the
    jail sets no_new_privs); setgroups is refused, and setuid(0) and setgid(0) answer
    EINVAL: the jail's user namespace maps no uid 0 at all."""
    script = (
        "su -c 'id -u > /box/su-ran' root < /dev/null > /dev/null 2>&1; echo su $?;"
        " passwd -d root < /dev/null > /dev/null 2>&1; echo passwd $?;"
        " cp /usr/bin/id myid && cp /usr/bin/su mysu && chmod 6755 myid mysu"
        " && echo copy $(stat -c %A myid) $(./myid -u) $(./myid -g);"
        " ./mysu -c id root < /dev/null > /dev/null 2>&1; echo mysu $?;"
        " test -e su-ran && echo su-ran; grep NoNewPrivs /proc/self/status | tr -d '\\t'; id -u"
    )
    ran = await target.run(script)
    assert ran["status"] == "ok", ran
    lines = ran["stdout"].splitlines()
    assert lines[0] != "su 0" and lines[1] != "passwd 0" and lines[3] != "mysu 0", lines
    assert lines[2] == "copy -rwsr-sr-x 1000 1000", lines
    assert lines[4:] == ["NoNewPrivs:1", "1000"], lines
    await expect_refused(target, {"setuid_root": "EINVAL", "setgid_root": "EINVAL",
                                  "setgroups": "EPERM"})  # fmt: skip


@pytest.mark.parametrize(
    ("attack", "errno"),
    [
        ("bpf", "EPERM"),
        ("perf_event_open", "EPERM"),
        ("userfaultfd", "EPERM"),
        ("keyctl", "EPERM"),
        ("add_key", "EPERM"),
    ],
)
async def test_kernel_facilities_with_a_history_of_exploits_are_refused(
    target: Target, attack: str, errno: str
) -> None:
    """bpf (a map), perf_event_open (of the program's own user time, which this host's
    perf_event_paranoid would allow anyone), userfaultfd, and the keyrings (joining a
    session keyring, adding a key) are all refused with EPERM."""
    await expect_refused(target, {attack: errno})


async def test_ptrace_of_another_process_is_refused(target: Target) -> None:
    """The program forks a sibling and tries to attach to it, to seize the jail's init, to
    be traced, and to read the sibling's memory: all refused."""
    await expect_refused(
        target,
        {"ptrace_attach": "EPERM", "ptrace_seize_init": "EPERM", "ptrace_traceme": "EPERM",
         "process_vm_readv": "EPERM"},
    )  # fmt: skip


async def test_mounting_in_any_form_is_refused(target: Target) -> None:
    """A tmpfs over /tmp, a bind of /usr over /box, a read-write remount of /, a cgroup2
    file system, unmounting /box, chroot: all refused."""
    await expect_refused(
        target,
        {"mount_tmpfs": "EPERM", "mount_bind": "EPERM", "remount_root_rw": "EPERM",
         "mount_cgroup": "EPERM", "umount_box": "EPERM", "chroot": "EPERM"},
    )  # fmt: skip


async def test_raw_and_packet_sockets_are_refused(target: Target) -> None:
    """Raw IPv4 and IPv6 sockets need CAP_NET_RAW, which the program lacks (EPERM); packet
    sockets are refused as if the kernel lacked them (EAFNOSUPPORT)."""
    await expect_refused(
        target,
        {"socket_raw": "EPERM", "socket_raw6": "EPERM", "socket_packet": "EAFNOSUPPORT"},
    )


async def test_the_read_only_base_cannot_be_written(target: Target, sandbox_root: Path) -> None:
    """Creating, appending, renaming, removing, changing modes and linking in /usr, /bin,
    /lib, /etc, / and /.cellblock (the init) all fail, and on the host /usr/bin/id and the
    sandbox root's /etc files are unchanged."""
    etc = {p.name: p.read_bytes() for p in (sandbox_root / "etc").iterdir()}
    id_before = Path("/usr/bin/id").read_bytes()
    attempts = [
        "touch /usr/x", "touch /bin/x", "touch /lib/x", "touch /etc/x", "touch /x",
        "touch /.cellblock/x", "echo root::0:0::/:/bin/sh >> /etc/passwd", "echo >> /etc/hosts",
        ": > /usr/bin/id", "mv /usr/bin/id /usr/bin/id2", "rm -f /etc/ld.so.cache",
        "chmod 777 /usr/bin/id", "ln -s /box /usr/x", "cp /bin/sh /.cellblock/init",
        "mkdir /opt", "touch /proc/x",
    ]  # fmt: skip
    script = "".join(f"{a} 2>/dev/null && echo 'WROTE: {a}';" for a in attempts) + " true"
    ran = await target.run(script)
    assert (ran["status"], ran["stdout"]) == ("ok", ""), ran
    assert Path("/usr/bin/id").read_bytes() == id_before
    assert {p.name: p.read_bytes() for p in (sandbox_root / "etc").iterdir()} == etc
    await target.still_serves()


async def test_hard_limits_and_priorities_cannot_be_raised(target: Target) -> None:
    """Raising the hard nofile, nproc, core, cpu and rtprio limits, lifting init's limits,
    a negative nice value and real-time scheduling: all refused, so the request's limits
    hold for the whole stage."""
    await expect_refused(
        target,
        {"raise_nofile": "EPERM", "raise_nproc": "EPERM", "raise_core": "EPERM",
         "raise_cpu": "EPERM", "raise_rtprio": "EPERM", "prlimit_init": "EPERM",
         "nice_down": "EACCES", "sched_fifo": "EPERM"},
    )  # fmt: skip


async def test_the_hosts_cgroup_and_kernel_files_cannot_be_written(target: Target) -> None:
    """/sys (and so /sys/fs/cgroup) is not there, the jail's /proc is read-only (sysctls,
    sysrq-trigger, the program's own cgroup and oom_score_adj): every write fails."""
    attempts = [
        "echo 1 > /sys/fs/cgroup/pids.max", "mkdir -p /sys/fs/cgroup/escape",
        "echo 1 > /proc/sys/kernel/sysrq", "echo b > /proc/sysrq-trigger",
        "echo 1000000 > /proc/sys/kernel/pid_max", "echo -1000 > /proc/self/oom_score_adj",
        "echo 2 > /proc/sys/vm/drop_caches", "echo x > /proc/self/attr/current",
    ]  # fmt: skip
    script = "".join(f"({a}) 2>/dev/null && echo 'WROTE: {a}';" for a in attempts)
    ran = await target.run(f"{script} test -e /sys && echo sys; true")
    assert (ran["status"], ran["stdout"]) == ("ok", ""), ran
    await target.still_serves()


async def test_kill_minus_one_does_not_reach_the_host(target: Target) -> None:
    """A host process runs as the slot's very uid, the one that signal permission checks
    see; the program sends SIGKILL to every process it may (``kill -9 -1``) and to pids it
    guesses. Its PID namespace holds only its own: the host process lives on, the program's
    own shell survives to report, and the stage ends ``ok``."""
    canary = subprocess.Popen(["sleep", "60"], user=target.uids[0])
    try:
        ran = await target.run(f"kill -9 -1; echo alive; kill -9 {canary.pid} 2>/dev/null; true")
        assert (ran["status"], ran["stdout"]) == ("ok", "alive\n"), ran
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()
    await target.still_serves()
