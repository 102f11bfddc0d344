"""Submissions with tests and output files through the runner and real nsjail: one compile,
one sandboxed run per test from a fresh snapshot, every verdict, every comparison mode, a
checker in the sandbox, and output files read back safely."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cellblock.executor import grading, host
from cellblock.executor.runner import SubmissionRunner
from cellblock.executor.sandbox import Sandbox
from cellblock.service.protocol import Event, StageStartedEvent, TestStartedEvent, parse_submission

pytestmark = pytest.mark.timeout(120)
#: The run_submission fixture of conftest.py: the submission document and every event.
RunSubmission = Callable[[dict[str, Any]], Awaitable[tuple[Any, list[dict[str, Any]]]]]

SUM_C = r"""
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    long n, x, sum = 0;
    if (scanf("%ld", &n) != 1) return 3;
    for (long i = 0; i < n; i++) { if (scanf("%ld", &x) == 1) sum += x; }
    if (argc > 1 && strcmp(argv[1], "--mean") == 0) printf("%.4f\n", (double)sum / n);
    else printf("%ld\n", sum);
    return 0;
}
"""
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def by_name(state: Any) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in state.stages["tests"]}


async def test_twenty_tests_over_one_compile_each_from_a_fresh_directory(
    run_submission: RunSubmission, sandbox_host: host.SandboxHost, sandbox: Sandbox
) -> None:
    """Each test appends to a file the compile stage made and leaves a file of its own: every
    test still sees the file as compile left it, and none sees another's."""
    tests = [{"name": f"t{i}", "stdin": f"{i}\n", "expected_output": f"{i} 1 0\n"}
             for i in range(20)]  # fmt: skip
    state, events = await run_submission({
        "compile": "echo compiled > log; echo compiled",
        "run": 'read n; echo again >> log; ls left-* 2>/dev/null | wc -l > count; touch left-$n;'
               ' echo "$n $(grep -c again log) $(($(cat count)))"',
        "tests": tests,
    })  # fmt: skip
    kinds = [e["type"] for e in events]
    assert kinds.count("stage_started") == 2  # compile once, run once (its tests inside)
    assert [e["stage"] for e in events if e["type"] == "stage_started"] == ["compile", "run"]
    assert kinds.count("test_started") == kinds.count("test_finished") == 20
    assert [t["verdict"] for t in state.stages["tests"]] == ["passed"] * 20
    assert state.score == {"passed": 20, "total": 20, "points": 20.0, "max_points": 20.0}
    run = state.stages["run"]
    assert run["status"] == "ok" and run["stdout"] == "" and run["stderr"] == ""
    assert run["wall_time"] == pytest.approx(sum(t["wall_time"] for t in state.stages["tests"]))
    assert run["memory"] == max(t["memory"] for t in state.stages["tests"])
    # Test events sit inside the run stage, in order, each test's output tagged with it.
    start, end = kinds.index("stage_started", 2), len(kinds) - kinds[::-1].index("stage_finished")
    inside = [e for e in events[start:end] if e["type"].startswith("test_")]
    assert [(e["type"], e["test"]) for e in inside] == [
        (kind, i) for i in range(20) for kind in ("test_started", "test_finished")
    ]
    outputs = [e for e in events if e["type"] == "output" and e["stage"] == "run"]
    assert {e["test"] for e in outputs} == set(range(20))
    assert list(sandbox_host.disk.root.glob(f"{sandbox.uid}-*")) == []  # snapshots removed


