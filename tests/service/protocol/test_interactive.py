"""Interactive stdin as queued for the executor (service/protocol/interactive.py)."""

from __future__ import annotations

import pytest

from cellblock.service.protocol.interactive import (
    Resize,
    SignalInput,
    StdinData,
    StdinEnd,
    decode_input,
    encode_input,
    tty_size_problem,
)


@pytest.mark.parametrize(
    "item", [StdinData(b"42\n\x00\xff"), StdinEnd(), SignalInput("SIGINT"), Resize(30, 120)]
)
def test_each_input_comes_back_as_it_went(item: object) -> None:
    assert decode_input(encode_input(item)) == item  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [[24, 80], (1, 1), [1000, 1000]])
def test_a_terminal_size_in_range_is_fine(size: object) -> None:
    assert tty_size_problem(size) is None


@pytest.mark.parametrize(
    "size", [[0, 80], [24, 1001], [24], [24, 80, 1], "24x80", [24.0, 80], [True, 80]]
)
def test_a_bad_terminal_size_says_what_it_must_be(size: object) -> None:
    assert "[rows, cols]" in (tty_size_problem(size) or "")
