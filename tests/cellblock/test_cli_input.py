"""``cellblock exec`` on bad input: refused before any sandbox is prepared, with its exit status;
and ``cellblock up``'s options, refused before anything starts.

Exit statuses: 2 for bad input (the protocol's error document on stderr), 3 when the system fails
(here: the submission file cannot be read, the configuration is wrong, or an option of `up` is
out of range).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellblock import cli
from cellblock.executor import host
from cellblock.up import UpOptions


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CELLBLOCK_* variable of the caller's leaks in; no sandbox is ever prepared;
    the root logger that ``main`` reconfigures is put back."""
    for name in list(os.environ):
        if name.startswith("CELLBLOCK_"):
            monkeypatch.delenv(name)

    def no_sandbox(*args: Any, **kwargs: Any) -> None:
        pytest.fail("bad input reached the sandbox")

    monkeypatch.setattr(host, "prepare", no_sandbox)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run_exec(state_dir: Path, source: str) -> int:
    return cli.main(["exec", source, "--state-dir", str(state_dir)])


def submission_file(tmp_path: Path, body: object) -> Path:
    path = tmp_path / "submission.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def error_document(stderr: str) -> dict[str, Any]:
    """The one JSON error document on stderr (the log lines of level warning+ would be JSON too)."""
    documents = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"error"')]
    assert len(documents) == 1, stderr
    error: dict[str, Any] = documents[0]["error"]
    return error


@pytest.mark.parametrize(
    "text",
    ["{not json", "", "   ", '{"run": "true",}', "{'run': 'true'}", '{"run": "true"} x', "NaN x"],
)
def test_a_file_that_is_not_json_exits_2(tmp_path, capsys, text):
    status = run_exec(tmp_path, str(submission_file(tmp_path, text)))
    out, err = capsys.readouterr()
    assert status == cli.EXIT_BAD_INPUT == 2
    assert out == ""
    error = error_document(err)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("not JSON: ")
    assert [d["field"] for d in error["details"]] == [""]
    assert error["details"][0]["message"] == error["message"]


def test_not_json_on_standard_input_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("run: ./main\n"))
    status = run_exec(tmp_path, "-")
    assert status == 2
    error = error_document(capsys.readouterr().err)
    assert "not JSON" in error["message"]
    assert "line 1 column 1" in error["message"]  # where json.loads gave up


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({}, "run", "is required"),
        ({"run": " "}, "run", "must not be empty"),
        ({"run": "true", "limts": {}}, "limts", "Extra inputs are not permitted"),
        (
            {
                "run": "true",
                "files": [{"name": "ok", "content": ""}, {"name": "/etc/x", "content": ""}],
            },
            "files[1].name",
            "is absolute",
        ),
        ({"run": "true", "files": [{"name": "../x", "content": ""}]}, "files[0].name", ".."),
        (
            {"run": "true", "files": [{"name": "b", "content": "@@", "encoding": "base64"}]},
            "files[0].content",
            "is not valid base64",
        ),
        (
            {"run": "true", "dependencies": ["a; builtins.readFile /etc/shadow"]},
            "dependencies[0]",
            "is not a package attribute name",
        ),
        ({"run": "true", "env": {"1X": "y"}}, "env", "is not a variable name"),
        ({"run": "true", "limits": {"run": {"cpu": -1}}}, "limits.run.cpu", "non-negative"),
        ({"run": "true", "limits": {"build": {}}}, "limits.build", "unknown stage"),
        (["run", "true"], "", "must be a JSON object"),
        (None, "", "must be a JSON object"),
    ],
)
def test_a_submission_that_does_not_fit_the_schema_exits_2_naming_the_field(
    tmp_path, capsys, body, field, fragment
):
    status = run_exec(tmp_path, str(submission_file(tmp_path, body)))
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    error = error_document(err)
    assert error["code"] == "invalid_request"
    assert [d["field"] for d in error["details"]] == [field]
    assert fragment in error["details"][0]["message"]


def test_a_limit_above_the_maximum_exits_2_as_limit_exceeded(tmp_path, capsys):
    body = {"run": "true", "limits": {"run": {"cpu": 500}}}
    assert run_exec(tmp_path, str(submission_file(tmp_path, body))) == 2
    error = error_document(capsys.readouterr().err)
    assert error["code"] == "limit_exceeded"
    assert error["message"] == "limits.run.cpu: 500 exceeds the maximum 120"
    assert error["details"] == [
        {"field": "limits.run.cpu", "message": "500 exceeds the maximum 120"}
    ]


