"""Configuration: defaults, the TOML file, ``CELLBLOCK_*`` variables, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellblock import config as config_module
from cellblock.config import Config, NamedToken, load
from cellblock.errors import ConfigError, InvalidRequest
from cellblock.service.protocol import GradingPolicy, parse_submission

MiB, GiB = 1024**2, 1024**3


def write_config(state_dir: Path, text: str) -> Path:
    path = state_dir / "cellblock.toml"
    path.write_text(text)
    return path


def config_error(state_dir: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(state_dir, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == "config"
    return info.value.message


def test_the_defaults_load_without_a_file(tmp_path):
    config = load(tmp_path, environ={})
    assert isinstance(config, Config)
    assert config.state_dir == tmp_path
    assert (config.slots, config.queue_size, config.max_attempts) == (2, 1000, 3)
    assert config.lease_timeout == 15.0
    assert config.max_body_size == 32 * MiB
    assert config.channel == ""
    assert config.sandbox.base == "host"
    assert config.tokens == ()
    run, compile_ = config.limits.run, config.limits.compile
    assert run.defaults.rlimits["cpu"] == (5, 5)
    assert compile_.defaults.rlimits["cpu"] == (30, 30)
    assert run.defaults.rlimits["as"] == (None, None)
    assert run.defaults.wall_time == 10.0
    assert compile_.defaults.wall_time == 60.0
    assert run.defaults.memory == 512 * MiB
    assert run.maxima.rlimits["cpu"] == (120, 120)
    assert run.maxima.rlimits["core"] == (0, 0)
    assert run.maxima.wall_time == 300.0
    assert run.maxima.memory == 8 * GiB
    assert (config.limits.deps_wall_time, config.limits.deps_max_wall_time) == (600.0, 3600.0)


def test_loading_leaves_the_built_in_defaults_alone(tmp_path):
    write_config(tmp_path, "slots = 9\n[limits.run.default]\ncpu = 1\n")
    load(tmp_path, environ={"CELLBLOCK_LIMITS__RUN__MAX__CPU": "60"})
    assert config_module.DEFAULTS["slots"] == 2
    assert config_module.DEFAULTS["limits"]["run"]["default"]["cpu"] == 5
    assert config_module.DEFAULTS["limits"]["run"]["max"]["cpu"] == 120
    assert load(tmp_path / "elsewhere", environ={}).limits.run.maxima.rlimits["cpu"] == (120, 120)


def test_the_file_in_the_state_dir_overrides_the_defaults(tmp_path):
    write_config(
        tmp_path,
        """
        slots = 4
        channel = "nixos-24.05"
        [sandbox]
        base = "pure"
        [limits.run.default]
        cpu = 10
        nofile = [64, 128]
        [limits.deps]
        wall_time = 120
        """,
    )
    config = load(tmp_path, environ={})
    assert config.slots == 4
    assert config.channel == "nixos-24.05"
    assert config.sandbox.base == "pure"
    assert config.limits.run.defaults.rlimits["cpu"] == (10, 10)
    assert config.limits.run.defaults.rlimits["nofile"] == (64, 128)
    assert config.limits.deps_wall_time == 120.0
    # What the file leaves out keeps its default.
    assert config.queue_size == 1000
    assert config.sandbox.uid_base == 200000
    assert config.limits.run.defaults.rlimits["nproc"] == (256, 256)
    assert config.limits.compile.defaults.rlimits["cpu"] == (30, 30)


def test_an_explicit_file_is_read_instead_of_the_state_dirs(tmp_path):
    write_config(tmp_path, "slots = 4\n")
    other = tmp_path / "other.toml"
    other.write_text("slots = 7\n")
    assert load(tmp_path, other, environ={}).slots == 7


def test_an_explicit_file_that_is_missing_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.toml"
    message = config_error(tmp_path, config_file=missing, environ={})
    assert str(missing) in message


def test_invalid_toml_is_an_error_naming_the_file(tmp_path):
    path = write_config(tmp_path, "slots = = 4\n")
    message = config_error(tmp_path, environ={})
    assert message.startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("environ", "check"),
    [
        ({"CELLBLOCK_SLOTS": "4"}, lambda c: c.slots == 4),
        (
            {"CELLBLOCK_LIMITS__RUN__MAX__CPU": "30"},
            lambda c: c.limits.run.maxima.rlimits["cpu"] == (30, 30),
        ),
        ({"CELLBLOCK_LEASE_TIMEOUT": "2.5"}, lambda c: c.lease_timeout == 2.5),
        ({"CELLBLOCK_SANDBOX__BASE": "pure"}, lambda c: c.sandbox.base == "pure"),  # plain text
        ({"CELLBLOCK_SANDBOX__BASE": '"pure"'}, lambda c: c.sandbox.base == "pure"),  # TOML
        ({"CELLBLOCK_CHANNEL": "nixos-24.05"}, lambda c: c.channel == "nixos-24.05"),
        (
            {"CELLBLOCK_LIMITS__RUN__DEFAULT__NOFILE": "[64, 128]"},
            lambda c: c.limits.run.defaults.rlimits["nofile"] == (64, 128),
        ),
        (
            {"CELLBLOCK_LIMITS__RUN__DEFAULT__STACK": "unlimited"},
            lambda c: c.limits.run.defaults.rlimits["stack"] == (None, None),
        ),
        (
            {"CELLBLOCK_LIMITS__DEPS__MAX_WALL_TIME": "7200"},
            lambda c: c.limits.deps_max_wall_time == 7200.0,
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_an_environment_variable_overrides_a_key(tmp_path, environ, check):
    assert check(load(tmp_path, environ=environ))


def test_a_variable_overrides_the_file(tmp_path):
    write_config(tmp_path, "slots = 4\n[limits.run.max]\ncpu = 60\n")
    config = load(
        tmp_path, environ={"CELLBLOCK_SLOTS": "8", "CELLBLOCK_LIMITS__RUN__MAX__CPU": "90"}
    )
    assert config.slots == 8
    assert config.limits.run.maxima.rlimits["cpu"] == (90, 90)


def test_other_variables_are_not_configuration(tmp_path):
    environ = {"HOME": "/root", "PATH": "/bin", "CELLBLOCKSLOTS": "9", "XCELLBLOCK_SLOTS": "9"}
    assert load(tmp_path, environ=environ).slots == 2


@pytest.mark.parametrize(
    "name",
    [
        "CELLBLOCK_URL",
        "CELLBLOCK_TOKEN",
        "CELLBLOCK_ADMIN_TOKEN",
        "CELLBLOCK_STATE_DIR",
        "CELLBLOCK_CONFIG",
        "CELLBLOCK_REDIS_URL",
    ],
)
def test_variables_that_say_where_things_are_are_not_keys(tmp_path, name):
    config = load(tmp_path, environ={name: "http://x:1/ secret", "CELLBLOCK_SLOTS": "3"})
    assert config.slots == 3
    assert config.tokens == ()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("slotz = 4\n", "slotz"),
        ("[limits.build]\ncpu = 1\n", "limits.build"),
        ("[limits.run]\ndefaults = {}\n", "limits.run.defaults"),
        ("[sandbox]\nbsae = 'host'\n", "sandbox.bsae"),
        ("[limits.deps]\ncpu = 1\n", "limits.deps.cpu"),
    ],
)
def test_an_unknown_key_in_the_file_is_an_error_naming_it_and_the_file(tmp_path, text, key):
    path = write_config(tmp_path, text)
    message = config_error(tmp_path, environ={})
    assert str(path) in message
    assert f"unknown key {key!r}" in message


def test_an_unknown_limit_in_the_file_is_an_error_naming_it(tmp_path):
    write_config(tmp_path, "[limits.run.default]\ncpus = 1\n")
    message = config_error(tmp_path, environ={})
    assert "limits.run.default.cpus" in message


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("CELLBLOCK_SLOTZ", "slotz"),
        ("CELLBLOCK_LIMITS__RUN__MAX__CPUS", "limits.run.max.cpus"),
        ("CELLBLOCK_LIMITS__BUILD__DEFAULT__CPU", "limits.build"),
        ("CELLBLOCK_LOG_LEVEL", "log_level"),
    ],
)
def test_an_unknown_key_in_a_variable_is_an_error_naming_it(tmp_path, name, key):
    message = config_error(tmp_path, environ={name: "1"})
    assert f"environment variable {name}" in message
    assert repr(key) in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("limits = 5\n", "'limits' must be a table"),
        ("sandbox = 'pure'\n", "'sandbox' must be a table"),
        ("tokens = 'x'\n", "'tokens' must be a table"),
    ],
)
def test_a_value_where_a_table_belongs_is_an_error(tmp_path, text, fragment):
    write_config(tmp_path, text)
    assert fragment in config_error(tmp_path, environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[limits.run.default]\ncpu = 500\n", "limits.run.default.cpu is above limits.run.max.cpu"),
        (
            "[limits.compile.default]\ncpu = 121\n",
            "limits.compile.default.cpu is above limits.compile.max.cpu",
        ),
        (
            "[limits.run.default]\ncpu = 'unlimited'\n",
            "limits.run.default.cpu is above limits.run.max.cpu",
        ),
        (
            "[limits.run.default]\nnofile = [1, 70000]\n",
            "limits.run.default.nofile is above limits.run.max.nofile",
        ),
        (
            "[limits.run.default]\nwall_time = 301\n",
            "limits.run.default.wall_time is above limits.run.max.wall_time",
        ),
        (
            "[limits.run.default]\nmemory = 9_000_000_000\n",
            "limits.run.default.memory is above limits.run.max.memory",
        ),
        (
            "[limits.compile.max]\noutput = 1024\n",
            "limits.compile.default.output is above limits.compile.max.output",
        ),
    ],
)
def test_a_default_above_its_maximum_is_an_error(tmp_path, text, fragment):
    write_config(tmp_path, text)
    assert fragment in config_error(tmp_path, environ={})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[limits.run.default]\nnofile = -1\n", "limits.run.default.nofile"),
        ("[limits.run.default]\nnofile = [10, 5]\n", "limits.run.default.nofile"),
        ("[limits.run.default]\nnofile = [1, 2, 3]\n", "limits.run.default.nofile"),
        ("[limits.compile.max]\nstack = 'lots'\n", "limits.compile.max.stack"),
        ("[limits.run.default]\nmemory = 0\n", "limits.run.default.memory"),
        ("[limits.compile.default]\npids = true\n", "limits.compile.default.pids"),
        ("[limits.compile.max]\noutput = 1.5\n", "limits.compile.max.output"),
    ],
)
def test_a_malformed_limit_is_an_error_naming_it(tmp_path, text, fragment):
    write_config(tmp_path, text)
    assert fragment in config_error(tmp_path, environ={})


def test_a_maximum_may_be_raised_and_a_default_follow_it(tmp_path):
    write_config(tmp_path, "[limits.run.max]\ncpu = 600\n[limits.run.default]\ncpu = 300\n")
    config = load(tmp_path, environ={})
    assert config.limits.run.maxima.rlimits["cpu"] == (600, 600)
    assert config.limits.run.defaults.rlimits["cpu"] == (300, 300)


@pytest.mark.parametrize("base", ["docker", "", "HOST"])
def test_a_bad_sandbox_base_is_an_error(tmp_path, base):
    write_config(tmp_path, f"[sandbox]\nbase = {base!r}\n")
    message = config_error(tmp_path, environ={})
    assert "sandbox.base" in message
    assert repr(base) in message


def test_named_tokens_are_read_with_their_roles(tmp_path):
    write_config(
        tmp_path,
        """
        [tokens.alice]
        token = "alice-secret"
        role = "admin"
        [tokens.bob]
        token = "bob-secret"
        """,
    )
    tokens = load(tmp_path, environ={}).tokens
    assert sorted(tokens, key=lambda t: t.name) == [
        NamedToken(name="alice", token="alice-secret", role="admin"),
        NamedToken(name="bob", token="bob-secret", role="client"),
    ]


def test_a_named_token_from_a_variable_is_read(tmp_path):
    tokens = load(tmp_path, environ={"CELLBLOCK_TOKENS__CAROL__TOKEN": "c-secret"}).tokens
    assert tokens == (NamedToken(name="carol", token="c-secret", role="client"),)


@pytest.mark.parametrize("role", ["root", "Admin", ""])
def test_a_bad_token_role_is_an_error(tmp_path, role):
    write_config(tmp_path, f'[tokens.eve]\ntoken = "x"\nrole = {role!r}\n')
    message = config_error(tmp_path, environ={})
    assert "tokens.eve.role" in message
    assert repr(role) in message


def test_a_named_token_without_a_token_is_an_error(tmp_path):
    write_config(tmp_path, '[tokens.eve]\nrole = "admin"\n')
    assert "token" in config_error(tmp_path, environ={})


@pytest.mark.parametrize("key", ["slots", "max_attempts", "queue_size"])
def test_counts_below_one_are_an_error(tmp_path, key):
    message = config_error(tmp_path, environ={f"CELLBLOCK_{key.upper()}": "0"})
    assert key in message


def test_a_value_of_the_wrong_type_is_an_error(tmp_path):
    write_config(tmp_path, "slots = 'many'\n")
    assert "invalid configuration" in config_error(tmp_path, environ={})


# -- known bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "environment"])
def test_the_run_maxima_and_the_compile_maxima_are_separate(tmp_path, source):
    environ: dict[str, str] = {}
    if source == "file":
        write_config(tmp_path, "[limits.run.max]\ncpu = 60\n")
    else:
        environ["CELLBLOCK_LIMITS__RUN__MAX__CPU"] = "60"
    config = load(tmp_path, environ=environ)
    assert config.limits.run.maxima.rlimits["cpu"] == (60, 60)
    assert config.limits.compile.maxima.rlimits["cpu"] == (120, 120)


def test_lowering_a_run_maximum_leaves_compile_alone(tmp_path):
    config = load(tmp_path, environ={"CELLBLOCK_LIMITS__RUN__MAX__CPU": "20"})
    assert config.limits.run.maxima.rlimits["cpu"] == (20, 20)


def test_a_malformed_run_maximum_is_reported_under_its_own_name(tmp_path):
    write_config(tmp_path, "[limits.run.max]\nstack = 'lots'\n")
    assert "limits.run.max.stack" in config_error(tmp_path, environ={})


def test_a_deps_default_above_its_maximum_is_an_error(tmp_path):
    write_config(tmp_path, "[limits.deps]\nwall_time = 5000\n")
    assert "limits.deps.wall_time" in config_error(tmp_path, environ={})


@pytest.mark.parametrize(
    "text",
    [
        "[limits.run.default]\nwall_time = 0\n",
        "[limits.run.default]\nwall_time = -1\n",
        "[limits.compile.default]\nwall_time = nan\n",
        "[limits.deps]\nwall_time = -5\n",
    ],
)
def test_a_wall_time_that_is_not_positive_is_an_error(tmp_path, text):
    write_config(tmp_path, text)
    assert "wall_time" in config_error(tmp_path, environ={})


def test_a_named_admin_token_from_variables_keeps_its_role(tmp_path):
    environ = {"CELLBLOCK_TOKENS__ALICE__TOKEN": "abc", "CELLBLOCK_TOKENS__ALICE__ROLE": "admin"}
    assert load(tmp_path, environ=environ).tokens == (
        NamedToken(name="alice", token="abc", role="admin"),
    )


# -- grading --------------------------------------------------------------------------------


def test_the_grading_caps_have_their_defaults(tmp_path):
    grading = load(tmp_path, environ={}).limits.grading
    assert grading == GradingPolicy(
        max_tests=200, max_tests_wall_time=2000.0, output_file_size=4 * MiB,
        output_total_size=16 * MiB)  # fmt: skip
    # The protocol's own defaults (a policy built without a configuration) are the same.
    assert grading == GradingPolicy()


def test_a_test_cap_above_what_any_submission_holds_is_refused(tmp_path):
    write_config(tmp_path, "[grading]\nmax_tests = 10001\n")
    with pytest.raises(ConfigError, match=r"grading\.max_tests: 10001 is above 10000"):
        load(tmp_path, environ={})


def test_the_grading_caps_are_read_from_the_file(tmp_path):
    write_config(
        tmp_path,
        """
        [grading]
        max_tests = 20
        max_tests_wall_time = 90
        output_file_size = 1024
        output_total_size = 4096
        """,
    )
    grading = load(tmp_path, environ={}).limits.grading
    assert (grading.max_tests, grading.max_tests_wall_time) == (20, 90.0)
    assert isinstance(grading.max_tests_wall_time, float)
    assert (grading.output_file_size, grading.output_total_size) == (1024, 4096)


@pytest.mark.parametrize(
    ("name", "value", "check"),
    [
        ("CELLBLOCK_GRADING__MAX_TESTS", "5", lambda g: g.max_tests == 5),
        ("CELLBLOCK_GRADING__MAX_TESTS_WALL_TIME", "2.5", lambda g: g.max_tests_wall_time == 2.5),
        ("CELLBLOCK_GRADING__OUTPUT_FILE_SIZE", "10", lambda g: g.output_file_size == 10),
        ("CELLBLOCK_GRADING__OUTPUT_TOTAL_SIZE", "20", lambda g: g.output_total_size == 20),
    ],
)
def test_a_variable_overrides_a_grading_cap(tmp_path, name, value, check):
    write_config(tmp_path, "[grading]\nmax_tests = 50\n")
    grading = load(tmp_path, environ={name: value}).limits.grading
    assert check(grading)
    # The rest keeps the file's value or the default.
    assert grading.max_tests == (5 if name.endswith("MAX_TESTS") else 50)
    assert grading.output_total_size == (20 if name.endswith("TOTAL_SIZE") else 16 * MiB)


def test_submissions_are_judged_against_the_configured_caps(tmp_path):
    policy = load(tmp_path, environ={"CELLBLOCK_GRADING__MAX_TESTS": "1"}).limits
    request = {"run": "true", "tests": [{"name": "a"}, {"name": "b"}]}
    with pytest.raises(InvalidRequest) as info:
        parse_submission(request, policy)
    assert [p.field for p in info.value.problems] == ["tests"]
    files = load(tmp_path, environ={"CELLBLOCK_GRADING__OUTPUT_FILE_SIZE": "99"}).limits
    assert parse_submission({"run": "true"}, files).limits.output_file_size == 99


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[grading]\nmax_tests = 0\n", "grading.max_tests"),
        ("[grading]\nmax_tests = -3\n", "grading.max_tests"),
        ("[grading]\nmax_tests = 2.5\n", "grading.max_tests"),
        ("[grading]\nmax_tests = true\n", "grading.max_tests"),
        ("[grading]\nmax_tests = 'many'\n", "grading.max_tests"),
        ("[grading]\nmax_tests_wall_time = 0\n", "grading.max_tests_wall_time"),
        ("[grading]\nmax_tests_wall_time = -1\n", "grading.max_tests_wall_time"),
        ("[grading]\nmax_tests_wall_time = inf\n", "grading.max_tests_wall_time"),
        ("[grading]\nmax_tests_wall_time = 'long'\n", "grading.max_tests_wall_time"),
        ("[grading]\noutput_file_size = 0\n", "grading.output_file_size"),
        ("[grading]\noutput_file_size = '4 MiB'\n", "grading.output_file_size"),
        ("[grading]\noutput_total_size = -1\n", "grading.output_total_size"),
        ("[grading]\noutput_total_size = 1.5e6\n", "grading.output_total_size"),
    ],
)
def test_a_bad_grading_cap_is_an_error_naming_it(tmp_path, text, key):
    write_config(tmp_path, text)
    assert key in config_error(tmp_path, environ={})


def test_a_bad_grading_cap_from_a_variable_is_an_error_naming_it(tmp_path):
    message = config_error(tmp_path, environ={"CELLBLOCK_GRADING__MAX_TESTS": "none"})
    assert "grading.max_tests" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[grading]\nmax_test = 5\n", "grading.max_test"),
        ("[grading]\noutput_size = 5\n", "grading.output_size"),
        ("grading = 5\n", "grading"),
    ],
)
def test_an_unknown_or_misplaced_grading_key_is_an_error(tmp_path, text, key):
    write_config(tmp_path, text)
    message = config_error(tmp_path, environ={})
    assert repr(key) in message
