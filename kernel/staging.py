"""The staged submission: what earlier cells set up, kept across cells in a kernel session.

Pure data. Files, tests and environment variables merge by name (a test keeps the place it was
first staged in), limits by ``stage.limit``; a ``%%deps``, ``%%compile``, ``%%stdin``,
``%%check`` or ``%%outputs`` section replaces what was staged before. A ``%%run`` section (or
a plain cell) turns everything staged plus the cell's own sections into a submission request;
the run script and its arguments belong to that cell alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cellblock.kernel.render import points_text
from cellblock.kernel.sections import (
    Cell,
    CellSyntaxError,
    Section,
    deps_names,
    encoded_body,
    env_variables,
    limit_settings,
    output_patterns,
    per_test_limits,
    points_value,
)


@dataclass(frozen=True)
class StagedFile:
    content: str
    encoding: str = "utf8"
    executable: bool = False


@dataclass(frozen=True)
class StagedTest:
    """One ``%%test`` (and its ``%%expect``): the run script's stdin and args for this test."""

    __test__ = False  # not a test case, whatever pytest guesses from the name
    stdin: str = ""
    stdin_encoding: str = "utf8"
    args: tuple[str, ...] = ()
    expected_output: str | None = None
    compare: str = "lines"
    points: float = 1.0
    #: This test's own run-stage limits (``--limits``), over the staged ``run`` ones.
    limits: dict[str, Any] = field(default_factory=dict)

    def spec(self, name: str) -> dict[str, Any]:
        """The test as the request's ``tests`` carries it; no ``expected_output`` when the test
        has none (it then passes when the run succeeds)."""
        spec: dict[str, Any] = {
            "name": name,
            "stdin": self.stdin,
            "stdin_encoding": self.stdin_encoding,
            "args": list(self.args),
            "compare": self.compare,
            "points": self.points,
        }
        if self.limits:
            spec["limits"] = dict(self.limits)
        if self.expected_output is not None:
            spec["expected_output"] = self.expected_output
        return spec


@dataclass(frozen=True)
class Staged:
    files: dict[str, StagedFile] = field(default_factory=dict)
    dependencies: tuple[str, ...] = ()
    compile: str | None = None
    show_compile_output: bool = False
    stdin: str = ""
    stdin_encoding: str = "utf8"
    env: dict[str, str] = field(default_factory=dict)
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)
    tests: dict[str, StagedTest] = field(default_factory=dict)
    checker: str | None = None
    outputs: tuple[str, ...] = ()

    def reset(self, what: tuple[str, ...] = ()) -> Staged:
        """What ``%reset`` leaves (nothing), or ``%reset tests``: everything but the tests and
        the checker, which judges only them (a checker left over would judge the next
        exercise's tests)."""
        return replace(self, tests={}, checker=None) if what else Staged()

    def summary(self) -> str:
        """One line: what is staged now."""
        parts = []
        if self.files:
            parts.append(f"{len(self.files)} file(s): {', '.join(sorted(self.files))}")
        if self.dependencies:
            parts.append(f"deps: {' '.join(self.dependencies)}")
        if self.compile is not None:
            parts.append("a compile script")
        if self.stdin:
            parts.append(f"stdin ({len(self.stdin)} chars)")
        if self.env:
            parts.append(f"env: {', '.join(sorted(self.env))}")
        for stage, limits in sorted(self.limits.items()):
            parts.append(
                f"{stage} limits: " + ", ".join(f"{k}={v}" for k, v in sorted(limits.items()))
            )
        if self.tests:
            points = points_text(sum(t.points for t in self.tests.values()))
            parts.append(f"{len(self.tests)} test(s), {points} pt: {', '.join(self.tests)}")
        if self.checker is not None:
            parts.append("a checker")
        if self.outputs:
            parts.append(f"outputs: {' '.join(self.outputs)}")
        return "; ".join(parts) if parts else "nothing"


def stage(staged: Staged, cell: Cell) -> Staged:
    """``staged`` with the cell's sections applied (its ``%%run`` section aside)."""
    for k, section in enumerate(cell.sections):
        if section.magic == "test":
            after = cell.sections[k + 1 : k + 2]  # its %%expect, if any (the parser checked)
            expected = after[0].body if after and after[0].magic == "expect" else None
            staged = replace(
                staged, tests={**staged.tests, section.args[0]: _test(section, expected)}
            )
        else:
            staged = _apply(staged, section)
    return staged


