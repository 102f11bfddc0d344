"""The wire protocol's pure half: request validation, limit resolution, the status state machine.

Every bad input of shared/PROTOCOL.md is checked for the exact field it is reported under and a
fragment of the sentence that explains it, since clients show both to people.
"""

from __future__ import annotations

import base64
import json
import math
import re
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellblock import config as config_module
from cellblock.errors import FieldProblem, InvalidRequest, LimitExceeded
from cellblock.service import protocol
from cellblock.service.protocol import (
    MAX_SCRIPT_BYTES,
    RLIMITS,
    SANDBOX_LIMITS,
    EventRecorder,
    FileSpec,
    InvalidTransition,
    LimitPolicy,
    ResolvedLimits,
    SandboxResult,
    StageLimits,
    Submission,
    SubmissionRequest,
    SubmissionState,
    apply_event,
    decode,
    decode_event,
    encode_output,
    field_path,
    parse_submission,
    resolve_limits,
    stage_result,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
PROPERTY = settings(max_examples=200, database=None)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> LimitPolicy:
    """The administrator's policy as a fresh installation has it (no file, no variables)."""
    return config_module.load(tmp_path_factory.mktemp("state"), environ={}).limits


def rejected(raw: object, policy: LimitPolicy) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_submission(raw, policy)
    return info.value


def only_problem(exc: InvalidRequest) -> FieldProblem:
    assert len(exc.problems) == 1, exc.problems
    return exc.problems[0]


def assert_only_problem(exc: InvalidRequest, field: str, fragment: str) -> None:
    problem = only_problem(exc)
    assert problem.field == field
    assert fragment in problem.message, problem.message
    assert exc.code == "invalid_request"


def with_files(*files: dict[str, Any]) -> dict[str, Any]:
    return {"run": "./main", "files": list(files)}


def utf8_file(name: str, content: str = "") -> dict[str, Any]:
    return {"name": name, "content": content}


# -- a valid request ------------------------------------------------------------------------

PROTOCOL_EXAMPLE: dict[str, Any] = {
    "files": [
        {"name": "main.c", "content": "int main(void){return 0;}", "encoding": "utf8"},
        {"name": "data/blob.bin", "content": "00ff10", "encoding": "hex"},
        {"name": "run.sh", "content": "ZWNobyBoaQo=", "encoding": "base64", "executable": True},
    ],
    "dependencies": ["gcc", "python3"],
    "compile": "gcc -O2 -o main main.c",
    "run": './main "$@"',
    "env": {"GREETING": "hello"},
    "stdin": "3 4\n",
    "stdin_encoding": "utf8",
    "args": ["--fast", "x y"],
    "limits": {
        "compile": {"cpu": 10, "as": 1073741824, "wall_time": 20},
        "run": {
            "cpu": 2,
            "as": 268435456,
            "nproc": 32,
            "fsize": 1048576,
            "wall_time": 5,
            "output": 65536,
        },
    },
}


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
    assert_only_problem(exc, "run", "Field required")


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


# -- limits ---------------------------------------------------------------------------------


def limit_problems(requested: dict[str, Any], policy: LimitPolicy) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        resolve_limits(requested, policy)
    return info.value


def test_an_unknown_stage_is_refused(policy):
    exc = limit_problems({"build": {"cpu": 1}}, policy)
    assert_only_problem(exc, "limits.build", "unknown stage")
    assert type(exc) is InvalidRequest


@pytest.mark.parametrize("name", ["cpus", "CPU", "rlimit_cpu", "time", "memory_limit", ""])
def test_an_unknown_limit_is_refused(policy, name):
    exc = limit_problems({"run": {name: 1}}, policy)
    assert_only_problem(exc, f"limits.run.{name}", "unknown limit")
    assert type(exc) is InvalidRequest


BAD_LIMITS = [
    ("run", "cpu", -1, "not a non-negative integer"),
    ("run", "cpu", 1.5, "not a non-negative integer"),
    ("run", "cpu", 2.0, "not a non-negative integer"),
    ("run", "cpu", True, "not a non-negative integer"),
    ("run", "cpu", False, "not a non-negative integer"),
    ("run", "cpu", "5", "not a non-negative integer"),
    ("run", "cpu", None, "not a non-negative integer"),
    ("run", "cpu", "unlimited", "not a non-negative integer"),
    ("run", "cpu", {"soft": 1}, "not a non-negative integer"),
    ("compile", "nofile", -100, "not a non-negative integer"),
    ("run", "as", [10, 5], "soft limit 10 is above the hard limit 5"),
    ("compile", "stack", [2, 1], "soft limit 2 is above the hard limit 1"),
    ("run", "as", [1], "[soft, hard]"),
    ("run", "as", [1, 2, 3], "[soft, hard]"),
    ("run", "as", [], "[soft, hard]"),
    ("run", "as", [-1, 5], "not a non-negative integer"),
    ("run", "as", [1, 2.5], "not a non-negative integer"),
    ("run", "as", [1, "unlimited"], "not a non-negative integer"),
    ("run", "wall_time", 0, "above 0"),
    ("run", "wall_time", 0.0, "above 0"),
    ("run", "wall_time", -1, "above 0"),
    ("compile", "wall_time", -0.5, "above 0"),
    ("run", "wall_time", math.nan, "not a finite number of seconds"),
    ("run", "wall_time", math.inf, "not a finite number of seconds"),
    ("run", "wall_time", "5", "not a number of seconds"),
    ("run", "wall_time", True, "not a number of seconds"),
    ("run", "wall_time", None, "not a number of seconds"),
    ("run", "wall_time", [1, 2], "not a number of seconds"),
    ("run", "memory", 0, "memory must be at least 1"),
    ("compile", "pids", 0, "pids must be at least 1"),
    ("run", "memory", 1.5, "not a non-negative integer"),
    ("run", "memory", -1, "not a non-negative integer"),
    ("run", "pids", [1, 2], "not a non-negative integer"),
    ("run", "output", -1, "not a non-negative integer"),
    ("run", "output", "1MiB", "not a non-negative integer"),
    ("deps", "cpu", 1, "wall_time only"),
    ("deps", "memory", 1, "wall_time only"),
    ("deps", "wall_time", 0, "above 0"),
    ("deps", "wall_time", "x", "not a number of seconds"),
    ("deps", "wall_time", math.nan, "not a finite number of seconds"),
]


@pytest.mark.parametrize(("stage", "name", "value", "fragment"), BAD_LIMITS)
def test_a_malformed_limit_is_refused(policy, stage, name, value, fragment):
    exc = limit_problems({stage: {name: value}}, policy)
    assert type(exc) is InvalidRequest  # malformed, not merely too high
    assert_only_problem(exc, f"limits.{stage}.{name}", fragment)


@pytest.mark.parametrize(("stage", "name", "value", "fragment"), BAD_LIMITS[:12])
def test_a_malformed_limit_is_refused_through_parse_submission(
    policy, stage, name, value, fragment
):
    exc = rejected({"run": "true", "limits": {stage: {name: value}}}, policy)
    assert type(exc) is InvalidRequest
    assert_only_problem(exc, f"limits.{stage}.{name}", fragment)


TOO_HIGH = [
    ("run", "cpu", 121, "120"),
    ("compile", "cpu", 10_000, "120"),
    ("run", "cpu", [1, 121], "120"),
    ("run", "nproc", 4097, "4096"),
    ("run", "nofile", [1, 65537], "65536"),
    ("run", "fsize", GiB + 1, str(GiB)),
    ("run", "core", 1, "0"),
    ("run", "nice", 1, "0"),
    ("compile", "rtprio", 1, "0"),
    ("run", "wall_time", 300.5, "300.0"),
    ("compile", "wall_time", 301, "300.0"),
    ("run", "memory", 8 * GiB + 1, str(8 * GiB)),
    ("run", "pids", 4097, "4096"),
    ("run", "output", 64 * MiB + 1, str(64 * MiB)),
    ("deps", "wall_time", 3600.5, "3600.0"),
]


@pytest.mark.parametrize(("stage", "name", "value", "maximum"), TOO_HIGH)
def test_a_limit_above_the_maximum_is_refused_never_lowered(policy, stage, name, value, maximum):
    exc = limit_problems({stage: {name: value}}, policy)
    assert isinstance(exc, LimitExceeded)
    assert exc.code == "limit_exceeded"
    problem = only_problem(exc)
    assert problem.field == f"limits.{stage}.{name}"
    assert problem.message == f"{value} exceeds the maximum {maximum}"
    # The one-line message names the field, the value and the maximum.
    assert exc.message == f"limits.{stage}.{name}: {value} exceeds the maximum {maximum}"
    assert exc.as_json()["error"]["code"] == "limit_exceeded"


def test_a_limit_above_the_maximum_is_refused_through_parse_submission(policy):
    with pytest.raises(LimitExceeded) as info:
        parse_submission({"run": "true", "limits": {"run": {"cpu": 500}}}, policy)
    assert info.value.message == "limits.run.cpu: 500 exceeds the maximum 120"


@pytest.mark.parametrize(
    ("stage", "name", "value", "resolved"),
    [
        ("run", "cpu", 120, (120, 120)),
        ("run", "core", 0, (0, 0)),
        ("run", "nofile", [0, 65536], (0, 65536)),
        ("run", "as", 2**40, (2**40, 2**40)),  # the maximum of `as` is unlimited
        ("run", "stack", [8 * MiB, 2**40], (8 * MiB, 2**40)),
    ],
)
def test_a_rlimit_up_to_the_maximum_is_accepted(policy, stage, name, value, resolved):
    limits = resolve_limits({stage: {name: value}}, policy)
    assert getattr(limits, stage).rlimits[name] == resolved


def test_scalar_limits_up_to_the_maximum_are_accepted(policy):
    limits = resolve_limits(
        {
            "deps": {"wall_time": 3600},
            "run": {"wall_time": 300, "memory": 8 * GiB, "pids": 4096, "output": 64 * MiB},
            "compile": {"wall_time": 0.001, "memory": 1, "pids": 1, "output": 0},
        },
        policy,
    )
    assert limits.deps_wall_time == 3600.0
    assert (limits.run.wall_time, limits.run.memory, limits.run.pids, limits.run.output) == (
        300.0,
        8 * GiB,
        4096,
        64 * MiB,
    )
    assert (limits.compile.memory, limits.compile.pids, limits.compile.output) == (1, 1, 0)
    assert limits.compile.wall_time == 0.001
    assert isinstance(limits.run.wall_time, float)


def test_malformed_and_too_high_together_are_a_plain_invalid_request_naming_both(policy):
    exc = limit_problems({"run": {"cpu": 500, "nofile": -1}, "compile": {"wall_time": 0}}, policy)
    assert type(exc) is InvalidRequest
    assert exc.code == "invalid_request"
    fields = {p.field: p.message for p in exc.problems}
    assert fields.keys() == {"limits.run.cpu", "limits.run.nofile", "limits.compile.wall_time"}
    assert fields["limits.run.cpu"] == "500 exceeds the maximum 120"
    assert "not a non-negative integer" in fields["limits.run.nofile"]


def test_several_limits_too_high_are_all_named(policy):
    exc = limit_problems({"run": {"cpu": 500, "pids": 10**6}, "deps": {"wall_time": 10**5}}, policy)
    assert isinstance(exc, LimitExceeded)
    assert {p.field for p in exc.problems} == {
        "limits.run.cpu",
        "limits.run.pids",
        "limits.deps.wall_time",
    }
    assert exc.message.endswith("(and 2 more)")


def test_omitted_limits_take_the_stage_defaults(policy):
    limits = resolve_limits({}, policy)
    assert limits.compile == policy.compile.defaults
    assert limits.run == policy.run.defaults
    assert limits.deps_wall_time == policy.deps_wall_time == 600.0
    as_json = limits.as_json()
    assert as_json.keys() == {"deps", "compile", "run"}
    assert as_json["deps"] == {"wall_time": 600.0}
    for stage in ("compile", "run"):
        assert set(as_json[stage]) == {*RLIMITS, *SANDBOX_LIMITS}
        assert len(as_json[stage]) == 21  # 16 rlimits, 5 of the sandbox (disk: v1.1)
    # Spot checks against config.DEFAULTS, so that a policy that loses its values fails here.
    assert as_json["run"]["cpu"] == 5
    assert as_json["compile"]["cpu"] == 30
    assert as_json["run"]["wall_time"] == 10.0
    assert as_json["compile"]["wall_time"] == 60.0
    assert as_json["run"]["as"] == "unlimited"
    assert as_json["run"]["core"] == 0
    assert as_json["run"]["memory"] == 512 * MiB
    assert as_json["run"]["output"] == MiB


def test_a_partial_request_overrides_only_what_it_names(policy):
    limits = resolve_limits({"run": {"cpu": 2, "wall_time": 1}}, policy)
    assert limits.run.rlimits["cpu"] == (2, 2)
    assert limits.run.wall_time == 1.0
    assert limits.compile == policy.compile.defaults
    untouched = {n: v for n, v in limits.run.rlimits.items() if n != "cpu"}
    assert untouched == {n: v for n, v in policy.run.defaults.rlimits.items() if n != "cpu"}
    assert limits.run.memory == policy.run.defaults.memory


def test_empty_stage_tables_change_nothing(policy):
    assert resolve_limits({"deps": {}, "compile": {}, "run": {}}, policy) == resolve_limits(
        {}, policy
    )


def test_a_soft_hard_pair_is_kept_as_a_pair(policy):
    limits = resolve_limits({"run": {"nofile": [64, 128], "cpu": [3, 3]}}, policy)
    assert limits.run.rlimits["nofile"] == (64, 128)
    assert limits.run.as_json()["nofile"] == [64, 128]
    # A pair of equal numbers is one number in JSON.
    assert limits.run.as_json()["cpu"] == 3


def test_resolved_limits_round_trip_through_json(policy):
    limits = resolve_limits(
        {"deps": {"wall_time": 30}, "run": {"nofile": [64, 128], "stack": [MiB, 2**40]}}, policy
    )
    again = ResolvedLimits.from_json(json.loads(json.dumps(limits.as_json())))
    assert again == limits
    assert again.run.rlimits["as"] == (None, None)  # "unlimited" comes back as infinity
    assert again.run.rlimits["stack"] == (MiB, 2**40)


def test_stage_limits_keep_a_finite_soft_below_an_unlimited_hard():
    limits = StageLimits(
        rlimits={name: (5, None) for name in RLIMITS},
        wall_time=1.5,
        memory=1,
        pids=1,
        output=0,
        disk=1,
    )
    assert limits.as_json()["cpu"] == [5, "unlimited"]
    assert StageLimits.from_json(limits.as_json()) == limits


def test_a_submission_round_trips_through_json(policy):
    submission = parse_submission(PROTOCOL_EXAMPLE, policy)
    again = Submission.from_json(json.loads(json.dumps(submission.as_json())))
    assert again == submission
    assert again.request.files[1].data() == b"\x00\xff\x10"
    assert again.limits.run.rlimits["nproc"] == (32, 32)


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


# -- the state machine ----------------------------------------------------------------------

T0, T1, T2 = "2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:01.000000Z", "2024-01-01T00:00:02Z"


def request(**fields: Any) -> SubmissionRequest:
    return SubmissionRequest.model_validate({"run": "./main", **fields})


FULL = {"dependencies": ["gcc"], "compile": "gcc -o main main.c"}


def result(status: str = "ok", **fields: Any) -> dict[str, Any]:
    if status == "skipped":
        return SandboxResult.skipped().wire()
    return {"status": status, "exit_code": 0 if status == "ok" else 1, **fields}


def deps_result(status: str = "ok") -> dict[str, Any]:
    return {"status": status, "cache": "hit", "packages": [], "log": "", "wall_time": 0.1}


class Recorder:
    """The protocol's ``EventRecorder``, fed and read as JSON, as events travel."""

    def __init__(self, recorder: EventRecorder) -> None:
        self.recorder = recorder

    @property
    def state(self) -> SubmissionState:
        return self.recorder.state

    @property
    def seq(self) -> int:
        return self.recorder.seq

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.recorder.record(decode_event(body)).wire()


def recorder_for(**fields: Any) -> Recorder:
    return Recorder(EventRecorder(SubmissionState.new("sub-1", request(**fields), created_at=T0)))


def play(rec: Recorder, *bodies: dict[str, Any]) -> list[dict[str, Any]]:
    return [rec.record(body) for body in bodies]


def apply(state: SubmissionState, body: dict[str, Any]) -> SubmissionState:
    return apply_event(state, decode_event(body))


QUEUED = {"type": "status", "status": "queued"}
RUNNING = {"type": "status", "status": "running", "worker": "executor-a-1"}


def started(stage: str) -> dict[str, Any]:
    return {"type": "stage_started", "stage": stage}


def stage_done(stage: str, res: dict[str, Any]) -> dict[str, Any]:
    return {"type": "stage_finished", "stage": stage, "result": res}


FINISHED = {"type": "finished"}


def test_a_new_submission_is_queued_and_knows_nothing_yet():
    state = SubmissionState.new("sub-1", request(**FULL), created_at=T0)
    assert state.as_json() == {
        "id": "sub-1",
        "status": "queued",
        "stage": None,
        "picked_up": None,
        "worker": None,
        "dependencies_installed": None,
        "compiled": None,
        "ran": None,
        "created_at": T0,
        "started_at": None,
        "finished_at": None,
        "stages": {"deps": None, "compile": None, "run": None},
        "error": None,
        "attempts": 0,
    }
    assert not state.done


def test_stages_a_submission_lacks_are_done_at_once():
    state = SubmissionState.new("sub-1", request())
    assert state.dependencies_installed is True
    assert state.compiled is True
    assert state.ran is None
    assert state.created_at.endswith("Z")
    only_deps = SubmissionState.new("sub-2", request(dependencies=["gcc"]))
    assert (only_deps.dependencies_installed, only_deps.compiled) == (None, True)
    only_compile = SubmissionState.new("sub-3", request(compile="make"))
    assert (only_compile.dependencies_installed, only_compile.compiled) == (True, None)


def test_the_normal_path_sets_every_flag_as_the_protocol_says():
    rec = recorder_for(**FULL)

    rec.record(QUEUED)
    assert rec.state.status == "queued"
    assert rec.state.picked_up is None

    rec.record({**RUNNING, "time": T1})
    s = rec.state
    assert (s.status, s.picked_up, s.worker, s.started_at, s.attempts) == (
        "running",
        True,
        "executor-a-1",
        T1,
        1,
    )
    assert (s.dependencies_installed, s.compiled, s.ran, s.stage) == (None, None, None, None)

    rec.record(started("deps"))
    assert rec.state.stage == "deps"
    rec.record(stage_done("deps", deps_result()))
    assert rec.state.dependencies_installed is True
    assert rec.state.stages["deps"] == stage_result("deps", deps_result())
    assert rec.state.compiled is None

    rec.record(started("compile"))
    assert rec.state.stage == "compile"
    rec.record({"type": "output", "stage": "compile", "stream": "stderr", "data": "warning"})
    rec.record(stage_done("compile", result("ok")))
    assert rec.state.compiled is True
    assert rec.state.ran is None

    rec.record(started("run"))
    assert rec.state.stage == "run"
    rec.record(stage_done("run", result("ok")))
    assert rec.state.ran is True
    assert rec.state.status == "running"

    finished = rec.record({**FINISHED, "time": T2})
    s = rec.state
    assert (s.status, s.stage, s.finished_at) == ("finished", None, T2)
    assert s.done
    assert s.stages == {
        "deps": stage_result("deps", deps_result()),
        "compile": stage_result("compile", result("ok")),
        "run": stage_result("run", result("ok")),
    }
    assert finished["submission"] == s.as_json()
    assert finished["submission"]["status"] == "finished"
    assert finished["submission"]["ran"] is True


def test_events_are_numbered_one_two_three_without_gaps_and_carry_the_id():
    rec = recorder_for()
    events = play(
        rec,
        QUEUED,
        RUNNING,
        started("run"),
        {"type": "output", "stage": "run", "stream": "stdout", "data": "hi\n"},
        stage_done("run", result("ok")),
        FINISHED,
    )
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e["id"] for e in events} == {"sub-1"}
    assert all(e["time"].endswith("Z") for e in events)
    assert events[3]["data"] == "hi\n"
    assert [e["type"] for e in events][-1] == "finished"
    assert rec.seq == 6


