"""Real sandboxes: real nsjail, real cgroups, the real init binary. These tests need root."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cellblock import config as config_module
from cellblock.executor import host
from cellblock.executor.runner import SubmissionRunner
from cellblock.executor.sandbox import Sandbox, StageOutcome, StageSpec
from cellblock.service.protocol import (
    Event,
    EventRecorder,
    FinishedEvent,
    StatusEvent,
    SubmissionState,
    parse_submission,
)

if os.geteuid() != 0:
    pytest.skip("sandbox tests need root (namespaces and cgroups)", allow_module_level=True)


@pytest.fixture(scope="session")
def sandbox_host(tmp_path_factory: pytest.TempPathFactory, sandbox_root: Path) -> host.SandboxHost:
    state = tmp_path_factory.mktemp("state")
    env = {"CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"'}
    return host.prepare(config_module.load(state, environ=env))


@pytest.fixture
async def sandbox(sandbox_host: host.SandboxHost) -> AsyncIterator[Sandbox]:
    sandbox = sandbox_host.sandbox(slot=7)
    yield sandbox
    await sandbox.aclose()  # the jails' ends, which follow their stages in the background


@pytest.fixture
def workdir(sandbox_host: host.SandboxHost, sandbox: Sandbox) -> Iterator[Path]:
    """A working directory of the sandbox's slot, on the working disk."""
    path = sandbox_host.disk.create(f"test-{secrets.token_hex(6)}", sandbox.uid)
    yield path
    sandbox_host.disk.remove(path)


RunStage = Callable[..., Awaitable[StageOutcome]]


@pytest.fixture
def run_stage(sandbox: Sandbox, workdir: Path, sandbox_host: host.SandboxHost) -> RunStage:
    """Run one script as a run stage; keyword arguments are request limits for the stage."""

    async def run(
        script: str,
        *,
        stdin: bytes = b"",
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        **limits: Any,
    ) -> StageOutcome:
        policy = sandbox_host.config.limits
        request = {"run": script, "limits": {"run": limits}}
        resolved = parse_submission(request, policy).limits.run
        spec = StageSpec(
            script=script,
            limits=resolved,
            workdir=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": "/box", **(env or {})},
            args=args,
            stdin=stdin,
        )
        return await sandbox.run(spec)

    return run


#: The submission document, its fields as attributes (``ran.stages["run"]["stdout"]``).
Ran = SimpleNamespace
RunSubmission = Callable[[dict[str, Any]], Awaitable[tuple[Ran, list[dict[str, Any]]]]]


@pytest.fixture
def run_submission(
    sandbox: Sandbox, tmp_path: Path, sandbox_host: host.SandboxHost
) -> RunSubmission:
    """Run a whole submission request; returns how it ended and every event, as their JSON."""

    async def run(request: dict[str, Any]) -> tuple[Ran, list[dict[str, Any]]]:
        submission = parse_submission(request, sandbox_host.config.limits)
        runner = SubmissionRunner(sandbox)
        recorder = EventRecorder(SubmissionState.new("test-submission", submission.request))
        events: list[dict[str, Any]] = []

        def emit(body: Event) -> None:
            events.append(recorder.record(body).wire())

        emit(StatusEvent(status="running", worker="test"))
        try:
            await runner.run(submission, emit)
        finally:
            await runner.aclose()
        emit(FinishedEvent())
        return Ran(**recorder.state.as_json()), events

    return run
