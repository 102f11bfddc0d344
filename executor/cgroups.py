"""Per-stage cgroups, on cgroup v1 (separate memory and pids hierarchies) or v2 (unified).

Each stage gets a cgroup of its own, made by us under the executor's own cgroup (so the host's
limits on the executor still hold). nsjail is told to put the jailed process tree into a child
cgroup of it (``NSJAIL.<pid>``), so our cgroup holds exactly the stage's processes and not
nsjail itself: its peak memory is the peak of the stage's whole tree. Our cgroup carries the
limits, so that an out-of-memory kill is counted where we can read it after nsjail has removed
its own child cgroup.

A series of stages (a submission's tests, see sandbox.py) shares one cgroup, one stage at a
time: each stage ``begin``s with its own caps, and is measured on nsjail's child cgroup of its
own jail, which init keeps until the host has measured it.

Not thread-safe; one ``StageCgroup`` belongs to one running stage at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from abc import ABC, abstractmethod
from pathlib import Path

from cellblock.errors import SandboxError

CGROUP_ROOT = Path("/sys/fs/cgroup")
# nsjail's own child cgroup gets no real caps (nsjail wants a number to make it at all): ours
# are the ones that bind, so the out-of-memory event is raised (and counted) on the cgroup we
# keep, and they can be set after nsjail has started, when the stage is known.
NSJAIL_LOOSE_MEMORY = 1 << 50
NSJAIL_LOOSE_PIDS = 1 << 22  # PID_MAX_LIMIT


class StageCgroup(ABC):
    """The cgroup of one stage: its limits, its measurements, and its end."""

    #: The directory of the memory controller's cgroup.
    memory_dir: Path

    @abstractmethod
    def nsjail_args(self) -> list[str]:
        """nsjail options that place the jailed tree under this cgroup."""

    def begin(self, memory: int, pids: int) -> None:
        """A stage begins: cap its memory (without swap) and number of processes, and forget
        an earlier stage's out-of-memory kill (and, where it can be reset, peak)."""
        self.limit(memory, pids)
        self._forget()

    @abstractmethod
    def limit(self, memory: int, pids: int) -> None:
        """Cap the stage's memory (without swap) and number of processes."""

    @abstractmethod
    def _forget(self) -> None:
        """From now on, ``out_of_memory`` tells only of kills still to come; v1 also resets
        our own peak."""

    def peak_memory(self) -> int:
        """Peak memory charged to the stage's tree, in bytes: from the cgroup nsjail made for
        the stage's jail while it is there (its init waits until the stage is measured), else
        from ours."""
        for child in self.memory_dir.glob("NSJAIL.*"):
            with contextlib.suppress(OSError, ValueError):  # gone meanwhile
                return self._peak(child)
        return self._peak(self.memory_dir)

    @abstractmethod
    def _peak(self, directory: Path) -> int:
        """The peak memory of the memory cgroup ``directory``."""

    @abstractmethod
    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of the stage for going over the memory cap."""

    @abstractmethod
    def procs(self) -> list[int]:
        """The pids still in the cgroup or its descendants."""

    @abstractmethod
    def _dirs(self) -> list[Path]:
        """Our directories, one per hierarchy."""

    def kill_all(self, deadline: float = 2.0) -> None:
        """SIGKILL every process of the stage, until none is left (or ``deadline`` passes)."""
        end = time.monotonic() + deadline
        while pids := self.procs():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > end:
                raise SandboxError(f"processes {pids} survived SIGKILL")
            time.sleep(0.005)

    def remove(self) -> None:
        """Remove the cgroup; first kill what is left in it, if anything is."""
        for top in self._dirs():
            try:
                top.rmdir()  # the common case: nsjail removed its child and nothing is left
                continue
            except FileNotFoundError:
                continue
            except OSError:
                pass
            self.kill_all()
            # Children first; os.walk lists directories only, not the many control files.
            for parent, dirs, _ in os.walk(top, topdown=False):
                for d in dirs:
                    _rmdir(Path(parent) / d)
            _rmdir(top)

    def close(self) -> None:  # noqa: B027 (most cgroups hold nothing to release)
        """Release descriptors held for measurements."""


def _rmdir(path: Path) -> None:
    # A cgroup whose last process is still exiting refuses rmdir for a moment.
    for _ in range(200):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)
    raise SandboxError(f"cannot remove cgroup {path}")


def _write(path: Path, value: str) -> None:
    # As write_text does, without a text-mode file object: a stage writes several of these.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise SandboxError(f"cannot write {value!r} to {path}: {exc}") from None


def _read_procs(directory: Path) -> list[int]:
    pids: list[int] = []
    for procs in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids.extend(int(line) for line in procs.read_text().split())
    return pids


class Cgroups(ABC):
    """Makes stage cgroups on one host."""

    version: int

    @abstractmethod
    def create(self, name: str) -> StageCgroup:
        """A fresh, empty cgroup for one stage, without caps until ``limit``."""

    @abstractmethod
    def _bases(self) -> list[Path]:
        """Where stage cgroups are made, one folder per hierarchy."""

    def remove_stale(self, uids: list[int]) -> int:
        """Remove the empty stage cgroups a previous run of these slots left (it was killed
        mid-stage). One that still holds processes is left alone: they may be another
        deployment's on this host using the same uids, and a killed executor's own jail ends
        at its init's deadline, after which its cgroup is empty and goes at the next start."""
        removed = 0
        for base in self._bases():
            for uid in uids:
                for stale in base.glob(f"{uid}-*"):
                    try:
                        for parent, dirs, _ in os.walk(stale, topdown=False):
                            for d in dirs:
                                os.rmdir(os.path.join(parent, d))
                        stale.rmdir()
                        removed += 1
                    except OSError:
                        continue  # not empty: in use
        return removed


