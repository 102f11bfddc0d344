"""Injection attacks through args, env, limits, dependency names and file names, end to end
through the real service and a real executor running real nsjail.

Each test is one attack class. Each asserts that what the attacker sends is either refused
with a 422 naming the field, or arrives verbatim where the protocol says it goes (and only
there): never re-parsed by a shell, never reaching Nix, never touching the executor, which
keeps serving the next submission.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from restio import Rest

from cellblock.service.protocol import RLIMITS, SANDBOX_LIMITS, SANDBOXED_STAGES
from cellblock.service.store import Store

Launch = Callable[..., Awaitable[Any]]  # the launch fixture of tests/conftest.py
NAME_MAX, PATH_MAX = 255, 4096


@pytest.fixture
async def api(service: Any) -> AsyncIterator[Rest]:
    client = Rest(service.url)
    yield client
    client.close()


async def run(api: Rest, request: dict[str, Any]) -> dict[str, Any]:
    """Run ``request`` to its end; the finished submission."""
    state: dict[str, Any] = await api.call(
        "POST", "/api/v1/submissions?wait=true&timeout=30", request, expect=201, timeout=40
    )
    assert state["status"] == "finished", state
    return state


async def serves_next(api: Rest, executor: Any) -> None:
    """The executor lives and runs a plain submission as before, in a fresh environment."""
    state = await run(api, {"run": "echo ok; env | sort"})
    result = state["stages"]["run"]
    assert result["status"] == "ok", result
    lines = result["stdout"].splitlines()
    assert lines[0] == "ok", result
    assert not [line for line in lines if line.startswith(("LD_PRELOAD=", "BASH_ENV=", "A="))]
    assert executor.proc.poll() is None, executor.logs()


async def refusals(
    api: Rest, cases: list[tuple[dict[str, Any], str]], path: str = "/api/v1/submissions"
) -> list[str]:
    """The cases whose answer is not a 422 with the error body naming their field."""
    wrong = []
    for body, field in cases:
        response = await api.request("POST", path, body)
        error = json.loads(response.body).get("error", {}) if response.code == 422 else {}
        fields = [d["field"] for d in error.get("details", [])]
        codes = ("invalid_request", "limit_exceeded")  # the latter: a value past its maximum
        if not (error.get("code") in codes and error["message"] and field in fields):
            wrong.append(f"{json.dumps(body)[:120]} → {response.code} {response.body[:200]!r}")
    return wrong


def nul_separated(text: str) -> list[str]:
    """What ``printf '%s\\0' ...`` printed, one string each."""
    assert text.endswith("\0"), text[-100:]
    return text[:-1].split("\0")


# -- args and env -----------------------------------------------------------------------------

ARGS = [
    "; rm -rf / #", "$(touch pwned)", "`touch pwned`", "$HOME", "${IFS}", "$0", "$@", "$((1/0))",
    "'", '"', "\\", "\\n", "\n", "a\nb", "\r\n", "\t", " ", "", "*", "?", "[a]", "{a,b}", "~",
    "#", "!!", "&& touch pwned", "| touch pwned", "> pwned", "< /etc/shadow", "2>&1", "-e",
    "--", "-", "--help", "%s%n%x", "ünï cödé 😀", "x" * 100_000,
]  # fmt: skip


async def test_args_with_shell_metacharacters_arrive_verbatim_in_dollar_at(
    api: Rest, launch: Launch, tmp_path: Path
) -> None:
    """Attack: args holding every shell metacharacter, command substitution, redirections,
    globs, newlines, empty strings, options and a 100 kB argument. Must hold: each arrives in
    "$@" byte for byte, in order, through the script and through an exec'd program; none is
    run or expanded (no file appears, in the sandbox or on the host); the compile stage gets
    none of them; the executor serves the next submission."""
    executor = await launch()
    marker = tmp_path / "pwned-on-the-host"
    args = [*ARGS, f"$(touch {marker})", f"; touch {marker}"]
    state = await run(api, {
        "compile": 'printf "%s" "$#"',
        "run": "printf '%s\\0' \"$#\" \"$@\"; /usr/bin/printf '%s\\0' \"$@\"; ls -A >&2",
        "args": args,
    })  # fmt: skip
    assert state["stages"]["compile"]["stdout"] == "0"
    result = state["stages"]["run"]
    assert result["status"] == "ok", result
    printed = nul_separated(result["stdout"])
    assert printed[0] == str(len(args))
    # Once from the shell's builtin, once through execve of another program.
    assert printed[1:] == args + args
    assert result["stderr"] == "", "the run made files: " + result["stderr"]
    assert not marker.exists()
    await serves_next(api, executor)


async def test_env_that_tries_to_break_out_stays_in_its_own_sandbox(
    api: Rest, launch: Launch, tmp_path: Path
) -> None:
    """Attack: env values with newlines that look like more variables (``x\\nB=injected``),
    ``=``, command substitution, and names that steer the loader and the shell (LD_PRELOAD,
    LD_LIBRARY_PATH, BASH_ENV, ENV). Must hold: each variable arrives as exactly one
    variable with its value verbatim; no other appears; LD_PRELOAD and BASH_ENV act on the
    submission's own programs only; the executor is untouched and its next submission starts
    from a clean environment."""
    executor = await launch()
    env = {
        "A": "x\nB=injected", "C": "line1\nline2\n", "D": "=", "E": "", "F": "$(touch pwned)",
        "G": "a\x01\x7f\u00e9\U0001f600", "LD_PRELOAD": "/nonexistent/evil.so",
        "LD_LIBRARY_PATH": "/nonexistent", "BASH_ENV": "./rc.sh", "ENV": "./rc.sh",
    }  # fmt: skip
    rc = {"name": "rc.sh", "content": "echo 'rc.sh ran' >&2\n"}
    state = await run(api, {"files": [rc], "env": env, "run": "env -0; ls -A >&2"})
    result = state["stages"]["run"]
    assert result["status"] == "ok", result
    seen = dict(entry.partition("=")[::2] for entry in nul_separated(result["stdout"]))
    for name, value in env.items():
        assert seen.get(name) == value, (name, seen.get(name))
    assert "B" not in seen and "line2" not in seen
    # BASH_ENV ran the submission's own file in its own shell; LD_PRELOAD reached its own
    # programs (the loader says it cannot preload the library, and runs them anyway).
    assert "rc.sh ran" in result["stderr"]
    assert "evil.so" in result["stderr"]
    assert "pwned" not in result["stderr"]  # ls -A: no file but rc.sh appeared
    environ = Path(f"/proc/{executor.proc.pid}/environ").read_bytes()
    assert b"evil.so" not in environ and b"rc.sh" not in environ
    assert "evil.so" not in executor.logs()
    await serves_next(api, executor)


BAD_ENV_NAMES = ["A=B", "=", "", "A\x00", "\x00", "1A", "A B", "A-B", "A.B", "é", "A\nB",
                 "BASH_FUNC_ls%%", "BASH_FUNC_ls()", "$A", "A;B", " A"]  # fmt: skip


async def test_env_names_and_values_that_are_no_variable_are_422(api: Rest, store: Store) -> None:
    """Attack: env names with ``=``, NUL, spaces, shell syntax, exported-function names
    (Shellshock's BASH_FUNC_x%%), the empty name, and values with NUL. Must hold: 422 with
    the error body naming env, and nothing queued."""
    cases = [({"run": "true", "env": {name: "v"}}, "env") for name in BAD_ENV_NAMES]
    cases += [({"run": "true", "env": {"A": value}}, "env") for value in ("\x00", "a\x00b")]
    cases += [({"run": "true", "env": {"A": "\ud800"}}, "env")]
    assert await refusals(api, cases) == []
    assert await store.queued() == 0


# -- limits -----------------------------------------------------------------------------------

BAD_NUMBERS: list[Any] = ["10", "unlimited", "1e3", -1, -(2**63), 2**64, 10**30, True, None, {},
                          [], [1], [1, 2, 3], ["1", "2"], [-1, 5], [5, -1], [1, [2]]]  # fmt: skip


async def test_limits_that_are_not_limits_are_422_naming_the_field(api: Rest, store: Store) -> None:
    """Attack: every limit of every stage given as a string, a negative, a float, a value
    past 64 bits or far past its maximum, a bool, null, an object or a malformed pair; and
    unknown limit names and stages. Must hold: 422 with the error body naming
    ``limits.<stage>.<name>`` (or ``limits.<stage>``), and nothing queued."""
    cases = []
    for stage in SANDBOXED_STAGES:
        for name in (*RLIMITS, *SANDBOX_LIMITS):
            # wall_time takes fractions of seconds; every other limit is a whole number.
            values = [*BAD_NUMBERS, 0.0 if name == "wall_time" else 1.5, 1e308]
            for value in values:
                body = {"run": "true", "limits": {stage: {name: value}}}
                cases.append((body, f"limits.{stage}.{name}"))
    for name in ("bogus", "__class__", "", "CPU", "cpu ", "rlimit_cpu", "cpu\x00", "nsjail"):
        cases.append(({"run": "true", "limits": {"run": {name: 1}}}, f"limits.run.{name}"))
    for value in ("5", -1, 0, True, None, 1e308, 10**30):
        cases.append(({"run": "true", "limits": {"deps": {"wall_time": value}}},
                      "limits.deps.wall_time"))  # fmt: skip
    cases.append(({"run": "true", "limits": {"deps": {"cpu": 1}}}, "limits.deps.cpu"))
    for stage in ("Run", "", "__proto__", "host", "executor"):
        cases.append(({"run": "true", "limits": {stage: {"cpu": 1}}}, f"limits.{stage}"))
    assert await refusals(api, cases) == []
    assert await store.queued() == 0


# -- dependency names -------------------------------------------------------------------------

BAD_DEPENDENCIES = [
    "gcc; rm -rf /", "(import <nixpkgs> {})", "<nixpkgs>", "../x", "./x", "/nix/store/x",
    "a b", "${builtins.readFile /etc/shadow}", "builtins.readFile /etc/shadow", "gcc\nhello",
    "gcc\x00", "", ".", "gcc.", ".gcc", "a..b", "a.b.c.d.e", "-gcc", "--option", "nixpkgs#gcc",
    '"gcc"', "gcc'", "gcc or null", "with import <nixpkgs> {}; gcc", "gcc}", "{gcc", "x" * 256,
    "x" * 100_000, "a." + "b" * 300,
]  # fmt: skip


async def test_dependency_names_that_try_to_inject_into_nix_are_422(
    api: Rest, store: Store, popen_spy: Any
) -> None:
    """Attack: dependency names that are Nix or shell syntax (``gcc; rm -rf /``,
    ``(import <nixpkgs> {})``, ``${builtins.readFile /etc/shadow}``), paths (``../x``),
    options, spaces, NUL, and very long names; in a submission and in a prefetch. Must hold:
    422 with the error body naming ``dependencies[i]`` (``names[i]``), nothing queued, and no
    nix command ever started."""
    cases = [({"run": "true", "dependencies": ["hello", name]}, "dependencies[1]")
             for name in BAD_DEPENDENCIES]  # fmt: skip
    assert await refusals(api, cases) == []
    cases = [({"names": ["hello", name]}, "names[1]") for name in BAD_DEPENDENCIES]
    assert await refusals(api, cases, "/api/v1/packages") == []
    assert await store.queued() == 0
    assert popen_spy.nix() == []


# -- file names -------------------------------------------------------------------------------


def files(*names: str) -> dict[str, Any]:
    return {"run": "true", "files": [{"name": name, "content": "x"} for name in names]}


async def test_file_names_that_escape_or_collide_are_422_and_odd_ones_arrive_verbatim(
    api: Rest, launch: Launch, store: Store
) -> None:
    """Attack: file names with ``..``, absolute paths, NUL, a component of NAME_MAX+1 bytes
    (in ASCII and in two-byte UTF-8), a path over PATH_MAX, ``.`` and empty components, a
    trailing ``/``, a name given twice, and a name that is both a file and another file's
    folder (``a`` and ``a/b``, in either order). Must hold: 422 with the error body naming
    ``files[i].name``, nothing queued; and names that are odd but legal (``-rf``, ``*``,
    ``$(id)``, newlines, NAME_MAX bytes, 100 folders deep) are written verbatim, by the
    executor, which stays up and serves the next submission."""
    executor = await launch()
    long_path = "/".join(["d" * 200] * 21)
    assert len(long_path) > PATH_MAX
    escaping = ["..", "../x", "a/../../x", "a/..", "/etc/passwd", "/", "//x", "a\x00b", "\x00",
                "x" * (NAME_MAX + 1), "é" * 128, long_path, ".", "./a", "a/.", "a/", "a//b",
                "", "a/b/"]  # fmt: skip
    cases = [(files("ok", name), "files[1].name") for name in escaping]
    cases += [
        (files("a", "a"), "files[1].name"),
        (files("a", "a/b"), "files[1].name"),
        (files("a/b", "a"), "files[0].name"),
        (files("a/b/c", "a/b"), "files[0].name"),
        (files("a/b", "a/b/c/d"), "files[1].name"),
    ]
    assert await refusals(api, cases) == []
    assert await store.queued() == 0
    odd = ["-rf", "*", "$(id)", "`id`", "a b", "new\nline", "back\\slash", "ünï", "...", "a..b",
           ".hidden", "x" * NAME_MAX, "/".join(["d"] * 100) + "/deep"]  # fmt: skip
    request = {"run": "find . -type f -printf '%P\\0'",
               "files": [{"name": name, "content": name} for name in odd]}  # fmt: skip
    result = (await run(api, request))["stages"]["run"]
    assert result["status"] == "ok", result
    assert sorted(nul_separated(result["stdout"])) == sorted(odd)
    await serves_next(api, executor)
