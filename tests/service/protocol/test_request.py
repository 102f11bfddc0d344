"""The submission request: every bad input of shared/PROTOCOL.md, checked for the exact field it
is reported under and a fragment of the sentence that explains it, since clients show both."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocolio import (
    PROPERTY,
    PROTOCOL_EXAMPLE,
    MiB,
    assert_only_problem,
    limit_problems,
    only_problem,
    rejected,
    utf8_file,
    with_files,
)

from cellblock.errors import InvalidRequest, LimitExceeded
from cellblock.service.protocol import (
    MAX_OUTPUT_PATTERNS,
    MAX_POINTS,
    MAX_SCRIPT_BYTES,
    MAX_TESTS,
    RLIMITS,
    SANDBOX_LIMITS,
    FileSpec,
    LimitPolicy,
    ResolvedLimits,
    Submission,
    decode,
    encode_output,
    field_path,
    parse_submission,
    resolve_limits,
)

# -- a valid request ------------------------------------------------------------------------


def test_the_protocol_example_is_accepted_and_its_contents_decode(policy):
    submission = parse_submission(PROTOCOL_EXAMPLE, policy)
    request = submission.request
    assert [f.data() for f in request.files] == [
        b"int main(void){return 0;}",
        b"\x00\xff\x10",
        b"echo hi\n",
    ]
    assert [f.executable for f in request.files] == [False, False, True]
    assert request.stdin_data() == b"3 4\n"
    assert request.args == ["--fast", "x y"]
    assert request.dependencies == ["gcc", "python3"]
    assert submission.limits.run.rlimits["cpu"] == (2, 2)
    assert submission.limits.run.rlimits["as"] == (268435456, 268435456)
    assert submission.limits.run.wall_time == 5.0
    assert submission.limits.run.output == 65536
    assert submission.limits.compile.rlimits["cpu"] == (10, 10)
    assert submission.limits.compile.wall_time == 20.0


def test_a_minimal_request_takes_every_default(policy):
    request = parse_submission({"run": "echo hi"}, policy).request
    assert request.files == []
    assert request.dependencies == []
    assert request.compile is None
    assert request.env == {}
    assert request.stdin_data() == b""
    assert request.args == []


# -- file names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("/etc/passwd", "is absolute"),
        ("/", "is absolute"),
        ("..", "contains '..'"),
        ("../x", "contains '..'"),
        ("a/../../x", "contains '..'"),
        ("a/..", "contains '..'"),
        ("", "must not be empty"),
        ("a//b", "empty or '.' path component"),
        ("a/", "empty or '.' path component"),
        (".", "empty or '.' path component"),
        ("./a", "empty or '.' path component"),
        ("a/./b", "empty or '.' path component"),
        ("a\x00b", "NUL"),
        ("x" * 256, "too long"),
        ("/".join(["abc"] * 257), "too long"),  # 1027 bytes in all
        ("é" * 128, "too long"),  # 128 characters but 256 bytes
    ],
)
def test_a_bad_file_name_is_refused_under_its_index(policy, name, fragment):
    exc = rejected(with_files(utf8_file("ok.txt"), utf8_file(name)), policy)
    assert_only_problem(exc, "files[1].name", fragment)


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "main.c",
        "data/blob.bin",
        ".hidden",
        "...",
        "a..b",
        "..a",
        "dir/sub/deeper/file.txt",
        "with space.txt",
        "ünïcødé",
        "x" * 255,
        "/".join(["x" * 200] * 5),  # 1004 bytes
    ],
)
def test_a_good_file_name_is_kept_as_given(policy, name):
    request = parse_submission(with_files(utf8_file(name, "hi")), policy).request
    assert [f.name for f in request.files] == [name]


def test_a_file_name_given_twice_is_refused(policy):
    exc = rejected(with_files(utf8_file("a.txt"), utf8_file("b"), utf8_file("a.txt")), policy)
    assert_only_problem(exc, "files[2].name", "'a.txt' is given twice, also as files[0]")


@pytest.mark.parametrize(
    ("names", "both", "index"),
    [
        (["a", "a/b"], "a", 1),
        (["a/b", "a"], "a", 0),
        (["x/y", "x/y/z/w"], "x/y", 1),
    ],
)
def test_a_name_that_is_both_a_file_and_a_folder_is_refused(policy, names, both, index):
    exc = rejected(with_files(*(utf8_file(n) for n in names)), policy)
    assert_only_problem(exc, f"files[{index}].name", f"{both!r} is both a file and a folder")


def test_files_sharing_a_folder_are_fine(policy):
    request = parse_submission(
        with_files(utf8_file("src/a.c"), utf8_file("src/b.c"), utf8_file("src2")), policy
    ).request
    assert [f.name for f in request.files] == ["src/a.c", "src/b.c", "src2"]


# -- encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "content", "fragment"),
    [
        ("base64", "not base64!", "is not valid base64"),
        ("base64", "ZWNobw", "is not valid base64"),  # missing padding
        ("base64", "ZW\nNobw==", "is not valid base64"),  # validate=True: no stray characters
        ("base64", "ZWNobw==é", "is not valid base64"),
        ("hex", "0g", "is not valid hex"),
        ("hex", "abc", "is not valid hex"),
        ("hex", "0x00", "is not valid hex"),
    ],
)
def test_file_content_that_does_not_decode_is_refused(policy, encoding, content, fragment):
    bad = {"name": "blob", "content": content, "encoding": encoding}
    exc = rejected(with_files(utf8_file("ok"), bad), policy)
    assert_only_problem(exc, "files[1].content", fragment)


@pytest.mark.parametrize("encoding", ["rot13", "UTF-8", "binary", ""])
def test_an_unknown_file_encoding_is_refused(policy, encoding):
    exc = rejected(with_files({"name": "a", "content": "x", "encoding": encoding}), policy)
    assert_only_problem(exc, "files[0].encoding", "'utf8', 'hex' or 'base64'")


@pytest.mark.parametrize("encoding", ["rot13", "latin1", None])
def test_an_unknown_stdin_encoding_is_refused(policy, encoding):
    exc = rejected({"run": "cat", "stdin": "x", "stdin_encoding": encoding}, policy)
    assert only_problem(exc).field == "stdin_encoding"


@pytest.mark.parametrize(
    ("encoding", "stdin", "fragment"),
    [("hex", "zz", "is not valid hex"), ("base64", "***", "is not valid base64")],
)
def test_stdin_that_does_not_fit_its_encoding_is_refused(policy, encoding, stdin, fragment):
    exc = rejected({"run": "cat", "stdin": stdin, "stdin_encoding": encoding}, policy)
    assert_only_problem(exc, "stdin", fragment)


@pytest.mark.parametrize(
    ("encoding", "stdin", "data"),
    [("utf8", "héllo\n", "héllo\n".encode()), ("hex", "00ff", b"\x00\xff"), ("base64", "", b"")],
)
def test_stdin_decodes_by_its_encoding(policy, encoding, stdin, data):
    raw = {"run": "cat", "stdin": stdin, "stdin_encoding": encoding}
    assert parse_submission(raw, policy).request.stdin_data() == data


# -- the scripts, args, env -----------------------------------------------------------------


def test_an_unknown_top_level_field_is_refused(policy):
    exc = rejected({"run": "true", "limts": {"run": {"cpu": 1}}}, policy)
    assert_only_problem(exc, "limts", "Extra inputs are not permitted")


def test_an_unknown_file_field_is_refused(policy):
    exc = rejected(with_files({"name": "a", "content": "", "mode": 493}), policy)
    assert_only_problem(exc, "files[0].mode", "Extra inputs are not permitted")


def test_a_missing_run_is_refused(policy):
    exc = rejected({"compile": "make"}, policy)
    assert_only_problem(exc, "run", "is required")


@pytest.mark.parametrize("run", ["", " ", "\n\t  \n"])
def test_a_blank_run_is_refused(policy, run):
    exc = rejected({"run": run}, policy)
    assert_only_problem(exc, "run", "must not be empty")


@pytest.mark.parametrize("stage", ["run", "compile"])
def test_a_script_of_exactly_the_maximum_size_is_accepted(policy, stage):
    script = "#" * MAX_SCRIPT_BYTES
    request = parse_submission({"run": "true", stage: script}, policy).request
    assert getattr(request, stage) == script


@pytest.mark.parametrize("stage", ["run", "compile"])
@pytest.mark.parametrize(
    "script",
    [
        "#" * (MAX_SCRIPT_BYTES + 1),
        "é" * (MAX_SCRIPT_BYTES // 2 + 1),  # fewer characters than the limit, more bytes
    ],
    ids=["ascii", "multibyte"],
)
def test_a_script_over_the_maximum_size_is_refused(policy, stage, script):
    exc = rejected({"run": "true", stage: script}, policy)
    assert_only_problem(exc, stage, f"is longer than {MAX_SCRIPT_BYTES} bytes")


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        ({"run": "echo\x00hi"}, "run", "NUL"),
        ({"run": "true", "compile": "make\x00"}, "compile", "NUL"),
        ({"run": "true", "args": ["ok", "a\x00b"]}, "args", "NUL"),
        (
            {"run": "true", "env": {"A": "1", "B": "x\x00y"}},
            "env",
            "value of B must not contain NUL",
        ),
    ],
)
def test_a_nul_character_is_refused(policy, raw, field, fragment):
    assert_only_problem(rejected(raw, policy), field, fragment)


@pytest.mark.parametrize("name", ["1A", "A-B", "", "A B", "A=B", "é", "A\x00"])
def test_a_bad_env_name_is_refused(policy, name):
    exc = rejected({"run": "true", "env": {name: "x"}}, policy)
    assert_only_problem(exc, "env", "is not a variable name")


def test_good_env_names_are_accepted(policy):
    env = {"_": "1", "GREETING": "hello", "lower_case9": "", "X": "=;$(id)"}
    assert parse_submission({"run": "true", "env": env}, policy).request.env == env


# -- dependencies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a; builtins.readFile /etc/shadow",
        "${x}",
        "../x",
        "",
        "a b",
        "$(id)",
        "`id`",
        "gcc\n",
        "<nixpkgs>",
        "/nix/store/abc-gcc",
        "pkgs.a.b.c.d",  # five parts: more than an attribute path of four
        ".gcc",
        "gcc.",
        "a..b",
        "1gcc",
        "python3Packages.numpy or builtins.abort",
        'x"',
        "x'",
        "import <nixpkgs> {}",
    ],
)
def test_a_bad_dependency_name_is_refused(policy, name):
    exc = rejected({"run": "true", "dependencies": ["gcc", name]}, policy)
    assert_only_problem(exc, "dependencies[1]", f"{name!r} is not a package attribute name")


@pytest.mark.parametrize(
    "name",
    [
        "gcc",
        "python3",
        "python3Packages.numpy",
        "gcc-unwrapped",
        "llvmPackages_17.clang",
        "haskellPackages.ghc",
        "gtk+3",
        "_private",
        "a.b.c.d",
    ],
)
def test_a_good_dependency_name_is_accepted(policy, name):
    assert parse_submission(
        {"run": "true", "dependencies": [name]}, policy
    ).request.dependencies == [name]


# -- wrong types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        ({"run": "true", "files": "main.c"}, "files", "valid list"),
        ({"run": "true", "files": {"name": "a"}}, "files", "valid list"),
        ({"run": "true", "files": [{"name": "a", "content": 5}]}, "files[0].content", "string"),
        ({"run": "true", "files": [{"name": "a", "content": None}]}, "files[0].content", "string"),
        ({"run": "true", "files": [{"name": "a"}]}, "files[0].content", "Field required"),
        ({"run": "true", "files": [{"content": "x"}]}, "files[0].name", "Field required"),
        ({"run": "true", "files": [{"name": 7, "content": ""}]}, "files[0].name", "string"),
        ({"run": "true", "files": ["main.c"]}, "files[0]", "dictionary"),
        ({"run": 5}, "run", "string"),
        ({"run": ["echo", "hi"]}, "run", "string"),
        ({"run": "true", "compile": 0}, "compile", "string"),
        ({"run": "true", "args": "--fast"}, "args", "valid list"),
        ({"run": "true", "args": [1]}, "args[0]", "string"),
        ({"run": "true", "env": ["A=1"]}, "env", "dictionary"),
        ({"run": "true", "env": {"A": 1}}, "env.A", "string"),
        ({"run": "true", "dependencies": "gcc"}, "dependencies", "valid list"),
        ({"run": "true", "stdin": 5}, "stdin", "string"),
        ({"run": "true", "limits": [1]}, "limits", "dictionary"),
        ({"run": "true", "limits": {"run": 5}}, "limits.run", "dictionary"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(policy, raw, field, fragment):
    assert_only_problem(rejected(raw, policy), field, fragment)


@pytest.mark.parametrize("raw", [[], ["run", "true"], "run", 5, None, True])
def test_a_body_that_is_not_an_object_is_refused_with_an_empty_field(policy, raw):
    exc = rejected(raw, policy)
    assert_only_problem(exc, "", "must be a JSON object")
    assert exc.message == "the submission must be a JSON object"


def test_every_problem_is_reported_not_just_the_first(policy):
    raw = {"files": [utf8_file("/abs")], "dependencies": ["${x}"], "args": [3]}
    exc = rejected(raw, policy)
    assert {p.field for p in exc.problems} == {"files[0].name", "dependencies[0]", "args[0]", "run"}
    assert exc.message.endswith("(and 3 more)")


def test_the_error_document_has_the_protocol_shape(policy):
    exc = rejected(with_files(utf8_file("ok"), utf8_file("../x")), policy)
    assert exc.as_json() == {
        "error": {
            "code": "invalid_request",
            "message": "files[1].name: '../x' contains '..'",
            "details": [{"field": "files[1].name", "message": "'../x' contains '..'"}],
        }
    }


# -- property tests -------------------------------------------------------------------------

#: Every character a file name may hold: anything but "/", NUL and lone surrogates.
NAME_CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters="/\x00")
COMPONENT = st.text(NAME_CHARACTERS, min_size=1, max_size=40).filter(lambda c: c not in (".", ".."))


@PROPERTY
@given(parts=st.lists(COMPONENT, min_size=1, max_size=6))
def test_any_valid_relative_file_name_round_trips(policy, parts):
    name = "/".join(parts)
    submission = parse_submission(with_files(utf8_file(name, "x")), policy)
    assert submission.request.files[0].name == name
    again = Submission.from_json(json.loads(json.dumps(submission.as_json())))
    assert again.request.files[0].name == name


@PROPERTY
@given(
    before=st.lists(COMPONENT, max_size=3),
    bad=st.sampled_from(["..", ".", ""]),
    after=st.lists(COMPONENT, max_size=3),
)
def test_a_name_with_a_dot_dot_dot_or_empty_component_is_always_refused(policy, before, bad, after):
    name = "/".join([*before, bad, *after])
    exc = rejected(with_files(utf8_file(name)), policy)
    assert only_problem(exc).field == "files[0].name"


@PROPERTY
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_round_trip_through_hex_and_base64(policy, data):
    hex_text, b64_text = data.hex(), base64.b64encode(data).decode()
    assert decode(hex_text, "hex") == data
    assert decode(hex_text.upper(), "hex") == data
    assert decode(b64_text, "base64") == data
    raw = {
        "run": "cat",
        "files": [
            {"name": "h", "content": hex_text, "encoding": "hex"},
            {"name": "b", "content": b64_text, "encoding": "base64"},
        ],
        "stdin": b64_text,
        "stdin_encoding": "base64",
    }
    request = parse_submission(raw, policy).request
    assert [f.data() for f in request.files] == [data, data]
    assert request.stdin_data() == data


@PROPERTY
@given(text=st.text())
def test_utf8_content_is_its_own_utf8_bytes(text):
    assert decode(text, "utf8") == text.encode()


@PROPERTY
@given(data=st.binary(max_size=512))
def test_encoded_output_always_decodes_back_to_the_same_bytes(data):
    text, encoding = encode_output(data)
    assert decode(text, encoding) == data
    json.dumps(text)  # fits a JSON document


@PROPERTY
@given(text=st.text())
def test_valid_utf8_output_stays_text(text):
    assert encode_output(text.encode()) == (text, "utf8")


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**100), max_value=2**100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
LIMIT_NAMES = st.sampled_from([*RLIMITS, *SANDBOX_LIMITS]) | st.text(max_size=8)
STAGE_NAMES = st.sampled_from(["deps", "compile", "run"]) | st.text(max_size=8)


@PROPERTY
@given(
    requested=st.dictionaries(
        STAGE_NAMES, st.dictionaries(LIMIT_NAMES, JSON_VALUES, max_size=6), max_size=4
    )
)
def test_garbage_limits_never_crash_and_every_problem_names_a_limits_field(policy, requested):
    try:
        limits = resolve_limits(requested, policy)
    except InvalidRequest as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.field.startswith("limits."), problem
            assert problem.message
    else:
        assert isinstance(limits, ResolvedLimits)
        # Whatever was accepted is within the maximum and comes back from JSON unchanged.
        assert ResolvedLimits.from_json(json.loads(json.dumps(limits.as_json()))) == limits
        for stage in ("compile", "run"):
            resolved, maxima = getattr(limits, stage), policy.stage(stage).maxima
            for name in RLIMITS:
                soft, hard = resolved.rlimits[name]
                ceiling = maxima.rlimits[name][1]
                assert ceiling is None or (hard is not None and hard <= ceiling)
                assert hard is None or (soft is not None and soft <= hard)
            assert 0 < resolved.wall_time <= maxima.wall_time


NOT_A_NUMBER = (
    st.none()
    | st.booleans()
    | st.text(max_size=10)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
NOT_AN_RLIMIT = (
    NOT_A_NUMBER
    | st.integers(max_value=-1)
    | st.floats()  # even 2.0: an rlimit is an integer
    | st.lists(st.integers(min_value=0, max_value=100)).filter(lambda v: len(v) != 2)
    | st.tuples(st.integers(min_value=1, max_value=100), st.integers(min_value=0, max_value=100))
    .filter(lambda p: p[0] > p[1])
    .map(list)
)


@PROPERTY
@given(
    stage=st.sampled_from(["compile", "run"]),
    name=st.sampled_from(RLIMITS),
    value=NOT_AN_RLIMIT,
)
def test_a_malformed_rlimit_is_always_a_plain_invalid_request(policy, stage, name, value):
    exc = limit_problems({stage: {name: value}}, policy)
    assert type(exc) is InvalidRequest
    assert only_problem(exc).field == f"limits.{stage}.{name}"


@PROPERTY
@given(
    stage=st.sampled_from(["compile", "run"]),
    value=NOT_A_NUMBER | st.floats(max_value=0) | st.integers(max_value=0),
)
def test_a_malformed_wall_time_is_always_a_plain_invalid_request(policy, stage, value):
    exc = limit_problems({stage: {"wall_time": value}}, policy)
    assert type(exc) is InvalidRequest
    assert only_problem(exc).field == f"limits.{stage}.wall_time"


@PROPERTY
@given(
    stage=st.sampled_from(["compile", "run"]),
    name=st.sampled_from(["cpu", "nofile", "nproc", "fsize", "locks", "sigpending"]),
    data=st.data(),
)
def test_an_rlimit_is_accepted_exactly_up_to_its_maximum(policy, stage, name, data):
    ceiling = policy.stage(stage).maxima.rlimits[name][1]
    assert ceiling is not None
    value = data.draw(st.integers(min_value=0, max_value=ceiling))
    assert getattr(resolve_limits({stage: {name: value}}, policy), stage).rlimits[name] == (
        value,
        value,
    )
    over = data.draw(st.integers(min_value=ceiling + 1, max_value=2**63 - 1))
    exc = limit_problems({stage: {name: over}}, policy)
    assert isinstance(exc, LimitExceeded)
    assert only_problem(exc).message == f"{over} exceeds the maximum {ceiling}"


# -- field_path, decode, encode_output ------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("files", 1, "name"), "files[1].name"),
        (("run",), "run"),
        ((), ""),
        (("limits", "run", "cpu"), "limits.run.cpu"),
        (("env", "A"), "env.A"),
        (("args", 0), "args[0]"),
        (("a", 0, 1, "b"), "a[0][1].b"),
        ((0, "x"), "[0].x"),
    ],
)
def test_field_path(loc, path):
    assert field_path(loc) == path


@pytest.mark.parametrize(
    ("content", "encoding", "data"),
    [
        ("héllo", "utf8", "héllo".encode()),
        ("", "utf8", b""),
        ("00ff10", "hex", b"\x00\xff\x10"),
        ("00 FF", "hex", b"\x00\xff"),
        ("", "hex", b""),
        ("ZWNobyBoaQo=", "base64", b"echo hi\n"),
        ("", "base64", b""),
    ],
)
def test_decode(content, encoding, data):
    assert decode(content, encoding) == data


@pytest.mark.parametrize(
    ("content", "encoding", "fragment"),
    [
        ("zz", "hex", "is not valid hex"),
        ("@@", "base64", "is not valid base64"),
        ("x", "latin1", "unknown encoding 'latin1'"),
        ("x", "", "unknown encoding ''"),
    ],
)
def test_decode_says_what_is_wrong(content, encoding, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        decode(content, encoding)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello\n", ("hello\n", "utf8")),
        (b"", ("", "utf8")),
        ("é".encode(), ("é", "utf8")),
        (b"\xff\xfe\x00", ("//4A", "base64")),
        (b"ok\xc3", ("b2vD", "base64")),  # a UTF-8 sequence cut short
        (b"\xed\xa0\x80", ("7aCA", "base64")),  # an encoded surrogate is not UTF-8
    ],
)
def test_encode_output(data, expected):
    assert encode_output(data) == expected


def test_file_spec_data_decodes_its_content():
    spec = FileSpec(name="x", content="AAE=", encoding="base64")
    assert spec.data() == b"\x00\x01"
    assert spec.executable is False


# -- tests, checker and outputs (v1.1) ------------------------------------------------------


def with_tests(*tests: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"run": './sum "$@"', "tests": list(tests), **fields}


def a_test(name: str = "small", **fields: Any) -> dict[str, Any]:
    return {"name": name, "stdin": "3\n1 2 3\n", "expected_output": "6\n", **fields}


def capped(policy: LimitPolicy, **caps: Any) -> LimitPolicy:
    return dataclasses.replace(policy, grading=dataclasses.replace(policy.grading, **caps))


def test_the_protocols_example_with_tests_is_accepted(policy):
    raw = {
        "files": [{"name": "sum.c", "content": "int main(void){return 0;}"}],
        "compile": "gcc -O2 -o sum sum.c",
        "run": './sum "$@"',
        "tests": [
            {"name": "small", "stdin": "3\n1 2 3\n", "expected_output": "6\n", "points": 1},
            {"name": "mean", "stdin": "2\n1 2\n", "args": ["--mean"], "expected_output": "1.50",
             "compare": "tokens"},
            {"name": "big", "stdin": "...", "expected_output": "...",
             "limits": {"cpu": 1, "wall_time": 2}},
        ],
        "checker": 'python3 check.py "$CB_INPUT" "$CB_EXPECTED" "$CB_ACTUAL"',
        "outputs": ["plot.png", "results/*.csv"],
    }  # fmt: skip
    submission = parse_submission(raw, policy)
    tests = submission.request.tests
    assert tests is not None
    assert [t.name for t in tests] == ["small", "mean", "big"]
    assert [t.stdin_data() for t in tests] == [b"3\n1 2 3\n", b"2\n1 2\n", b"..."]
    assert [t.args for t in tests] == [[], ["--mean"], []]
    assert [str(t.comparison()) for t in tests] == ["lines", "tokens", "lines"]
    assert [t.points for t in tests] == [1.0, 1.0, 1.0]
    assert isinstance(tests[0].points, float)
    assert submission.request.checker is not None
    assert submission.request.outputs == ["plot.png", "results/*.csv"]
    assert len(submission.limits.tests) == 3
    assert submission.limits.output_file_size == policy.grading.output_file_size
    assert submission.limits.output_total_size == policy.grading.output_total_size


def test_a_submission_with_tests_round_trips_through_its_stored_json(policy):
    raw = with_tests(
        a_test("a", stdin="AAE=", stdin_encoding="base64", points=2.5, compare="number:1e-3"),
        a_test("b", limits={"cpu": 1, "wall_time": 2.5, "nofile": [10, 20]}),
        checker="./check",
        outputs=["out/*.txt"],
    )
    submission = parse_submission(raw, policy)
    again = Submission.from_json(json.loads(json.dumps(submission.as_json())))
    assert again == submission
    assert again.request.tests is not None and again.request.tests[0].stdin_data() == b"\x00\x01"
    assert again.limits.tests[1].rlimits["nofile"] == (10, 20)


def test_a_test_without_stdin_reads_an_empty_stdin_and_has_every_default(policy):
    [test] = parse_submission(with_tests({"name": "bare"}), policy).request.tests or []
    assert test.stdin_data() == b""
    assert (test.args, test.expected_output, test.compare, test.points, test.limits) == (
        [], None, "lines", 1.0, {})  # fmt: skip


def test_without_tests_a_submission_has_none(policy):
    submission = parse_submission({"run": "true"}, policy)
    assert submission.request.tests is None
    assert submission.request.checker is None and submission.request.outputs == []
    assert submission.limits.tests == ()


def test_a_tests_limits_go_over_the_submissions_run_limits(policy):
    raw = with_tests(
        a_test("own", limits={"cpu": 1, "wall_time": 2, "memory": 64 * MiB}),
        a_test("inherits"),
        limits={"run": {"cpu": 3, "wall_time": 4, "nofile": 99}, "compile": {"cpu": 7}},
    )
    limits = parse_submission(raw, policy).limits
    own, inherits = limits.tests
    assert (own.rlimits["cpu"], own.wall_time, own.memory) == ((1, 1), 2.0, 64 * MiB)
    # What a test leaves out is the submission's run limit, not the administrator's default.
    assert own.rlimits["nofile"] == (99, 99)
    assert inherits == limits.run
    assert (limits.run.rlimits["cpu"], limits.run.wall_time) == ((3, 3), 4.0)
    # The compile stage is not the tests' base.
    assert own.rlimits["cpu"] != limits.compile.rlimits["cpu"]
    assert policy.run.defaults.memory != 64 * MiB


def test_a_test_may_raise_a_limit_above_the_runs_up_to_the_maximum(policy):
    maximum = policy.run.maxima.wall_time
    raw = with_tests(a_test(limits={"wall_time": maximum}), limits={"run": {"wall_time": 1}})
    assert parse_submission(raw, policy).limits.tests[0].wall_time == maximum


@pytest.mark.parametrize("limit", ["cpu", "wall_time", "memory", "nproc", "disk"])
def test_a_tests_limit_over_the_maximum_is_refused_naming_the_test(policy, limit):
    maxima = policy.run.maxima
    ceiling = maxima.rlimits[limit][1] if limit in maxima.rlimits else getattr(maxima, limit)
    value = int(ceiling) + 1
    raw = with_tests(a_test("a"), a_test("b", limits={limit: value}))
    exc = rejected(raw, policy)
    assert isinstance(exc, LimitExceeded) and exc.code == "limit_exceeded"
    problem = only_problem(exc)
    assert problem.field == f"tests[1].limits.{limit}"
    assert problem.message == f"{value} exceeds the maximum {ceiling}"


@pytest.mark.parametrize(
    ("limits", "field", "fragment"),
    [
        ({"cpu": -1}, "tests[0].limits.cpu", "not a non-negative integer"),
        ({"wall_time": 0}, "tests[0].limits.wall_time", "above 0"),
        ({"nofile": [10, 5]}, "tests[0].limits.nofile", "above the hard limit"),
        ({"bogus": 1}, "tests[0].limits.bogus", "unknown limit"),
        ({"memory": 0}, "tests[0].limits.memory", "at least 1"),
    ],
)
def test_a_malformed_test_limit_is_refused_naming_the_test(policy, limits, field, fragment):
    exc = rejected(with_tests(a_test(limits=limits)), policy)
    assert type(exc) is InvalidRequest
    assert_only_problem(exc, field, fragment)


def test_a_tests_limits_must_be_an_object(policy):
    exc = rejected(with_tests(a_test(limits=[1])), policy)
    assert_only_problem(exc, "tests[0].limits", "dictionary")


def test_a_duplicate_test_name_is_refused_under_the_second(policy):
    exc = rejected(with_tests(a_test("a"), a_test("b"), a_test("a")), policy)
    assert_only_problem(exc, "tests[2].name", "'a' is given twice, also as tests[0]")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("", "at least 1 character"), ("x" * 201, "at most 200 characters"), ("a\x00", "NUL")],
)
def test_a_bad_test_name_is_refused(policy, name, fragment):
    assert_only_problem(rejected(with_tests(a_test(name)), policy), "tests[0].name", fragment)


def test_a_test_without_a_name_is_refused(policy):
    exc = rejected(with_tests({"stdin": "1"}), policy)
    assert_only_problem(exc, "tests[0].name", "Field required")


def test_more_tests_than_the_cap_are_refused_naming_tests(policy):
    cap = policy.grading.max_tests
    assert cap == 200
    many = [a_test(f"t{i}", limits={"wall_time": 1}) for i in range(cap + 1)]
    exc = rejected(with_tests(*many), policy)
    assert_only_problem(exc, "tests", f"{cap + 1} tests are more than the {cap}")
    # Exactly at the cap they are accepted.
    assert len(parse_submission(with_tests(*many[:cap]), policy).request.tests or []) == cap


def test_the_tests_cap_comes_from_the_policy(policy):
    small = capped(policy, max_tests=2)
    exc = rejected(with_tests(a_test("a"), a_test("b"), a_test("c")), small)
    assert_only_problem(exc, "tests", "3 tests are more than the 2")
    parse_submission(with_tests(a_test("a"), a_test("b")), small)


def test_tests_whose_wall_times_add_up_over_the_cap_are_refused_naming_tests(policy):
    small = capped(policy, max_tests_wall_time=10)
    fits = with_tests(a_test("a", limits={"wall_time": 4}), a_test("b", limits={"wall_time": 6}))
    assert sum(t.wall_time for t in parse_submission(fits, small).limits.tests) == 10
    over = with_tests(a_test("a", limits={"wall_time": 4}), a_test("b", limits={"wall_time": 6.5}))
    exc = rejected(over, small)
    assert_only_problem(exc, "tests", "add up to 10.5 s, over the 10 s")
    # A test that leaves wall_time out counts with the run stage's.
    inherited = with_tests(a_test("a"), a_test("b"), limits={"run": {"wall_time": 6}})
    assert_only_problem(rejected(inherited, small), "tests", "add up to 12 s")


def test_a_checker_s_runs_count_towards_the_tests_wall_time_cap(policy):
    small = capped(policy, max_tests_wall_time=9)
    two = with_tests(a_test("a", limits={"wall_time": 2}), a_test("b", limits={"wall_time": 2}),
                     limits={"run": {"wall_time": 3}})  # fmt: skip
    assert parse_submission(two, small).limits.tests  # 4 s of tests
    exc = rejected({**two, "checker": "true"}, small)  # and 2 x 3 s of checker
    assert_only_problem(exc, "tests", "with their checker's runs add up to 10 s, over the 9 s")
    assert_only_problem(rejected({**two, "checker": "true", "limits": {"run": {"wall_time": 4}}},
                                 small), "tests", "add up to 12 s")  # fmt: skip


def test_more_tests_than_any_submission_holds_are_refused_before_they_are_read(policy):
    many = with_tests(*[a_test(f"t{i}") for i in range(MAX_TESTS + 1)])
    assert_only_problem(rejected(many, capped(policy, max_tests=MAX_TESTS)), "tests",
                        f"at most {MAX_TESTS} items")  # fmt: skip


@pytest.mark.parametrize("points", [MAX_POINTS + 1, 1e308])
def test_points_past_any_grading_scale_are_refused(policy, points):
    assert_only_problem(rejected(with_tests(a_test("a", points=points)), policy),
                        "tests[0].points", f"give 0 to {MAX_POINTS}")  # fmt: skip


@pytest.mark.parametrize(
    ("encoding", "stdin"), [("rot13", "x"), ("UTF-8", "x"), ("", ""), (None, "3\n")]
)
def test_a_tests_bad_stdin_encoding_is_refused_naming_the_test(policy, encoding, stdin):
    exc = rejected(
        with_tests(a_test("a"), a_test("b", stdin=stdin, stdin_encoding=encoding)), policy
    )
    assert only_problem(exc).field == "tests[1].stdin_encoding"


@pytest.mark.parametrize(
    ("encoding", "stdin", "fragment"),
    [("hex", "zz", "is not valid hex"), ("base64", "***", "is not valid base64")],
)
def test_a_tests_stdin_that_does_not_fit_its_encoding_is_refused(policy, encoding, stdin, fragment):
    exc = rejected(with_tests(a_test(stdin=stdin, stdin_encoding=encoding)), policy)
    assert_only_problem(exc, "tests[0].stdin", fragment)


@pytest.mark.parametrize(
    ("compare", "fragment"),
    [
        ("diff", "unknown comparison 'diff'"),
        ("Lines", "unknown comparison"),
        ("", "unknown comparison"),
        ("number", "needs its tolerance"),
        ("number:x", "is not a number"),
        ("number:-1", "at least 0"),
        ("number:nan", "at least 0"),
        ("number:inf", "at least 0"),
    ],
)
def test_an_unknown_compare_mode_or_a_bad_tolerance_is_refused(policy, compare, fragment):
    exc = rejected(with_tests(a_test(compare=compare)), policy)
    assert_only_problem(exc, "tests[0].compare", fragment)


@pytest.mark.parametrize("compare", ["lines", "exact", "tokens", "number:0", "number:1e-6"])
def test_every_compare_mode_is_accepted(policy, compare):
    [test] = parse_submission(with_tests(a_test(compare=compare)), policy).request.tests or []
    assert test.compare == compare


@pytest.mark.parametrize(
    ("points", "fragment"),
    [
        (-1, "is not a number of points"),
        (-0.5, "is not a number of points"),
        (True, "valid number"),
        ("1", "valid number"),
        (None, "valid number"),
    ],
)
def test_bad_points_are_refused(policy, points, fragment):
    exc = rejected(with_tests(a_test(points=points)), policy)
    assert_only_problem(exc, "tests[0].points", fragment)


def test_points_may_be_zero_or_a_fraction(policy):
    tests = parse_submission(
        with_tests(a_test("a", points=0), a_test("b", points=0.25)), policy
    ).request.tests
    assert [t.points for t in tests or []] == [0.0, 0.25]


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("/etc/passwd", "is absolute"),
        ("/box/*.png", "is absolute"),
        ("../secret", "contains '..'"),
        ("results/../../etc/*", "contains '..'"),
        ("..", "contains '..'"),
        ("", "must not be empty"),
        ("a//b", "empty or '.' path component"),
    ],
)
def test_an_outputs_pattern_outside_the_working_directory_is_refused(policy, pattern, fragment):
    exc = rejected({"run": "true", "outputs": ["ok.png", pattern]}, policy)
    assert_only_problem(exc, "outputs[1]", fragment)


def test_outputs_work_without_tests_too(policy):
    request = parse_submission({"run": "true", "outputs": ["plot.png"]}, policy).request
    assert (request.outputs, request.tests) == (["plot.png"], None)


def test_too_many_outputs_patterns_are_refused(policy):
    exc = rejected({"run": "true", "outputs": ["a"] * (MAX_OUTPUT_PATTERNS + 1)}, policy)
    assert_only_problem(exc, "outputs", f"at most {MAX_OUTPUT_PATTERNS} items")


def test_tests_without_run_are_refused_naming_run(policy):
    exc = rejected({"tests": [a_test()]}, policy)
    assert_only_problem(exc, "run", "is required")


def test_a_checker_without_tests_is_refused_naming_checker(policy):
    exc = rejected({"run": "true", "checker": "./check"}, policy)
    assert_only_problem(exc, "checker", "give tests with it")


def test_an_empty_tests_list_is_refused(policy):
    assert_only_problem(rejected(with_tests(), policy), "tests", "at least 1 item")
    exc = rejected(with_tests(checker="./check"), policy)
    assert {p.field for p in exc.problems} == {"tests"}


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        (with_tests(a_test(bogus=1)), "tests[0].bogus", "Extra inputs are not permitted"),
        ({"run": "true", "tests": {"name": "a"}}, "tests", "valid list"),
        ({"run": "true", "tests": ["a"]}, "tests[0]", "dictionary"),
        (with_tests(a_test(args="--fast")), "tests[0].args", "valid list"),
        (with_tests(a_test(args=["a", 1])), "tests[0].args[1]", "string"),
        (with_tests(a_test(args=["a\x00"])), "tests[0].args", "NUL"),
        (with_tests(a_test(expected_output=6)), "tests[0].expected_output", "string"),
        (with_tests(a_test(stdin=3)), "tests[0].stdin", "string"),
        ({"run": "true", "tests": [a_test()], "checker": 5}, "checker", "string"),
        ({"run": "true", "tests": [a_test()], "checker": "a\x00"}, "checker", "NUL"),
        ({"run": "true", "outputs": "plot.png"}, "outputs", "valid list"),
        ({"run": "true", "outputs": [1]}, "outputs[0]", "string"),
    ],
)
def test_a_test_field_of_the_wrong_type_is_refused(policy, raw, field, fragment):
    assert_only_problem(rejected(raw, policy), field, fragment)


def test_a_checker_over_the_script_size_is_refused(policy):
    exc = rejected(with_tests(a_test(), checker="#" * (MAX_SCRIPT_BYTES + 1)), policy)
    assert_only_problem(exc, "checker", f"is longer than {MAX_SCRIPT_BYTES} bytes")


def test_every_tests_problem_is_reported_each_under_its_test(policy):
    raw = with_tests(
        a_test("a", compare="diff"),
        a_test("b", points=-1),
        a_test("c", stdin_encoding="rot13"),
        outputs=["/abs"],
    )
    exc = rejected(raw, policy)
    assert {p.field for p in exc.problems} == {
        "tests[0].compare", "tests[1].points", "tests[2].stdin_encoding", "outputs[0]"}  # fmt: skip


def test_a_tests_disk_cap_must_hold_the_uploaded_files(policy):
    files = [{"name": "data.bin", "content": "00" * 100_000, "encoding": "hex"}]
    raw = with_tests(a_test("roomy"), a_test("cramped", limits={"disk": 50_000}), files=files)
    exc = rejected(raw, policy)
    problem = only_problem(exc)
    assert problem.field == "files"
    assert "tests[1].limits.disk" in problem.message
