"""File, stdin and output content on the wire: UTF-8 text, hex or base64."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

Encoding = Literal["utf8", "hex", "base64"]


def decode(content: str, encoding: str) -> bytes:
    """Decode file or stdin content; ``ValueError`` says what is wrong with it."""
    if encoding == "utf8":
        return content.encode("utf-8", errors="surrogatepass")
    if encoding == "hex":
        try:
            return bytes.fromhex(content)
        except ValueError:
            raise ValueError("is not valid hex (pairs of 0-9, a-f)") from None
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
    raise ValueError(f"unknown encoding {encoding!r}; use utf8, hex or base64")


def encode_output(data: bytes) -> tuple[str, Encoding]:
    """Program output for JSON: UTF-8 text when it is valid, else base64."""
    try:
        return data.decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"
