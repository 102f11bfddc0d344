"""Reading what is not yours, end to end through the real service and a real executor running
real nsjail: the host's files, the worker's environment and tokens, Redis, the service, the
network, and, run concurrently in the executor's other slot, another client's files,
processes, sockets and SysV IPC. Each test asserts that the attacker finds nothing, that its
stage ends honestly, that the victim runs on unharmed, and that the service still serves."""

from __future__ import annotations

import base64
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from attackio import OpenTarget, Target
from restio import BOB

pytestmark = pytest.mark.timeout(90)

#: Every file named planted*, but in /proc and the read-only /usr.
FIND_PLANTED = "find / \\( -path /proc -o -path /usr \\) -prune -o -name 'planted*' -print"
ALL_FOUND = 'for p in "$@"; do test -e "$p" && echo "visible $p"; done; true'


async def test_the_hosts_files_and_the_executors_state_are_not_there(
    target: Target, tmp_path: Path, sandbox_root: Path
) -> None:
    """/etc/shadow and the host's other secrets, /root, /home, /sys, /run, the test's folder
    (Redis's socket, the executor's state directory), the sandbox root and the folder of the
    working directories: none exists inside. /etc/passwd is the sandbox's own, naming no
    user of the host, and pid 1 is the jail's init, not the host's (whose environment is
    so out of reach)."""
    paths = [
        "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/etc/machine-id", "/root",
        "/home", "/var", "/boot", "/run", "/sys", "/sys/fs/cgroup", "/sys/kernel",
        tmp_path / "redis.sock", tmp_path / "executor-0", tmp_path, sandbox_root,
        target.work_root, *target.workdirs(),
    ]  # fmt: skip
    ran = await target.run(
        f"{ALL_FOUND}; cut -d: -f1 /etc/passwd | tr '\\n' ' '; echo;"
        " tr '\\0' ' ' < /proc/1/cmdline",
        args=[str(p) for p in paths],
    )
    assert ran["status"] == "ok", ran
    users, pid_1 = ran["stdout"].splitlines()
    assert users == "root runner nobody ", ran
    assert pid_1.startswith("/.cellblock/init "), ran  # not the host's pid 1
    await target.still_serves()


WHERE_SECRETS_HIDE = r"""
import base64, glob, os, sys
needles = [base64.b64decode(n)[::-1] for n in open("needles").read().split()]
places = {"env": "\n".join(f"{k}={v}" for k, v in os.environ.items()).encode()}
for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
    try:
        places[path] = open(path, "rb").read()
    except OSError as exc:
        print("unreadable", path, exc.strerror)
for top in ("/box", "/tmp", "/dev/shm", "/etc", "/.cellblock"):
    for folder, _, leaves in os.walk(top):
        for leaf in leaves:
            path = os.path.join(folder, leaf)
            if path not in ("/box/needles", "/box/find.py"):
                places[path] = open(path, "rb").read()
names = {k for k in os.environ if k.startswith("CELLBLOCK") or "REDIS" in k or "TOKEN" in k}
print("variables", sorted(names))
print("found", sorted(p for p, text in places.items() for n in needles if n in text))
"""


async def test_the_workers_environment_and_tokens_are_nowhere_inside(
    open_target: OpenTarget, redis_url: str
) -> None:
    """The executor holds a client and an admin token and Redis's URL in its environment.
    The program looks for them, and for the service's tokens and any CELLBLOCK_*, *REDIS* or
    *TOKEN* variable, in its environment, in every /proc/N/environ and cmdline it can read
    and in every file of its writable folders, /etc and /.cellblock: nothing is there.
    (It is given the secrets reversed and encoded, so that its own files do not hold them.)"""
    token, admin = f"client-{secrets.token_hex(8)}", f"admin-{secrets.token_hex(8)}"
    target = await open_target(
        CELLBLOCK_TOKEN=token, CELLBLOCK_ADMIN_TOKEN=admin, CELLBLOCK_REDIS_URL=redis_url
    )
    needles = [token, admin, redis_url, "alice-token", "bob-token", "admin-token"]
    hidden = " ".join(base64.b64encode(n.encode()[::-1]).decode() for n in needles)
    files = [
        {"name": "needles", "content": hidden},
        {"name": "find.py", "content": WHERE_SECRETS_HIDE},
    ]
    ran = await target.run("python3 find.py", files=files)
    assert ran["status"] == "ok", ran
    lines = ran["stdout"].splitlines()
    assert lines[-2:] == ["variables []", "found []"], ran
    # init's own environment is not even readable; what else is unreadable holds nothing
    # either, since init starts the program with only the stage's variables.
    assert all(line.startswith("unreadable /proc/1/") for line in lines[:-2]), lines
    await target.still_serves()


