"""Completion and inspection (pure): magics, options, limit names, package names, and the help
text Shift-Tab shows."""

from __future__ import annotations

import pytest

from cellblock.kernel.help import MAGIC_HELP, complete, inspect_text
from cellblock.kernel.sections import LINE_MAGICS, SECTION_MAGICS, STAGE_LIMITS

PACKAGES = ["gcc", "git", "python3", "python3Packages.numpy"]


def at_end(code: str, packages: list[str] | None = None) -> tuple[list[str], int]:
    return complete(code, len(code), PACKAGES if packages is None else packages)


def test_section_magics() -> None:
    assert at_end("%%") == ([f"%%{m}" for m in SECTION_MAGICS], 0)
    assert at_end("%%f") == (["%%files"], 0)
    assert at_end("%%co") == (["%%compile"], 0)
    assert at_end("%%files a\nhello\n%%r") == (["%%run"], 16)
    assert at_end("%%nothing") == ([], 0)


def test_line_magics() -> None:
    assert at_end("%") == ([f"%{m}" for m in LINE_MAGICS], 0)
    assert at_end("%s") == (["%staged", "%status"], 0)
    assert at_end("%reset\n%p") == (["%packages"], 7)
    assert at_end("%w") == (["%workers"], 0)


def test_options_of_the_magic_on_the_line() -> None:
    assert at_end("%%files a.c --") == (["--encoding", "--executable"], 12)
    assert at_end("%%files a.c --ex") == (["--executable"], 12)
    assert at_end("%%stdin --") == (["--encoding"], 8)
    assert at_end("%%compile --s") == (["--show-output"], 10)
    assert at_end("%%run --") == (["--interactive"], 6)  # its one flag, first
    assert at_end("%%run --interactive --") == ([], 20)  # every later word is an argument
    assert at_end("%%run x --i") == ([], 8)
    assert at_end("%%bogus --") == ([], 8)


def test_options_and_their_values_of_a_test() -> None:
    assert at_end("%%test a --") == (["--points", "--compare", "--encoding", "--limits"], 9)
    assert at_end("%%test a --compare ") == (["lines", "exact", "tokens", "number:"], 19)
    assert at_end("%%test a --compare t") == (["tokens"], 19)
    assert at_end("%%test a --encoding b") == (["base64"], 20)
    assert at_end("%%files a --encoding ") == (["utf8", "hex", "base64"], 21)
    assert at_end("%%test a --points ") == ([], 18)  # a number: nothing to offer


def test_what_reset_forgets() -> None:
    assert at_end("%reset ") == (["tests"], 7)
    assert at_end("%reset t") == (["tests"], 7)
    assert at_end("%reset x") == ([], 7)


def test_package_names_on_the_deps_line_and_in_its_body() -> None:
    assert at_end("%%deps g") == (["gcc", "git"], 7)
    assert at_end("%%deps gcc py") == (["python3", "python3Packages.numpy"], 11)
    assert at_end("%%deps ") == (PACKAGES, 7)
    assert at_end("%%deps\ngcc\npython3P") == (["python3Packages.numpy"], 11)
    assert at_end("%%deps\ngcc python3P") == (["python3Packages.numpy"], 11)
    assert at_end("%%deps g", packages=[]) == ([], 7)


def test_limit_names_in_a_limits_body() -> None:
    names, start = at_end("%%limits\n")
    assert start == 9
    assert len(names) == 2 * len(STAGE_LIMITS) + 1
    assert {"run.cpu", "compile.wall_time", "deps.wall_time", "run.rttime"} <= set(names)
    assert at_end("%%limits\nrun.c") == (["run.core", "run.cpu"], 9)
    assert at_end("%%limits\nrun.cpu = 2\ncompile.wa") == (["compile.wall_time"], 21)
    assert at_end("%%limits\ndeps.") == (["deps.wall_time"], 9)
    assert at_end("%%limits\nrun.cpu = ") == ([], 19)  # a value, not a name


def test_nothing_to_complete_in_other_bodies() -> None:
    assert at_end("%%files a.txt\nhel") == ([], 14)
    assert at_end("%%run\necho hi") == ([], 11)
    assert at_end("echo hi") == ([], 5)
    assert at_end("") == ([], 0)


def test_completion_in_the_middle_of_a_cell() -> None:
    code = "%%deps gc\n%%run\n./main"
    assert complete(code, len("%%deps gc"), PACKAGES) == (["gcc"], 7)
    code = "%%limits\nrun.n\n%%run\ntrue"
    assert complete(code, len("%%limits\nrun.n"), PACKAGES) == (
        ["run.nice", "run.nofile", "run.nproc"], 9,
    )  # fmt: skip


# -- inspection --------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", SECTION_MAGICS)
def test_help_for_each_section_magic_on_its_line(magic: str) -> None:
    code = f"%%{magic} something\nbody line\n"
    text = inspect_text(code, 3)
    assert text == MAGIC_HELP[magic]
    assert text.startswith(f"%%{magic}")


@pytest.mark.parametrize("magic", LINE_MAGICS)
def test_help_for_each_line_magic(magic: str) -> None:
    assert inspect_text(f"%{magic}", 2) == MAGIC_HELP[magic]
    assert MAGIC_HELP[magic].startswith(f"%{magic}")


def test_help_for_the_section_the_cursor_is_in() -> None:
    code = "%%limits\nrun.cpu = 2\n%%run\n./main\n"
    assert inspect_text(code, code.index("cpu")) == MAGIC_HELP["limits"]
    assert "run.as = 256M" in MAGIC_HELP["limits"] and "soft:hard" in MAGIC_HELP["limits"]
    assert inspect_text(code, code.index("main")) == MAGIC_HELP["run"]
    assert inspect_text(code, len(code)) == MAGIC_HELP["run"]


def test_no_help_outside_any_magic() -> None:
    assert inspect_text("echo hi", 3) == ""
    assert inspect_text("%%bogus\nx", 3) == ""
    assert inspect_text("", 0) == ""


def test_the_help_texts_document_the_options() -> None:
    assert "--encoding utf8|hex|base64" in MAGIC_HELP["files"]
    assert "--executable" in MAGIC_HELP["files"]
    assert "--show-output" in MAGIC_HELP["compile"]
    assert "--encoding" in MAGIC_HELP["stdin"]
    for option in ("--points N", "--compare lines|exact|tokens|number:TOL", "--encoding"):
        assert option in MAGIC_HELP["test"]
    assert "%%test" in MAGIC_HELP["expect"] and "$CB_ACTUAL" in MAGIC_HELP["check"]
    assert "%reset tests" in MAGIC_HELP["reset"] and "SVG" in MAGIC_HELP["outputs"]
    assert set(MAGIC_HELP) == {*SECTION_MAGICS, *LINE_MAGICS}
