"""Stage cgroups. v1 is this host's real hierarchy; v2 cannot be mounted with its memory
controller on a v1 host, so its file handling is checked against a directory laid out as the
kernel lays out a delegated v2 subtree (the real v2 path runs wherever a host uses v2)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cellblock.errors import SandboxError
from cellblock.executor import cgroups

MiB = 1024 * 1024
V1_HOST = (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")).exists()


def test_own_cgroup_reads_proc_self_cgroup() -> None:
    text = "9:name=systemd:/\n8:pids:/a/b\n4:memory:/process_api/x\n0::/unified/path\n"
    assert cgroups.own_cgroup("memory", text) == "/process_api/x"
    assert cgroups.own_cgroup("pids", text) == "/a/b"
    assert cgroups.own_cgroup("", text) == "/unified/path"
    with pytest.raises(SandboxError, match="no cpuset cgroup"):
        cgroups.own_cgroup("cpuset", text)


@pytest.mark.skipif(not V1_HOST or os.geteuid() != 0, reason="needs root on a cgroup v1 host")
def test_v1_stage_cgroup_limits_measurement_and_removal() -> None:
    detected = cgroups.detect()
    assert isinstance(detected, cgroups.CgroupsV1)
    stage = detected.create("test-v1-stage")
    try:
        memory_dir = detected.memory_base / "test-v1-stage"
        pids_max = detected.pids_base / "test-v1-stage" / "pids.max"
        # No caps until the stage is known: an armed jail gets them when it is given its stage.
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) > 1 << 60
        assert pids_max.read_text().strip() == "max"
        stage.limit(48 * MiB, 17)
        assert int((memory_dir / "memory.limit_in_bytes").read_text()) == 48 * MiB
        assert pids_max.read_text().strip() == "17"
        args = stage.nsjail_args()
        assert int(args[args.index("--cgroup_pids_max") + 1]) > 17  # ours bind first
        assert int(args[args.index("--cgroup_mem_max") + 1]) > 48 * MiB
        assert stage.peak_memory() == 0 and not stage.out_of_memory() and stage.procs() == []
    finally:
        stage.close()
        stage.remove()
    assert not (detected.memory_base / "test-v1-stage").exists()


@pytest.mark.skipif(not V1_HOST or os.geteuid() != 0, reason="needs root on a cgroup v1 host")
def test_closing_a_v1_stage_twice_leaves_a_file_given_its_numbers_alone(tmp_path: Path) -> None:
    """A stage's descriptors go once: closed again, a number the kernel has handed to another
    file since (another jail's pipe) would close that file."""
    stage = cgroups.detect().create("test-v1-twice")
    try:
        stage.close()
        others = [os.open(tmp_path, os.O_RDONLY) for _ in range(4)]  # take the freed numbers
        stage.close()
        for fd in others:
            os.fstat(fd)  # still open
            os.close(fd)
    finally:
        stage.remove()


def fake_v2(root: Path) -> Path:
    """A v2 root as the kernel shows it, with this process's cgroup at the root ("0::/")."""
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_is_detected_and_its_stage_files_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_v2(tmp_path)
    real_read_text = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/proc/self/cgroup":
            return "0::/\n"
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    detected = cgroups.detect(root)
    assert isinstance(detected, cgroups.CgroupsV2)
    assert (root / "cellblock" / "cgroup.subtree_control").read_text() == "+memory +pids"
    stage = detected.create("s1")
    directory = root / "cellblock" / "s1"
    assert not (directory / "memory.max").exists()
    (directory / "memory.swap.max").write_text("max")
    stage.limit(32 * MiB, 9)
    assert (directory / "memory.max").read_text() == str(32 * MiB)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "9"
    args = stage.nsjail_args()
    assert args[:3] == ["--use_cgroupv2", "--cgroupv2_mount", str(directory)]
    (directory / "memory.peak").write_text(f"{5 * MiB}\n")
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    assert stage.peak_memory() == 5 * MiB
    assert not stage.out_of_memory()
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert stage.out_of_memory()
    (directory / "cgroup.procs").write_text("")
    assert stage.procs() == []


def test_detect_refuses_a_host_without_controllers(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="no memory and pids cgroup controllers"):
        cgroups.detect(tmp_path)


@pytest.mark.skipif(not V1_HOST or os.geteuid() != 0, reason="needs root on a cgroup v1 host")
def test_stale_stage_cgroups_of_a_slot_are_removed_at_start() -> None:
    detected = cgroups.detect()
    left = detected.create("987654-leftover")  # as if its executor died mid-stage
    left.close()
    busy = detected.create("987654-busy")
    sleeper = subprocess.Popen(["sleep", "30"])
    for base in (detected.memory_base, detected.pids_base):  # type: ignore[attr-defined]
        (base / "987654-busy" / "cgroup.procs").write_text(str(sleeper.pid))
    try:
        assert detected.remove_stale([987654]) == 2  # the empty one's memory and pids cgroups
        assert not (detected.memory_base / "987654-leftover").exists()  # type: ignore[attr-defined]
        assert (detected.memory_base / "987654-busy").exists()  # type: ignore[attr-defined]
        assert sleeper.poll() is None  # a cgroup in use is left alone, its processes too
    finally:
        sleeper.kill()
        sleeper.wait()
        busy.close()
        busy.remove()