def test_a_refused_event_takes_no_sequence_number():
    rec = recorder_for()
    play(rec, QUEUED)
    with pytest.raises(InvalidTransition):
        rec.record(started("run"))  # while queued
    assert rec.seq == 1
    assert rec.record(RUNNING)["seq"] == 2


def test_a_recorder_resumes_after_the_last_stored_sequence_number():
    rec = Recorder(EventRecorder(SubmissionState.new("sub-1", request()), seq=41))
    assert rec.record(QUEUED)["seq"] == 42


def test_recording_leaves_the_body_alone_and_keeps_a_given_time():
    rec = recorder_for()
    body = {**RUNNING, "time": T1}
    event = rec.record(body)
    assert body == {**RUNNING, "time": T1}
    assert event == {**RUNNING, "time": T1, "id": "sub-1", "seq": 1}


def test_the_finished_event_carries_the_full_submission():
    rec = recorder_for(**FULL)
    events = play(
        rec,
        QUEUED,
        RUNNING,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
        stage_done("compile", result("ok")),
        started("run"),
        stage_done("run", result("failed")),
        FINISHED,
    )
    submission = events[-1]["submission"]
    assert submission == rec.state.as_json()
    assert set(submission) >= {
        "id",
        "status",
        "stage",
        "picked_up",
        "worker",
        "dependencies_installed",
        "compiled",
        "ran",
        "created_at",
        "started_at",
        "finished_at",
        "stages",
        "error",
    }
    assert submission["stages"]["run"]["status"] == "failed"
    assert submission["ran"] is True  # it ran, and failed
    json.dumps(events)  # every event is JSON


