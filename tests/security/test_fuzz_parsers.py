"""Fuzzing the two parsers that read untrusted text: the notebook's cell syntax (kernel/sections.py
and staging.py, from a cell's text to a submission request) and the protocol's validation of a
submission request (service/protocol.py). Whatever they are given, they answer or raise their
own named error with a message: never another exception.

The inputs are drawn from grammars close to the real syntax, so that most cases reach deep into
the parsers instead of failing at the first character. Fixed budgets and derandomized runs keep
CI reproducible, with no example database written into the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellblock import config as config_module
from cellblock.errors import InvalidRequest
from cellblock.kernel import staging
from cellblock.kernel.sections import (
    ENCODINGS,
    LINE_MAGICS,
    OPTIONS,
    SECTION_MAGICS,
    STAGE_LIMITS,
    CellSyntaxError,
    limit_value,
    parse,
)
from cellblock.service.protocol import STAGES, parse_submission

LIMITS = config_module.load(Path("/nonexistent"), environ={}).limits
FUZZ = settings(
    max_examples=600,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- cells ------------------------------------------------------------------------------------

#: Text with the characters the syntax gives a meaning to, and some it must take as content
#: (a lone surrogate: JSON, as Jupyter's messages carry a cell, can hold one).
SYNTAX = "%=:.#\"' \t\\-_\r\x0b\x0c\u2028\x00\ud800"
words = st.text(st.characters(codec="utf-8") | st.sampled_from(SYNTAX), max_size=12)
numbers = st.builds(
    "{}{}{}".format,
    st.sampled_from(["", " ", "-"]),
    st.integers(0, 2**70).map(str) | st.floats(0, 1e25).map(str) | words,
    st.sampled_from(["", "K", "M", "G", "k", "ms", "s", "m", "x", " "]),
)
limit_lines = st.builds(
    "{}.{} = {}".format,
    st.sampled_from([*STAGES, "nope", ""]),
    st.sampled_from([*STAGE_LIMITS, "nope"]),
    numbers | st.builds("{}:{}".format, numbers, numbers),
)


def magic_line(magic: str) -> st.SearchStrategy[str]:
    """A ``%%magic`` line with mostly the options and arguments that magic takes."""
    own = sorted(OPTIONS.get(magic, {}))
    option = st.builds(
        "{}{}".format,
        st.sampled_from([*own, "--nope"]) if own else st.just("--nope"),
        st.sampled_from(["", "=", *(f"={e}" for e in ENCODINGS), " utf8", " nope"]),
    )
    name = st.sampled_from(["main.c", "a/b.txt", "../x", "/abs", "a b"]) | words
    return st.builds(
        lambda parts: " ".join([f"%%{magic}", *parts]),
        st.lists(option | name if magic in ("files", "run", "deps") else option, max_size=3),
    )


section_lines = st.sampled_from([*SECTION_MAGICS, "nope", ""]).flatmap(magic_line)
line_magics = st.builds(
    "%{} {}".format,
    st.sampled_from([*LINE_MAGICS, "nope", ""]),
    st.lists(words, max_size=3).map(" ".join),
)
body_lines = st.one_of(
    words,
    limit_lines,
    st.builds("{}={}".format, words, words),
    st.sampled_from(["", "#", "# a comment", "00ff", "ZWNobyBoaQo=", "zz", "gcc python3"]),
)
sections = st.builds(
    lambda magic, body: [magic, *body], section_lines, st.lists(body_lines, max_size=4)
)
ends = st.sampled_from(["\n", "\r\n"])
#: Line magics, then sections; or a plain run script (with a stray %% line now and then).
cells = st.one_of(
    st.builds(
        lambda head, groups, end: end.join(head + [line for group in groups for line in group]),
        st.lists(line_magics | st.just(""), max_size=2),
        st.lists(sections, max_size=5),
        ends,
    ),
    st.builds(
        lambda lines, end: end.join(lines),
        st.lists(body_lines | line_magics | section_lines, max_size=4),
        ends,
    ),
)


def submitted(code: str) -> dict[str, Any] | None:
    """What the kernel does with a cell's text before it sends anything."""
    cell = parse(code)
    return staging.request(staging.stage(staging.Staged(), cell), cell)


def check_cell(code: str) -> None:
    try:
        request = submitted(code)
    except CellSyntaxError as exc:
        assert exc.message and exc.line >= 1, exc
        return
    if request is not None:
        # The request the kernel would send gets the protocol's answer, never a crash.
        check_request(request)


@FUZZ
@given(cells)
def test_a_cell_stages_or_raises_a_cell_syntax_error(code: str) -> None:
    check_cell(code)


@FUZZ
@given(st.text(st.characters(codec="utf-8") | st.sampled_from(SYNTAX + "\n")))
def test_any_text_stages_or_raises_a_cell_syntax_error(code: str) -> None:
    check_cell(code)


@FUZZ
@given(st.sampled_from([*STAGE_LIMITS, "nope"]), numbers)
def test_a_limit_value_is_a_number_or_a_value_error(name: str, text: str) -> None:
    try:
        value = limit_value(name, text)
    except ValueError as exc:
        assert str(exc)
        return
    assert isinstance(value, int | float) and value >= 0


# -- submission requests ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
names = st.sampled_from(["main.c", "a/b", "../x", "/abs", "a//b", ".", "", "x\x00", "a" * 300])
files = st.fixed_dictionaries(
    {},
    optional={
        "name": names | json_values,
        "content": st.sampled_from(["", "00ff", "ZWNobyBoaQo=", "zz", "\ud800"]) | json_values,
        "encoding": st.sampled_from(["utf8", "hex", "base64", "nope"]) | json_values,
        "executable": st.booleans() | json_values,
    },
)
limit_numbers = st.one_of(
    st.integers(-1, 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-1, 2**64), max_size=3),
    st.sampled_from(["unlimited", "1", True]),
    json_values,
)
stage_limits = st.dictionaries(st.sampled_from([*STAGE_LIMITS, "nope"]), limit_numbers, max_size=4)
requests = st.fixed_dictionaries(
    {},
    optional={
        "files": st.lists(files, max_size=3) | json_values,
        "dependencies": st.lists(st.sampled_from(["gcc", "a.b", "1x", "a b", ""]), max_size=3)
        | json_values,
        "compile": st.none() | st.text() | json_values,
        "run": st.sampled_from(["true", " ", "", "x\x00"]) | st.text() | json_values,
        "env": st.dictionaries(
            st.sampled_from(["A", "1A", "", "B_2"]), st.text() | json_values, max_size=3
        )
        | json_values,
        "stdin": st.text() | json_values,
        "stdin_encoding": st.sampled_from(["utf8", "hex", "base64", "nope"]) | json_values,
        "args": st.lists(st.text(), max_size=3) | json_values,
        "limits": st.dictionaries(
            st.sampled_from([*STAGES, "nope"]), stage_limits | json_values, max_size=3
        )
        | json_values,
        "nope": json_values,
    },
)


def check_request(raw: object) -> None:
    try:
        parse_submission(raw, LIMITS)
    except InvalidRequest as exc:
        assert exc.message and exc.problems, exc
        # The error goes out as JSON (a 422, a WebSocket error): it must encode.
        json.dumps(exc.as_json())


@FUZZ
@given(requests)
def test_a_request_validates_or_raises_invalid_request(raw: dict[str, Any]) -> None:
    check_request(raw)


@FUZZ
@given(json_values)
def test_any_json_validates_or_raises_invalid_request(raw: object) -> None:
    check_request(raw)