async def test_every_verdict(run_submission: RunSubmission) -> None:
    def case(name: str, script: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "stdin": script, "expected_output": "ok\n", **more}

    state, _ = await run_submission({
        "files": [{"name": "sum.c", "content": SUM_C}],
        "run": "bash -c \"$(cat)\"",
        "tests": [
            case("passed", "echo ok"),
            case("wrong_answer", "echo no"),
            case("runtime_error", "exit 3"),
            case("signal", "kill -SEGV $$"),
            case("time_limit", "sleep 5", limits={"wall_time": 0.5}),
            case("cpu", "while :; do :; done", limits={"cpu": 1, "wall_time": 5}),
            case("memory_limit", "head -c 200m /dev/zero | tail > /dev/null",
                 limits={"memory": 32 * 1024 * 1024}),
            case("output_limit", "head -c 100000 /dev/zero > f", limits={"fsize": 1000}),
            case("disk_limit", "head -c 8000000 /dev/zero > f", limits={"disk": 1024 * 1024}),
            case("points", "echo ok", points=2.5),
        ],
    })  # fmt: skip
    verdicts = {name: t["verdict"] for name, t in by_name(state).items()}
    assert verdicts == {
        "passed": "passed",
        "wrong_answer": "wrong_answer",
        "runtime_error": "runtime_error",
        "signal": "runtime_error",
        "time_limit": "time_limit",
        "cpu": "time_limit",
        "memory_limit": "memory_limit",
        "output_limit": "output_limit",
        "disk_limit": "disk_limit",
        "points": "passed",
    }
    tests = by_name(state)
    assert tests["signal"]["signal_name"] == "SIGSEGV"
    assert tests["time_limit"]["limits"]["wall_time"] == 0.5  # the test's own limit
    assert tests["passed"]["limits"]["wall_time"] == 10.0  # the run stage's default
    assert (tests["points"]["points"], tests["points"]["max_points"]) == (2.5, 2.5)
    assert (tests["wrong_answer"]["points"], tests["wrong_answer"]["max_points"]) == (0.0, 1.0)
    assert tests["wrong_answer"]["stdout"] == "no\n"
    assert tests["wrong_answer"]["expected_output"] == "ok\n"
    assert state.score == {"passed": 2, "total": 10, "points": 3.5, "max_points": 11.5}
    assert state.stages["run"]["status"] == "failed"


async def test_a_failed_compile_skips_every_test(run_submission: RunSubmission) -> None:
    state, events = await run_submission({
        "files": [{"name": "bad.c", "content": "int main( {"}],
        "compile": "gcc bad.c", "run": "./a.out",
        "tests": [{"name": "a", "points": 2}, {"name": "b"}],
    })  # fmt: skip
    assert not [e for e in events if e["type"].startswith("test_")]
    assert [(t["name"], t["verdict"], t["max_points"]) for t in state.stages["tests"]] == [
        ("a", "skipped", 2.0), ("b", "skipped", 1.0)
    ]  # fmt: skip
    assert state.score == {"passed": 0, "total": 2, "points": 0.0, "max_points": 3.0}


@pytest.mark.parametrize(
    ("compare", "printed", "expected", "verdict"),
    [
        ("lines", "a b  \n\n\n", "a b\n", "passed"),
        ("lines", "a  b\n", "a b\n", "wrong_answer"),
        ("exact", "a b\n", "a b\n", "passed"),
        ("exact", "a b", "a b\n", "wrong_answer"),
        ("tokens", "1\n2   3", "1 2 3\n", "passed"),
        ("tokens", "1 2", "1 2 3", "wrong_answer"),
        ("number:0.001", "3.1416 x", "3.14159 x", "passed"),
        ("number:0.001", "3.15 x", "3.14159 x", "wrong_answer"),
    ],
)
async def test_every_comparison_mode(
    run_submission: RunSubmission, compare: str, printed: str, expected: str, verdict: str
) -> None:
    state, _ = await run_submission({
        "run": "printf %s \"$1\"",
        "tests": [{"name": "t", "args": [printed], "expected_output": expected,
                   "compare": compare}],
    })  # fmt: skip
    [test] = state.stages["tests"]
    assert test["verdict"] == verdict, test


async def test_a_checker_accepts_any_of_several_valid_answers(
    run_submission: RunSubmission,
) -> None:
    """Any factor pair of the input is right: the checker multiplies them back."""
    check = (
        'read n < "$CB_INPUT"; read a b < "$CB_ACTUAL";'
        ' if [ $((a * b)) -eq "$n" ] && [ "$a" -gt 1 ] && [ "$b" -gt 1 ];'
        ' then echo "good: $a x $b";'
        ' else echo "$a x $b is not $n"; exit 1; fi'
    )
    state, _ = await run_submission({
        "files": [{"name": "check.sh", "content": check}],
        "run": 'read n; for i in $(seq 2 $n); do if [ $((n % i)) -eq 0 ]; then'
               ' echo "$i $((n / i))"; exit; fi; done',
        "tests": [
            {"name": "twelve", "stdin": "12\n", "expected_output": "3 4\n"},
            {"name": "fifteen", "stdin": "15\n", "expected_output": "5 3\n"},
            {"name": "prime", "stdin": "7\n", "expected_output": "no factors\n"},
        ],
        "checker": "bash check.sh",
    })  # fmt: skip
    tests = by_name(state)
    assert tests["twelve"]["verdict"] == "passed"  # printed "2 6", not the "3 4" expected
    assert tests["twelve"]["message"] == "good: 2 x 6"
    assert tests["fifteen"]["verdict"] == "passed"
    assert tests["prime"]["verdict"] == "wrong_answer"
    assert tests["prime"]["message"] == "7 x 1 is not 7"


