"""What the protocol's tests share: expecting a refusal and naming its one problem, and
requests to send."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings

from cellblock.errors import FieldProblem, InvalidRequest
from cellblock.service.protocol import (
    LimitPolicy,
    parse_submission,
    resolve_limits,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
PROPERTY = settings(max_examples=200, database=None)


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


def limit_problems(requested: dict[str, Any], policy: LimitPolicy) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        resolve_limits(requested, policy)
    return info.value


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