def test_a_compile_failure_skips_the_run():
    rec = recorder_for(compile="gcc main.c")
    play(rec, QUEUED, RUNNING)
    assert rec.state.dependencies_installed is True
    play(rec, started("compile"), stage_done("compile", result("failed")))
    assert rec.state.compiled is False
    play(rec, stage_done("run", result("skipped")), FINISHED)
    s = rec.state
    assert (s.status, s.compiled, s.ran) == ("finished", False, False)
    assert s.stages["run"] is not None and s.stages["run"].status == "skipped"


def test_a_dependency_failure_is_recorded():
    rec = recorder_for(**FULL)
    play(rec, RUNNING, started("deps"), stage_done("deps", deps_result("failed")))
    assert rec.state.dependencies_installed is False
    assert rec.state.compiled is None


@pytest.mark.parametrize(
    ("status", "ran"),
    [
        ("ok", True),
        ("failed", True),
        ("signaled", True),
        ("time_limit", True),
        ("memory_limit", True),
        ("output_limit", True),
        ("skipped", False),
        ("error", False),
    ],
)
def test_ran_says_whether_the_program_ran(status, ran):
    rec = recorder_for()
    play(rec, RUNNING, started("run"), stage_done("run", result(status)))
    assert rec.state.ran is ran


def test_a_reclaim_by_another_worker_starts_every_stage_over():
    rec = recorder_for(**FULL)
    play(
        rec,
        QUEUED,
        RUNNING,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
    )
    assert rec.state.dependencies_installed is True
    rec.record({"type": "status", "status": "running", "worker": "executor-b-2", "time": T2})
    s = rec.state
    assert (s.status, s.worker, s.attempts, s.picked_up, s.started_at) == (
        "running",
        "executor-b-2",
        2,
        True,
        T2,
    )
    assert (s.stage, s.dependencies_installed, s.compiled, s.ran) == (None, None, None, None)
    assert s.stages == {"deps": None, "compile": None, "run": None}
    events = play(
        rec,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
        stage_done("compile", result()),
        started("run"),
        stage_done("run", result()),
        FINISHED,
    )
    assert rec.state.status == "finished"
    assert events[-1]["submission"]["attempts"] == 2
    assert events[-1]["seq"] == 13


