"""What a cell has shown so far, to show it again in a cleared output area. Pure.

Why a kernel would: JupyterLab (4.x, ``@jupyterlab/outputarea``'s ``OutputArea``) adds an input
box (its ``Stdin`` widget) beside the cell's outputs on an ``input_request`` and removes it only
when the user answers it (its value resolves) or when the output area is cleared. The
``execute_reply`` and the kernel's ``idle`` status only reset its ``pendingInput`` flag, and the
messaging protocol has no message that withdraws an input request. A box the program no longer
waits for (it ended, or was interrupted) would stay in the cell, dead. A ``clear_output`` with
``wait`` clears the area at the next output, box and all, and the kernel then sends what the
cell showed again: in one go, so nothing flickers.
"""

from __future__ import annotations

import copy
from typing import Any

Content = dict[str, Any]


class OutputLog:
    """The cell's iopub outputs as the output area holds them: consecutive stream texts of one
    name joined, a display updated in place by its ``update_display_data``."""

    def __init__(self) -> None:
        self._outputs: list[tuple[str, Content]] = []

    def add(self, msg_type: str, content: Content) -> None:
        if msg_type == "stream" and self._outputs:
            last_type, last = self._outputs[-1]
            if last_type == "stream" and last["name"] == content["name"]:
                last["text"] += content["text"]
                return
        if msg_type == "update_display_data":
            display_id = content.get("transient", {}).get("display_id")
            for kind, shown in self._outputs:
                if kind == "display_data" and shown.get("transient", {}).get("display_id") == (
                    display_id
                ):
                    shown.update(data=content["data"], metadata=content["metadata"])
            return
        self._outputs.append((msg_type, copy.deepcopy(content)))

    def replay(self) -> list[tuple[str, Content]]:
        """The messages that clear the output area and show it again as it was."""
        return [("clear_output", {"wait": True}), *copy.deepcopy(self._outputs)]
