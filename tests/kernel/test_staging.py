"""The staged submission (pure): what persists across cells, the request a running cell sends,
and the one-line summary a staging cell prints."""

from __future__ import annotations

from typing import Any

import pytest

from cellblock.config import Config
from cellblock.kernel.sections import CellSyntaxError, parse
from cellblock.kernel.staging import Staged, StagedFile, StagedTest, request, stage
from cellblock.service.protocol import parse_submission


def cells(*codes: str) -> Staged:
    """What is staged after running ``codes`` one after the other (runs included)."""
    staged = Staged()
    for code in codes:
        staged = stage(staged, parse(code))
    return staged


def submit(staged: Staged, code: str) -> dict[str, Any]:
    cell = parse(code)
    body = request(stage(staged, cell), cell)
    assert body is not None
    return body


# -- what persists -----------------------------------------------------------------------------


def test_files_merge_by_name_and_a_later_file_replaces_an_earlier_one() -> None:
    staged = cells(
        "%%files a.txt\nfirst a\n",
        "%%files b.bin --encoding hex\n00ff\n",
        "%%files a.txt --executable\nsecond a\n",
    )
    assert staged.files == {
        "a.txt": StagedFile("second a\n", "utf8", True),
        "b.bin": StagedFile("00ff", "hex", False),
    }


def test_env_merges_by_name() -> None:
    staged = cells("%%env\nA=1\nB=2\n", "%%env\nB=two\nC=3\n")
    assert staged.env == {"A": "1", "B": "two", "C": "3"}


def test_limits_merge_by_stage_and_name() -> None:
    staged = cells(
        "%%limits\nrun.cpu = 2\nrun.as = 1M\ncompile.wall_time = 20s\n",
        "%%limits\nrun.cpu = 5\nrun.nproc = 16:32\ndeps.wall_time = 1m\n",
    )
    assert staged.limits == {
        "run": {"cpu": 5, "as": 1024**2, "nproc": [16, 32]},
        "compile": {"wall_time": 20.0},
        "deps": {"wall_time": 60.0},
    }


def test_deps_replace_what_was_staged() -> None:
    assert cells("%%deps gcc python3\n", "%%deps nodejs\n").dependencies == ("nodejs",)
    assert cells("%%deps gcc\n", "%%deps\n").dependencies == ()


def test_compile_replaces_and_an_empty_compile_section_removes_it() -> None:
    staged = cells("%%compile --show-output\ngcc a.c\n", "%%compile\ngcc -O2 a.c\n")
    assert staged.compile == "gcc -O2 a.c\n" and not staged.show_compile_output
    assert cells("%%compile\ngcc a.c\n", "%%compile\n\n").compile is None
    assert cells("%%compile --show-output\nmake").show_compile_output


def test_stdin_replaces_with_its_encoding() -> None:
    staged = cells("%%stdin --encoding hex\n0a0b\n", "%%stdin\n1 2\n")
    assert cells("%%stdin --encoding hex\n0a0b\n").stdin == "0a0b"
    assert (staged.stdin, staged.stdin_encoding) == ("1 2\n", "utf8")
    staged = cells("%%stdin\n1 2\n", "%%stdin --encoding base64\nAQI=")
    assert (staged.stdin, staged.stdin_encoding) == ("AQI=", "base64")


def test_run_is_not_staged() -> None:
    staged = cells("%%files a\nx\n%%run extra args\necho hi\n")
    assert staged == cells("%%files a\nx\n")
    # A later cell without %%run only stages: the earlier run script is gone.
    cell = parse("%%env\nA=1\n")
    assert request(stage(staged, cell), cell) is None


def test_staging_returns_a_new_state_and_leaves_the_old_one_alone() -> None:
    before = cells("%%files a\nx\n%%env\nA=1\n%%limits\nrun.cpu = 1\n")
    limits = {stage: dict(values) for stage, values in before.limits.items()}
    snapshot = (dict(before.files), dict(before.env), limits)
    after = stage(before, parse("%%files b\ny\n%%env\nB=2\n%%limits\nrun.cpu = 9\nrun.as = 1K\n"))
    assert after is not before
    assert (before.files, before.env, before.limits) == snapshot
    assert after.limits == {"run": {"cpu": 9, "as": 1024}}


def test_one_cell_with_several_sections_stages_the_same_as_several_cells() -> None:
    sections = [
        "%%files main.c\nint main(void) { return 0; }\n",
        "%%deps gcc\n",
        "%%compile\ngcc -o main main.c\n",
        "%%stdin\n3 4\n",
        "%%env\nX=1\n",
        "%%limits\nrun.cpu = 2\n",
    ]
    one = cells("".join(sections))
    assert one == cells(*sections)
    assert submit(one, "%%run a\n./main") == submit(cells(*sections), "%%run a\n./main")


def test_a_syntax_error_while_staging_names_its_line() -> None:
    with pytest.raises(CellSyntaxError) as info:
        cells("%%files a\nx\n%%limits\nrun.cpu = 2\nrun.cpu = fast\n")
    assert info.value.line == 5