def test_a_reclaim_keeps_the_stages_a_submission_lacks_done():
    rec = recorder_for()
    play(rec, RUNNING, started("run"), RUNNING)
    assert (rec.state.dependencies_installed, rec.state.compiled, rec.state.ran) == (
        True,
        True,
        None,
    )
    assert rec.state.attempts == 2


def test_a_cancelled_submission_stays_cancelled_through_its_finished_event():
    rec = recorder_for()
    play(rec, QUEUED, RUNNING, started("run"))
    rec.record({"type": "status", "status": "cancelled", "time": T2})
    assert (rec.state.status, rec.state.stage, rec.state.finished_at) == ("cancelled", None, T2)
    assert rec.state.done
    finished = rec.record(FINISHED)
    assert rec.state.status == "cancelled"
    assert finished["submission"]["status"] == "cancelled"
    assert finished["submission"]["finished_at"] == T2
    with pytest.raises(InvalidTransition):
        rec.record(started("run"))


def test_a_queued_submission_can_be_cancelled():
    rec = recorder_for()
    play(rec, QUEUED, {"type": "status", "status": "cancelled"})
    assert rec.state.status == "cancelled"
    assert rec.state.picked_up is None
    assert rec.record(FINISHED)["submission"]["status"] == "cancelled"


def test_a_system_error_says_why():
    rec = recorder_for()
    play(rec, QUEUED, RUNNING)
    rec.record({"type": "status", "status": "error", "error": "executor crashed 3 times"})
    assert (rec.state.status, rec.state.error) == ("error", "executor crashed 3 times")
    assert rec.state.finished_at is not None
    assert rec.record(FINISHED)["submission"]["error"] == "executor crashed 3 times"


