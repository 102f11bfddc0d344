"""The kernel as Jupyter runs it: real kernel processes (jupyter_client) against the real service,
real executors running real nsjail, and a real cache builder for dependencies."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jupyter_kernel_test
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from kernelio import (
    ADMIN,
    ALICE,
    Kernel,
    Message,
    ServiceProcesses,
    StartKernel,
    closed_port,
    execute,
    kernel_env,
)

from cellblock.service.client import Client

C_SUM = """\
#include <stdio.h>
int main(void) {
    int a, b;
    if (scanf("%d %d", &a, &b) != 2) return 2;
    printf("%d\\n", a + b);
    return 0;
}
"""


@pytest.fixture
async def alice(service: Any) -> AsyncIterator[Client]:
    async with Client(service.url, ALICE, timeout=10) as client:
        yield client


async def submissions(client: Client) -> list[dict[str, Any]]:
    return await client.list(limit=100)


# -- a run -------------------------------------------------------------------------------------


async def test_a_run_shows_a_live_status_its_output_and_a_summary(kernel: Kernel) -> None:
    _, kc = kernel
    out = await execute(kc, "%%run\necho hello, world\necho to stderr >&2\n")
    assert out.status == "ok", out.reply
    # One status display, then updates of it (the same display id).
    first, *updates = out.displays[:-1]
    assert first["msg_type"] == "display_data"
    display_id = first["content"]["transient"]["display_id"]
    assert updates and all(m["msg_type"] == "update_display_data" for m in updates)
    assert {m["content"]["transient"]["display_id"] for m in updates} == {display_id}
    assert {"text/html", "text/plain"} <= first["content"]["data"].keys()
    lines = out.status_lines()
    assert lines[0] == "submitting…"
    assert "queued" in lines
    assert "queued → picked up by executor-test-0" in lines
    assert "queued → picked up by executor-test-0 → run…" in lines
    assert re.fullmatch(r"queued → picked up by executor-test-0 → run: ok \d+ ms .* → finished",
                        lines[-1]), lines[-1]  # fmt: skip
    # The run's output as stream messages, before the summary.
    assert out.stream("stdout") == "hello, world\n"
    assert out.stream("stderr") == "to stderr\n"
    kinds = [m["msg_type"] for m in out.messages]
    assert kinds.index("stream") < len(kinds) - 1 and kinds[-1] == "display_data"
    # The summary table: last, a display of its own.
    summary = out.displays[-1]
    assert summary["msg_type"] == "display_data" and not summary["content"].get("transient")
    assert '<table class="cellblock-summary">' in summary["content"]["data"]["text/html"]
    header, row = out.summary.split("\n")
    assert header.split() == ["stage", "status", "exit", "signal", "wall", "cpu", "memory"]
    assert row.split()[:4] == ["run", "✅", "ok", "0"]
    assert not out.of("error")


async def test_output_is_streamed_while_the_run_goes_on(kernel: Kernel) -> None:
    _, kc = kernel
    out = await execute(kc, "echo one\nsleep 1\necho two\n")  # a plain cell is a run script
    assert out.status == "ok"
    texts = [
        m["content"]["text"] if m["msg_type"] == "stream" else m["content"]["data"]["text/plain"]
        for m in out.of("stream", "update_display_data")
    ]
    one, two = texts.index("one\n"), texts.index("two\n")
    # "one" came before the run had finished; "two" after "one".
    finished = next(i for i, t in enumerate(texts) if "run: ok" in t)
    assert one < two < finished


async def test_staging_cells_print_a_summary_and_persist(kernel: Kernel, alice: Client) -> None:
    _, kc = kernel
    out = await execute(kc, "%%files greeting.txt\nhello\n%%env\nNAME=world\n")
    assert out.status == "ok"
    assert out.stream() == "staged: 1 file(s): greeting.txt; env: NAME\n"
    assert not out.displays
    out = await execute(kc, "%%limits\nrun.wall_time = 10s\n%%stdin\nfrom stdin\n")
    assert out.stream().count("\n") == 1
    assert out.stream().startswith("staged: 1 file(s): greeting.txt; stdin (11 chars); env: NAME")
    assert await submissions(alice) == []
    out = await execute(kc, '%%run "two words"\ncat greeting.txt; echo "$NAME $1"; cat\n')
    assert out.status == "ok", out.reply
    assert out.stream() == "hello\nworld two words\nfrom stdin\n"
    [submission] = await submissions(alice)
    assert submission["status"] == "finished"


async def test_a_syntax_error_is_reported_before_anything_is_submitted(
    kernel: Kernel, alice: Client
) -> None:
    _, kc = kernel
    code = "%%files main.c\nint x;\n%%limits\nrun.cpu = 2\nrun.as = lots\n%%run\necho never\n"
    out = await execute(kc, code)
    assert out.status == "error"
    ename, evalue = out.error
    assert ename == "CellSyntaxError"
    assert evalue.startswith("line 5: run.as: 'lots' is not a number")
    assert "run.as = lots" in evalue
    [error] = out.of("error")
    assert error["content"]["ename"] == "CellSyntaxError"
    assert len(error["content"]["traceback"]) == 1  # one line, not a Python traceback
    assert not out.displays and not out.stream()
    out = await execute(kc, "%%frobnicate\n")
    assert out.error[0] == "CellSyntaxError"
    assert out.error[1].startswith("line 1: unknown magic %%frobnicate")
    out = await execute(kc, "%%deps gcc\nnot/a/package\n%%run\ntrue")
    assert out.error[1].startswith("line 2: 'not/a/package' is not a package name")
    # A refused cell stages nothing.
    assert (await execute(kc, "%staged")).stream() == "staged: nothing\n"
    # What only the service can judge (its maxima, file names) it refuses, naming the field.
    out = await execute(kc, "%%limits\nrun.wall_time = 1000m\n%%run\ntrue")
    ename, evalue = out.error
    assert ename == "CellblockInvalidSubmission"
    assert evalue.startswith("limits.run.wall_time: "), evalue
    assert out.status_lines() == ["submitting…", "not submitted"]
    out = await execute(kc, "%reset\n%%files ../escape.txt\nx\n%%run\ntrue")
    assert out.error[0] == "CellblockInvalidSubmission"
    assert out.error[1].startswith("files[0].name: "), out.error
    assert await submissions(alice) == []


# -- cells that fail ---------------------------------------------------------------------------


async def test_a_failing_run_ends_the_cell_in_error(kernel: Kernel) -> None:
    _, kc = kernel
    out = await execute(kc, "%%run\necho before the failure\nexit 3\n")
    assert out.status == "error"
    assert out.error == ("CellblockStageFailed", "run stage: failed: exit code 3")
    [error] = out.of("error")
    assert error["content"]["ename"] == "CellblockStageFailed"
    assert out.stream() == "before the failure\n"
    assert out.summary.split("\n")[1].split()[:4] == ["run", "❌", "failed", "3"]
    assert "run: failed exit 3" in out.status_lines()[-1]
    kinds = [m["msg_type"] for m in out.messages]
    assert kinds[-1] == "error" and kinds[-2] == "display_data"  # the summary, then the error


async def test_time_limits_end_the_cell_in_error(kernel: Kernel) -> None:
    _, kc = kernel
    out = await execute(kc, "%%limits\nrun.wall_time = 1s\n%%run\nsleep 10\n")
    assert out.error == (
        "CellblockStageFailed", "run stage: time_limit: wall time limit of 1 s exceeded",
    )  # fmt: skip
    assert "⏱ time_limit" in out.summary
    # CPU time, soft 1 s (SIGXCPU) and hard 3 s; the wall time limit is still staged, so raise it.
    code = "%%limits\nrun.cpu = 1:3\nrun.wall_time = 20s\n%%run\nwhile :; do :; done\n"
    out = await execute(kc, code)
    ename, evalue = out.error
    assert ename == "CellblockStageFailed"
    assert evalue.startswith("run stage: time_limit"), evalue


async def test_a_memory_limit_ends_the_cell_in_error(kernel: Kernel) -> None:
    _, kc = kernel
    code = (
        "%%limits\nrun.memory = 64M\n"
        "%%run\npython3 -c 'data = b\"x\" * (512 * 1024 * 1024); print(len(data))'\n"
    )
    out = await execute(kc, code)
    ename, evalue = out.error
    assert ename == "CellblockStageFailed"
    assert evalue.startswith("run stage: memory_limit"), evalue
    assert "🧠 memory_limit" in out.summary


@pytest.mark.timeout(120)
async def test_dependencies_compile_and_run(
    service: Any, executor: Any, start_builder: Any, start_kernel: StartKernel, alice: Client
) -> None:
    builder = start_builder()
    await builder.started()
    _, kc = await start_kernel(kernel_env(service.url))
    out = await execute(kc, "%%deps no-such-package\n%%run\necho never\n")
    assert out.error == (
        "CellblockStageFailed", "dependencies: failed: unknown package(s): no-such-package",
    )  # fmt: skip
    assert out.stream() == ""
    assert out.summary.split("\n")[1].split()[:3] == ["deps", "❌", "failed"]

    await execute(kc, "%reset")
    cell = (
        f"%%deps gcc\n%%files sum.c\n{C_SUM}%%compile\ngcc -O2 -o sum sum.c\n"
        "%%stdin\n3 4\n%%run\n./sum\n"
    )
    out = await execute(kc, cell, timeout=90)
    assert out.status == "ok", (out.reply, out.stream("stderr"))
    assert out.stream() == "7\n"
    rows = [row.split() for row in out.summary.split("\n")[1:]]
    assert [row[:3] for row in rows] == [
        ["deps", "✅", "ok"], ["compile", "✅", "ok"], ["run", "✅", "ok"],
    ]  # fmt: skip
    assert rows[0][3:5] in (["cache", "hit"], ["cache", "miss"])
    lines = out.status_lines()
    assert any(line.endswith("dependencies…") for line in lines)
    assert any(line.endswith("compile…") for line in lines)
    assert re.search(r"dependencies: ok cache (hit|miss) .* compile: ok .* run: ok", lines[-1])

    # Everything but the run stays staged: another input, the same program.
    out = await execute(kc, "%%stdin\n40 2\n%%run\n./sum")
    assert out.stream() == "42\n"
    # A compile error: its output is shown, and the run is skipped.
    out = await execute(kc, "%%files sum.c\nint main( {\n%%run\n./sum")
    assert out.error == ("CellblockStageFailed", "compile stage: failed: exit code 1")
    assert "error" in out.stream("stderr")
    assert "⏭ skipped" in out.summary

    # The package is in the cache now: %packages lists it, completion offers it.
    out = await execute(kc, "%packages")
    assert re.search(r"^gcc\s+\S+", out.stream(), re.MULTILINE), out.stream()
    reply = await kc.complete("%%deps gc", 9, reply=True, timeout=10)
    assert reply["content"]["matches"] == ["gcc"]
    assert len(await submissions(alice)) == 4


# -- line magics -------------------------------------------------------------------------------


async def test_line_magics(kernel: Kernel, alice: Client) -> None:
    _, kc = kernel
    out = await execute(kc, "%status")
    assert out.stream() == "no submission yet: give an id, %status ID\n"
    assert (await execute(kc, "%staged")).stream() == "staged: nothing\n"
    await execute(kc, "%%files a.txt\nabc\n%%compile\nmake all\n%%env\nX=1\n")
    out = await execute(kc, "%staged")
    assert out.stream() == (
        "staged: 1 file(s): a.txt; a compile script; env: X\n"
        "  file a.txt: 4 chars (utf8)\n"
        "  compile: make all\n"
    )
    # %reset forgets everything; sections after it in the same cell are staged anew.
    out = await execute(kc, "%reset\n%%env\nY=2\n")
    assert out.stream() == "staged submission cleared\nstaged: env: Y\n"
    out = await execute(kc, "%reset\n%staged")
    assert out.stream() == "staged submission cleared\nstaged: nothing\n"

    out = await execute(kc, "%packages")
    assert out.status == "ok" and out.stream() == "the cache holds no packages yet\n"
    out = await execute(kc, "%workers")
    header, *rows = out.stream().splitlines()
    assert header.split() == ["id", "kind", "host", "busy", "slots", "last", "seen"]
    assert [row.split()[:2] for row in rows] == [["executor-test-0", "executor"]]

    await execute(kc, "%%run\necho hi")
    [submission] = await submissions(alice)
    for code in ("%status", f"%status {submission['id']}"):
        out = await execute(kc, code)
        assert out.status == "ok"
        status, summary = out.of("display_data")
        assert "run: ok" in status["content"]["data"]["text/plain"]
        assert status["content"]["data"]["text/plain"].endswith("→ finished")
        assert summary["content"]["data"]["text/plain"].split("\n")[1].startswith("run ")
    out = await execute(kc, "%status no-such-id")
    assert out.status == "error" and out.error[0] == "NotFound"


async def test_workers_needs_the_admin_token(
    service: Any, executor: Any, start_kernel: StartKernel
) -> None:
    _, kc = await start_kernel(kernel_env(service.url, admin_token=ALICE))
    out = await execute(kc, "%workers")
    assert out.status == "error"
    assert out.error[0] == "Forbidden"
    assert len(out.of("error")[0]["content"]["traceback"]) == 1


async def test_workers_with_a_client_token_shows_the_capacity_and_no_worker(
    service: Any, launch: Any, start_kernel: StartKernel, tmp_path: Path
) -> None:
    # As a kernel of the embedded deployment has it: the client token, and a state directory
    # with no admin-token in it.
    executor = await launch(slots=2)
    env = {k: v for k, v in kernel_env(service.url).items() if k != "CELLBLOCK_ADMIN_TOKEN"}
    _, kc = await start_kernel({**env, "CELLBLOCK_STATE_DIR": str(tmp_path)})
    out = await execute(kc, "%workers")
    assert out.status == "ok", out.reply
    assert out.stream().splitlines() == ["executors  builders  slots  busy  queued",
                                         "1          0         2      0     0"]  # fmt: skip
    assert executor.worker_id not in out.stream()


# -- interrupts and an unreachable service -----------------------------------------------------


async def test_an_interrupt_cancels_the_submission(kernel: Kernel, service: Any) -> None:
    km, kc = kernel

    async def interrupt_once_started(message: Message) -> None:
        if message["msg_type"] == "stream" and "started" in message["content"]["text"]:
            await km.interrupt_kernel()

    out = await execute(kc, "%%run\necho started\nsleep 30\necho never\n",
                        on_message=interrupt_once_started)  # fmt: skip
    assert out.status == "error"
    assert out.error == ("CellblockCancelled", "interrupted: the submission was cancelled")
    assert out.stream() == "started\n"
    assert out.status_lines()[-1].endswith("→ cancelled")
    async with Client(service.url, ADMIN, timeout=10) as admin:
        [submission] = await admin.list(everyone=True)
        assert submission["status"] == "cancelled"
    # The kernel goes on: the next cell runs.
    out = await execute(kc, "%%run\necho after")
    assert out.status == "ok" and out.stream() == "after\n"


async def test_an_unreachable_service_is_one_clear_error(
    kernelspec: str, start_kernel: StartKernel
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    _, kc = await start_kernel(kernel_env(url))
    for code in ("%%run\necho hi", "%packages", "%status some-id"):
        out = await execute(kc, code)
        assert out.status == "error"
        ename, evalue = out.error
        assert ename == "CellblockServiceUnavailable", (code, out.error)
        assert url in evalue
        [error] = out.of("error")
        assert error["content"]["traceback"] == [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]
        if code.startswith("%%run"):
            assert out.status_lines() == ["submitting…", "not submitted"]
    # Staging needs no service; completion still offers magics.
    assert (await execute(kc, "%%env\nA=1")).status == "ok"
    reply = await kc.complete("%%de", 4, reply=True, timeout=10)
    assert reply["content"]["matches"] == ["%%deps"]


# -- completion, inspection, kernel info -------------------------------------------------------


async def test_completion_and_inspection_requests(kernel: Kernel) -> None:
    _, kc = kernel
    reply = (await kc.complete("%%files a.c\nx\n%%f", 17, reply=True, timeout=10))["content"]
    assert reply == {"status": "ok", "matches": ["%%files"], "cursor_start": 14,
                     "cursor_end": 17, "metadata": {}}  # fmt: skip
    reply = (await kc.complete("%%limits\nrun.wall", 17, reply=True, timeout=10))["content"]
    assert reply["matches"] == ["run.wall_time"] and reply["cursor_start"] == 9
    reply = (await kc.complete("%%stdin --", 10, reply=True, timeout=10))["content"]
    assert reply["matches"] == ["--encoding"]
    reply = (await kc.complete("%sta", 4, reply=True, timeout=10))["content"]
    assert reply["matches"] == ["%staged", "%status"]

    reply = (await kc.inspect("%%limits\nrun.cpu = 2", 12, reply=True, timeout=10))["content"]
    assert reply["status"] == "ok" and reply["found"] is True
    assert reply["data"]["text/plain"].startswith("%%limits\n")
    reply = (await kc.inspect("echo hi", 2, reply=True, timeout=10))["content"]
    assert reply["found"] is False and reply["data"] == {}


async def test_kernel_info(kernel: Kernel) -> None:
    _, kc = kernel
    info = (await kc.kernel_info(reply=True, timeout=10))["content"]
    assert info["implementation"] == "cellblock"
    assert info["language_info"]["name"] == "cellblock"
    assert "%%files" in info["banner"]


def test_the_kernelspec(kernelspec: str) -> None:
    spec = KernelSpecManager().get_kernel_spec("cellblock")
    assert spec.display_name == "Cellblock"
    assert spec.language == "cellblock"
    assert spec.interrupt_mode == "signal"
    assert spec.argv == [sys.executable, "-m", "cellblock.kernel", "-f", "{connection_file}"]


# -- conformance -------------------------------------------------------------------------------


@pytest.mark.usefixtures("kernelspec")
@pytest.mark.timeout(120)
class TestConformance(jupyter_kernel_test.KernelTests):
    """jupyter_kernel_test's message-level checks. A unittest class cannot use the async
    fixtures, so the service, Redis and an executor run as subprocesses of their own, and the
    kernel finds them through the environment it inherits."""

    kernel_name = "cellblock"
    language_name = "cellblock"
    file_extension = ".sh"

    code_hello_world = "%%run\necho hello, world"
    code_stderr = "%%run\necho oops >&2"
    code_generate_error = "%%frobnicate"  # refused before submission: one error message
    code_display_data = [
        {"code": "%%run\ntrue", "mime": "text/html"},
        {"code": "%%run\ntrue", "mime": "text/plain"},
    ]
    completion_samples = [
        {"text": "%%fi", "matches": ["%%files"]},
        {"text": "%st", "matches": ["%staged", "%status"]},
        {"text": "%%limits\nrun.wall", "matches": ["run.wall_time"]},
    ]
    code_inspect_sample = "%%limits"

    services: ServiceProcesses
    saved_environ: dict[str, str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.services = ServiceProcesses().start()
        cls.saved_environ = dict(os.environ)
        os.environ.update(kernel_env(cls.services.url))
        try:
            super().setUpClass()
        except BaseException:
            cls._restore()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            cls._restore()

    @classmethod
    def _restore(cls) -> None:
        os.environ.clear()
        os.environ.update(cls.saved_environ)
        cls.services.stop()