# -- the request -------------------------------------------------------------------------------


def test_the_request_of_a_cell_that_runs() -> None:
    staged = cells(
        "%%files z.sh --executable\necho z\n%%files a.bin --encoding base64\nAAE=\n",
        "%%deps gcc python3\n%%compile\ngcc -o main main.c\n",
        "%%stdin --encoding hex\n0a\n%%env\nGREETING=hello\n",
        "%%limits\nrun.cpu = 2\nrun.nproc = 16:32\ncompile.wall_time = 1.5s\n",
    )
    body = submit(staged, "%%files main.c\nint main;\n%%run --fast 'x y'\n./main \"$@\"\n")
    assert body == {
        "files": [  # sorted by name
            {"name": "a.bin", "content": "AAE=", "encoding": "base64", "executable": False},
            {"name": "main.c", "content": "int main;\n", "encoding": "utf8", "executable": False},
            {"name": "z.sh", "content": "echo z\n", "encoding": "utf8", "executable": True},
        ],
        "dependencies": ["gcc", "python3"],
        "compile": "gcc -o main main.c\n",
        "run": './main "$@"\n',
        "args": ["--fast", "x y"],
        "env": {"GREETING": "hello"},
        "stdin": "0a",
        "stdin_encoding": "hex",
        "limits": {"run": {"cpu": 2, "nproc": [16, 32]}, "compile": {"wall_time": 1.5}},
    }


def test_the_request_of_an_empty_session_has_no_compile_key() -> None:
    assert submit(Staged(), "%%run\ntrue") == {
        "files": [], "dependencies": [], "run": "true", "args": [], "env": {}, "stdin": "",
        "stdin_encoding": "utf8", "limits": {},
    }  # fmt: skip


def test_a_plain_cell_runs_with_everything_staged() -> None:
    staged = cells("%%files a.txt\nhello\n%%env\nA=1\n")
    body = submit(staged, "%staged\ncat a.txt\n")
    assert body["run"] == "cat a.txt\n" and body["args"] == []
    assert body["files"][0]["name"] == "a.txt" and body["env"] == {"A": "1"}


def test_a_cell_that_only_stages_sends_nothing() -> None:
    for code in ("%%files a\nx\n", "%reset\n", "", "\n  \n", "%%limits\nrun.cpu = 1\n"):
        cell = parse(code)
        assert request(stage(Staged(), cell), cell) is None


def test_a_run_section_without_a_script_is_refused() -> None:
    cell = parse("%%files a\nx\n%%run arg\n\n   \n")
    with pytest.raises(CellSyntaxError) as info:
        request(stage(Staged(), cell), cell)
    assert info.value.line == 3 and "needs a body" in info.value.message


def test_the_request_is_a_copy_of_the_staged_state() -> None:
    staged = cells("%%env\nA=1\n%%limits\nrun.cpu = 1\n%%deps gcc\n")
    body = submit(staged, "%%run\ntrue")
    body["env"]["A"] = "changed"
    body["limits"]["run"]["cpu"] = 99
    body["dependencies"].append("python3")
    assert staged.env == {"A": "1"} and staged.limits == {"run": {"cpu": 1}}
    assert staged.dependencies == ("gcc",)


def test_the_request_is_one_the_service_accepts(config: Config) -> None:
    staged = cells(
        "%%files main.c\nint main(void) { return 0; }\n%%files data.bin --encoding hex\n00ff\n",
        "%%deps gcc\n%%compile\ngcc -o main main.c\n%%stdin --encoding base64\nAAE=\n",
        "%%env\nX=1\n%%limits\nrun.cpu = 2\nrun.as = 256M\nrun.nproc = 16:32\n"
        "compile.wall_time = 20s\nrun.wall_time = 1500ms\nrun.rttime = 1s\n",
    )
    submission = parse_submission(submit(staged, "%%run 1 '2 3'\n./main \"$@\""), config.limits)
    assert submission.request.args == ["1", "2 3"]
    assert submission.request.dependencies == ["gcc"]


# -- tests, checker, outputs (v1.1) ------------------------------------------------------------


def test_tests_are_staged_like_files_in_the_order_first_staged() -> None:
    staged = cells(
        "%%test small\n1 2\n%%expect\n3\n%%test big --points 2\n9 9\n",
        "%%test mean --mean --compare tokens\n1 2\n%%expect\n1.50\n",
        "%%test small --points 0.5\n2 2\n%%expect\n4\n",  # replaces small, keeps its place
    )
    assert list(staged.tests) == ["small", "big", "mean"]
    assert staged.tests["small"] == StagedTest("2 2\n", expected_output="4\n", points=0.5)
    assert staged.tests["big"] == StagedTest("9 9\n", points=2.0)  # no %%expect: None
    assert staged.tests["mean"] == StagedTest(
        "1 2\n", args=("--mean",), expected_output="1.50\n", compare="tokens"
    )


def test_a_test_with_an_encoded_stdin() -> None:
    staged = cells("%%test bin --encoding hex\n00 ff\n0a\n")
    assert staged.tests["bin"] == StagedTest("00ff0a", "hex")