async def test_redis_and_the_service_are_unreachable(
    target: Target, redis_url: str, service: Any
) -> None:
    """The program knows where Redis's unix socket is and the port the service listens on
    at the host's 127.0.0.1, and tries Redis's usual TCP port too: the socket is not in the
    jail's file system, and the jail's loopback is its own (a network namespace), so every
    connection fails and the service sees none."""
    port = int(service.url.rsplit(":", 1)[1])
    probe = (
        "import socket, sys\n"
        "def attempt(family, address):\n"
        "    try:\n        socket.socket(family).connect(address)\n"
        "        return 'connected'\n    except OSError as exc:\n        return exc.strerror\n"
        "print(attempt(socket.AF_UNIX, sys.argv[1]))\n"
        "print(attempt(socket.AF_INET, ('127.0.0.1', int(sys.argv[2]))))\n"
        "print(attempt(socket.AF_INET, ('127.0.0.1', 6379)))\n"
        "print(attempt(socket.AF_INET6, ('::1', int(sys.argv[2]))))\n"
    )
    ran = await target.run(
        'python3 probe.py "$@"',
        files=[{"name": "probe.py", "content": probe}],
        args=[redis_url.removeprefix("unix://"), str(port)],
    )
    assert ran["status"] == "ok", ran
    assert ran["stdout"].splitlines() == ["No such file or directory"] + 3 * ["Connection refused"]
    await target.still_serves()


def host_addresses() -> list[str]:
    """The host's addresses other than loopback."""
    shown = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True)
    found = []
    for line in shown.stdout.splitlines():
        words = line.split()
        address = words[3].split("/")[0]
        if words[1] != "lo" and not address.startswith("fe80"):
            found.append(address)
    return found


async def test_there_is_no_route_out_only_loopback(target: Target) -> None:
    """The jail has one interface, lo. A public address, the host's own addresses (where a
    listener of the test waits on every interface), UDP to a DNS server and a DNS lookup all
    fail at once, and the program's own loopback works."""
    with socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        addresses = [*host_addresses(), "1.1.1.1", "2606:4700:4700::1111"]
        probe = (
            "import socket, sys\nport = int(sys.argv[1])\n"
            "def attempt(what, call):\n    try:\n        call()\n        print(what, 'ok')\n"
            "    except OSError as exc:\n        print(what, type(exc).__name__)\n"
            "for address in sys.argv[2:]:\n"
            "    attempt(address, lambda: socket.create_connection((address, port), 2))\n"
            "udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "attempt('udp', lambda: udp.sendto(b'x', ('8.8.8.8', 53)))\n"
            "attempt('dns', lambda: socket.getaddrinfo('example.com', 80))\n"
            "local = socket.create_server(('127.0.0.1', 0))\n"
            "attempt('loopback', lambda: socket.create_connection(local.getsockname(), 2))\n"
        )
        ran = await target.run(
            "ls /sys/class/net 2>/dev/null; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ';"
            ' python3 probe.py "$@"',
            files=[{"name": "probe.py", "content": probe}],
            args=[str(port), *addresses],
        )
    assert ran["status"] == "ok", ran
    lines = ran["stdout"].splitlines()
    assert lines[0] == "lo", lines
    outcomes = dict(line.rsplit(" ", 1) for line in lines[1:])
    assert outcomes.pop("loopback") == "ok"
    assert outcomes.pop("dns") == "gaierror"
    assert set(outcomes) == {*addresses, "udp"}
    assert set(outcomes.values()) == {"OSError"}, outcomes  # ENETUNREACH, not a timeout
    assert ran["wall_time"] < 2
    await target.still_serves()


# -- another submission, running at the same time in the other slot --------------------------

LISTEN = """
import pathlib, socket, time
unix = socket.socket(socket.AF_UNIX)
unix.bind("/tmp/planted.sock")
abstract = socket.socket(socket.AF_UNIX)
abstract.bind("\\0cellblock-planted")
tcp = socket.socket()
tcp.bind(("127.0.0.1", 4444))
for s in (unix, abstract, tcp):
    s.listen()
pathlib.Path("/tmp/listening").touch()
time.sleep(300)
"""
#: Bob's program: files in every writable folder, three SysV IPC objects, a unix socket, an
#: abstract one and a TCP listener, and a long sleeper of a telling name.
PLANT = (
    "echo secret > /box/planted && echo secret > /tmp/planted && echo secret > /dev/shm/planted"
    " && ipcmk -M 4096 && ipcmk -Q && ipcmk -S 1 && { python3 listen.py & }"
    " && until test -e /tmp/listening; do sleep 0.01; done"
    " && echo planted $(ipcs | grep -c ^0x) && exec -a planted-sleeper sleep 300"
)