def _test(section: Section, expected: str | None) -> StagedTest:
    stdin, encoding = encoded_body(section)
    points = section.options.get("--points")
    limits = section.options.get("--limits")
    return StagedTest(
        stdin=stdin,
        stdin_encoding=encoding,
        args=section.args[1:],
        expected_output=expected,
        compare=str(section.options.get("--compare", "lines")),
        points=1.0 if points is None else points_value(section.line, section.text, str(points)),
        limits={} if limits is None else per_test_limits(str(limits)),
    )


def _apply(staged: Staged, section: Section) -> Staged:
    magic = section.magic
    if magic == "files":
        content, encoding = encoded_body(section)
        staged_file = StagedFile(content, encoding, bool(section.options.get("--executable")))
        return replace(staged, files={**staged.files, section.args[0]: staged_file})
    if magic == "deps":
        return replace(staged, dependencies=tuple(deps_names(section)))
    if magic == "compile":
        script = section.body if section.body.strip() else None
        show = bool(section.options.get("--show-output"))
        return replace(staged, compile=script, show_compile_output=show)
    if magic == "stdin":
        content, encoding = encoded_body(section)
        return replace(staged, stdin=content, stdin_encoding=encoding)
    if magic == "env":
        return replace(staged, env={**staged.env, **env_variables(section)})
    if magic == "limits":
        limits = {stage: dict(values) for stage, values in staged.limits.items()}
        for setting in limit_settings(section):
            limits.setdefault(setting.stage, {})[setting.name] = setting.value
        return replace(staged, limits=limits)
    if magic == "check":
        return replace(staged, checker=section.body if section.body.strip() else None)
    if magic == "outputs":
        return replace(staged, outputs=tuple(output_patterns(section)))
    return staged  # %%run: not staged; %%expect: staged with its %%test


def request(staged: Staged, cell: Cell, stdin_allowed: bool = False) -> dict[str, Any] | None:
    """The submission request the cell sends, or None when it only stages. A ``%%run
    --interactive`` cell asks for interactive stdin on a terminal when the frontend can take
    input (``stdin_allowed``); otherwise (nbclient, papermill) it runs on the staged stdin."""
    args: tuple[str, ...] = ()
    if cell.plain_run is not None:
        script = cell.plain_run
    elif (run := cell.run) is not None:
        script, args = run.body, run.args
        if not script.strip():
            raise CellSyntaxError(run.line, run.text, "%%run needs a body: the command that runs")
        if args and staged.tests:
            # With tests the service runs the script with each test's args, never these.
            message = "with tests staged, each %%test line gives its own arguments, not %%run"
            raise CellSyntaxError(run.line, run.text, message + " (or %reset tests)")
        if cell.interactive and staged.tests:
            # A teacher's tests run on their own stdin, a person's typing would grade nothing:
            # say so rather than silently run the tests (or play and leave them unrun).
            message = (
                "--interactive runs the program once with its input typed in, and tests are "
                "staged (each runs on its own stdin): drop --interactive to run the tests, or "
                "%reset tests to play"
            )
            raise CellSyntaxError(run.line, run.text, message)
    else:
        return None
    body: dict[str, Any] = {
        "files": [
            {"name": name, "content": f.content, "encoding": f.encoding, "executable": f.executable}
            for name, f in sorted(staged.files.items())
        ],
        "dependencies": list(staged.dependencies),
        "run": script,
        "args": list(args),
        "env": dict(staged.env),
        "stdin": staged.stdin,
        "stdin_encoding": staged.stdin_encoding,
        "limits": {stage: dict(values) for stage, values in staged.limits.items()},
    }
    if cell.interactive and stdin_allowed:
        del body["stdin"], body["stdin_encoding"]  # it comes as the program runs
        body.update(stdin_mode="interactive", tty=True)
    if staged.compile is not None:
        body["compile"] = staged.compile
    if staged.tests:
        body["tests"] = [test.spec(name) for name, test in staged.tests.items()]
    if staged.checker is not None:
        body["checker"] = staged.checker
    if staged.outputs:
        body["outputs"] = list(staged.outputs)
    return body
