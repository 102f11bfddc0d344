"""One submission, stage by stage: working directory, dependencies, compile, run, events.

``SubmissionRunner.run`` emits event bodies (``stage_started``, ``output``, ``stage_finished``)
through a callback; whoever drives it (the executor worker, or ``cellblock exec``) numbers them,
adds the ``status`` events around them and keeps the submission state.

Cancellation: cancelling ``run`` kills the running stage (see ``Sandbox.run``) before the
``CancelledError`` propagates. The working directory is removed in the background once no jail
uses it any more, however ``run`` ends (``aclose`` waits for that).

Between submissions, ``prepare`` makes the next working directory and arms its first jail, so
that a submission without dependencies does not wait for nsjail to start; while a compile stage
runs, the jail of the run stage is armed. ``aclose`` gives up what is armed.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cellblock.executor.outputs import collect
from cellblock.executor.sandbox import WORKDIR, Mount, Sandbox, StageOutcome, StageSpec
from cellblock.service.protocol import (
    STREAMS,
    DepsResult,
    Event,
    FileSpec,
    OutputEvent,
    SandboxResult,
    StageFinishedEvent,
    StageLimits,
    StageName,
    StageStartedEvent,
    Stream,
    Submission,
    TestFinishedEvent,
    TestResult,
    TestSpec,
    TestStartedEvent,
    aggregate,
    judge,
    now,
    test_result,
)

Emit = Callable[[Event], None]
HOST_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Where a checker finds its test's input, expected and actual output (read-only).
CHECK_FILES = "/.cellblock/check"
#: Tests whose snapshot and jail are made ahead, while an earlier one runs.
TESTS_AHEAD = 2
#: Bytes of a checker's stdout kept as the test's message.
CHECKER_MESSAGE = 4096


@dataclass(frozen=True)
class StageEnvironment:
    """A dependency environment: variables to set and store paths to mount read-only."""

    variables: Mapping[str, str] = field(default_factory=dict)
    paths: Sequence[str] = ()
    packages: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class DepsOutcome:
    """The deps stage's result plus, when it succeeded, the environment."""

    result: DepsResult
    environment: StageEnvironment | None


class DependencyProvider(Protocol):
    async def provide(self, names: Sequence[str], wall_time: float, emit: Emit) -> DepsOutcome:
        """Install ``names`` (from the cache, or by asking a builder) within ``wall_time``."""


class NoDependencies:
    """The provider when no dependency cache is configured: any dependency fails the stage."""

    async def provide(self, names: Sequence[str], wall_time: float, emit: Emit) -> DepsOutcome:
        log = f"no dependency cache is configured here; cannot install {', '.join(names)}"
        return DepsOutcome(result=DepsResult(status="failed", log=log), environment=None)


def write_files(workdir: Path, files: Sequence[FileSpec], uid: int) -> None:
    """Write the submission's files, owned by the sandbox uid.

    Every component is opened relative to its parent with O_NOFOLLOW, so a path can never be
    redirected through a symlink (the sandbox has not run in ``workdir`` yet, and even so).
    """
    root = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for spec in files:
            *folders, base = spec.name.split("/")
            parent = os.dup(root)
            try:
                for folder in folders:
                    try:
                        os.mkdir(folder, 0o755, dir_fd=parent)
                        os.chown(folder, uid, uid, dir_fd=parent, follow_symlinks=False)
                    except FileExistsError:
                        pass
                    child = os.open(
                        folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent
                    )
                    os.close(parent)
                    parent = child
                mode = 0o755 if spec.executable else 0o644
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(base, flags, mode, dir_fd=parent)
                try:
                    view = memoryview(spec.data())
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fchown(fd, uid, uid)
                    os.fchmod(fd, mode)  # not narrowed by the umask
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
    finally:
        os.close(root)


def stage_environment(
    env: StageEnvironment, request_env: Mapping[str, str], pure: bool
) -> dict[str, str]:
    """The whole environment of a stage: an allowlist, never a variable of the executor's."""
    path = env.variables.get("PATH", "")
    if not pure:
        path = f"{path}:{HOST_PATH}" if path else HOST_PATH
    variables = {
        "HOME": WORKDIR,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "USER": "runner",
        "LOGNAME": "runner",
        **env.variables,
        "PATH": path,
    }
    variables.update(request_env)
    return variables


def find_shell(env: StageEnvironment, pure: bool) -> str | None:
    """The shell for stage scripts: bash if there is one, else a POSIX sh."""
    if not pure:
        return "/bin/bash"
    for name in ("bash", "sh"):
        for directory in env.variables.get("PATH", "").split(":"):
            if directory and os.access(os.path.join(directory, name), os.X_OK):
                return os.path.join(directory, name)
    return None