def finished_state() -> SubmissionState:
    rec = recorder_for()
    play(rec, QUEUED, RUNNING, started("run"), stage_done("run", result()), FINISHED)
    assert rec.state.status == "finished"
    return rec.state


@pytest.mark.parametrize(
    "event",
    [
        QUEUED,
        RUNNING,
        {"type": "status", "status": "cancelled"},
        {"type": "status", "status": "error", "error": "x"},
        {"type": "status", "status": "finished"},
        started("run"),
        stage_done("run", result()),
        FINISHED,
    ],
    ids=lambda e: e["type"] + ":" + str(e.get("status", "")),
)
def test_nothing_follows_finished(event):
    state = finished_state()
    with pytest.raises(InvalidTransition, match="sub-1 is finished"):
        apply(state, event)


def test_an_output_event_after_finished_is_refused():
    with pytest.raises(InvalidTransition):
        apply(finished_state(), {"type": "output", "stage": "run", "stream": "stdout", "data": ""})


def test_a_finished_event_while_queued_is_refused():
    rec = recorder_for()
    rec.record(QUEUED)
    with pytest.raises(InvalidTransition):
        rec.record(FINISHED)


@pytest.mark.parametrize(
    "event", [started("run"), stage_done("run", result())], ids=["started", "finished"]
)
def test_stage_events_while_queued_are_refused(event):
    rec = recorder_for()
    rec.record(QUEUED)
    with pytest.raises(InvalidTransition, match="while queued"):
        rec.record(event)
    assert rec.state.status == "queued"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "status", "status": "finished"},  # finished needs an executor first
        {"type": "status", "status": "bogus"},
        {"type": "bogus"},
    ],
)
def test_impossible_events_are_refused(event):
    # A status or type the protocol lacks is no event at all: its decoding refuses it, before
    # the state machine could (both are ValueErrors).
    state = SubmissionState.new("sub-1", request())
    with pytest.raises(ValueError) as info:
        apply(state, event)
    assert isinstance(info.value, InvalidTransition) or event != {
        "type": "status",
        "status": "finished",
    }


