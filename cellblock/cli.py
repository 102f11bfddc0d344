"""The ``cellblock`` command: the one entry point to every part of the system."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellblock import config as config_module
from cellblock import logs
from cellblock.errors import CellblockError, FieldProblem, InvalidRequest

if TYPE_CHECKING:
    from cellblock.service.client import Client, Stream
    from cellblock.terminal import Lent
    from cellblock.up import UpOptions

DEFAULT_STATE_DIR = Path(os.environ.get("CELLBLOCK_STATE_DIR", "~/.local/state/cellblock"))

#: Exit statuses of ``cellblock exec``.
EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_SYSTEM = 0, 1, 2, 3


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where Cellblock keeps its state (default: %(default)s or $CELLBLOCK_STATE_DIR)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ["CELLBLOCK_CONFIG"]) if "CELLBLOCK_CONFIG" in os.environ else None,
        help="configuration file (default: <state-dir>/cellblock.toml)",
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellblock", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "exec",
        help="run one submission on this machine, without any service",
        description="Run SUBMISSION (a JSON file of shared/PROTOCOL.md's submission request, "
        "or - for standard input) in the sandbox and print the finished submission as JSON. "
        "Exit status: 0 when every stage succeeded, 1 when a stage did not, 2 for bad input, "
        "3 when the system failed.",
    )
    run.add_argument("submission", help="submission request JSON file, or - for stdin")
    run.add_argument("--stream", action="store_true", help="print events as JSON lines")
    run.add_argument("--slot", type=int, default=0, help="sandbox slot (its uid) to use")
    _common(run)

    executor = commands.add_parser(
        "executor",
        help="run an executor: take submissions from the queue and run them",
        description="SIGTERM or SIGINT drains it: running submissions finish, then it exits.",
    )
    _worker_options(executor, "executor")
    executor.add_argument("--slots", type=int, help="parallel sandboxes (default: config slots)")
    executor.add_argument(
        "--uid-offset",
        type=int,
        default=0,
        help="slot N runs as uid sandbox.uid_base + offset + N; give every executor on one "
        "host its own range",
    )

    builder = commands.add_parser(
        "builder",
        help="run a cache builder: build package sets into the shared Nix cache",
        description="SIGTERM or SIGINT drains it: the running build finishes, then it exits.",
    )
    _worker_options(builder, "builder")

    up = commands.add_parser(
        "up",
        help="run the whole system on this machine: Redis, the service, executors, builders",
        description="Ctrl-C (or SIGTERM) stops everything and leaves no process behind.",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8765)
    up.add_argument(
        "--token",
        default=os.environ.get("CELLBLOCK_TOKEN"),
        help="the client token (default: $CELLBLOCK_TOKEN, else generated)",
    )
    up.add_argument(
        "--admin-token",
        default=os.environ.get("CELLBLOCK_ADMIN_TOKEN"),
        help="the admin token (default: $CELLBLOCK_ADMIN_TOKEN, else generated)",
    )
    up.add_argument("--executors", type=int, default=2)
    up.add_argument("--builders", type=int, default=2)
    up.add_argument("--redis", help="use this Redis instead of starting a private one")
    up.add_argument(
        "--stop-with", type=int, metavar="FD",
        help="stop when this inherited pipe's writer is gone (the process that started it)",
    )  # fmt: skip
    _common(up)

    kernel = commands.add_parser("kernel", help="the Jupyter kernel")
    kernel_actions = kernel.add_subparsers(dest="kernel_action", required=True, metavar="ACTION")
    install = kernel_actions.add_parser(
        "install", help="install the kernelspec `cellblock` (default: for the whole system)"
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python's prefix")
    where.add_argument("--prefix", help="into this prefix")
    install.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=argparse.SUPPRESS
    )
    install.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)

    service = commands.add_parser("service", help="run the REST and WebSocket API")
    service.add_argument("--host", default="127.0.0.1")
    service.add_argument("--port", type=int, default=8765)
    service.add_argument(
        "--redis",
        default=os.environ.get("CELLBLOCK_REDIS_URL"),
        required=False,
        help="Redis URL (default: $CELLBLOCK_REDIS_URL)",
    )
    _common(service)
    _client_commands(commands)
    return parser


def _worker_options(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument(
        "--redis",
        default=os.environ.get("CELLBLOCK_REDIS_URL"),
        help="Redis URL (default: $CELLBLOCK_REDIS_URL)",
    )
    parser.add_argument("--id", help=f"worker id (default: {kind}-HOST-PID)")
    _common(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, component=args.command)
    state_dir: Path = args.state_dir.expanduser()
    try:
        if args.command == "kernel":
            return _kernel(args)
        if args.command == "packages" and args.action == "gc":
            config = config_module.load(state_dir, args.config)
            return asyncio.run(_packages_gc(config, args))
        if args.command in CLIENT_COMMANDS:  # they talk to a service: no configuration needed
            return asyncio.run(_client_command(args, state_dir))
        config = config_module.load(state_dir, args.config)
        if args.command == "exec":
            return asyncio.run(_exec(config, args))
        if args.command == "up":
            from cellblock import up

            return asyncio.run(up.run(config, _up_options(args)))
        if args.command in ("executor", "builder", "service") and not args.redis:
            raise CellblockError("no Redis: give --redis URL or set CELLBLOCK_REDIS_URL")
        if args.command == "executor":
            return asyncio.run(_executor(config, args))
        if args.command == "builder":
            return asyncio.run(_builder(config, args))
        if args.command == "service":
            from cellblock.service import server

            return asyncio.run(server.serve(config, args.redis, args.host, args.port))
    except InvalidRequest as exc:
        print(json.dumps(exc.as_json()), file=sys.stderr)
        return EXIT_BAD_INPUT
    except CellblockError as exc:
        print(f"cellblock: {exc.message}", file=sys.stderr)
        return EXIT_SYSTEM
    except KeyboardInterrupt:
        return 130
    return EXIT_SYSTEM


def _up_options(args: argparse.Namespace) -> UpOptions:
    from cellblock.up import UpOptions

    return UpOptions(
        host=args.host,
        port=args.port,
        executors=args.executors,
        builders=args.builders,
        log_level=args.log_level,
        redis=args.redis,
        token=args.token,
        admin_token=args.admin_token,
        config_file=args.config,
        stop_with=args.stop_with,
    )


async def _exec(config: config_module.Config, args: argparse.Namespace) -> int:
    from cellblock.executor import host
    from cellblock.executor.runner import SubmissionRunner
    from cellblock.service.protocol import (
        Event,
        EventRecorder,
        FinishedEvent,
        StatusEvent,
        SubmissionState,
        encode_event,
        parse_submission,
    )

    raw = _read_json(args.submission)
    submission = parse_submission(raw, config.limits)
    if submission.request.stdin_mode == "interactive":
        raise InvalidRequest([FieldProblem(
            "stdin_mode", "interactive stdin comes through the service: use cellblock submit "
            "--interactive, or give stdin with the submission",
        )])  # fmt: skip
    sandboxes = host.prepare(config)
    runner = SubmissionRunner(sandboxes.sandbox(args.slot))
    submission_id = secrets.token_urlsafe(18)
    recorder = EventRecorder(SubmissionState.new(submission_id, submission.request))

    def emit(body: Event) -> None:
        event = recorder.record(body)
        if args.stream:
            print(encode_event(event), flush=True)

    emit(StatusEvent(status="queued"))
    emit(StatusEvent(status="running", worker=f"exec-{os.uname().nodename}"))
    try:
        await runner.run(submission, emit)
    finally:
        await runner.aclose()
    emit(FinishedEvent())
    if not args.stream:
        print(json.dumps(recorder.state.as_json(), indent=2))
    stages = [s for s in recorder.state.stages.values() if s is not None]
    return EXIT_OK if all(s.status == "ok" for s in stages) else EXIT_STAGE_FAILED


async def _executor(config: config_module.Config, args: argparse.Namespace) -> int:
    from cellblock.executor import host
    from cellblock.executor.executor import Executor
    from cellblock.service.store import Store

    store = Store.connect(args.redis, retention=config.retention, queue_size=config.queue_size)
    worker_id = args.id or f"executor-{socket.gethostname()}-{os.getpid()}"
    executor = Executor(
        store,
        host.prepare(config),
        worker_id=worker_id,
        slots=args.slots or config.slots,
        uid_offset=args.uid_offset,
    )
    executor.presence.drain_on_signals()
    try:
        await executor.run()
    finally:
        await store.close()
    return 0


async def _builder(config: config_module.Config, args: argparse.Namespace) -> int:
    from cellblock.cachebuilder.builder import Builder
    from cellblock.service.store import Store

    store = Store.connect(args.redis, retention=config.retention, queue_size=config.queue_size)
    builder = Builder(
        store, config, worker_id=args.id or f"builder-{socket.gethostname()}-{os.getpid()}"
    )
    builder.presence.drain_on_signals()
    try:
        await builder.run()
    finally:
        await store.close()
    return 0


# -- commands that talk to a service --------------------------------------------------------

CLIENT_COMMANDS = ("submit", "workers", "scale", "packages")
#: Those of them that take the admin token; ``workers`` without one shows the capacity.
ADMIN_COMMANDS = ("workers", "scale")


def _client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = commands.add_parser(
        "submit",
        help="send a submission to a Cellblock service",
        description="Send SUBMISSION (a JSON file of shared/PROTOCOL.md's submission request, "
        "or - for standard input) to the service and print its id and status as JSON. With "
        "--wait, print the finished submission; with --stream, print its events as JSON lines "
        "as they happen (a dropped connection is resumed). Ctrl-C while waiting cancels the "
        "submission. Exit status: 0 when it was accepted (or, waiting, every stage succeeded), "
        "1 when a stage did not succeed or it was cancelled, 2 for bad input, 3 when the "
        "service or the system failed. With --interactive, the run stage's exit status when it "
        "ran to an exit or a signal.",
    )
    submit.add_argument("submission", help="submission request JSON file, or - for stdin")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--stream", action="store_true", help="print events as JSON lines")
    submit.add_argument(
        "--interactive",
        action="store_true",
        help="run it on this terminal, like `docker run -it`: what you type goes to the "
        "program (Ctrl-C interrupts it, Ctrl-D ends its input), its output comes here, and "
        "its exit status (128+N for signal N) is this command's; other stages' output goes "
        "to stderr",
    )
    _client_options(submit, admin=False)

    workers = commands.add_parser(
        "workers",
        help="list the service's executors and builders (admin), or its capacity",
        description="Print every live worker as JSON; --drain ID drains and stops one (admin). "
        'With a client token (no admin token given or found), print {"capacity": {"executors", '
        '"builders", "slots", "busy", "queued"}} instead.',
    )
    workers.add_argument("--drain", metavar="ID", help="drain and stop this worker")
    _client_options(workers, admin=True)

    scale = commands.add_parser(
        "scale",
        help="start or stop workers of a `cellblock up` deployment (admin)",
        description="Ask the service for this many executors and/or builders; stopping drains.",
    )
    scale.add_argument("--executors", type=int, metavar="N")
    scale.add_argument("--builders", type=int, metavar="M")
    _client_options(scale, admin=True)

    packages = commands.add_parser(
        "packages",
        help="the shared package cache: list it, prefetch into it, evict from it",
        description="list: the cached packages as JSON. prefetch NAME...: build a package set "
        "into the cache ahead of use (with --wait, until it is built). gc: evict least recently "
        "used environments over the size budget (runs on a builder host: needs --redis).",
    )
    packages.add_argument("action", choices=("list", "prefetch", "gc"), nargs="?", default="list")
    packages.add_argument("names", nargs="*", metavar="NAME", help="package names to prefetch")
    packages.add_argument("--wait", action="store_true", help="prefetch: wait for the build")
    packages.add_argument(
        "--redis",
        default=os.environ.get("CELLBLOCK_REDIS_URL"),
        help="gc: the Redis URL (default: $CELLBLOCK_REDIS_URL)",
    )
    packages.add_argument("--config", type=Path, help="gc: configuration file")
    _client_options(packages, admin=False)


def _client_options(parser: argparse.ArgumentParser, *, admin: bool) -> None:
    variable, file = (
        ("CELLBLOCK_ADMIN_TOKEN", "admin-token") if admin else ("CELLBLOCK_TOKEN", "token")
    )
    parser.add_argument("--url", help="the service (default: $CELLBLOCK_URL, else <state-dir>/url)")
    parser.add_argument(
        "--token", help=f"the token (default: ${variable}, else <state-dir>/{file})"
    )
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for answers")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where `cellblock up` wrote the URL and tokens (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")


async def _client_command(args: argparse.Namespace, state_dir: Path) -> int:
    from cellblock.service.client import Client, ClientError

    def connect(admin: bool) -> Client:
        return Client.from_environment(
            state_dir, admin=admin, url=args.url, token=args.token, timeout=args.timeout
        )

    try:
        client = connect(admin=args.command in ADMIN_COMMANDS)
    except ClientError:
        if args.command != "workers" or args.drain:
            raise
        # No admin token anywhere: the client token still shows the capacity.
        client = connect(admin=False)
    async with client:
        if args.command == "submit":
            return await _submit(client, args)
        if args.command == "workers":
            return await _workers(client, args)
        if args.command == "packages":
            return await _packages(client, args)
        return await _scale(client, args)


async def _packages(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        _print_json(await client.packages(), indent=2)
        return EXIT_OK
    if not args.names:
        raise InvalidRequest([FieldProblem("names", "name the packages to prefetch")])
    answer = await client.prefetch(args.names)
    while args.wait and answer.get("status") == "building":
        await asyncio.sleep(0.5)
        build = await client.build(answer["id"])
        if build["status"] != "building":
            answer = {**answer, "status": build["status"], "message": build.get("message", "")}
    _print_json(answer, indent=2)
    return EXIT_OK if answer.get("status") in ("cached", "ok", "building") else EXIT_STAGE_FAILED


async def _submit(client: Client, args: argparse.Namespace) -> int:
    if args.interactive:
        return await _submit_interactive(client, args)
    request = _read_request(args.submission)
    if not (args.wait or args.stream):
        _print_json(await client.submit(request))
        return EXIT_OK
    stream = client.stream(request)
    try:
        async with stream:
            async for event in stream:
                if args.stream:
                    print(json.dumps(event), flush=True)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task
        if stream.id is not None:
            await _cancel_quietly(client, stream.id)
        raise
    assert stream.submission is not None
    if not args.stream:
        _print_json(stream.submission, indent=2)
    return _submission_exit_status(stream.submission)


async def _submit_interactive(client: Client, args: argparse.Namespace) -> int:
    """The submission's run stage on this terminal; the program's exit status."""
    from cellblock.service.protocol.interactive import MAX_TTY_SIDE
    from cellblock.terminal import size

    refusal = None
    if args.wait or args.stream:
        refusal = "--interactive shows the program's output itself: leave out --wait and --stream"
    elif args.submission == "-":
        refusal = "--interactive needs the submission in a file: standard input is the terminal"
    elif not sys.stdin.isatty():
        refusal = "--interactive needs a terminal: standard input is not one"
    if refusal is not None:
        print(f"cellblock: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    request = {**_read_request(args.submission), "stdin_mode": "interactive", "tty": True}
    if (rows_cols := size(sys.stdin.fileno())) is not None:
        request["tty_size"] = [min(side, MAX_TTY_SIDE) for side in rows_cols]
    stream = client.stream(request)
    try:
        async with stream:
            await _converse(stream)
    except asyncio.CancelledError:  # Ctrl-C before the run stage: asyncio.run cancels this task
        if stream.id is not None:
            await _cancel_quietly(client, stream.id)
        raise
    assert stream.submission is not None
    return _program_exit_status(stream.submission)


async def _converse(stream: Stream) -> None:
    """Follow the stream to its end, lending this terminal to the run stage while it runs."""
    from cellblock.terminal import Lent

    async with contextlib.AsyncExitStack() as lent:
        async for event in stream:
            kind, stage = event.get("type"), event.get("stage")
            if kind == "output":
                # Only the program's own output on stdout: compile's goes with the messages.
                run_stdout = stage == "run" and event.get("stream") == "stdout"
                out = sys.stdout if run_stdout else sys.stderr
                out.buffer.write(str(event.get("data", "")).encode())
                out.flush()
            elif kind == "stage_started" and stage == "run":
                terminal = lent.enter_context(Lent(sys.stdin.fileno()))
                forwarding = asyncio.create_task(_forward(stream, terminal))
                lent.push_async_callback(_stop, forwarding)
            elif kind == "stage_finished" and stage == "run":
                await lent.aclose()


async def _forward(stream: Stream, terminal: Lent) -> None:
    """Keystrokes and size changes to the running stage, in the order they came."""
    async for item in terminal:
        if isinstance(item, bytes):
            await stream.send_stdin(item)
        else:
            await stream.resize(*item)
    await stream.close_stdin()  # the terminal hung up: nothing more can come


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it; what it raised before, it raises here."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _program_exit_status(submission: dict[str, Any]) -> int:
    """The run stage's exit status as a shell gives it (128+N for signal N); when there is
    none, the reason on stderr and ``_submission_exit_status``'s status."""
    run = submission["stages"].get("run")
    if run is not None and run["status"] in ("ok", "failed", "signaled"):
        return 128 + run["signal"] if run["signal"] is not None else int(run["exit_code"])
    stages = submission["stages"].items()
    failed = next(((name, s["status"]) for name, s in stages if s and s["status"] != "ok"), None)
    if submission["status"] == "finished" and failed is not None:
        reason = f"the {failed[0]} stage ended with status {failed[1]}"
    else:
        error = submission.get("error")
        reason = f"the submission is {submission['status']}" + (f": {error}" if error else "")
    print(f"cellblock: {reason}", file=sys.stderr)
    return _submission_exit_status(submission)


