"""Finding the processes a test started by what their command lines name. A module of its own
because test modules cannot import conftest.py or each other; tests/ is on sys.path."""

from __future__ import annotations

import os
from pathlib import Path


def processes_of(state_dir: Path) -> dict[int, str]:
    """Every live process but this one whose command line names ``state_dir`` (``cellblock
    up`` and what it starts: redis-server, the service, the workers), by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        command = " ".join(a.decode(errors="replace") for a in argv if a)
        if str(state_dir) in command:
            found[int(entry.name)] = command
    return found