def test_running_cannot_go_back_to_queued():
    rec = recorder_for()
    play(rec, RUNNING)
    with pytest.raises(InvalidTransition, match="running cannot become queued"):
        rec.record(QUEUED)


def test_a_running_submission_can_finish_by_a_status_event():
    rec = recorder_for()
    play(rec, RUNNING, {"type": "status", "status": "finished", "time": T2})
    assert (rec.state.status, rec.state.finished_at) == ("finished", T2)


def test_apply_event_leaves_the_old_state_alone():
    state = SubmissionState.new("sub-1", request(**FULL), created_at=T0)
    running = apply(state, RUNNING)
    assert state.status == "queued"
    assert state.attempts == 0
    assert running.status == "running"


def test_output_events_change_nothing_while_running():
    rec = recorder_for()
    play(rec, RUNNING, started("run"))
    before = rec.state
    rec.record({"type": "output", "stage": "run", "stream": "stdout", "data": "x"})
    assert rec.state == before


def mid_run_state() -> SubmissionState:
    rec = recorder_for(**FULL)
    play(
        rec,
        QUEUED,
        RUNNING,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
        stage_done("compile", result(stdout="é\n")),
    )
    return rec.state


def test_a_state_round_trips_through_its_record():
    state = mid_run_state()
    record = json.loads(json.dumps(state.as_record()))
    assert SubmissionState.from_record(record) == state
    assert record["has_dependencies"] is True
    assert record["has_compile"] is True


