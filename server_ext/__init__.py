"""The jupyter_server extension: Cellblock inside JupyterLab.

An authenticated proxy of the Cellblock API under ``<base_url>/cellblock/api/v1/``, an optional
embedded deployment started and stopped with the server, and a status page at
``<base_url>/cellblock/``.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from cellblock.server_ext.application import Cellblock

    return [{"module": "cellblock.server_ext", "app": Cellblock}]
