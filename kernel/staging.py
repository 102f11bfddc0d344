"""The staged submission: what earlier cells set up, kept across cells in a kernel session.

Pure data. Files and environment variables merge by name, limits by ``stage.limit``; a
``%%deps``, ``%%compile`` or ``%%stdin`` section replaces what was staged before. A ``%%run``
section (or a plain cell) turns everything staged plus the cell's own sections into a
submission request; the run script and its arguments belong to that cell alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cellblock.kernel.sections import (
    Cell,
    CellSyntaxError,
    Section,
    deps_names,
    encoded_body,
    env_variables,
    limit_settings,
)


@dataclass(frozen=True)
class StagedFile:
    content: str
    encoding: str = "utf8"
    executable: bool = False


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
        return "; ".join(parts) if parts else "nothing"


def stage(staged: Staged, cell: Cell) -> Staged:
    """``staged`` with the cell's sections applied (its ``%%run`` section aside)."""
    for section in cell.sections:
        staged = _apply(staged, section)
    return staged


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
    return staged  # %%run: not staged


def request(staged: Staged, cell: Cell) -> dict[str, Any] | None:
    """The submission request the cell sends, or None when it only stages."""
    args: tuple[str, ...] = ()
    if cell.plain_run is not None:
        script = cell.plain_run
    elif (run := cell.run) is not None:
        script, args = run.body, run.args
        if not script.strip():
            raise CellSyntaxError(run.line, run.text, "%%run needs a body: the command that runs")
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
    if staged.compile is not None:
        body["compile"] = staged.compile
    return body