def test_the_record_keeps_what_a_reclaim_needs_to_know():
    state = SubmissionState.new("sub-1", request(), created_at=T0)
    again = SubmissionState.from_record(json.loads(json.dumps(state.as_record())))
    # Restarted after a reload, the stages the request lacks stay done.
    running = apply(again, RUNNING)
    assert (running.dependencies_installed, running.compiled) == (True, True)


def test_the_clients_view_hides_the_bookkeeping():
    as_json = mid_run_state().as_json()
    assert "has_dependencies" not in as_json
    assert "has_compile" not in as_json


def test_a_skipped_stage_is_a_stage_result():
    skipped = SandboxResult.skipped().wire()
    assert skipped["status"] == "skipped"
    assert skipped["exit_code"] is None
    assert (skipped["stdout_encoding"], skipped["stderr_encoding"]) == ("utf8", "utf8")
    with pytest.raises(ValueError):  # shared by every caller, so nobody may change it
        SandboxResult.skipped().status = "ok"  # type: ignore[misc]


# -- known bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["run", "compile", "deps"])
def test_a_huge_integer_wall_time_is_refused_not_a_crash(policy, stage):
    with pytest.raises(InvalidRequest) as info:
        resolve_limits({stage: {"wall_time": 10**400}}, policy)
    assert only_problem(info.value).field == f"limits.{stage}.wall_time"