async def test_the_checker_runs_in_the_sandbox_on_read_only_copies(
    run_submission: RunSubmission,
) -> None:
    check = (
        'echo "uid=$(id -u) host=$(hostname) cwd=$PWD";'
        ' echo tampered > "$CB_ACTUAL" 2>/dev/null && echo wrote-actual;'
        ' cat "$CB_EXPECTED"'
    )
    state, _ = await run_submission({
        "run": "echo program", "tests": [{"name": "t", "expected_output": "expected"}],
        "checker": check,
    })  # fmt: skip
    [test] = state.stages["tests"]
    assert test["verdict"] == "passed"
    assert test["message"] == "uid=1000 host=cellblock cwd=/box\nexpected"


async def test_a_checker_that_does_not_finish_makes_the_verdict_error(
    run_submission: RunSubmission,
) -> None:
    state, _ = await run_submission({
        "run": "echo x", "limits": {"run": {"wall_time": 0.5}},
        "tests": [{"name": "t", "limits": {"wall_time": 5}}], "checker": "sleep 10",
    })  # fmt: skip
    [test] = state.stages["tests"]
    assert test["verdict"] == "error"
    assert "checker" in test["message"] and "wall time" in test["message"]


async def test_output_files_of_the_run_stage(run_submission: RunSubmission) -> None:
    png = base64.b64encode(PNG).decode()
    state, _ = await run_submission({
        "run": f"echo {png} | base64 -d > plot.png; mkdir -p out; echo 1,2 > out/a.csv;"
               " head -c 3000 /dev/zero > big.bin; ln -s /etc/passwd passwd.txt",
        "outputs": ["plot.png", "out/*.csv", "big.bin", "passwd.txt", "nothing.gif"],
    })  # fmt: skip
    run = state.stages["run"]
    files = {f["name"]: f for f in run["files"]}
    assert sorted(files) == ["big.bin", "out/a.csv", "plot.png"]
    assert files["plot.png"]["media_type"] == "image/png"
    assert base64.b64decode(files["plot.png"]["content"]) == PNG
    assert files["out/a.csv"]["media_type"] == "text/csv"
    assert run["missing"] == ["passwd.txt", "nothing.gif"]


async def test_output_files_over_the_caps_are_truncated(
    run_submission: RunSubmission, sandbox_host: host.SandboxHost
) -> None:
    cap = sandbox_host.config.limits.grading.output_file_size
    state, _ = await run_submission({
        "run": f"head -c {cap + 10} /dev/urandom > big.bin", "outputs": ["big.bin"],
    })  # fmt: skip
    [big] = state.stages["run"]["files"]
    assert (big["size"], big["truncated"]) == (cap + 10, True)
    assert len(base64.b64decode(big["content"])) == cap


async def test_each_test_brings_back_its_own_files(run_submission: RunSubmission) -> None:
    state, _ = await run_submission({
        "run": "read n; echo $n > out-$n.txt",
        "tests": [{"name": "a", "stdin": "1\n"}, {"name": "b", "stdin": "2\n"}],
        "outputs": ["out-*.txt"],
    })  # fmt: skip
    tests = by_name(state)
    assert [f["name"] for f in tests["a"]["files"]] == ["out-1.txt"]
    assert [f["name"] for f in tests["b"]["files"]] == ["out-2.txt"]
    assert "files" not in state.stages["run"]


async def test_no_outputs_no_files_field(run_submission: RunSubmission) -> None:
    state, _ = await run_submission({"run": "echo hi"})
    assert "files" not in state.stages["run"] and "missing" not in state.stages["run"]


async def test_cancelling_between_tests_leaves_no_snapshot_behind(
    sandbox: Sandbox, sandbox_host: host.SandboxHost
) -> None:
    submission = parse_submission({
        "run": 'read n; [ "$n" = 1 ] && sleep 30; echo $n',
        "tests": [{"name": f"t{i}", "stdin": f"{i}\n"} for i in range(5)],
    }, sandbox_host.config.limits)  # fmt: skip
    runner = SubmissionRunner(sandbox)
    started: list[int] = []

    def emit(event: Event) -> None:
        if isinstance(event, TestStartedEvent):
            started.append(event.test)

    work = asyncio.create_task(runner.run(submission, emit))
    while started != [0, 1]:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the sleep runs, the next test's snapshot is made
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    await runner.aclose()
    assert list(sandbox_host.disk.root.glob(f"{sandbox.uid}-*")) == []


