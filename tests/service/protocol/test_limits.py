"""Per-stage limits: their resolution against the policy, and the one table of them that the
OpenAPI document and the notebook's names derive from."""

from __future__ import annotations

import json
import math
import string

import pytest
from protocolio import (
    PROTOCOL_EXAMPLE,
    GiB,
    MiB,
    assert_only_problem,
    limit_problems,
    only_problem,
    rejected,
    utf8_file,
    with_files,
)

from cellblock.errors import InvalidRequest, LimitExceeded
from cellblock.kernel import sections
from cellblock.service import protocol
from cellblock.service.openapi import document
from cellblock.service.protocol import (
    LIMIT_BY_NAME,
    LIMITS,
    RLIMITS,
    SANDBOX_LIMITS,
    SIZE_LIMITS,
    ResolvedLimits,
    StageLimits,
    Submission,
    Unit,
    parse_submission,
    resolve_limits,
)

# -- limits ---------------------------------------------------------------------------------


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
    assert as_json.keys() == {"deps", "compile", "run", "tests", "outputs"}
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


def test_the_table_names_every_field_of_a_stages_limits():
    fields = set(StageLimits.__dataclass_fields__) - {"rlimits"}
    assert set(SANDBOX_LIMITS) == fields
    assert set(RLIMITS) | set(SANDBOX_LIMITS) == {limit.name for limit in LIMITS}
    assert "wall_time" not in SIZE_LIMITS and set(SIZE_LIMITS) < set(SANDBOX_LIMITS)


def test_the_openapi_limits_are_the_tables():
    schema = document()["components"]["schemas"]["StageLimits"]["properties"]
    assert list(schema) == [limit.name for limit in LIMITS]
    assert schema["disk"]["minimum"] == LIMIT_BY_NAME["disk"].minimum == 1
    assert schema["wall_time"]["exclusiveMinimum"] == 0
    assert [s["type"] for s in schema["cpu"]["oneOf"]] == ["integer", "array"]
    assert "oneOf" not in schema["memory"]  # Cellblock's own limits take one value


def test_the_notebook_takes_every_limit_of_the_table():
    assert tuple(limit.name for limit in LIMITS) == sections.STAGE_LIMITS


@pytest.mark.parametrize("limit", LIMITS, ids=lambda limit: limit.name)
def test_the_notebook_reads_each_limit_in_its_unit(limit):
    one_k = sections.limit_value(limit.name, "1K") if limit.unit is Unit.BYTES else None
    if limit.unit is Unit.BYTES:
        assert one_k == 1024
    elif limit.unit is Unit.MICROSECONDS:
        assert sections.limit_value(limit.name, "2ms") == 2000
    elif limit.unit is Unit.SECONDS:
        assert sections.limit_value(limit.name, "1m") == 60
    else:
        with pytest.raises(ValueError, match="takes no unit"):
            sections.limit_value(limit.name, "1K")
