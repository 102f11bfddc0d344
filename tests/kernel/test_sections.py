"""The notebook syntax (shared/NOTEBOOK.md) as the pure parser reads it: every section and
option, file bodies kept exactly, limits with their units, line magics, plain cells, and every
error naming the line it came from."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellblock.kernel import staging
from cellblock.kernel.sections import (
    LINE_MAGICS,
    SECTION_MAGICS,
    STAGE_LIMITS,
    Cell,
    CellSyntaxError,
    LimitSetting,
    Section,
    deps_names,
    encoded_body,
    env_variables,
    limit_settings,
    output_patterns,
    parse,
)
from cellblock.kernel.staging import Staged

KiB, MiB, GiB = 1024, 1024**2, 1024**3


def only(code: str) -> Section:
    """The one section of a cell."""
    cell = parse(code)
    assert len(cell.sections) == 1, cell
    return cell.sections[0]


def syntax_error(code: str) -> CellSyntaxError:
    """The error the cell is refused with, by the parser or when it is staged."""
    with pytest.raises(CellSyntaxError) as info:
        cell = parse(code)
        staging.request(staging.stage(Staged(), cell), cell)
    return info.value


def assert_error(code: str, line: int, *words: str) -> CellSyntaxError:
    """The cell is refused at ``line`` (1-based), the message naming ``words``; the error's
    text is that line of the cell."""
    exc = syntax_error(code)
    assert exc.line == line, exc
    assert exc.text == code.split("\n")[line - 1].removesuffix("\r")
    assert str(exc).startswith(f"line {line}: ")
    assert exc.text in str(exc)
    for word in words:
        assert word in exc.message, exc.message
    return exc


# -- sections ----------------------------------------------------------------------------------


def test_a_cell_splits_into_sections_at_every_double_percent_line() -> None:
    code = (
        "%%files main.c\nint main(void) { return 0; }\n"
        "%%deps gcc\n"
        "%%compile\ngcc -o main main.c\n"
        "%%stdin\n3 4\n"
        "%%env\nGREETING=hello\n"
        "%%limits\nrun.cpu = 2\n"
        '%%run --fast\n./main "$@"\n'
    )
    cell = parse(code)
    assert [s.magic for s in cell.sections] == [
        "files", "deps", "compile", "stdin", "env", "limits", "run",
    ]  # fmt: skip
    assert [s.line for s in cell.sections] == [1, 3, 4, 6, 8, 10, 12]
    assert [s.text for s in cell.sections] == [
        "%%files main.c", "%%deps gcc", "%%compile", "%%stdin", "%%env", "%%limits",
        "%%run --fast",
    ]  # fmt: skip
    assert cell.sections[0].body == "int main(void) { return 0; }\n"
    assert cell.sections[1].body == ""
    assert cell.sections[2].body == "gcc -o main main.c\n"
    assert cell.run is cell.sections[-1]
    assert cell.run.body == './main "$@"\n'
    assert cell.magics == () and cell.plain_run is None


def test_every_section_magic_of_the_contract_is_known() -> None:
    assert set(SECTION_MAGICS) == {
        "files", "deps", "compile", "run", "stdin", "env", "limits",
        "test", "expect", "check", "outputs",  # v1.1
    }  # fmt: skip
    assert set(LINE_MAGICS) == {"reset", "staged", "packages", "workers", "status"}


def test_a_cell_without_a_run_section_has_no_run() -> None:
    assert parse("%%files a.txt\nhello\n").run is None


# -- %%files -----------------------------------------------------------------------------------

BODIES = [
    pytest.param("hello\n", id="trailing-newline"),
    pytest.param("hello", id="no-trailing-newline"),
    pytest.param("", id="empty"),
    pytest.param("\n", id="one-newline"),
    pytest.param("\n\n\n", id="only-newlines"),
    pytest.param("    four spaces\n  two\n", id="leading-spaces"),
    pytest.param("first\n\n\nafter blank lines\n\n", id="blank-lines"),
    pytest.param("\tindented\n\t\tdeeper\t\n", id="tabs"),
    pytest.param("trailing spaces   \n   ", id="trailing-spaces"),
    pytest.param("dos\r\nline ends\r\n", id="crlf"),
    pytest.param("page one\n\x0cpage two\n", id="form-feed"),
    pytest.param("a\x0b%%b\x1c%%c\x85%%d\u2028%%e\u2029%%f\n", id="unicode-line-separators"),
    pytest.param("50% of %d\n 100%% done\n%reset\n%status\n", id="percent-signs"),
    pytest.param("Grüße, 世界 🎉\n", id="unicode"),
]


@pytest.mark.parametrize("body", BODIES)
def test_a_file_body_at_the_end_of_the_cell_is_kept_exactly(body: str) -> None:
    section = only(f"%%files notes.txt\n{body}")
    assert section.magic == "files"
    assert section.args == ("notes.txt",)
    assert section.body == body


@pytest.mark.parametrize("body", BODIES)
def test_a_file_body_before_another_section_ends_at_the_newline_before_it(body: str) -> None:
    # The newline that ends the last body line belongs to the body: the next %% line starts
    # after it.
    cell = parse(f"%%files notes.txt\n{body}\n%%run\ncat notes.txt")
    assert cell.sections[0].body == body + "\n"
    assert cell.run is not None and cell.run.body == "cat notes.txt"


def test_files_options() -> None:
    assert only("%%files a.bin --encoding hex\n00ff").options == {"--encoding": "hex"}
    assert only("%%files a.bin --encoding=base64\nAAE=").options == {"--encoding": "base64"}
    assert only("%%files --encoding utf8 a.txt\nx").options == {"--encoding": "utf8"}
    section = only("%%files run.sh --executable --encoding base64\nZWNobyBoaQo=\n")
    assert section.args == ("run.sh",)
    assert section.options == {"--executable": True, "--encoding": "base64"}
    assert only("%%files a.txt\nx").options == {}


def test_files_names_may_be_quoted_and_in_folders() -> None:
    assert only('%%files "my notes.txt"\nx').args == ("my notes.txt",)
    assert only("%%files 'it''s.txt'\nx").args == ("its.txt",)
    assert only("%%files src/lib/util.c\nx").args == ("src/lib/util.c",)


@pytest.mark.parametrize(
    ("magic_line", "words"),
    [
        ("%%files", ["one file name"]),
        ("%%files a.txt b.txt", ["one file name"]),
        ("%%files --executable", ["one file name"]),
        ("%%files a.txt --mode 0755", ["no option --mode", "--encoding", "--executable"]),
        ("%%files a.txt --encoding", ["--encoding needs a value"]),
        ("%%files a.txt --executable=yes", ["--executable takes no value"]),
        ("%%files a.txt --encoding latin1", ["unknown encoding 'latin1'", "utf8, hex, base64"]),
        ("%%files a.txt --encoding=", ["unknown encoding ''"]),
        ("%%files 'a.txt", ["cannot split", "quotation"]),
    ],
)
def test_files_errors_name_the_magic_line(magic_line: str, words: list[str]) -> None:
    assert_error(f"%%run\necho\n%%files ok.txt\nfine\n{magic_line}\nbody\n", 5, *words)


@pytest.mark.parametrize(
    ("code", "content"),
    [
        ("%%files a.txt --encoding utf8\n  text \n\n", "  text \n\n"),
        ("%%files a.bin --encoding hex\n00 ff\n10\t20\n\n%%run\ntrue", "00ff1020"),
        ("%%files a.bin --encoding base64\nAAEC\nAwQF\r\nBg==\n%%run\ntrue", "AAECAwQFBg=="),
        ("%%files a.bin --encoding base64\n", ""),
        ("%%stdin --encoding hex\n 0a 0b\n", "0a0b"),
        ("%%stdin --encoding base64\nMyA0Cg==\n\n", "MyA0Cg=="),
    ],
)
def test_hex_and_base64_bodies_lose_their_whitespace(code: str, content: str) -> None:
    # Whitespace is no part of the bytes such a body encodes; the service's base64 decoder
    # refuses it, and the newline before the next section is always there.
    assert encoded_body(parse(code).sections[0])[0] == content


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("%%files a.bin --encoding hex\n0g\n", ["is not valid hex"]),
        ("%%files a.bin --encoding hex\nabc\n", ["is not valid hex"]),
        ("%%files a.bin --encoding base64\nAAE\n", ["is not valid base64"]),
        ("%%stdin --encoding base64\n!!!!\n", ["is not valid base64"]),
    ],
)
def test_a_body_that_does_not_decode_names_its_magic_line(code: str, words: list[str]) -> None:
    assert_error(f"%%run\ncat\n{code}", 3, *words)


# -- %%deps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "names"),
    [
        ("%%deps gcc python3\n", ["gcc", "python3"]),
        ("%%deps\ngcc\npython3\n", ["gcc", "python3"]),
        ("%%deps\ngcc python3Packages.numpy\n\n  nodejs  \n",
         ["gcc", "python3Packages.numpy", "nodejs"]),
        ("%%deps gcc\npython3\tnodejs", ["gcc", "python3", "nodejs"]),
        ("%%deps", []),
        ("%%deps\n\n   \n", []),
        ("%%deps gcc-unwrapped python3Packages.scikit-learn",
         ["gcc-unwrapped", "python3Packages.scikit-learn"]),
    ],
)  # fmt: skip
def test_deps_names_on_the_line_and_in_the_body(code: str, names: list[str]) -> None:
    assert deps_names(only(code)) == names


def test_a_bad_dependency_name_on_the_magic_line_names_that_line() -> None:
    assert_error(
        "%%files a\nx\n%%deps gcc 'rm -rf /'\n%%run\ntrue", 3, "'rm -rf /'", "package name"
    )


@pytest.mark.parametrize("bad", ["/nix/store/abc-gcc", "1gcc", "gcc.", "a;b", "$(reboot)"])
def test_a_bad_dependency_name_in_the_body_names_its_own_line(bad: str) -> None:
    assert_error(f"%%deps gcc\npython3\nnodejs {bad}\n%%run\ntrue", 3, repr(bad), "package name")


def test_deps_take_no_options() -> None:
    assert_error("%%deps --pure gcc\n", 1, "%%deps has no option --pure", "none")


# -- %%compile ---------------------------------------------------------------------------------


def test_compile_body_and_show_output() -> None:
    section = only("%%compile\ngcc -O2 -o main main.c\n")
    assert section.body == "gcc -O2 -o main main.c\n" and section.options == {}
    assert only("%%compile --show-output\nmake\n").options == {"--show-output": True}


@pytest.mark.parametrize("magic", ["compile", "stdin", "env", "limits"])
def test_body_only_sections_take_no_arguments(magic: str) -> None:
    assert_error(f"%%files a\nx\n%%{magic} extra\nbody", 3, f"%%{magic} takes no arguments")


@pytest.mark.parametrize(
    ("magic", "option"), [("compile", "--quiet"), ("env", "--file"), ("limits", "--strict")]
)
def test_unknown_options_are_refused(magic: str, option: str) -> None:
    assert_error(f"%%{magic} {option}\nbody", 1, f"%%{magic} has no option {option}")


# -- %%run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "args"),
    [
        ("%%run", ()),
        ("%%run a b c", ("a", "b", "c")),
        ('%%run --fast "x y"', ("--fast", "x y")),
        ("%%run 'single quoted' \"double quoted\" back\\ slash",
         ("single quoted", "double quoted", "back slash")),
        ("%%run '$HOME' \"$(date)\" '*'", ("$HOME", "$(date)", "*")),
        ("%%run --encoding hex --executable", ("--encoding", "hex", "--executable")),
        ("%%run ''", ("",)),
        ("%%run   spaced    out  ", ("spaced", "out")),
    ],
)  # fmt: skip
def test_run_args_are_shell_quoted_words(line: str, args: tuple[str, ...]) -> None:
    section = only(f'{line}\n./main "$@"\n')
    assert section.args == args
    assert section.options == {}  # every word after %%run is an argument
    assert section.body == './main "$@"\n'


def test_run_with_an_unterminated_quote_names_its_line() -> None:
    assert_error("%%files a\nx\n%%run 'oops\ntrue", 3, "cannot split the arguments")


def test_two_run_sections_name_the_second() -> None:
    assert_error("%%run\necho 1\n%%files a\nx\n%%run\necho 2\n", 5, "one %%run section")


def test_a_run_section_without_a_body_is_refused() -> None:
    assert_error("%%files a\nx\n%%run\n   \n", 3, "%%run needs a body")


# -- %%stdin -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "options"),
    [
        ("%%stdin", {}),
        ("%%stdin --encoding utf8", {"--encoding": "utf8"}),
        ("%%stdin --encoding hex", {"--encoding": "hex"}),
        ("%%stdin --encoding=base64", {"--encoding": "base64"}),
    ],
)
def test_stdin_encodings(line: str, options: dict[str, str]) -> None:
    section = only(f"{line}\n  3 4\n\n5\t6")
    assert section.options == options
    assert section.body == "  3 4\n\n5\t6"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("%%stdin --encoding utf16", ["unknown encoding 'utf16'"]),
        ("%%stdin --encoding", ["--encoding needs a value"]),
        ("%%stdin --executable", ["%%stdin has no option --executable", "--encoding"]),
    ],
)
def test_stdin_errors(line: str, words: list[str]) -> None:
    assert_error(f"%%run\ncat\n{line}\nabc\n", 3, *words)


# -- %%env -------------------------------------------------------------------------------------


def test_env_lines() -> None:
    section = only(
        "%%env\nGREETING=hello world\n\n# a comment\nEMPTY=\nEQUATION=a=b+c\n_UNDER_1=x\n"
        "  INDENTED=yes\n"
    )
    assert env_variables(section) == {
        "GREETING": "hello world", "EMPTY": "", "EQUATION": "a=b+c", "_UNDER_1": "x",
        "INDENTED": "yes",
    }  # fmt: skip


def test_env_keeps_the_value_exactly_but_not_a_crlf_line_end() -> None:
    assert env_variables(only("%%env\nA=  padded \t\r\nB=x\r\n")) == {"A": "  padded \t", "B": "x"}


@pytest.mark.parametrize("bad", ["NOVALUE", "1ABC=x", "MY-VAR=x", "A B=x", "=x", "ÄRGER=x"])
def test_a_bad_env_line_names_its_line(bad: str) -> None:
    assert_error(f"%%files a\nx\n%%env\nGOOD=1\n\n{bad}\n", 6, "NAME=value")


# -- %%limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "setting"),
    [
        # counts and seconds without a unit
        ("run.cpu = 2", ("run", "cpu", 2)),
        ("run.cpu=2", ("run", "cpu", 2)),
        ("  run.cpu   =   2  ", ("run", "cpu", 2)),
        ("run.nproc = 16", ("run", "nproc", 16)),
        ("run.nofile = 64", ("run", "nofile", 64)),
        ("run.pids = 32", ("run", "pids", 32)),
        ("compile.core = 0", ("compile", "core", 0)),
        # sizes: bytes, K, M, G as powers of 1024, either case
        ("run.as = 1000", ("run", "as", 1000)),
        ("run.as = 256M", ("run", "as", 256 * MiB)),
        ("run.as = 256 M", ("run", "as", 256 * MiB)),
        ("run.as = 256m", ("run", "as", 256 * MiB)),
        ("run.fsize = 1K", ("run", "fsize", KiB)),
        ("run.stack = 8k", ("run", "stack", 8 * KiB)),
        ("run.memory = 1G", ("run", "memory", GiB)),
        ("run.memory = 1.5G", ("run", "memory", 3 * GiB // 2)),
        ("run.output = 64K", ("run", "output", 64 * KiB)),
        ("compile.data = 2g", ("compile", "data", 2 * GiB)),
        ("run.memlock = 0.5K", ("run", "memlock", 512)),
        ("run.as = 9007199254740993", ("run", "as", 2**53 + 1)),  # exact: no float rounding
        # cpu: whole seconds; ms, s, m
        ("run.cpu = 2s", ("run", "cpu", 2)),
        ("run.cpu = 2000ms", ("run", "cpu", 2)),
        ("run.cpu = 1m", ("run", "cpu", 60)),
        ("run.cpu = 0.5m", ("run", "cpu", 30)),
        # wall_time: fractional seconds
        ("compile.wall_time = 20s", ("compile", "wall_time", 20.0)),
        ("run.wall_time = 1.5", ("run", "wall_time", 1.5)),
        ("run.wall_time = 250ms", ("run", "wall_time", 0.25)),
        ("run.wall_time = 1500ms", ("run", "wall_time", 1.5)),
        ("run.wall_time = 2m", ("run", "wall_time", 120.0)),
        ("deps.wall_time = 10m", ("deps", "wall_time", 600.0)),
        # rttime: microseconds, as RLIMIT_RTTIME counts them
        ("run.rttime = 250", ("run", "rttime", 250)),
        ("run.rttime = 1s", ("run", "rttime", 1_000_000)),
        ("run.rttime = 500ms", ("run", "rttime", 500_000)),
        ("run.rttime = 1m", ("run", "rttime", 60_000_000)),
        # soft:hard
        ("run.nproc = 16:32", ("run", "nproc", [16, 32])),
        ("run.nproc = 16 : 32", ("run", "nproc", [16, 32])),
        ("run.as = 1M:2M", ("run", "as", [MiB, 2 * MiB])),
        ("run.cpu = 1:3s", ("run", "cpu", [1, 3])),
        ("run.stack = 8K:8K", ("run", "stack", [8 * KiB, 8 * KiB])),
    ],
)
def test_limit_values(line: str, setting: tuple[str, str, object]) -> None:
    [result] = limit_settings(only(f"%%limits\n{line}\n"))
    assert result == LimitSetting(*setting)
    assert type(result.value) is type(setting[2])  # an int stays an int, a float a float


def test_every_limit_of_the_protocol_can_be_set_for_compile_and_run() -> None:
    assert set(STAGE_LIMITS) == {
        "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
        "nproc", "rss", "rtprio", "rttime", "sigpending", "stack", "wall_time", "memory", "pids",
        "output", "disk",
    }  # fmt: skip
    body = "".join(f"{stage}.{name} = 1\n" for stage in ("compile", "run") for name in STAGE_LIMITS)
    settings = limit_settings(only(f"%%limits\n{body}"))
    assert [(s.stage, s.name) for s in settings] == [
        (stage, name) for stage in ("compile", "run") for name in STAGE_LIMITS
    ]


def test_limits_skip_blank_lines_and_comments() -> None:
    settings = limit_settings(only("%%limits\n\n# the defaults are fine\nrun.cpu = 2\n   \n"))
    assert settings == [LimitSetting("run", "cpu", 2)]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("run.cpu 2", ["write stage.limit = value"]),
        ("cpu = 2", ["write stage.limit = value"]),
        ("run.cpu =", ["run.cpu", "'' is not a number"]),
        ("run.cpu =   ", ["run.cpu", "is not a number"]),
        ("build.cpu = 2", ["unknown stage 'build'", "compile, run or deps"]),
        ("run.speed = 2", ["unknown limit run.speed", "wall_time"]),
        ("run.CPU = 2", ["unknown limit run.CPU"]),
        ("run.cpu.soft = 2", ["unknown limit run.cpu.soft"]),
        ("deps.cpu = 2", ["unknown limit deps.cpu", "known: wall_time"]),
        ("run.cpu = two", ["'two' is not a number"]),
        ("run.cpu = -1", ["'-1' is not a number"]),
        ("run.cpu = 1e3", ["'1e3' is not a number"]),
        ("run.cpu = .5", ["'.5' is not a number"]),
        ("run.cpu = 2h", ["unknown time unit 'h'", "ms, s or m"]),
        ("run.wall_time = 5sec", ["unknown time unit 'sec'"]),
        ("run.as = 2X", ["unknown size unit 'X'", "K, M or G"]),
        ("run.as = 2MB", ["unknown size unit 'MB'"]),
        ("run.as = 2s", ["unknown size unit 's'"]),
        ("run.nproc = 2K", ["nproc is a count and takes no unit"]),
        ("run.cpu = 1500ms", ["cpu takes a whole number, not 1.5"]),
        ("run.nproc = 1.5", ["nproc takes a whole number"]),
        ("run.as = 0.3K", ["as takes a whole number"]),
        ("run.rttime = 1.5", ["rttime takes a whole number"]),
        ("run.wall_time = 1:2", ["wall_time takes one value, not soft:hard"]),
        ("run.memory = 1G:2G", ["memory takes one value"]),
        ("run.nproc = 1:2:3", ["takes one value"]),
        ("run.nproc = 32:16", ["soft limit 32 is above the hard limit 16"]),
        ("run.nproc = 16:", ["'' is not a number"]),
        ("run.nproc = 99999999999999999999", ["larger than any limit"]),
        ("run.wall_time = 99999999999999999999", ["larger than any limit"]),
        ("run.nproc = " + "9" * 400, ["larger than any limit"]),
        ("run.cpu = \u0663", ["is not a number"]),  # an Arabic-Indic digit three
    ],
)
def test_bad_limits_name_their_line(line: str, words: list[str]) -> None:
    assert_error(f"%%files a\nx\n%%limits\nrun.cpu = 1\n\n{line}\n%%run\ntrue", 6, *words)


# -- %%test, %%expect, %%check, %%outputs (v1.1) ----------------------------------------------


def test_a_test_section_takes_a_name_args_and_options_and_its_body_is_stdin() -> None:
    cell = parse(
        "%%test mean --mean 'x y' --points 2.5 --compare number:1e-6\n3\n1 2 3\n"
        "%%expect\n2.00\n%%run\n./mean\n"
    )
    test, expect, _ = cell.sections
    assert (test.magic, test.args) == ("test", ("mean", "--mean", "x y"))
    assert test.options == {"--points": "2.5", "--compare": "number:1e-6"}
    assert test.body == "3\n1 2 3\n"
    assert (expect.magic, expect.args, expect.body) == ("expect", (), "2.00\n")


def test_words_after_a_double_dash_are_all_arguments() -> None:
    test = parse("%%test t --points 3 -- --points 4 --compare x\n").sections[0]
    assert test.args == ("t", "--points", "4", "--compare", "x")
    assert test.options == {"--points": "3"}


def test_a_test_without_a_body_has_an_empty_stdin() -> None:
    cell = parse("%%test a\n%%test b\n%%expect\n%%run\ntrue")
    assert [(s.magic, s.body) for s in cell.sections] == [
        ("test", ""), ("test", ""), ("expect", ""), ("run", "true"),
    ]  # fmt: skip


@pytest.mark.parametrize("body", BODIES)
def test_an_expected_output_is_kept_exactly(body: str) -> None:
    cell = parse(f"%%test t\n%%expect\n{body}\n%%run\ntrue")
    assert cell.sections[1].body == body + "\n"
    assert parse(f"%%test t\n%%expect\n{body}").sections[1].body == body


@pytest.mark.parametrize("value", ["0", "1", "2.5", "100", "0.0", "1e3"])
def test_points_take_any_number_of_at_least_zero(value: str) -> None:
    assert parse(f"%%test t --points {value}\n").sections[0].options["--points"] == value
    assert parse(f"%%test t --points={value}\n").sections[0].options["--points"] == value


@pytest.mark.parametrize("mode", ["lines", "exact", "tokens", "number:0", "number:1e-6"])
def test_each_comparison_mode(mode: str) -> None:
    assert parse(f"%%test t --compare {mode}\n").sections[0].options["--compare"] == mode


def test_outputs_patterns_on_the_line_and_in_the_body() -> None:
    section = only("%%outputs plot.png 'my file.txt'\nresults/*.csv\n\n  out/a.svg b.gif\n")
    assert output_patterns(section) == [
        "plot.png", "my file.txt", "results/*.csv", "out/a.svg", "b.gif",
    ]  # fmt: skip


def test_reset_tests() -> None:
    assert parse("%reset tests").magics[0].args == ("tests",)


@pytest.mark.parametrize(
    ("code", "line", "words"),
    [
        # %%expect without the %%test it belongs to, right above it in the same cell.
        ("%%expect\n3\n%%run\ntrue", 1, ["%%expect without a %%test", "it opens the cell"]),
        ("%%test a\n%%files b\nx\n%%expect\n3", 4, ["%%expect without a %%test", "%%files"]),
        ("%%test a\n%%expect\n1\n%%expect\n2", 4, ["it follows %%expect"]),
        ("%%files a\nx\n\n%%expect\n", 4, ["%%expect without a %%test"]),
        ("%%expect x\n", 1, ["%%expect takes no arguments"]),
        # %%test
        ("%%test\n1 2\n", 1, ["%%test takes a test name"]),
        ("%%test ''\n", 1, ["%%test takes a test name"]),
        ("%%test " + "n" * 201 + "\n", 1, ["at most 200 characters"]),
        ("%%test a\n%%expect\n1\n%%test a\n", 4, ["'a' is given twice", "line 1"]),
        ("%%test a --points\n", 1, ["--points needs a value"]),
        ("%%test a --points -1\n", 1, ["--points takes a number of points, 0 or more", "'-1'"]),
        ("%%test a --points=-0.5\n", 1, ["0 or more", "'-0.5'"]),
        ("%%test a --points two\n", 1, ["'two'"]),
        ("%%test a --points nan\n", 1, ["'nan'"]),
        ("%%test a --points inf\n", 1, ["'inf'"]),
        ("%%test a --point 3\n", 1, ["no option --point", "did you mean --points?", "after --"]),
        ("%%test a --compar lines\n", 1, ["did you mean --compare?"]),
        ("%%test a --compare fuzzy\n", 1, ["--compare", "unknown comparison 'fuzzy'", "tokens"]),
        ("%%test a --compare number\n", 1, ["--compare", "number needs its tolerance"]),
        ("%%test a --compare number:x\n", 1, ["--compare", "tolerance 'x'"]),
        ("%%test a --compare number:-1\n", 1, ["--compare", "at least 0"]),
        ("%%test a --compare lines:1\n", 1, ["--compare", "unknown comparison"]),
        ("%%test a --encoding rot13\n", 1, ["unknown encoding 'rot13'"]),
        ("%%test a --encoding hex\nzz\n", 1, ["the body"]),
        # %%check, %%outputs
        ("%%check now\ntrue\n", 1, ["%%check takes no arguments"]),
        ("%%outputs /etc/passwd\n", 1, ["absolute"]),
        ("%%outputs ok.png\n../up.txt\n", 2, ["contains '..'"]),
        ("%%outputs a//b\n", 1, ["empty or '.' path component"]),
        ("%%outputs --all\n", 1, ["%%outputs has no option --all"]),
        ("%%outputs\n'unclosed\n", 2, ["cannot split"]),
        ("%%outputs\n" + "f\n" * 65, 66, ["at most 64 output patterns"]),
        # %reset
        ("%reset everything\n", 1, ["%reset tests only the tests"]),
        ("%reset tests files\n", 1, ["%reset tests only the tests"]),
    ],
)
def test_bad_grading_sections_name_their_line(code: str, line: int, words: list[str]) -> None:
    assert_error(code, line, *words)


def test_run_arguments_with_tests_are_refused_as_they_would_not_be_used() -> None:
    assert_error("%%test a\n%%run --fast\n./a", 2, "each %%test line gives its own arguments")


# -- line magics and plain cells ---------------------------------------------------------------


@pytest.mark.parametrize("name", LINE_MAGICS)
def test_each_line_magic(name: str) -> None:
    cell = parse(f"%{name}")
    assert [(m.name, m.args, m.line) for m in cell.magics] == [(name, (), 1)]
    assert cell.sections == () and cell.plain_run is None


def test_line_magics_with_arguments_and_several_in_a_cell() -> None:
    cell = parse("\n%staged\n  %status abc123\n%packages\n")
    assert [(m.name, m.args, m.line) for m in cell.magics] == [
        ("staged", (), 2), ("status", ("abc123",), 3), ("packages", (), 4),
    ]  # fmt: skip


def test_line_magics_then_sections() -> None:
    cell = parse("%reset\n\n%%files a.txt\nx\n%%run\ncat a.txt")
    assert [m.name for m in cell.magics] == ["reset"]
    assert [s.magic for s in cell.sections] == ["files", "run"]
    assert cell.sections[0].line == 3


def test_a_plain_cell_is_a_run_script() -> None:
    cell = parse("echo hello\nls -l\n")
    assert cell == Cell(plain_run="echo hello\nls -l\n")
    assert cell.run is None  # no %%run section: the plain text is the script


def test_a_plain_cell_after_line_magics_is_a_run_script() -> None:
    cell = parse("%reset\n%staged\n\necho hello\n%not-a-magic-here\n")
    assert [m.name for m in cell.magics] == ["reset", "staged"]
    assert cell.plain_run == "echo hello\n%not-a-magic-here\n"


def test_an_empty_cell_runs_nothing() -> None:
    for code in ("", "\n\n", "   \n\t\n", "%reset\n\n  \n"):
        cell = parse(code)
        assert cell.plain_run is None and cell.sections == ()


@pytest.mark.parametrize(
    ("code", "line", "words"),
    [
        ("%frobnicate\n%%run\ntrue", 1, ["unknown line magic %frobnicate", "%reset", "%status"]),
        ("%reset\n%frobnicate\necho hi", 2, ["unknown line magic %frobnicate"]),
        ("%\necho", 1, ["unknown line magic %"]),
        ("%status 'abc\n", 1, ["cannot split the arguments"]),
        ("%%frobnicate\nbody", 1, ["unknown magic %%frobnicate", "%%files", "%%limits"]),
        ("%%files a\nx\n%%Run\ntrue", 3, ["unknown magic %%Run"]),
        ("%%files a\nx\n%%\ntrue", 3, ["%% without a magic name"]),
        ("%%files a\nx\n%%   \ntrue", 3, ["%% without a magic name"]),
        ("%%%files a\nx", 1, ["unknown magic %%%files"]),
        ("echo hi\n%%run\ntrue", 1, ["text before the first %% section"]),
        ("\n\n  stray text\n%%run\ntrue", 3, ["text before the first %% section"]),
        ("%reset\nstray\n%%files a\nx", 2, ["text before the first %% section"]),
        (" %%run\necho\n%%files a\nx", 1, ["unknown line magic %%run"]),
    ],
)
def test_errors_name_their_line(code: str, line: int, words: list[str]) -> None:
    assert_error(code, line, *words)


def test_errors_are_value_errors_with_the_line_and_its_text() -> None:
    exc = assert_error("%%files a\nx\n%%limits\nrun.cpu = lots\n", 4)
    assert isinstance(exc, ValueError)
    assert str(exc) == "line 4: run.cpu: 'lots' is not a number\n    run.cpu = lots"
    assert exc.message == "run.cpu: 'lots' is not a number"


def test_line_numbers_count_only_newlines() -> None:
    # A form feed or a Unicode line separator inside a body is content, not a new line.
    assert_error("%%files a\nx\x0cy\u2028z\x85w\n%%limits\nrun.cpu = ?\n", 4, "not a number")


# -- property tests ----------------------------------------------------------------------------

#: Characters that have tripped line splitting: every kind of line break, percent signs.
TRICKY = st.sampled_from(
    ["%", "%%", "\r", "\n", "\r\n", "\t", " ", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
     "\u2028", "\u2029", "\x00", "#", "=", ":", "'", '"', "\\"]
)  # fmt: skip
TEXT = st.lists(st.one_of(TRICKY, st.text()), max_size=20).map("".join)


@st.composite
def file_bodies(draw: st.DrawFn) -> str:
    """Any text none of whose lines starts with %% (such a line would start a section)."""
    lines = draw(TEXT).split("\n")
    return "\n".join(" " + line if line.startswith("%%") else line for line in lines)


@given(body=file_bodies(), name=st.sampled_from(["a.txt", "dir/b.c", "'sp ace'"]))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_file_body_round_trips_exactly(body: str, name: str) -> None:
    section = only(f"%%files {name}\n{body}")
    assert section.body == body
    cell = parse(f"%%files {name}\n{body}\n%%stdin\n{body}\n%%run\ncat")
    assert [s.body for s in cell.sections] == [body + "\n", body + "\n", "cat"]
    staged = staging.stage(Staged(), cell)
    request = staging.request(staged, cell)
    assert request is not None
    assert request["files"][0]["content"] == body + "\n"
    assert request["stdin"] == body + "\n"


MAGIC_LINES = st.one_of(
    st.sampled_from(
        [f"%%{m}" for m in SECTION_MAGICS]
        + [f"%{m}" for m in LINE_MAGICS]
        + ["%%", "%", "%%files a --encoding", "%%files a --executable", "%%run 'x", "%%deps gcc",
           "%%files", "%%stdin --encoding hex", "%%compile --show-output", "run.cpu = 1:2",
           "run.as = 2M", "A=1", "compile.wall_time = 1.5s", "deps.wall_time = 1",
           "%%test t", "%%test t --points 2", "%%test t --compare number:0.1", "%%test t -- x",
           "%%test u --encoding hex", "%%expect", "%%check", "%%outputs a.png", "%reset tests",
           "%%outputs ../x", "%%test", "%%test t --points -1"]
    ),
    st.text(max_size=30).map(lambda t: "%%" + t),
    st.text(max_size=30).map(lambda t: "%" + t),
    st.builds(
        lambda stage, name, value: f"{stage}.{name} = {value}",
        st.sampled_from(["run", "compile", "deps", "x", ""]),
        st.sampled_from([*STAGE_LIMITS, "", "bogus"]),
        st.text(st.sampled_from("0123456789.:KMGkmgsx -"), max_size=12),
    ),
)  # fmt: skip
GARBAGE = st.one_of(
    st.text(),
    st.lists(st.one_of(MAGIC_LINES, st.text(max_size=20), TRICKY), max_size=12).map("\n".join),
)


@given(code=GARBAGE)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_raises_nothing_but_cell_syntax_errors(code: str) -> None:
    try:
        cell = parse(code)
        staged = staging.stage(Staged(), cell)
        request = staging.request(staged, cell)
    except CellSyntaxError as exc:
        assert 1 <= exc.line <= max(1, code.count("\n") + 1)
        assert exc.text == code.split("\n")[exc.line - 1].removesuffix("\r")
        return
    assert request is None or isinstance(request["run"], str)


def test_nbgrader_hidden_test_markers_between_sections_are_no_part_of_the_cell() -> None:
    cell = parse(
        "### BEGIN HIDDEN TESTS\n"
        "%%test hidden\n0 -7\n%%expect\n0 not prime\n### END HIDDEN TESTS\n"
        "%%run\n./primes\n// BEGIN HIDDEN TESTS\n"
    )
    test, expect, run = cell.sections
    assert (test.body, expect.body, run.body) == ("0 -7\n", "0 not prime\n", "./primes\n")
    # Inside a body, the line is the body's: a shell comment of a script, say.
    inside = parse("%%run\n### BEGIN HIDDEN TESTS\necho hi\n")
    assert inside.run is not None and inside.run.body == "### BEGIN HIDDEN TESTS\necho hi\n"
    with pytest.raises(CellSyntaxError, match="line 1"):
        parse("# BEGIN HIDDEN TEST\n%%run\necho\n")


def test_a_test_takes_its_own_run_limits_with_units() -> None:
    cell = parse("%%test big --limits cpu=1,wall_time=500ms,as=256M,nproc=16:32\n%%run\n./p\n")
    request = staging.request(staging.stage(Staged(), cell), cell)
    assert request is not None
    assert request["tests"][0]["limits"] == {
        "cpu": 1, "wall_time": 0.5, "as": 256 * MiB, "nproc": [16, 32]
    }  # fmt: skip


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ("cpu", "write NAME=VALUE"),
        ("bogus=1", "unknown limit run.bogus"),
        ("cpu=fast", "run.cpu: 'fast' is not a number"),
        ("wall_time=1:2", "run.wall_time: wall_time takes one value"),
        ("nproc=9:3", "the soft limit 9 is above the hard limit 3"),
    ],
)
def test_a_bad_test_limit_names_the_line(limits, fragment) -> None:
    with pytest.raises(CellSyntaxError, match="line 2") as raised:
        parse(f"%%files a\n%%test t --limits {limits}\n")
    assert fragment in str(raised.value)
