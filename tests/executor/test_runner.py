"""Whole submissions through the runner: files, args, stdin, stages in order, events."""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cellblock.executor import host
from cellblock.executor.runner import SubmissionRunner, write_files
from cellblock.executor.sandbox import Mount, Sandbox
from cellblock.service.protocol import (
    EventRecorder,
    FileSpec,
    StatusEvent,
    SubmissionState,
    parse_submission,
)

RunSubmission = Callable[[dict[str, Any]], Awaitable[tuple[Any, list[dict[str, Any]]]]]


async def test_files_in_every_encoding_with_folders_and_modes(
    run_submission: RunSubmission,
) -> None:
    request = {
        "files": [
            {"name": "a.txt", "content": "héllo\n"},
            {"name": "data/blob.bin", "content": "00ff10", "encoding": "hex"},
            {
                "name": "bin/run.sh",
                "content": base64.b64encode(b"echo from-script\n").decode(),
                "encoding": "base64",
                "executable": True,
            },
        ],
        "run": "cat a.txt; od -An -tx1 data/blob.bin; stat -c '%a %n' a.txt bin/run.sh; bin/run.sh",
    }
    state, _ = await run_submission(request)
    run = state.stages["run"]
    assert run is not None and run["status"] == "ok", run
    assert run["stdout"].splitlines() == [
        "héllo", " 00 ff 10", "644 a.txt", "755 bin/run.sh", "from-script"
    ]  # fmt: skip


async def test_args_arrive_verbatim(run_submission: RunSubmission) -> None:
    args = ["a b", "it's", 'say "hi"', "line1\nline2", "$(touch pwned)", "; rm -rf /", "*", ""]
    state, _ = await run_submission(
        {"run": 'for a in "$@"; do printf "[%s]\\n" "$a"; done; ls', "args": args}
    )
    run = state.stages["run"]
    assert run is not None
    expected = "".join(f"[{a}]\n" for a in args)
    assert run["stdout"] == expected  # and no file "pwned" was made by ls's listing


async def test_stdin_in_hex_and_base64(run_submission: RunSubmission) -> None:
    for encoding, content in (("hex", "68690a"), ("base64", "aGkK"), ("utf8", "hi\n")):
        state, _ = await run_submission(
            {"run": "cat", "stdin": content, "stdin_encoding": encoding}
        )
        run = state.stages["run"]
        assert run is not None and run["stdout"] == "hi\n", encoding


async def test_compile_then_run_share_the_working_directory(run_submission: RunSubmission) -> None:
    state, events = await run_submission(
        {
            "files": [
                {
                    "name": "main.c",
                    "content": 'int puts(const char*);\nint main(void){puts("built");}',
                }
            ],
            "compile": "gcc -o main main.c && echo compiled > note",
            "run": "./main; cat note",
        }
    )
    assert state.compiled is True and state.ran is True
    assert state.stages["run"]["stdout"] == "built\ncompiled\n"  # type: ignore[index]
    types = [(e["type"], e.get("stage")) for e in events]
    assert types[:3] == [
        ("status", None),
        ("stage_started", "compile"),
        ("stage_finished", "compile"),
    ]
    assert types[-1] == ("finished", None)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_a_failed_compile_skips_the_run(run_submission: RunSubmission) -> None:
    state, _ = await run_submission(
        {
            "files": [{"name": "bad.c", "content": "int main( {"}],
            "compile": "gcc bad.c",
            "run": "./a.out",
        }
    )
    compile_result, run_result = state.stages["compile"], state.stages["run"]
    assert compile_result is not None and compile_result["status"] == "failed"
    assert "error" in compile_result["stderr"]
    assert run_result is not None and run_result["status"] == "skipped"
    assert (state.status, state.compiled, state.ran) == ("finished", False, False)


async def test_binary_output_comes_back_base64(run_submission: RunSubmission) -> None:
    state, _ = await run_submission({"run": "printf '\\377\\376ok'"})
    run = state.stages["run"]
    assert run is not None and run["stdout_encoding"] == "base64"
    assert base64.b64decode(run["stdout"]) == b"\xff\xfeok"