async def _cancel_quietly(client: Client, submission_id: str) -> None:
    try:
        await asyncio.wait_for(client.cancel(submission_id), client.timeout)
        print(f"cellblock: cancelled submission {submission_id}", file=sys.stderr)
    except (CellblockError, TimeoutError) as exc:
        reason = exc.message if isinstance(exc, CellblockError) else "no answer"
        print(f"cellblock: could not cancel {submission_id}: {reason}", file=sys.stderr)


def _submission_exit_status(submission: dict[str, Any]) -> int:
    """0 when every stage succeeded, 1 when one did not (or it was cancelled), 3 when the
    system failed it (or the sandbox failed a stage)."""
    stages = [s for s in submission["stages"].values() if s is not None]
    if submission["status"] == "error" or any(s["status"] == "error" for s in stages):
        return EXIT_SYSTEM
    if submission["status"] == "finished" and all(s["status"] == "ok" for s in stages):
        return EXIT_OK
    return EXIT_STAGE_FAILED


async def _workers(client: Client, args: argparse.Namespace) -> int:
    from cellblock.service.client import Forbidden

    if args.drain:
        _print_json(await client.drain(args.drain))
        return EXIT_OK
    try:
        _print_json({"workers": await client.workers()}, indent=2)
    except Forbidden:  # a client's token: the list is for admins, the capacity is not
        _print_json({"capacity": await client.capacity()}, indent=2)
    return EXIT_OK


