"""The Cellblock Jupyter kernel: notebook cells to submissions, live status in the cell.

Cells are parsed (``sections``) and staged (``staging``) before anything is sent, so a bad
magic, option or limit is reported with its line and nothing is submitted. A cell that runs
submits over the service's WebSocket (``cellblock.service.client``) and renders events as they
come: one status line updated in place (a line per test below it), the run stage's output as
stream messages, a summary table at the end, then the tests' table and the output files. The
cell ends in error when a stage fails, hits a limit, a test does not pass, or the dependencies
cannot be installed; when every test passed, the cell's result is its points (for nbgrader).

Interrupting the kernel (SIGINT, which Jupyter sends) cancels the running submission on the
service (an interactive one gets SIGINT first: interactive.py). A dropped connection is resumed
by the client without losing or repeating events.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from types import FrameType
from typing import Any

from ipykernel.kernelbase import Kernel

from cellblock import __version__
from cellblock.kernel import render, sections, staging
from cellblock.kernel.help import MAGIC_HELP, complete, inspect_text
from cellblock.kernel.interactive import Conversation, StdinChannel
from cellblock.kernel.replay import OutputLog
from cellblock.kernel.sections import CellSyntaxError
from cellblock.kernel.staging import Staged
from cellblock.service.client import (
    ApiError,
    BadRequest,
    Client,
    ClientError,
    ServiceUnavailable,
)
from cellblock.service.protocol import (
    STREAMS,
    DepsResult,
    FinishedEvent,
    InvalidTransition,
    SandboxResult,
    SubmissionRequest,
    SubmissionState,
    apply_event,
    decode_event,
)

PACKAGES_TTL = 30.0


class CellblockKernel(Kernel):
    implementation = "cellblock"
    implementation_version = __version__
    language = "cellblock"
    language_version = "1"
    language_info = {
        "name": "cellblock",
        "mimetype": "text/x-sh",
        "file_extension": ".sh",
        "codemirror_mode": "shell",
        "pygments_lexer": "bash",
    }
    banner = (
        "Cellblock: %%files, %%deps, %%compile, %%run, %%stdin, %%env, %%limits, "
        "%%test, %%expect, %%check, %%outputs"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.staged = Staged()
        self.last_id: str | None = None
        self._clients: dict[bool, Client] = {}
        self._packages: tuple[float, list[str]] = (0.0, [])
        #: What the running cell has shown, while an input box may have to be cleared away.
        self._log: OutputLog | None = None

    # -- talking to the service ------------------------------------------------------------

    def client(self, admin: bool = False) -> Client:
        if admin not in self._clients:
            self._clients[admin] = Client.from_environment(admin=admin)
        return self._clients[admin]

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        return {"status": "ok", "restart": restart}

    # -- output helpers -----------------------------------------------------------------------

    def _iopub(self, msg_type: str, content: dict[str, Any]) -> None:
        self.send_response(self.iopub_socket, msg_type, content)
        if self._log is not None:
            self._log.add(msg_type, content)

    def _print(self, text: str, name: str = "stdout") -> None:
        self._iopub("stream", {"name": name, "text": text})

    def _display(
        self, html: str, text: str, display_id: str | None = None, update: bool = False
    ) -> None:
        content: dict[str, Any] = {"data": {"text/html": html, "text/plain": text}, "metadata": {}}
        if display_id is not None:
            content["transient"] = {"display_id": display_id}
        self._iopub("update_display_data" if update else "display_data", content)

    def _error(self, ename: str, evalue: str) -> dict[str, Any]:
        traceback = [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]
        self._iopub("error", {"ename": ename, "evalue": evalue, "traceback": traceback})
        return {"status": "error", "execution_count": self.execution_count, "ename": ename,
                "evalue": evalue, "traceback": traceback}  # fmt: skip

    def _show(self, display: render.Display) -> None:
        self._iopub("display_data", {"data": display.data, "metadata": display.metadata})

    def _ok(self) -> dict[str, Any]:
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}  # fmt: skip

    # -- execution -----------------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: Mapping[str, Any] | None = None,
        allow_stdin: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        try:
            cell = sections.parse(code)
            # Line magics come before the sections: after a %reset, the cell's sections are
            # staged on nothing (or, after %reset tests, on no tests), not on what was before.
            base = self.staged
            for magic in cell.magics:
                if magic.name == "reset":
                    base = base.reset(magic.args)
            staged = staging.stage(base, cell)
            request = staging.request(staged, cell, stdin_allowed=allow_stdin)
        except CellSyntaxError as exc:
            return self._error("CellSyntaxError", str(exc))
        # An input box left up is cleared away with the cell's outputs, which are then shown
        # again (replay.py): from here on, what the cell shows is kept.
        if request is not None and request.get("stdin_mode") == "interactive":
            self._log = OutputLog()
        try:
            return await self._execute(cell, staged, request, silent)
        finally:
            self._log = None

    async def _execute(
        self, cell: sections.Cell, staged: Staged, request: dict[str, Any] | None, silent: bool
    ) -> dict[str, Any]:
        try:
            for magic in cell.magics:
                await self._line_magic(magic)
        except ClientError as exc:
            return self._client_error(exc)
        self.staged = staged
        if request is None:
            if cell.sections and not silent:
                self._print(f"staged: {staged.summary()}\n")
            return self._ok()
        stdin = None
        if request.get("stdin_mode") == "interactive":
            assert self.session is not None  # a kernel that took an execute request has one
            stdin = StdinChannel(self.session, self.stdin_socket, self.get_parent("shell"),
                                 self._parent_ident["shell"])  # fmt: skip
        elif cell.interactive and not silent:
            self._print("(no interactive input here: ran with the staged %%stdin)\n")
        try:
            return await self._submit(request, staged.show_compile_output, silent, stdin)
        except ClientError as exc:
            return self._client_error(exc)

    def _client_error(self, exc: ClientError) -> dict[str, Any]:
        """The cell's error for what the service (or the way to it) answered: one line, the
        same for a line magic as for a submission, never a traceback."""
        if isinstance(exc, ServiceUnavailable):
            return self._error("CellblockServiceUnavailable", exc.message)
        if isinstance(exc, BadRequest):
            details = "; ".join(f"{p.field}: {p.message}" for p in exc.problems) or exc.message
            return self._error("CellblockInvalidSubmission", details)
        return self._error(type(exc).__name__, exc.message)

    async def _submit(
        self,
        request: dict[str, Any],
        show_compile: bool,
        silent: bool = False,
        stdin: StdinChannel | None = None,
    ) -> dict[str, Any]:
        display_id = uuid.uuid4().hex
        state: SubmissionState | None = None
        shown = ""
        self._display('<div class="cellblock-status">submitting…</div>', "submitting…", display_id)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        interrupted = False

        stream = self.client().stream(request)
        conversation = None
        if stdin is not None:
            assert self._log is not None  # kept since the cell began (do_execute)
            conversation = Conversation(stream, stdin, self._log)

        def on_interrupt(signum: int, frame: FrameType | None) -> None:
            nonlocal interrupted
            interrupted = True
            if conversation is not None:
                loop.call_soon_threadsafe(conversation.interrupt, task.cancel)
            else:
                loop.call_soon_threadsafe(task.cancel)

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            async with stream, self._conversing(conversation):
                async for event in stream:
                    if state is None:
                        self.last_id = event["id"]
                        # The protocol's own reading of what was sent (the service took it):
                        # which stages it has, and its tests.
                        sent = SubmissionRequest.model_validate(request)
                        state = SubmissionState.new(event["id"], sent)
                    state = _advance(state, event)
                    # Run output streams live; compile and deps output is in their results,
                    # shown at the end when they fail (or on request). A test's output is in
                    # its result, shown when it fails: twenty tests' output would bury the
                    # table.
                    if (event["type"] == "output" and event["stage"] == "run"
                            and event.get("test") is None):  # fmt: skip
                        text = event["data"]
                        if conversation is not None:
                            text = conversation.terminal.feed(text)
                        if text:
                            self._print(text, event["stream"])
                    elif conversation is not None:
                        conversation.on_event(event)
                    text = render.status_text(state)
                    if text != shown:
                        shown = text
                        self._display(render.status_html(state), text, display_id, update=True)
        except asyncio.CancelledError:
            if not interrupted:
                raise
            task.uncancel()
            return await self._interrupted(stream.id, display_id)
        except ClientError:
            if stream.id is None:  # refused or unreachable: the status must not stay "submitting…"
                html = '<div class="cellblock-status">not submitted</div>'
                self._display(html, "not submitted", display_id, update=True)
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
        assert stream.submission is not None
        final = SubmissionState.from_record(stream.submission)
        self._display(render.status_html(final), render.status_text(final), display_id, update=True)
        failure = render.failure(final)
        compile_result = final.stages.get("compile")
        if isinstance(compile_result, SandboxResult) and (
            show_compile or compile_result.status != "ok"
        ):
            for name, text in zip(
                STREAMS, (compile_result.stdout, compile_result.stderr), strict=True
            ):
                if text:
                    self._print(text, name)
        # The run's output streamed live stops where the output limit cut it, which looks like
        # the program's last words; say right below it that the rest was dropped.
        run_result = final.stages.get("run")
        if run_result is not None and (cut := render.truncation(run_result)):
            self._print(f"[{cut}: the rest was not kept; raise run.output in %%limits]\n", "stderr")
        deps_result = final.stages.get("deps")
        if isinstance(deps_result, DepsResult) and deps_result.status != "ok" and deps_result.log:
            self._print(deps_result.log + "\n", "stderr")
        self._display(render.summary_html(final), render.summary_text(final))
        if final.test_plan:
            self._display(render.tests_html(final), render.tests_text(final))
        for display in render.file_displays(final):
            self._show(display)
        if failure:
            return self._error(*failure)
        if (points := render.points_result(final)) is not None and not silent:
            # The points as the cell's result: nbgrader's autograder reads a test cell's
            # execute_result as the points it earned.
            self._iopub("execute_result", {
                "execution_count": self.execution_count,
                "data": {"text/plain": points}, "metadata": {},
            })  # fmt: skip
        return self._ok()

    @contextlib.asynccontextmanager
    async def _conversing(self, conversation: Conversation | None) -> AsyncIterator[None]:
        """The end of an interactive run, however it ends: no more waiting for an answer, the
        terminal's last text shown, and the cell shown again without a box left up."""
        try:
            yield
        finally:
            if conversation is not None:
                if tail := conversation.terminal.flush():
                    self._print(tail)
                if await conversation.close():
                    for msg_type, content in conversation.log.replay():
                        self.send_response(self.iopub_socket, msg_type, content)

    async def _interrupted(self, submission_id: str | None, display_id: str) -> dict[str, Any]:
        """The user interrupted: cancel the submission on the service and show where it was."""
        if submission_id is not None:
            try:
                await self.client().cancel(submission_id)
                final = SubmissionState.from_record(await self.client().get(submission_id))
                self._display(
                    render.status_html(final), render.status_text(final), display_id, update=True
                )
            except ApiError:
                pass  # it ended on its own meanwhile; the error below still stands
        return self._error("CellblockCancelled", "interrupted: the submission was cancelled")

    # -- line magics ---------------------------------------------------------------------------

    async def _line_magic(self, magic: sections.LineMagic) -> None:
        if magic.name == "reset":
            self.staged = self.staged.reset(magic.args)
            cleared = "staged tests and checker" if magic.args else "staged submission"
            self._print(f"{cleared} cleared\n")
        elif magic.name == "staged":
            self._print(_describe(self.staged))
        elif magic.name == "packages":
            packages = await self.client().packages()
            rows = [["name", "version", "size", "uses", "last used"]] + [
                [p["name"], p["version"], render.size(p.get("size")), str(p.get("uses", 0)),
                 p.get("last_used") or ""] for p in packages
            ]  # fmt: skip
            self._print(_table(rows) if packages else "the cache holds no packages yet\n")
        elif magic.name == "workers":
            self._print(await self._workers())
        elif magic.name == "status":
            target = magic.args[0] if magic.args else self.last_id
            if target is None:
                self._print("no submission yet: give an id, %status ID\n")
                return
            state = SubmissionState.from_record(await self.client().get(target))
            self._display(render.status_html(state), render.status_text(state))
            if any(state.stages.values()):
                self._display(render.summary_html(state), render.summary_text(state))
            if state.test_plan:
                self._display(render.tests_html(state), render.tests_text(state))

    async def _workers(self) -> str:
        """Every worker with an admin token; with a client token (the embedded deployment
        gives its kernels no other), what a client may see: the capacity."""
        try:
            admin = self.client(admin=True)
        except ClientError:  # no admin token in this kernel's environment
            capacity = await self.client().capacity()
            names = ["executors", "builders", "slots", "busy", "queued"]
            return _table([names, [str(capacity[name]) for name in names]])
        rows = [["id", "kind", "host", "busy", "slots", "last seen"]] + [
            [w["id"], w["kind"], w["host"], str(w["busy"]), str(w["slots"]), w["last_seen"]]
            for w in await admin.workers()
        ]
        return _table(rows)

    # -- completion and inspection -------------------------------------------------------------

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        matches, start = complete(code, cursor_pos, await self._package_names())
        return {"status": "ok", "matches": matches, "cursor_start": start,
                "cursor_end": cursor_pos, "metadata": {}}  # fmt: skip

    async def _package_names(self) -> list[str]:
        fetched, names = self._packages
        if time.monotonic() - fetched > PACKAGES_TTL:
            try:
                names = [p["name"] for p in await self.client().packages()]
            except ClientError:
                names = []
            self._packages = (time.monotonic(), names)
        return names

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        text = inspect_text(code, cursor_pos)
        data = {"text/plain": text} if text else {}
        return {"status": "ok", "found": bool(text), "data": data, "metadata": {}}