class SubmissionRunner:
    """Runs submissions with one sandbox (one executor slot). One submission at a time."""

    def __init__(
        self,
        sandbox: Sandbox,
        dependencies: DependencyProvider | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.dependencies = dependencies or NoDependencies()
        self._next: Path | None = None
        for stale in sandbox.disk.names(f"{sandbox.uid}-"):  # this slot's, from a killed run
            with contextlib.suppress(OSError):  # as rmtree's ignore_errors did: never fatal
                sandbox.disk.remove(stale)

    def prepare(self) -> None:
        """Make the next submission's working directory and arm its first jail now."""
        if self._next is None:
            self._next = self._new_workdir()
            self.sandbox.arm(self._next)

    async def aclose(self) -> None:
        """Give up the prepared working directory and jail; wait for every jail to end."""
        if self._next is not None:
            self.sandbox.retire(self._next)
            self._next = None
        await self.sandbox.aclose()

    def _new_workdir(self) -> Path:
        name = f"{self.sandbox.uid}-{secrets.token_hex(8)}"
        return self.sandbox.disk.create(name, self.sandbox.uid)

    async def run(self, submission: Submission, emit: Emit) -> None:
        request, limits = submission.request, submission.limits
        workdir, self._next = self._next or self._new_workdir(), None
        try:
            # The files count against the disk cap of the first stage they meet. The service
            # refused files over it, but their metadata may still tip them over.
            first: StageName = "compile" if request.compile is not None else "run"
            first_limits: StageLimits = getattr(limits, first)
            self.sandbox.disk.limit(workdir, first_limits.disk)
            try:
                write_files(workdir, request.files, self.sandbox.uid)
            except OSError as exc:
                if exc.errno != errno.EDQUOT:  # ENOSPC: the whole disk is full, a system failure
                    raise
                emit(_files_over_disk(first, first_limits))
                if first == "compile":
                    emit(_skipped("run"))
                return
            env = StageEnvironment()
            if request.dependencies:
                emit(StageStartedEvent(stage="deps"))
                started = now()
                outcome = await self.dependencies.provide(
                    request.dependencies, limits.deps_wall_time, emit
                )
                result = outcome.result.model_copy(
                    update={"started_at": started, "finished_at": now()}
                )
                emit(StageFinishedEvent(stage="deps", result=result))
                if outcome.environment is None:
                    if request.compile is not None:
                        emit(_skipped("compile"))
                    emit(_skipped("run"))
                    return
                env = outcome.environment
            pure = self.sandbox.base == "pure"
            shell = find_shell(env, pure)
            first_spec = StageSpec(
                script=request.compile if request.compile is not None else request.run,
                limits=first_limits,
                workdir=workdir,
                env=stage_environment(env, request.env, pure),
                mounts=[Mount(Path(p), p) for p in env.paths],
                shell=shell or "",
            )
            if shell is None:
                emit(_no_shell(first, first_limits))
                if first == "compile":
                    emit(_skipped("run"))
                return
            if request.compile is not None:
                emit(StageStartedEvent(stage="compile"))
                # While the compile stage runs, the run stage's jail starts (a test's cannot:
                # its working directory is a snapshot of what compile leaves).
                compiled = await self._execute(
                    "compile", first_spec, emit, arm_next=None if request.tests else workdir
                )
                emit(StageFinishedEvent(stage="compile", result=compiled.result(limits.compile)))
                if compiled.status != "ok":
                    emit(_skipped("run"))
                    return
            run_spec = replace(first_spec, script=request.run, limits=limits.run)
            if request.tests is None:
                await self._run(submission, run_spec, emit)
            else:
                await self._tests(submission, run_spec, emit)
        finally:
            self.sandbox.retire(workdir)

    async def _run(self, submission: Submission, spec: StageSpec, emit: Emit) -> None:
        """The run stage, once, with the request's stdin and args."""
        request = submission.request
        emit(StageStartedEvent(stage="run"))
        spec = replace(spec, args=request.args, stdin=request.stdin_data())
        result = (await self._execute("run", spec, emit)).result(spec.limits)
        result = await self._with_outputs(result, submission, spec.workdir)
        emit(StageFinishedEvent(stage="run", result=result))

    async def _tests(self, submission: Submission, spec: StageSpec, emit: Emit) -> None:
        """The run stage as one sandboxed run per test, each in a fresh snapshot of the working
        directory as compile left it (so that what one test writes, the next does not see),
        judged as it ends. The next tests' snapshots and jails are made while one runs."""
        request, limits = submission.request, submission.limits
        tests = request.tests or []
        emit(StageStartedEvent(stage="run"))
        started = now()
        results: list[TestResult] = []
        # Starting a jail takes longer than a short test runs: keep TESTS_AHEAD ready.
        upcoming = collections.deque(
            asyncio.create_task(self._fresh(spec)) for _ in tests[:TESTS_AHEAD]
        )
        try:
            for i, test in enumerate(tests):
                # Shielded: a cancel here must not lose a snapshot its thread goes on making.
                current = await asyncio.shield(upcoming.popleft())
                if i + TESTS_AHEAD < len(tests):
                    upcoming.append(asyncio.create_task(self._fresh(spec)))
                emit(TestStartedEvent(test=i, name=test.name))
                test_spec = replace(
                    spec, workdir=current, limits=limits.tests[i], args=test.args,
                    stdin=test.stdin_data(),
                )  # fmt: skip
                try:
                    outcome = await self._execute("run", test_spec, emit, test=i)
                    run = await self._with_outputs(
                        outcome.result(test_spec.limits), submission, current
                    )
                finally:
                    self.sandbox.retire(current)
                checker = None
                if request.checker is not None and run.status == "ok":
                    checker = await self._check(spec, request.checker, test, outcome.stdout)
                judgement = judge(
                    run, outcome.stdout, test.expected_output, test.comparison(), *checker or ()
                )
                result = test_result(test.name, run, judgement, test.points, test.expected_output)
                emit(TestFinishedEvent(test=i, result=result))
                results.append(result)
        finally:
            for task in upcoming:
                # Not cancelled: its snapshot may be made already, in a thread that cannot be
                # stopped, and must be removed either way.
                with contextlib.suppress(Exception):
                    self.sandbox.retire(await task)
        emit(StageFinishedEvent(stage="run", result=aggregate(results, started, now())))

    async def _check(
        self, spec: StageSpec, checker: str, test: TestSpec, actual: bytes
    ) -> tuple[SandboxResult, str]:
        """Run the checker on one test's output, in the sandbox, in its own snapshot of the
        working directory as compile left it: never where the test ran, whose program could
        have rewritten the checker's files. It reads the test's input, the expected output and
        the program's stdout as read-only files; its result and what it said (its stdout)."""
        files = {
            "input": test.stdin_data(),
            "expected": (test.expected_output or "").encode(),
            "actual": actual,
        }
        folder = self._check_files(files)
        workdir = await self._snapshot(spec.workdir)
        try:
            check_spec = replace(
                spec,
                script=checker,
                workdir=workdir,
                env={**spec.env, **{f"CB_{n.upper()}": f"{CHECK_FILES}/{n}" for n in files}},
                mounts=[*spec.mounts, Mount(folder, CHECK_FILES)],
            )
            outcome = await self.sandbox.run(check_spec)
        finally:
            self.sandbox.retire(workdir)
            shutil.rmtree(folder, ignore_errors=True)
        said = outcome.stdout[:CHECKER_MESSAGE].decode("utf-8", "replace").strip()
        return outcome.result(check_spec.limits), said

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

    async def _snapshot(self, workdir: Path) -> Path:
        """A snapshot of ``workdir``, made in a thread: it waits for a btrfs transaction
        commit, milliseconds that would stall every other slot of this executor."""
        name = f"{workdir.name}-{secrets.token_hex(4)}"
        return await asyncio.to_thread(self.sandbox.disk.snapshot, workdir, name)

    async def _fresh(self, spec: StageSpec) -> Path:
        """A test's fresh working directory, with its jail armed."""
        path = await self._snapshot(spec.workdir)
        self.sandbox.arm(path, spec.mounts)
        return path

    async def _with_outputs(
        self, result: SandboxResult, submission: Submission, workdir: Path
    ) -> SandboxResult:
        """``result`` with the output files the request names, read from ``workdir``."""
        patterns, limits = submission.request.outputs, submission.limits
        if not patterns:
            return result
        collected = await asyncio.to_thread(
            collect, workdir, patterns, limits.output_file_size, limits.output_total_size
        )
        return result.model_copy(update={"files": collected.files, "missing": collected.missing})

    async def _execute(
        self,
        stage: StageName,
        spec: StageSpec,
        emit: Emit,
        *,
        test: int | None = None,
        arm_next: Path | None = None,
    ) -> StageOutcome:
        """Run one stage (or one test) in the sandbox, its output streaming live."""
        # Live output is text; a character split across two reads is decoded whole. (The final
        # result carries the exact bytes, base64 when they are not UTF-8.)
        decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in STREAMS}

        def output(stream: Stream, data: bytes) -> None:
            text = decoders[stream].decode(data)
            if text:
                emit(OutputEvent(stage=stage, stream=stream, data=text, test=test))

        return await self.sandbox.run(spec, output, arm_next=arm_next)


def _no_shell(stage: StageName, limits: StageLimits) -> Event:
    message = "no shell in this pure sandbox: add bash or busybox to dependencies"
    result = SandboxResult.refused("error", limits, message)
    return StageFinishedEvent(stage=stage, result=result)


def _files_over_disk(stage: StageName, limits: StageLimits) -> Event:
    message = f"the submission's files do not fit the disk limit of {limits.disk} bytes"
    result = SandboxResult.refused("disk_limit", limits, message)
    return StageFinishedEvent(stage=stage, result=result)


def _skipped(stage: StageName) -> Event:
    return StageFinishedEvent(stage=stage, result=SandboxResult.skipped())
