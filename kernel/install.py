"""``cellblock kernel install``: the kernelspec ``cellblock`` for this Python's Jupyter."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

SPEC = Path(__file__).with_name("kernelspec") / "kernel.json"


def install(user: bool = False, prefix: str | None = None) -> str:
    """Install the kernelspec; its argv names this interpreter, so the kernel runs with the
    environment Cellblock is installed in. Answers where it went."""
    spec = json.loads(SPEC.read_text())
    spec["argv"][0] = sys.executable
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kernel.json").write_text(json.dumps(spec, indent=2))
        return str(
            # Installing always replaces an earlier installation (``replace=`` is deprecated).
            KernelSpecManager().install_kernel_spec(folder, "cellblock", user=user, prefix=prefix)
        )