def _advance(state: SubmissionState, raw: Mapping[str, Any]) -> SubmissionState:
    try:
        event = decode_event(raw)
    except ValueError:
        return state  # an event this kernel does not know (a newer service): nothing to show
    if isinstance(event, FinishedEvent) and event.submission is not None:
        return SubmissionState.from_record(event.submission)
    try:
        return apply_event(state, event)
    except InvalidTransition:
        return state  # the final document settles it


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows
    )


def _describe(staged: Staged) -> str:
    lines = [f"staged: {staged.summary()}"]
    for name, f in sorted(staged.files.items()):
        flags = f" ({f.encoding}{', executable' if f.executable else ''})"
        lines.append(f"  file {name}: {len(f.content)} chars{flags}")
    if staged.compile is not None:
        lines.append("  compile: " + staged.compile.strip().replace("\n", "\n           "))
    for name, test in staged.tests.items():
        expected = "no expected output" if test.expected_output is None else (
            f"expects {len(test.expected_output)} chars ({test.compare})"
        )  # fmt: skip
        args = f", args {' '.join(test.args)}" if test.args else ""
        lines.append(f"  test {name}: {render.points_text(test.points)} pt, stdin "
                     f"{len(test.stdin)} chars{args}, {expected}")  # fmt: skip
    return "\n".join(lines) + "\n"


__all__ = ["MAGIC_HELP", "CellblockKernel"]