async def test_output_streams_live_as_events(run_submission: RunSubmission) -> None:
    _, events = await run_submission({"run": "echo one; sleep 0.3; echo two >&2"})
    outputs = [(e["stream"], e["data"]) for e in events if e["type"] == "output"]
    assert outputs == [("stdout", "one\n"), ("stderr", "two\n")]
    finished_at = next(i for i, e in enumerate(events) if e["type"] == "stage_finished")
    assert all(i < finished_at for i, e in enumerate(events) if e["type"] == "output")


async def test_the_working_directory_is_removed(
    run_submission: RunSubmission, sandbox_host: host.SandboxHost, sandbox: Sandbox
) -> None:
    await run_submission(
        {"files": [{"name": "x", "content": "y"}], "run": "mkdir -p d/e; chmod 000 d"}
    )
    assert list(sandbox_host.disk.root.glob(f"{sandbox.uid}-*")) == []


async def test_a_prepared_slot_runs_in_its_series_and_arms_run_during_compile(
    sandbox_host: host.SandboxHost, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = SubmissionRunner(sandbox)
    started: list[tuple[Path, tuple[Mount, ...], bool]] = []
    start = sandbox._start

    def spy(key: tuple[Path, tuple[Mount, ...]], rerun: bool = False) -> Any:
        started.append((*key, rerun))
        return start(key, rerun=rerun)

    monkeypatch.setattr(sandbox, "_start", spy)
    runner.prepare()
    runner.prepare()  # already prepared: nothing more
    [(link, mounts, rerun)] = started
    assert link.name.endswith(".box") and (mounts, rerun) == ((), True)
    workdir = link.resolve()
    request = {"files": [{"name": "a.c", "content": "int main(void) { return 0; }"}],
               "compile": "gcc -o a a.c", "run": "./a && pwd && ls"}  # fmt: skip
    submission = parse_submission(request, sandbox_host.config.limits)
    recorder = EventRecorder(SubmissionState.new("s", submission.request))
    recorder.record(StatusEvent(status="running", worker="test"))
    try:
        await runner.run(submission, recorder.record)
    finally:
        await runner.aclose()
    run = recorder.state.as_json()["stages"]["run"]
    assert run is not None and run["stdout"] == "/box\na\na.c\n", run
    # Compile took the prepared series' jail, and run the one armed while compile ran: two
    # nsjail processes in all, none started while the program ran.
    assert started[1:] == [(workdir, (), False)]
    assert not workdir.exists()


async def test_dependencies_without_a_cache_fail_the_deps_stage(
    run_submission: RunSubmission,
) -> None:
    state, _ = await run_submission({"dependencies": ["gcc"], "compile": "true", "run": "true"})
    deps = state.stages["deps"]
    assert deps is not None and deps["status"] == "failed" and "gcc" in deps["log"]
    assert state.dependencies_installed is False
    assert state.stages["compile"]["status"] == "skipped"  # type: ignore[index]
    assert state.stages["run"]["status"] == "skipped"  # type: ignore[index]


async def test_limits_of_the_request_are_applied_per_stage(run_submission: RunSubmission) -> None:
    state, _ = await run_submission(
        {
            "compile": "ulimit -t",
            "run": "ulimit -t; ulimit -n",
            "limits": {"compile": {"cpu": 7}, "run": {"cpu": 3, "nofile": [32, 64]}},
        }
    )
    assert state.stages["compile"]["stdout"] == "7\n"  # type: ignore[index]
    assert state.stages["run"]["stdout"] == "3\n32\n"  # type: ignore[index]
    assert state.stages["run"]["limits"]["nofile"] == [32, 64]  # type: ignore[index]


def test_files_are_never_written_through_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "host-file"
    target.write_text("host secret")
    workdir = tmp_path / "box"
    workdir.mkdir()
    (workdir / "main.c").symlink_to(target)
    (workdir / "src").symlink_to(tmp_path)
    for name in ("main.c", "src/evil.c"):
        with pytest.raises(OSError):
            write_files(workdir, [FileSpec(name=name, content="overwritten")], os.getuid())
    assert target.read_text() == "host secret"
    assert not (tmp_path / "evil.c").exists()
