"""One submission, stage by stage: working directory, dependencies, compile, run, events.

``SubmissionRunner.run`` emits event bodies (``stage_started``, ``output``, ``stage_finished``)
through a callback; whoever drives it (the executor worker, or ``cellblock exec``) numbers them,
adds the ``status`` events around them and keeps the submission state.

Cancellation: cancelling ``run`` kills the running stage (see ``Sandbox.run``) before the
``CancelledError`` propagates. The working directory is removed in the background once no jail
uses it any more, however ``run`` ends (``aclose`` waits for that).

Between submissions, ``prepare`` makes the next working directory and arms its first jail, so
that a submission without dependencies does not wait for nsjail to start; while a compile stage
runs, the jail of the run stage is armed. ``aclose`` gives up what is armed. A submission with
tests runs its run stage as ``Grading`` (grading.py) does, test by test, with ``test_started``
and ``test_finished`` events.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cellblock.executor.console import Console, InputSource
from cellblock.executor.grading import Grading
from cellblock.executor.outputs import attach
from cellblock.executor.sandbox import WORKDIR, Mount, Sandbox, StageSpec
from cellblock.executor.streaming import Emit, run_streaming
from cellblock.service.protocol import (
    DepsResult,
    Event,
    FileSpec,
    InputWantedEvent,
    SandboxResult,
    SandboxStatus,
    StageFinishedEvent,
    StageLimits,
    StageName,
    StageStartedEvent,
    Submission,
    now,
)
from cellblock.service.protocol.interactive import DEFAULT_TTY_SIZE

HOST_PATH = "/usr/local/bin:/usr/bin:/bin"
NO_SHELL = "no shell in this pure sandbox: add bash or busybox to dependencies"


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
        """Make the next submission's working directory and arm its first jail now: in a
        series (see ``_run``), unless the last run stage's series holds it already."""
        self.sandbox.arm_series(self._next_workdir())

    async def aclose(self) -> None:
        """Give up the prepared working directory and jail; wait for every jail to end."""
        if self._next is not None:
            self.sandbox.retire(self._next)
            self._next = None
        await self.sandbox.aclose()

    def _next_workdir(self) -> Path:
        """The next submission's working directory, made now if it is not yet."""
        if self._next is None:
            self._next = self._new_workdir()
        return self._next

    def _new_workdir(self) -> Path:
        name = f"{self.sandbox.uid}-{secrets.token_hex(8)}"
        return self.sandbox.disk.create(name, self.sandbox.uid)

    async def run(
        self, submission: Submission, emit: Emit, inputs: InputSource | None = None
    ) -> None:
        """Run ``submission``'s stages, emitting their events; ``inputs`` is the input of an
        interactive run stage."""
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
                message = (
                    f"the submission's files do not fit the disk limit of {first_limits.disk} bytes"
                )
                emit(_refused(first, "disk_limit", first_limits, message))
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
            if shell is None:
                emit(StageStartedEvent(stage=first))
                emit(_refused(first, "error", first_limits, NO_SHELL))
                if first == "compile":
                    emit(_skipped("run"))
                return
            first_spec = StageSpec(
                script=request.compile if request.compile is not None else request.run,
                limits=first_limits,
                workdir=workdir,
                env=stage_environment(env, request.env, pure),
                mounts=[Mount(Path(p), p) for p in env.paths],
                shell=shell,
            )
            if request.compile is not None:
                emit(StageStartedEvent(stage="compile"))
                # While the compile stage runs, the run stage's jail starts (a test's cannot:
                # its working directory is a snapshot of what compile leaves).
                compiled = await run_streaming(
                    self.sandbox, "compile", first_spec, emit,
                    arm_next=request.tests is None,
                )  # fmt: skip
                emit(StageFinishedEvent(stage="compile", result=compiled.result(limits.compile)))
                if compiled.status != "ok":
                    emit(_skipped("run"))
                    return
            run_spec = replace(first_spec, script=request.run, limits=limits.run)
            if request.tests is None:
                await self._run(submission, run_spec, emit, inputs)
            else:
                await Grading(self.sandbox, submission, run_spec).run(emit)
        finally:
            self.sandbox.retire(workdir)

    async def _run(
        self, submission: Submission, spec: StageSpec, emit: Emit, inputs: InputSource | None
    ) -> None:
        """The run stage, once, with the request's stdin (or ``inputs``) and args."""
        request, limits = submission.request, submission.limits
        emit(StageStartedEvent(stage="run"))
        spec = replace(spec, args=request.args, stdin=request.stdin_data())
        if request.stdin_mode == "interactive" and inputs is not None:
            size = (request.tty_size or DEFAULT_TTY_SIZE) if request.tty else None
            console = Console(inputs, size, lambda: emit(InputWantedEvent()))
            # Programs that draw (clear, curses) look the terminal up by name, as under
            # docker run -t.
            env = {"TERM": "xterm", **spec.env} if request.tty else spec.env
            spec = replace(spec, console=console, env=env)
        # The next submission's working directory now, so that this stage runs in a series
        # whose next jail is made there: nsjail stays loaded from one submission to the next
        # (its start is most of a bare jail's cost), and each stage still gets a jail of its own.
        try:
            outcome = await run_streaming(
                self.sandbox, "run", spec, emit, then=self._next_workdir()
            )
        finally:
            if spec.console is not None:
                await spec.console.inputs.discard()  # input nobody read is not kept
        result, _ = await attach(
            outcome.result(spec.limits), spec.workdir, request.outputs,
            limits.output_file_size, limits.output_total_size,
        )  # fmt: skip
        emit(StageFinishedEvent(stage="run", result=result))


def _refused(stage: StageName, status: SandboxStatus, limits: StageLimits, message: str) -> Event:
    """The end of a stage the executor refused before its sandbox ran anything."""
    return StageFinishedEvent(stage=stage, result=SandboxResult.refused(status, limits, message))


def _skipped(stage: StageName) -> Event:
    return StageFinishedEvent(stage=stage, result=SandboxResult.skipped())
