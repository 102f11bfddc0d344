"""Finds, or builds once, the ``cellblock-init`` binary from ``jailinit.c``.

It is compiled on the executor's host rather than shipped, so that it matches the host's
architecture; the file name carries a hash of the source, so a changed source is rebuilt and
executors sharing a directory never run a stale or half-written binary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from cellblock.errors import SandboxError

SOURCE = Path(__file__).with_name("jailinit.c")


def init_binary(directory: Path) -> Path:
    """The path of a built ``cellblock-init`` in ``directory``, compiling it if needed."""
    source = SOURCE.read_bytes()
    target = directory / f"cellblock-init-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SandboxError("cannot build cellblock-init: no C compiler (apt-get install gcc)")
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{target.name}.{os.getpid()}"
    result = subprocess.run(
        [compiler, "-static", "-O2", "-Wall", "-o", str(partial), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise SandboxError(f"cannot build cellblock-init: {result.stderr.strip()}")
    partial.chmod(0o755)
    os.replace(partial, target)  # atomic: a concurrent builder's copy is identical
    return target