def test_the_maximum_comes_from_the_state_dirs_configuration(tmp_path, capsys):
    (tmp_path / "cellblock.toml").write_text("[limits.run.max]\ncpu = 60\n")
    body = {"run": "true", "limits": {"run": {"cpu": 61}}}
    assert run_exec(tmp_path, str(submission_file(tmp_path, body))) == 2
    error = error_document(capsys.readouterr().err)
    assert error["message"] == "limits.run.cpu: 61 exceeds the maximum 60"


def test_every_problem_is_listed(tmp_path, capsys):
    body = {"run": "", "args": [1], "dependencies": ["${x}"]}
    assert run_exec(tmp_path, str(submission_file(tmp_path, body))) == 2
    error = error_document(capsys.readouterr().err)
    assert {d["field"] for d in error["details"]} == {"run", "args[0]", "dependencies[0]"}


def test_a_schema_error_on_standard_input_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"run": "true", "args": "x"})))
    assert run_exec(tmp_path, "-") == 2
    error = error_document(capsys.readouterr().err)
    assert [d["field"] for d in error["details"]] == ["args"]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_submission_file_that_cannot_be_read_exits_3(tmp_path, capsys, kind):
    path = tmp_path / "submission.json"
    if kind == "directory":
        path.mkdir()
    status = run_exec(tmp_path, str(path))
    out, err = capsys.readouterr()
    assert status == cli.EXIT_SYSTEM == 3
    assert out == ""
    reason = "No such file or directory" if kind == "missing" else "Is a directory"
    assert f"cellblock: cannot read {path}: {reason}" in err.splitlines()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000 anyway")
def test_a_submission_file_without_read_permission_exits_3(tmp_path, capsys):
    path = submission_file(tmp_path, {"run": "true"})
    path.chmod(0)
    assert run_exec(tmp_path, str(path)) == 3
    assert "Permission denied" in capsys.readouterr().err


def test_a_bad_configuration_exits_3_before_reading_the_submission(tmp_path, capsys):
    (tmp_path / "cellblock.toml").write_text("slotz = 4\n")
    status = run_exec(tmp_path, str(tmp_path / "missing.json"))
    err = capsys.readouterr().err
    assert status == 3
    assert "unknown key 'slotz'" in err
    assert err.startswith("cellblock: ")


# -- cellblock up ---------------------------------------------------------------------------


def up_options(*argv: str) -> UpOptions:
    return cli._up_options(cli.build_parser().parse_args(["up", *argv]))


def test_up_options_come_from_the_command_line_else_the_environment(monkeypatch):
    monkeypatch.setenv("CELLBLOCK_TOKEN", "client-from-env")
    monkeypatch.setenv("CELLBLOCK_ADMIN_TOKEN", "admin-from-env")
    assert up_options() == UpOptions(
        host="127.0.0.1", port=8765, executors=2, builders=2, log_level="warning",
        token="client-from-env", admin_token="admin-from-env",
    )  # fmt: skip
    given = up_options(
        "--host", "::", "--port", "9000", "--executors", "0", "--builders", "64",
        "--redis", "unix:///r.sock", "--config", "c.toml", "--log-level", "info",
        "--token", "client", "--admin-token", "admin",
    )  # fmt: skip
    assert given == UpOptions(
        host="::", port=9000, executors=0, builders=64, log_level="info",
        redis="unix:///r.sock", token="client", admin_token="admin", config_file=Path("c.toml"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "0"], "--port 0 is not a port the service can listen on"),
        (["--port", "65536"], "--port 65536 is not a port the service can listen on"),
        (["--executors", "-1"], "--executors must be from 0 to 64"),
        (["--builders", "65"], "--builders must be from 0 to 64"),
    ],
)
def test_up_with_an_option_out_of_range_exits_3_having_started_nothing(
    tmp_path, capsys, options, message
):
    state = tmp_path / "state"
    assert cli.main(["up", "--state-dir", str(state), *options]) == 3
    assert f"cellblock: {message}" in capsys.readouterr().err.splitlines()
    assert not state.exists()


# -- known bugs -----------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_exits_2(tmp_path, capsys):
    path = tmp_path / "submission.json"
    path.write_bytes(b'{"run": "echo \xff"}')
    assert run_exec(tmp_path, str(path)) == 2
    assert "not UTF-8 text" in error_document(capsys.readouterr().err)["message"]


def test_a_number_too_long_to_read_exits_2(tmp_path, capsys):
    text = '{"run": "true", "limits": {"run": {"cpu": ' + "9" * 5000 + "}}}"
    assert run_exec(tmp_path, str(submission_file(tmp_path, text))) == 2
    assert error_document(capsys.readouterr().err)["code"] in ("invalid_request", "limit_exceeded")
