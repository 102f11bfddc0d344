"""A submission's tests (PROTOCOL.md, "Tests"): the run stage as one sandboxed run per test,
each from a fresh copy of the working directory as compile left it, judged as it ends.

What one test writes, the next never sees: each runs in its own btrfs subvolume (with its own
quota group), in its own jail. The subvolume is a copy of the compiled directory if that is
small, else a snapshot of it (see disk.py for why). Those of the next ``TESTS_AHEAD`` tests
are made while one runs.

The tests are one series of the sandbox: the jail of the next test is made, in its own fresh
directory, as soon as one test's program has ended (see ``Sandbox``).

A checker runs in the sandbox too, in a fresh directory of its own (never where the test ran, whose
program could have rewritten the checker's files), reading read-only copies of the test's
input, expected output and actual output mounted at ``CHECK_FILES``.

What comes back is bounded for the whole submission, not per test: output files share one
``output_total_size``, and the kept stdout and stderr of all tests share ``KEPT_OUTPUT`` (a
test is judged on all its run kept, up to its ``output`` limit, before its result is cut).

Cancellation: cancelling ``Grading.run`` kills the running test or checker (``Sandbox.run``)
and removes every directory made for it, including those being made in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from cellblock.executor.disk import NotCopyable
from cellblock.executor.outputs import attach
from cellblock.executor.sandbox import Mount, Sandbox, StageOutcome, StageSpec
from cellblock.executor.streaming import Emit, run_streaming
from cellblock.service.protocol import (
    STREAMS,
    SandboxResult,
    StageFinishedEvent,
    StageLimits,
    StageStartedEvent,
    Submission,
    TestFinishedEvent,
    TestResult,
    TestSpec,
    TestStartedEvent,
    aggregate,
    encode_output,
    judge,
    now,
    test_result,
)

#: Tests whose fresh directory is made ahead, while an earlier one runs.
TESTS_AHEAD = 3
#: Series of jails the tests take in turn: while one test runs, the next one's jail is made.
SERIES = 2
#: Where a checker finds its test's input, expected and actual output (read-only).
CHECK_FILES = "/.cellblock/check"
#: Bytes of a checker's stdout kept as the test's message.
CHECKER_MESSAGE = 4096
#: Bytes of stdout and stderr kept in the results of all of a submission's tests together:
#: the stored document holds every result, and is written again as each test ends.
KEPT_OUTPUT = 8 * 1024 * 1024


class Grading:
    """The tests of one submission, run in ``sandbox`` from the compiled ``spec.workdir``."""

    def __init__(self, sandbox: Sandbox, submission: Submission, spec: StageSpec) -> None:
        self.sandbox, self.submission, self.spec = sandbox, submission, spec
        self._file_room = submission.limits.output_total_size
        self._output_room = KEPT_OUTPUT
        self._copyable = False

    async def run(self, emit: Emit) -> None:
        """The run stage: ``stage_started``, each test's events, the aggregate result."""
        request, limits = self.submission.request, self.submission.limits
        tests = request.tests or []
        emit(StageStartedEvent(stage="run"))
        started = now()
        results: list[TestResult] = []
        # Told once: the compiled directory does not change while its tests run.
        self._copyable = await asyncio.to_thread(self.sandbox.disk.copyable, self.spec.workdir)
        upcoming = collections.deque(
            asyncio.create_task(self._fresh(series=i < SERIES))
            for i, _ in enumerate(tests[:TESTS_AHEAD])
        )
        try:
            for i, test in enumerate(tests):
                # Shielded, and taken off the queue only once made: a cancel here must not
                # lose a directory its thread goes on making.
                current = await asyncio.shield(upcoming[0])
                upcoming.popleft()
                if i + TESTS_AHEAD < len(tests):
                    upcoming.append(asyncio.create_task(self._fresh()))
                emit(TestStartedEvent(test=i, name=test.name))
                # The test SERIES on: this test's series serves it next.
                following = upcoming[SERIES - 1] if len(upcoming) >= SERIES else None
                result = await self._test(i, test, current, following, limits.tests[i], emit)
                emit(TestFinishedEvent(test=i, result=result))
                results.append(result)
        finally:
            for task in upcoming:
                # Not cancelled: its directory may be made already, in a thread that cannot be
                # stopped, and must be removed either way.
                with contextlib.suppress(Exception):
                    self.sandbox.retire(await task)
        emit(StageFinishedEvent(stage="run", result=aggregate(results, started, now())))

    async def _test(
        self,
        index: int,
        test: TestSpec,
        workdir: Path,
        following: asyncio.Future[Path] | None,
        limits: StageLimits,
        emit: Emit,
    ) -> TestResult:
        """Run one test in ``workdir`` and judge it; ``following`` makes the next test's
        directory, which this series' next jail is made from as soon as this test's program has
        ended."""
        request = self.submission.request
        spec = replace(
            self.spec, workdir=workdir, limits=limits, args=test.args, stdin=test.stdin_data()
        )
        try:
            then = await asyncio.shield(following) if following is not None else None
            outcome = await run_streaming(self.sandbox, "run", spec, emit, test=index, then=then)
            run, used = await attach(
                outcome.result(spec.limits), workdir, request.outputs,
                self.submission.limits.output_file_size, self._file_room,
            )  # fmt: skip
            self._file_room -= used
        finally:
            self.sandbox.retire(workdir)
        checker = None
        if request.checker is not None and run.status == "ok":
            checker = await self._check(request.checker, test, outcome.stdout)
        judgement = judge(
            run, outcome.stdout, test.expected_output, test.comparison(), *(checker or ())
        )
        result = test_result(test.name, run, judgement, test.points, test.expected_output)
        return self._kept(result, outcome)

    def _kept(self, result: TestResult, outcome: StageOutcome) -> TestResult:
        """``result`` with its stdout and stderr (``outcome``'s bytes) cut to what is left of
        ``KEPT_OUTPUT``."""
        update: dict[str, object] = {}
        for stream, data in zip(STREAMS, (outcome.stdout, outcome.stderr), strict=True):
            kept = data[: self._output_room]
            self._output_room -= len(kept)
            if len(kept) < len(data):
                text, encoding = encode_output(kept)
                update |= {stream: text, f"{stream}_encoding": encoding,
                           f"{stream}_truncated": True}  # fmt: skip
        return result.model_copy(update=update) if update else result

    async def _check(
        self, checker: str, test: TestSpec, actual: bytes
    ) -> tuple[SandboxResult, str]:
        """Run the checker on one test's output; its result and what it said (its stdout)."""
        files = {
            "input": test.stdin_data(),
            "expected": (test.expected_output or "").encode(),
            "actual": actual,
        }
        folder = await asyncio.to_thread(self._check_files, files)
        workdir: Path | None = None
        try:
            made = asyncio.create_task(self._fresh())
            workdir = await asyncio.shield(made)
            spec = replace(
                self.spec,
                script=checker,
                workdir=workdir,
                env={**self.spec.env, **{f"CB_{n.upper()}": f"{CHECK_FILES}/{n}" for n in files}},
                mounts=[*self.spec.mounts, Mount(folder, CHECK_FILES)],
            )
            outcome = await self.sandbox.run(spec)
        finally:
            if workdir is None:  # cancelled while its directory was being made
                with contextlib.suppress(Exception):
                    workdir = await made
            if workdir is not None:
                self.sandbox.retire(workdir)
            await asyncio.to_thread(shutil.rmtree, folder, True)
        said = outcome.stdout[:CHECKER_MESSAGE].decode("utf-8", "replace").strip()
        return outcome.result(spec.limits), said

    def _made(self, name: str) -> Path:
        """The fresh directory ``name``: a copy if the compiled one is small, else a snapshot."""
        disk, source = self.sandbox.disk, self.spec.workdir
        if self._copyable:
            try:
                return disk.copy(source, name)
            except NotCopyable:
                self._copyable = False  # the rest are snapshots; racing threads agree
        return disk.snapshot(source, name)

    def _check_files(self, files: Mapping[str, bytes]) -> Path:
        """A folder of the host holding ``files``, readable (only) by the sandbox."""
        folder = self.sandbox.disk.root / f"{self.sandbox.uid}-{secrets.token_hex(8)}-check"
        folder.mkdir()
        folder.chmod(0o755)
        for name, data in files.items():
            path = folder / name
            path.write_bytes(data)
            path.chmod(0o444)
        return folder

    async def _fresh(self, *, series: bool = False) -> Path:
        """A fresh copy of the compiled working directory, made in a thread: a copy reads and
        writes files, a snapshot waits for a btrfs transaction commit, either of which would
        stall every other slot. With ``series``, a series of jails is started there (the first
        tests')."""
        name = f"{self.spec.workdir.name}-{secrets.token_hex(4)}"
        path = await asyncio.to_thread(self._made, name)
        if series:
            try:
                self.sandbox.arm_series(path, self.spec.mounts)
            except BaseException:
                self.sandbox.retire(path)
                raise
        return path