def test_checker_and_outputs_replace_and_empty_sections_remove_them() -> None:
    staged = cells("%%check\ndiff a b\n%%outputs a.png\n", "%%outputs b.png\nc/*.csv\n")
    assert staged.checker == "diff a b\n" and staged.outputs == ("b.png", "c/*.csv")
    assert cells("%%check\nx\n", "%%check\n  \n").checker is None
    assert cells("%%outputs a\n", "%%outputs\n").outputs == ()


def test_reset_tests_forgets_the_tests_and_the_checker_only() -> None:
    staged = cells("%%files a\nx\n%%outputs o.txt\n%%check\ntrue\n%%test t\n")
    left = staged.reset(("tests",))
    assert left.tests == {} and left.checker is None
    assert left.files == staged.files and left.outputs == ("o.txt",)


def test_the_request_of_a_cell_with_tests() -> None:
    staged = cells(
        "%%files sum.sh\necho\n%%test small\n1 2\n%%expect\n3\n",
        '%%check\ncmp "$CB_EXPECTED" "$CB_ACTUAL"\n%%outputs plot.png\n',
    )
    body = submit(staged, "%%test mean 'a b' --points 2 --compare number:0.1\n%%run\n./sum.sh\n")
    assert body["tests"] == [
        {"name": "small", "stdin": "1 2\n", "stdin_encoding": "utf8", "args": [],
         "compare": "lines", "points": 1.0, "expected_output": "3\n"},
        {"name": "mean", "stdin": "", "stdin_encoding": "utf8", "args": ["a b"],
         "compare": "number:0.1", "points": 2.0},
    ]  # fmt: skip
    assert body["checker"] == 'cmp "$CB_EXPECTED" "$CB_ACTUAL"\n'
    assert body["outputs"] == ["plot.png"]
    # The cell's own %%test is staged for the next cell too.
    assert "mean" in stage(staged, parse("%%test mean\n%%run\ntrue")).tests


def test_a_plain_cell_runs_the_staged_tests() -> None:
    body = submit(cells("%%test a\n"), "./prog\n")
    assert [t["name"] for t in body["tests"]] == ["a"]


def test_without_tests_the_request_has_no_grading_keys() -> None:
    assert {"tests", "checker", "outputs"}.isdisjoint(submit(Staged(), "%%run\ntrue"))


def test_the_request_with_tests_is_one_the_service_accepts(config: Config) -> None:
    staged = cells(
        "%%test a --points 0\n%%expect\n\n%%test b x --compare number:1e-9\n1\n",
        "%%test c --encoding base64\nAAE=\n%%check\ntrue\n%%outputs out/*.txt p.png\n",
    )
    submission = parse_submission(submit(staged, "%%run\n./prog"), config.limits)
    tests = submission.request.tests
    assert tests is not None and [t.name for t in tests] == ["a", "b", "c"]
    assert tests[0].points == 0.0 and tests[0].expected_output == "\n"
    assert tests[1].args == ["x"] and tests[1].expected_output is None
    assert tests[2].stdin_data() == b"\x00\x01"
    assert submission.request.outputs == ["out/*.txt", "p.png"]


# -- the summary line --------------------------------------------------------------------------


def test_the_summary_of_nothing() -> None:
    assert Staged().summary() == "nothing"
    assert cells("%%deps\n%%compile\n%%stdin\n").summary() == "nothing"


def test_the_summary_names_everything_staged_on_one_line() -> None:
    staged = cells(
        "%%files b.c\nx\n%%files a.c\ny\n%%deps gcc python3\n%%compile\ncc a.c b.c\n",
        "%%stdin\n1 2 3\n%%env\nZED=1\nALPHA=2\n",
        "%%limits\nrun.cpu = 2\nrun.as = 1K\ncompile.wall_time = 20s\n",
    )
    summary = staged.summary()
    assert "\n" not in summary
    assert summary == (
        "2 file(s): a.c, b.c; deps: gcc python3; a compile script; stdin (6 chars); "
        "env: ALPHA, ZED; compile limits: wall_time=20.0; run limits: as=1024, cpu=2"
    )


@pytest.mark.parametrize(
    ("code", "summary"),
    [
        ("%%files a.txt\nhi\n", "1 file(s): a.txt"),
        ("%%deps gcc\n", "deps: gcc"),
        ("%%compile\nmake\n", "a compile script"),
        ("%%stdin\nabc", "stdin (3 chars)"),
        ("%%env\nA=1\n", "env: A"),
        ("%%limits\nrun.nproc = 1:2\n", "run limits: nproc=[1, 2]"),
        ("%%test a\n%%test b --points 1.5\n", "2 test(s), 2.5 pt: a, b"),
        ("%%check\ntrue\n", "a checker"),
        ("%%outputs a.png b/*.csv\n", "outputs: a.png b/*.csv"),
    ],
)
def test_the_summary_of_each_section(code: str, summary: str) -> None:
    assert cells(code).summary() == summary