async def test_cancelling_while_the_first_snapshot_is_made_leaves_nothing_behind(
    sandbox: Sandbox, sandbox_host: host.SandboxHost
) -> None:
    submission = parse_submission(
        {"run": "true", "tests": [{"name": f"t{i}"} for i in range(3)]},
        sandbox_host.config.limits,
    )
    runner = SubmissionRunner(sandbox)
    stage_started = asyncio.Event()

    def emit(event: Event) -> None:
        if isinstance(event, StageStartedEvent):
            stage_started.set()

    work = asyncio.create_task(runner.run(submission, emit))
    await stage_started.wait()  # the snapshots' threads run now
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    await runner.aclose()
    assert list(sandbox_host.disk.root.glob(f"{sandbox.uid}-*")) == []


async def test_output_files_share_one_budget_across_the_tests(
    run_submission: RunSubmission, sandbox_host: host.SandboxHost
) -> None:
    grading_caps = sandbox_host.config.limits.grading
    each, total = grading_caps.output_file_size, grading_caps.output_total_size
    count = total // each + 1  # one test more than the budget holds files of
    state, _ = await run_submission({
        "run": f"head -c {each} /dev/zero > out.bin",
        "tests": [{"name": f"t{i}"} for i in range(count)], "outputs": ["out.bin"],
    })  # fmt: skip
    files = [t["files"][0] for t in state.stages["tests"]]
    assert [len(base64.b64decode(f["content"])) for f in files] == [each] * (count - 1) + [0]
    assert [f["truncated"] for f in files] == [False] * (count - 1) + [True]


async def test_the_tests_kept_output_shares_one_budget_but_each_is_judged_whole(
    run_submission: RunSubmission, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grading, "KEPT_OUTPUT", 10)
    state, _ = await run_submission({
        "run": "echo 0123456", "limits": {"run": {"output": 100}},
        "tests": [{"name": n, "expected_output": "0123456\n"} for n in ("a", "b", "c")],
    })  # fmt: skip
    tests = state.stages["tests"]
    assert [t["verdict"] for t in tests] == ["passed"] * 3
    assert [t["stdout"] for t in tests] == ["0123456\n", "01", ""]
    assert [t["stdout_truncated"] for t in tests] == [False, True, True]


async def test_each_test_is_measured_and_limited_alone_in_its_series(
    run_submission: RunSubmission,
) -> None:
    """Tests take turns in a few series of jails sharing a cgroup each: a test's memory, its
    out-of-memory kill, its time-limit kill (which ends its series) and its own limits are its
    own, never another's, before or after it in the same series or in another."""
    big = "python3 -c \"b = bytearray(96 * 1024 * 1024); print('ok')\""
    tests = [
        {"name": "big", "stdin": big, "expected_output": "ok\n"},
        {"name": "small0", "stdin": "echo ok", "expected_output": "ok\n"},
        {"name": "oom", "stdin": big, "expected_output": "ok\n",
         "limits": {"memory": 48 * 1024 * 1024}},
        {"name": "small1", "stdin": "echo ok", "expected_output": "ok\n"},
        {"name": "slow", "stdin": "sleep 5", "limits": {"wall_time": 0.3}},
        {"name": "small2", "stdin": "echo ok", "expected_output": "ok\n"},
        {"name": "small3", "stdin": "echo ok", "expected_output": "ok\n"},
        {"name": "big2", "stdin": big, "expected_output": "ok\n"},
    ]  # fmt: skip
    state, _ = await run_submission({"run": "bash", "tests": tests})
    got = by_name(state)
    verdicts = {name: t["verdict"] for name, t in got.items()}
    assert verdicts == {
        "big": "passed", "small0": "passed", "oom": "memory_limit", "small1": "passed",
        "slow": "time_limit", "small2": "passed", "small3": "passed", "big2": "passed",
    }  # fmt: skip
    for name in ("big", "big2"):
        assert got[name]["memory"] > 96 * 1024 * 1024
    for name in ("small0", "small1", "small2", "small3"):
        assert got[name]["memory"] < 24 * 1024 * 1024, got[name]
        assert got[name]["limits"]["memory"] != 48 * 1024 * 1024
    assert got["oom"]["limits"]["memory"] == 48 * 1024 * 1024