@pytest.mark.parametrize("value", [2**64, [0, 2**64], 10**30])
def test_a_rlimit_no_kernel_can_hold_is_refused(policy, value):
    with pytest.raises(InvalidRequest) as info:
        resolve_limits({"run": {"as": value}}, policy)
    assert only_problem(info.value).field == "limits.run.as"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"run": "true", "args": ["\ud800"]}, "args"),
        ({"run": "true", "env": {"A": "\udcff\ud800"}}, "env"),
    ],
)
def test_a_lone_surrogate_in_args_or_env_is_refused(policy, raw, field):
    exc = rejected(json.loads(json.dumps(raw)), policy)
    assert only_problem(exc).field == field


def test_a_lone_surrogate_in_a_file_name_or_script_is_refused(policy):
    exc = rejected({"run": "echo \ud800"}, policy)
    assert only_problem(exc).field == "run"
    exc = rejected(with_files(utf8_file("\ud800")), policy)
    assert only_problem(exc).field == "files[0].name"


def test_a_dependency_name_holds_no_character_nix_could_read_as_syntax():
    # Guard against the pattern growing into something a Nix expression could be built from.
    allowed = {c for c in string.printable if protocol.DEPENDENCY_NAME.fullmatch("a" + c)}
    assert allowed == set(string.ascii_letters + string.digits + "_+-")
