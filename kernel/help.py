"""Completion and inspection (Shift-Tab) for the notebook syntax. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

from cellblock.kernel.sections import (
    ENCODINGS,
    LINE_MAGICS,
    OPTIONS,
    RESET_WHAT,
    SECTION_MAGICS,
    STAGE_LIMITS,
)
from cellblock.service.protocol import DEPS_LIMITS, SANDBOXED_STAGES

#: Values an option takes, for completion (``number:`` then wants its tolerance).
OPTION_VALUES = {"--compare": ("lines", "exact", "tokens", "number:"), "--encoding": ENCODINGS}

MAGIC_HELP = {
    "files": "%%files NAME [--encoding utf8|hex|base64] [--executable]\n"
    "The body is the content of file NAME in the working directory (whitespace kept exactly).",
    "deps": "%%deps [NAME ...]\nNix packages the compile and run stages need: names on the magic "
    "line and/or in the body. Replaces the staged dependencies.",
    "compile": "%%compile [--show-output]\nThe body is the compile script (bash). Its output is "
    "shown when it fails, or always with --show-output.",
    "run": "%%run [--interactive] [ARG ...]\nThe body is the run script (bash); the words after "
    '%%run are its arguments ("$@"). This section submits everything staged plus the cell\'s '
    "sections. --interactive (first word only) runs it on a terminal: when the program waits "
    "for input, an input box asks for it, and what is typed goes to the program. Where the "
    "notebook takes no input (nbclient, papermill), it runs on the staged %%stdin instead. Not "
    "with tests staged: they run on their own stdin.",
    "stdin": "%%stdin [--encoding utf8|hex|base64]\nThe body is the run stage's standard input.",
    "env": "%%env\nBody lines NAME=value: environment variables of compile and run.",
    "limits": "%%limits\nBody lines stage.limit = value, e.g. run.cpu = 2, run.as = 256M, "
    "compile.wall_time = 20s, run.nproc = 16:32 (soft:hard). Sizes take K, M, G; times ms, s, m.",
    "test": "%%test NAME [ARG ...] [--points N] [--compare lines|exact|tokens|number:TOL] "
    "[--encoding utf8|hex|base64] [--limits NAME=VALUE,...]\nA test: the body is its stdin "
    "(no body: an empty stdin), the "
    "words after NAME its arguments (after --, even those that look like options). The run "
    "script runs once per staged test, after one compile. --points: what passing earns "
    "(default 1); --compare: how its output is compared with %%expect (default lines: "
    "trailing whitespace ignored); --limits: this test's own run limits, over the run stage's, "
    "as %%limits writes them (cpu=1,wall_time=500ms,as=256M). A test with an existing NAME "
    "replaces it.",
    "expect": "%%expect\nThe expected output of the %%test right above it in the same cell, "
    "whitespace kept. Without it a test passes when the run succeeds (and the checker accepts).",
    "check": "%%check\nThe body is the checker script (bash), run in the sandbox after each "
    "test with $CB_INPUT, $CB_EXPECTED and $CB_ACTUAL (files); exit 0 accepts, its output "
    "is the test's message. An empty body removes it.",
    "outputs": "%%outputs PATTERN ...\nFiles to bring back after the run (or after each test): "
    "paths or globs relative to the working directory, on the line or in the body. Images "
    "(PNG, JPEG, GIF, SVG) are shown as images, text files as text, others named with their "
    "size. Replaces the staged patterns.",
    "reset": "%reset [tests]\nForget everything staged; %reset tests forgets only the tests "
    "(and the checker, which judges them).",
    "staged": "%staged\nShow what is staged.",
    "packages": "%packages\nList the packages the shared cache holds.",
    "workers": "%workers\nList the live executors and cache builders (with an admin token); "
    "with a client token, their counts, the executors' slots, busy slots and the queue.",
    "status": "%status [ID]\nThe status of a submission (the last one by default).",
}


def _word_at(code: str, cursor_pos: int) -> tuple[str, int, str]:
    """The word before the cursor, where it starts, and the cursor's line up to it."""
    line_start = code.rfind("\n", 0, cursor_pos) + 1
    line = code[line_start:cursor_pos]
    start = cursor_pos
    while start > line_start and not code[start - 1].isspace():
        start -= 1
    return code[start:cursor_pos], start, line


def _section_of(code: str, cursor_pos: int) -> str | None:
    """The magic of the section the cursor is in, if any."""
    before = code[:cursor_pos]
    for line in reversed(
        before.splitlines()[:-1] if not before.endswith("\n") else before.splitlines()
    ):
        if line.startswith("%%"):
            words = line[2:].split()
            return words[0] if words else None
    return None


def complete(code: str, cursor_pos: int, packages: Sequence[str]) -> tuple[list[str], int]:
    """Completions for the word at the cursor and where it starts."""
    word, start, line = _word_at(code, cursor_pos)
    if line == word and word.startswith("%%"):
        return [f"%%{m}" for m in SECTION_MAGICS if f"%%{m}".startswith(word)], start
    if line == word and word.startswith("%"):
        return [f"%{m}" for m in LINE_MAGICS if f"%{m}".startswith(word)], start
    if line.split()[:1] == ["%reset"]:
        return [w for w in RESET_WHAT if w.startswith(word)], start
    if line.startswith("%%"):
        magic = line[2:].split()[0] if line[2:].split() else ""
        before = line[: len(line) - len(word)].split()
        if before and before[-1] in OPTION_VALUES and before[-1] in OPTIONS.get(magic, {}):
            return [v for v in OPTION_VALUES[before[-1]] if v.startswith(word)], start
        if magic == "run" and word.startswith("-"):
            # Only the first word can be the flag: every later one is the program's.
            first = before == ["%%run"] and "--interactive".startswith(word)
            return (["--interactive"] if first else []), start
        if word.startswith("-"):
            return [o for o in OPTIONS.get(magic, {}) if o.startswith(word)], start
        if magic == "deps":
            return [p for p in packages if p.startswith(word)], start
        return [], start
    section = _section_of(code, cursor_pos)
    if section == "limits" and line == word:
        names = [f"{stage}.{name}" for stage in SANDBOXED_STAGES for name in STAGE_LIMITS]
        names += [f"deps.{name}" for name in DEPS_LIMITS]
        return [n for n in names if n.startswith(word)], start
    if section == "deps":
        return [p for p in packages if p.startswith(word)], start
    return [], start


def inspect_text(code: str, cursor_pos: int) -> str:
    """Help for the magic on the cursor's line, or of the section the cursor is in."""
    line_start = code.rfind("\n", 0, cursor_pos) + 1
    line_end = code.find("\n", cursor_pos)
    line = code[line_start : line_end if line_end >= 0 else len(code)]
    name = (
        line.lstrip("%").split()[0] if line.startswith("%") and line.lstrip("%").split() else None
    )
    name = name or _section_of(code, cursor_pos)
    return MAGIC_HELP.get(name or "", "")