@pytest.fixture
async def victim(open_target: OpenTarget) -> AsyncIterator[tuple[Target, str]]:
    """An executor of two slots, one of which runs Bob's planting program; at the end, Bob's
    submission is still running, unharmed, and is cancelled, which ends all of it."""
    target = await open_target(slots=2)
    request = {
        "files": [{"name": "listen.py", "content": LISTEN}],
        "run": PLANT,
        "limits": {"run": {"wall_time": 60}},
    }
    sid = await target.start(request, token=BOB)
    await target.printed(sid, "planted 3", token=BOB)
    yield target, sid
    state = await target.rest.call("GET", f"/api/v1/submissions/{sid}", token=BOB)
    assert (state["status"], state["stage"]) == ("running", "run"), state
    await target.cancel(sid, token=BOB)
    # Cancelling kills the stage; an executor stopped before it has done so would leave the
    # stage to its init's deadline, past this test.
    await target.settled()
    await target.still_serves()


async def test_another_submissions_files_are_not_visible(victim: tuple[Target, str]) -> None:
    """While Bob's program holds files in its working directory, /tmp and /dev/shm, Alice's
    program looks everywhere (and at the host paths of every working directory): it finds
    nothing of Bob's."""
    target, _ = victim
    ran = await target.run(
        f"{FIND_PLANTED}; {ALL_FOUND}",
        args=[str(p) for p in target.workdirs()] + [str(target.work_root)],
    )
    assert (ran["status"], ran["stdout"]) == ("ok", ""), ran


async def test_another_submissions_processes_are_not_visible_or_killable(
    victim: tuple[Target, str],
) -> None:
    """Alice's program lists every process it can see (a PID namespace of its own: a
    handful, none of Bob's) and then kills every process it may, ``kill -9 -1``: Bob's
    program runs on (the fixture checks)."""
    target, _ = victim
    lister = (
        "import glob\nfor path in sorted(glob.glob('/proc/[0-9]*/cmdline')):\n"
        "    print(path.split('/')[2], open(path, 'rb').read().replace(b'\\0', b' ').decode())\n"
    )
    ran = await target.run(
        "python3 ps.py; kill -9 -1; echo killed",
        files=[{"name": "ps.py", "content": lister}],
    )
    assert ran["status"] == "ok", ran
    *processes, last = ran["stdout"].splitlines()
    assert last == "killed"
    assert "planted" not in ran["stdout"], processes
    assert all(int(line.split()[0]) < 20 for line in processes), processes


async def test_another_submissions_sockets_are_not_reachable(victim: tuple[Target, str]) -> None:
    """Bob's program listens on a unix socket in /tmp, an abstract unix socket and TCP port
    4444 of loopback. Alice's program connects to each: the file is not there, and the
    abstract name and the port are free in its own network namespace (it binds them
    itself)."""
    target, _ = victim
    probe = (
        "import socket\n"
        "def attempt(family, address):\n"
        "    try:\n        socket.socket(family).connect(address)\n"
        "        return 'connected'\n    except OSError as exc:\n        return exc.strerror\n"
        "print(attempt(socket.AF_UNIX, '/tmp/planted.sock'))\n"
        "print(attempt(socket.AF_UNIX, '\\0cellblock-planted'))\n"
        "print(attempt(socket.AF_INET, ('127.0.0.1', 4444)))\n"
        "mine = [socket.socket(socket.AF_UNIX), socket.socket()]\n"
        "mine[0].bind('\\0cellblock-planted')\n"
        "mine[1].bind(('127.0.0.1', 4444))\n"
        "print(open('/proc/net/unix').read().count('planted'))\n"
    )
    ran = await target.run("python3 probe.py", files=[{"name": "probe.py", "content": probe}])
    assert ran["status"] == "ok", ran
    assert ran["stdout"].splitlines() == [
        "No such file or directory", "Connection refused", "Connection refused", "1",
    ]  # fmt: skip


async def test_another_submissions_sysv_ipc_is_not_visible(victim: tuple[Target, str]) -> None:
    """Bob's program made a shared memory segment, a message queue and a semaphore set.
    Alice's program sees no SysV IPC object at all (an IPC namespace of its own), and
    cannot attach the first segment id there is."""
    target, _ = victim
    attach = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.shmat.restype = "
        "ctypes.c_void_p\nprint(libc.shmat(0, None, 0) == 2**64 - 1, ctypes.get_errno())\n"
    )
    ran = await target.run(
        "ipcs | grep -c ^0x; python3 attach.py",
        files=[{"name": "attach.py", "content": attach}],
    )
    assert ran["stdout"].splitlines() == ["0", "True 22"], ran  # EINVAL: no such segment
