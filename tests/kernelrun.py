"""What a running kernel prints for some code, through a started jupyter_client client. A
module of its own because test modules cannot import each other; tests/ is on sys.path."""

from __future__ import annotations

from typing import Any


async def printed_by(client: Any, code: str, timeout: float = 30) -> str:
    """Everything ``code`` prints to the kernel's streams, once the kernel is ready; the
    execution must succeed."""
    await client.wait_for_ready(timeout=30)
    printed: list[str] = []

    def output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])

    reply = await client.execute_interactive(code, output_hook=output, timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(printed)