async def _scale(client: Client, args: argparse.Namespace) -> int:
    from cellblock.errors import FieldProblem

    if args.executors is None and args.builders is None:
        raise InvalidRequest([FieldProblem("", "give --executors N and/or --builders M")])
    _print_json(await client.scale(executors=args.executors, builders=args.builders))
    return EXIT_OK


def _print_json(document: object, indent: int | None = None) -> None:
    print(json.dumps(document, indent=indent), flush=True)


async def _packages_gc(config: config_module.Config, args: argparse.Namespace) -> int:
    from cellblock.cachebuilder.builder import evict
    from cellblock.cachebuilder.environments import EnvironmentCache
    from cellblock.service.store import Store

    if not args.redis:
        raise CellblockError("no Redis: give --redis URL or set CELLBLOCK_REDIS_URL")
    store = Store.connect(args.redis)
    try:
        evicted = await evict(EnvironmentCache(store), config.cache_size_budget, config.cache_grace)
    finally:
        await store.close()
    _print_json(
        {"evicted": [{"key": e.key, "packages": list(e.names), "size": e.size} for e in evicted]},
        indent=2,
    )
    return EXIT_OK


def _kernel(args: argparse.Namespace) -> int:
    from cellblock.kernel.install import install

    prefix = args.prefix or (sys.prefix if args.sys_prefix else None)
    print(f"installed the cellblock kernelspec in {install(user=args.user, prefix=prefix)}")
    return EXIT_OK


def _read_request(source: str) -> dict[str, Any]:
    request = _read_json(source)
    if not isinstance(request, dict):
        raise InvalidRequest([FieldProblem("", "the submission must be a JSON object")])
    return request


def _read_json(source: str) -> object:
    from cellblock.errors import FieldProblem

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise CellblockError(f"cannot read {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest([FieldProblem("", f"not UTF-8 text: {exc}")]) from None
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise InvalidRequest([FieldProblem("", f"not JSON: {exc}")]) from None
