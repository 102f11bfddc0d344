"""Machines simulated on this one, for the multi-host fault tests.

A ``Host`` is what another machine would be to Cellblock: a network namespace of its own, joined
to this one (the first host, which runs Redis and the service) by a veth pair only; a pid, mount
and UTS namespace of its own; and a Nix store of its own, a directory bind-mounted on ``/nix`` in
its mount namespace, so that store paths keep their names and a closure built on one host is
not on another until it is fetched. Its processes run under an init of its own (pid 1 of its pid
namespace): killing that init kills everything the host runs, sandboxes included, as pulling a
machine's power cord would.

The namespaces are entered with ``nsenter``, not ``ip netns exec``, which mounts a new ``/sys``
and so hides the cgroup hierarchies an executor needs. (A module of its own because test modules
cannot import conftest.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: The links' private addresses: host ``i``'s is 10.213.i.2, the first host's end 10.213.i.1.
SUBNET = "10.213"

#: pid 1 of a host: its own /nix and hostname, then it reaps what is orphaned to it.
_INIT = """
import os, socket, subprocess, sys, time
subprocess.run(["mount", "--bind", sys.argv[1], "/nix"], check=True)
socket.sethostname(sys.argv[2])
print("ready", flush=True)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.2)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Host:
    """One simulated machine; ``start`` it, ``spawn`` its processes, ``lose`` it whole."""

    def __init__(self, name: str, index: int) -> None:
        self.name, self.index = name, index
        tag = f"{os.getpid() % 100000}{name}"
        self.netns, self._link = f"cellblock-{tag}", f"cbv{tag}"
        self.address, self.gateway = f"{SUBNET}.{index}.2", f"{SUBNET}.{index}.1"
        # Under /tmp, not a test's private directory: nsjail needs a sandbox root every uid can
        # reach, and the store must be readable by the sandboxes.
        self.directory = Path(tempfile.mkdtemp(prefix=f"cellblock-test-host-{name}-"))
        self.directory.chmod(0o711)
        self.nix = self.directory / "nix"
        self.nix.mkdir(mode=0o755)
        self.sandbox_root = self.directory / "sandbox"
        self.sandbox_root.mkdir(mode=0o711)
        self._init: subprocess.Popen[bytes] | None = None
        self._spawned: list[subprocess.Popen[bytes]] = []
        self.init_pid = 0

    def start(self) -> None:
        _ip("netns", "add", self.netns)
        _ip("link", "add", self._link, "type", "veth", "peer", "name", f"{self._link}p")
        _ip("link", "set", f"{self._link}p", "netns", self.netns)
        _ip("addr", "add", f"{self.gateway}/30", "dev", self._link)
        _ip("link", "set", self._link, "up")
        _ip("-n", self.netns, "addr", "add", f"{self.address}/30", "dev", f"{self._link}p")
        _ip("-n", self.netns, "link", "set", f"{self._link}p", "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        self._init = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount",
             "--propagation", "private", "--pid", "--fork", "--mount-proc", "--uts",
             sys.executable, "-c", _INIT, str(self.nix), f"host-{self.name}"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self._init.stdout is not None
        if self._init.stdout.readline() != b"ready\n":
            raise RuntimeError(f"host {self.name} did not start")
        # nsenter became unshare, whose only child is the host's pid 1.
        children = Path(f"/proc/{self._init.pid}/task/{self._init.pid}/children").read_text()
        self.init_pid = int(children.split()[0])

    def spawn(self, argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host, its stderr in the file ``log``."""
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                ["nsenter", "-t", str(self.init_pid), "--net", "--mount", "--pid", "--uts",
                 "--", *argv],
                env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        self._spawned.append(proc)
        return proc

    def pids(self) -> list[int]:
        """The processes in this host's network namespace (the sandboxes have their own)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def lose(self) -> None:
        """Everything this host runs dies at once: its pid 1, and with it its pid namespace."""
        if self._init is None or self._init.poll() is not None:
            return
        os.kill(self.init_pid, signal.SIGKILL)
        self._init.wait()
        assert self._init.stdout is not None
        self._init.stdout.close()
        for proc in self._spawned:  # each nsenter ends with the process it entered
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self._init is not None and self._init.poll() is None

    def has(self, store_path: str) -> bool:
        """Whether this host's own store holds ``store_path``."""
        return (self.nix / Path(store_path).relative_to("/nix")).exists()

    def build_logs(self) -> list[str]:
        """The derivations this host's Nix built itself (Nix keeps a log of each build, none of
        a path it fetched)."""
        drvs = self.nix / "var/log/nix/drvs"
        return sorted(p.name for p in drvs.rglob("*.drv*")) if drvs.exists() else []

    def remove(self) -> None:
        self.lose()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self._link], capture_output=True, check=False)
        shutil.rmtree(self.directory, ignore_errors=True)