class CgroupsV1(Cgroups):
    version = 1

    def __init__(self, memory_base: Path, pids_base: Path, memory_mount: Path, pids_mount: Path):
        self.memory_base, self.pids_base = memory_base, pids_base
        self.memory_mount, self.pids_mount = memory_mount, pids_mount
        for base in (memory_base, pids_base):
            base.mkdir(parents=True, exist_ok=True)
        self.swap_accounting = (memory_base / "memory.memsw.limit_in_bytes").exists()

    def create(self, name: str) -> StageCgroup:
        return StageCgroupV1(self, name)

    def _bases(self) -> list[Path]:
        return [self.memory_base, self.pids_base]


class StageCgroupV1(StageCgroup):
    def __init__(self, owner: CgroupsV1, name: str) -> None:
        self.owner = owner
        self.memory_dir = owner.memory_base / name
        self.pids_dir = owner.pids_base / name
        for d in self._dirs():
            if d.exists():
                StageCgroupV1._remove_stale(d)
            d.mkdir()
        try:
            self._watch_oom()
        except BaseException:
            self.remove()
            raise

    def _watch_oom(self) -> None:
        # v1 counts the out-of-memory kill on the victim's own cgroup, which nsjail removes;
        # an eventfd registered on ours is signalled when our cap is the one that was hit.
        self._oom_event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._oom_control = os.open(self.memory_dir / "memory.oom_control", os.O_RDONLY)
        _write(self.memory_dir / "cgroup.event_control", f"{self._oom_event} {self._oom_control}")
        self._oom_seen = False

    @staticmethod
    def _remove_stale(directory: Path) -> None:
        for pid in _read_procs(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for sub in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                _rmdir(sub)
        _rmdir(directory)

    def _dirs(self) -> list[Path]:
        return [self.memory_dir, self.pids_dir]

    def nsjail_args(self) -> list[str]:
        mem_parent = self.memory_dir.relative_to(self.owner.memory_mount)
        pids_parent = self.pids_dir.relative_to(self.owner.pids_mount)
        return [
            "--cgroup_mem_mount", str(self.owner.memory_mount),
            "--cgroup_mem_parent", str(mem_parent),
            "--cgroup_mem_max", str(NSJAIL_LOOSE_MEMORY),
            "--cgroup_pids_mount", str(self.owner.pids_mount),
            "--cgroup_pids_parent", str(pids_parent),
            "--cgroup_pids_max", str(NSJAIL_LOOSE_PIDS),
        ]  # fmt: skip

    def limit(self, memory: int, pids: int) -> None:
        # The kernel keeps memsw >= memory: a cap going down is set on memory first, one going
        # up (a series' next stage) on memsw first. Swap must not extend the cap.
        caps = ["memory.limit_in_bytes"]
        if self.owner.swap_accounting:
            current = int((self.memory_dir / "memory.limit_in_bytes").read_text())
            caps.insert(0 if memory > current else 1, "memory.memsw.limit_in_bytes")
        for cap in caps:
            _write(self.memory_dir / cap, str(memory))
        _write(self.pids_dir / "pids.max", str(pids))

    def _peak(self, directory: Path) -> int:
        return int((directory / "memory.max_usage_in_bytes").read_text())

    def _forget(self) -> None:
        self.out_of_memory()
        self._oom_seen = False
        # Our own peak too, the fallback for a stage whose own cgroup went with it.
        _write(self.memory_dir / "memory.max_usage_in_bytes", "0")

    def out_of_memory(self) -> bool:
        if not self._oom_seen and self._oom_event >= 0:
            with contextlib.suppress(BlockingIOError):
                self._oom_seen = os.eventfd_read(self._oom_event) > 0
        return self._oom_seen

    def procs(self) -> list[int]:
        # Each process is in both hierarchies: listed once.
        return list(dict.fromkeys(_read_procs(self.memory_dir) + _read_procs(self.pids_dir)))

    def close(self) -> None:
        """Idempotent: a descriptor closed twice could be another file's by then."""
        self.out_of_memory()
        for fd in (self._oom_event, self._oom_control):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._oom_event = self._oom_control = -1


class CgroupsV2(Cgroups):
    version = 2

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        _write(base / "cgroup.subtree_control", "+memory +pids")

    def create(self, name: str) -> StageCgroup:
        return StageCgroupV2(self.base / name)

    def _bases(self) -> list[Path]:
        return [self.base]


class StageCgroupV2(StageCgroup):
    def __init__(self, directory: Path) -> None:
        self.directory = self.memory_dir = directory
        if directory.exists():
            StageCgroupV1._remove_stale(directory)
        directory.mkdir()
        _write(directory / "cgroup.subtree_control", "+memory +pids")
        self._oom_kills_before = 0

    def _dirs(self) -> list[Path]:
        return [self.directory]

    def nsjail_args(self) -> list[str]:
        return [
            "--use_cgroupv2", "--cgroupv2_mount", str(self.directory),
            "--cgroup_mem_max", str(NSJAIL_LOOSE_MEMORY),
            "--cgroup_pids_max", str(NSJAIL_LOOSE_PIDS),
        ]  # fmt: skip

    def limit(self, memory: int, pids: int) -> None:
        _write(self.directory / "memory.max", str(memory))
        if (self.directory / "memory.swap.max").exists():
            _write(self.directory / "memory.swap.max", "0")
        _write(self.directory / "pids.max", str(pids))

    def _peak(self, directory: Path) -> int:
        return int((directory / "memory.peak").read_text())

    def _forget(self) -> None:
        self._oom_kills_before = self._oom_kills()

    def out_of_memory(self) -> bool:
        return self._oom_kills() > self._oom_kills_before

    def _oom_kills(self) -> int:
        # memory.events is hierarchical on v2: a kill in nsjail's child cgroup counts here.
        for line in (self.directory / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def procs(self) -> list[int]:
        return _read_procs(self.directory)

    def kill_all(self, deadline: float = 2.0) -> None:
        kill = self.directory / "cgroup.kill"
        if kill.exists() and self.procs():
            _write(kill, "1")
        super().kill_all(deadline)


def own_cgroup(controller: str, proc_cgroup: str) -> str:
    """This process's cgroup path for ``controller`` ("" for v2's unified line)."""
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise SandboxError(f"this process is in no {controller or 'unified'} cgroup")


def detect(root: Path = CGROUP_ROOT, namespace: str = "cellblock") -> Cgroups:
    """The cgroups of this host: v2 when the unified hierarchy has the memory controller.

    Stage cgroups go under ``namespace`` inside the executor's own cgroup. On v2 the executor
    first moves itself into a ``supervisor`` leaf, because a cgroup that hands controllers to
    its children may hold no processes itself (the "no internal processes" rule).
    """
    proc_cgroup = Path("/proc/self/cgroup").read_text()
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        own = root / own_cgroup("", proc_cgroup).lstrip("/")
        if own != root:
            supervisor = own / "supervisor"
            supervisor.mkdir(exist_ok=True)
            for pid in _read_procs_flat(own):
                with contextlib.suppress(OSError):
                    _write(supervisor / "cgroup.procs", str(pid))
            _write(own / "cgroup.subtree_control", "+memory +pids")
        return CgroupsV2(own / namespace)
    memory_mount, pids_mount = root / "memory", root / "pids"
    if not (memory_mount / "memory.limit_in_bytes").exists() or not pids_mount.is_dir():
        raise SandboxError(f"no memory and pids cgroup controllers under {root}")
    memory_own = own_cgroup("memory", proc_cgroup).lstrip("/")
    pids_own = own_cgroup("pids", proc_cgroup).lstrip("/")
    return CgroupsV1(
        memory_base=memory_mount / memory_own / namespace,
        pids_base=pids_mount / pids_own / namespace,
        memory_mount=memory_mount,
        pids_mount=pids_mount,
    )


def _read_procs_flat(directory: Path) -> list[int]:
    return [int(line) for line in (directory / "cgroup.procs").read_text().split()]
