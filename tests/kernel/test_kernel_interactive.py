"""``%%run --interactive`` through a real kernel process (jupyter_client) against the real
service and executor: input requests only when the program waits, answers typed in, no request
left once the program has ended, an interrupt, and frontends that allow no stdin."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from kernelio import Kernel, Message, Outcome, execute

from cellblock.kernel import staging
from cellblock.kernel.help import inspect_text
from cellblock.kernel.replay import OutputLog
from cellblock.kernel.sections import CellSyntaxError, parse
from cellblock.kernel.terminal import TerminalText

# -- the syntax, the request, the terminal's text, the replay: pure ---------------------------


def test_interactive_is_the_first_word_after_run_and_the_rest_are_arguments() -> None:
    cell = parse('%%run --interactive --verbose x\n./main "$@"\n')
    assert cell.interactive and cell.run is not None
    assert cell.run.args == ("--verbose", "x")
    later = parse("%%run x --interactive\n./main\n")
    assert not later.interactive and later.run is not None
    assert later.run.args == ("x", "--interactive")
    assert not parse("%%run\ntrue\n").interactive and not parse("true\n").interactive
    with pytest.raises(CellSyntaxError, match="line 1: --interactive takes no value"):
        parse("%%run --interactive=yes\ntrue\n")
    assert "--interactive" in inspect_text("%%run --interactive\ntrue", 3)


def test_the_request_is_interactive_only_where_the_frontend_takes_input() -> None:
    cell = parse("%%stdin\nAda\n%%run --interactive a\nread n\n")
    staged = staging.stage(staging.Staged(), cell)
    asked = staging.request(staged, cell, stdin_allowed=True)
    assert asked is not None
    assert asked["stdin_mode"] == "interactive" and asked["tty"] is True
    assert "stdin" not in asked and asked["args"] == ["a"]
    fed = staging.request(staged, cell, stdin_allowed=False)
    assert fed is not None
    assert fed["stdin"] == "Ada\n" and "stdin_mode" not in fed and "tty" not in fed


def test_interactive_with_staged_tests_is_refused_naming_both_ways_out() -> None:
    staged = staging.stage(staging.Staged(), parse("%%test one\n1\n"))
    cell = parse("%%run --interactive\ncat\n")
    with pytest.raises(CellSyntaxError) as error:
        staging.request(staged, cell, stdin_allowed=False)
    assert error.value.line == 1
    assert "drop --interactive" in error.value.message and "%reset tests" in error.value.message


def test_the_terminal_text_folds_crlf_and_drops_the_echo_of_what_was_typed() -> None:
    text = TerminalText()
    assert text.feed("Guess: ") == "Guess: "
    text.typed("42\n")
    # The echo comes in pieces, a CR at a chunk's end waits for its LF.
    assert text.feed("4") == ""
    assert text.feed("2\r") == ""
    assert text.feed("\nToo low\r\nGuess: ") == "Too low\nGuess: "
    assert text.feed("50%\r") == "50%"
    assert text.flush() == "\r"
    # Echo off (a password prompt): the output is shown whole and no echo is awaited.
    text.typed("secret\n")
    assert text.feed("\r\nwelcome\r\n") == "\nwelcome\n"
    assert text.feed("secret\n") == "secret\n"


def test_the_log_holds_what_the_output_area_shows_and_replays_it_after_a_clear() -> None:
    log = OutputLog()
    status = {
        "data": {"text/plain": "submitting…"},
        "metadata": {},
        "transient": {"display_id": "s"},
    }
    log.add("display_data", status)
    log.add("stream", {"name": "stdout", "text": "Name? "})
    log.add("stream", {"name": "stdout", "text": "Ada\n"})
    log.add("update_display_data", {**status, "data": {"text/plain": "run: ok"}})
    log.add("stream", {"name": "stderr", "text": "oops\n"})
    assert log.replay() == [
        ("clear_output", {"wait": True}),
        ("display_data", {**status, "data": {"text/plain": "run: ok"}}),
        ("stream", {"name": "stdout", "text": "Name? Ada\n"}),
        ("stream", {"name": "stderr", "text": "oops\n"}),
    ]
    assert status["data"] == {"text/plain": "submitting…"}  # what was sent stays as it was


# -- through a real kernel ---------------------------------------------------------------------

GUESS_C = r"""%%files guess.c
#include <stdio.h>
int main(void) {
    int secret = 37, guess, tries = 0;
    do {
        printf("Guess a number (1-100): ");
        if (scanf("%d", &guess) != 1) { printf("bye\n"); return 1; }
        tries++;
        if (guess < secret) printf("%d is too low\n", guess);
        else if (guess > secret) printf("%d is too high\n", guess);
    } while (guess != secret);
    printf("Right, in %d tries!\n", tries);
    return 0;
}
%%compile
gcc -O2 -o guess guess.c
"""


@dataclass
class Conversation:
    """One execute request that allows stdin: its outcome and the input requests it made."""

    outcome: Outcome
    requests: list[Message] = field(default_factory=list)

    def shown_before(self, request: Message) -> str:
        """The stdout the kernel had sent when it sent ``request`` (by the kernel's own send
        times: iopub and stdin are two sockets, the order of arrival proves nothing)."""
        sent = request["header"]["date"]
        streams = [m for m in self.outcome.of("stream") if m["header"]["date"] < sent]
        return "".join(m["content"]["text"] for m in streams if m["content"]["name"] == "stdout")

    @property
    def area(self) -> Outcome:
        """What the output area holds at the end: the messages after the last clear_output."""
        kinds = [m["msg_type"] for m in self.outcome.messages]
        last = len(kinds) - kinds[::-1].index("clear_output") if "clear_output" in kinds else 0
        return Outcome(self.outcome.reply, self.outcome.messages[last:])


Answer = Callable[[], Awaitable[str | None]]


async def converse(kc: AsyncKernelClient, code: str, answer: Answer,
                   timeout: float = 60) -> Conversation:  # fmt: skip
    """Run ``code`` (jupyter_client's execute requests allow stdin, as JupyterLab's do) and
    ``answer()`` each input request (None: leave it unanswered); then make sure that no input
    request is still to come."""
    requests: list[Message] = []
    done = asyncio.Event()

    async def answer_requests() -> None:
        while not done.is_set():
            try:
                request = await kc.get_stdin_msg(timeout=0.1)
            except queue.Empty:
                continue
            requests.append(request)
            if (value := await answer()) is not None:
                kc.input(value)

    answering = asyncio.create_task(answer_requests())
    try:
        outcome = await execute(kc, code, timeout=timeout)
    finally:
        done.set()
        await answering
    await asyncio.sleep(0.5)
    assert not await kc.stdin_channel.msg_ready(), "an input request after the cell's end"
    return Conversation(outcome, requests)


async def test_a_guessing_game_asks_for_each_guess_after_its_prompt(kernel: Kernel) -> None:
    _, kc = kernel
    guesses = iter(["50", "25", "37"])

    async def guess() -> str:
        return next(guesses)

    talk = await converse(kc, f"{GUESS_C}%%run --interactive\n./guess\n", guess)
    out = talk.outcome
    assert out.status == "ok", (out.reply, out.stream(), out.summary)
    # One box per scanf, each after its prompt (the C library flushed it: a terminal); none
    # for the compile, none after the end.
    assert len(talk.requests) == 3
    for request in talk.requests:
        assert request["msg_type"] == "input_request"
        assert request["content"] == {"prompt": "", "password": False}
        assert talk.shown_before(request).endswith("Guess a number (1-100): ")
    # The terminal's output as the cell shows it: LF line ends, the answers not echoed a
    # second time (the frontend shows what was typed).
    assert out.stream() == (
        "Guess a number (1-100): 50 is too high\n"
        "Guess a number (1-100): 25 is too low\n"
        "Guess a number (1-100): Right, in 3 tries!\n"
    )
    # Every box was answered: nothing to clear away.
    assert not out.of("clear_output")


async def never() -> None:
    return None


async def test_a_box_left_unanswered_is_cleared_away_when_the_program_ends(kernel: Kernel) -> None:
    _, kc = kernel
    code = '%%limits\nrun.wall_time = 2s\n%%run --interactive\nread -p "Name? " name\n'
    talk = await converse(kc, code, never)
    out = talk.outcome
    assert out.status == "error" and "time" in out.error[1], out.error
    [request] = talk.requests
    assert talk.shown_before(request) == "Name? "
    # JupyterLab keeps a box until its output area is cleared (kernel/replay.py): the kernel
    # clears it at its next output and shows the cell again as it is: the status (the run's
    # end already), the prompt, then the summary.
    [clear] = out.of("clear_output")
    assert clear["content"] == {"wait": True}
    area = talk.area
    assert all(line.endswith("→ finished") for line in area.status_lines()), area.status_lines()
    assert area.stream() == "Name? "
    assert "time" in area.summary
    # An answer typed into that box now goes nowhere: the next program's box gets its own.
    kc.input("too late")

    async def fresh() -> str:
        return "fresh"

    talk = await converse(kc, '%%run --interactive\nread -p "Name? " n; echo "hi $n"\n', fresh)
    assert talk.outcome.status == "ok", talk.outcome.reply
    assert talk.outcome.stream() == "Name? hi fresh\n"


async def test_end_of_file_typed_closes_the_programs_stdin(kernel: Kernel) -> None:
    _, kc = kernel
    answers = iter(["hello", "\x04"])  # what jupyter_client's console sends for Ctrl-D

    async def type_then_eof() -> str:
        return next(answers)

    talk = await converse(kc, "%%run --interactive\ncat\necho done\n", type_then_eof)
    assert talk.outcome.status == "ok", talk.outcome.reply
    assert talk.outcome.stream() == "hello\ndone\n"
    assert len(talk.requests) == 2


async def test_an_interrupt_sends_the_program_sigint_first(kernel: Kernel) -> None:
    km, kc = kernel
    code = '%%run --interactive\nread -p "Number? " n\necho never\n'
    talk = await converse(kc, code, km.interrupt_kernel)
    # The program ended of its SIGINT, as Ctrl-C on its terminal ends it: the run's own
    # result, not a cancelled submission; its box cleared away.
    out = talk.area
    assert out.status == "error" and out.error[0] != "CellblockCancelled", out.error
    assert out.stream() == "Number? "
    assert "signal" in out.summary, out.summary
    assert talk.outcome.of("clear_output")


async def test_a_program_that_ignores_sigint_is_cancelled(kernel: Kernel) -> None:
    km, kc = kernel
    code = "%%run --interactive\ntrap '' INT\nread -p 'Number? ' n\nsleep 30\n"
    talk = await converse(kc, code, km.interrupt_kernel)
    out = talk.area
    assert out.error == ("CellblockCancelled", "interrupted: the submission was cancelled")
    assert out.status_lines()[-1].endswith("→ cancelled")


async def test_without_stdin_from_the_frontend_the_staged_stdin_is_fed(kernel: Kernel) -> None:
    _, kc = kernel
    kc.allow_stdin = False  # as nbclient and papermill execute
    out = await execute(kc, '%%stdin\nAda\n%%run --interactive\nread -p "Name? " n; echo "hi $n"\n')
    assert out.status == "ok", out.reply
    assert out.stream() == "(no interactive input here: ran with the staged %%stdin)\nhi Ada\n"
    assert not await kc.stdin_channel.msg_ready()


async def test_interactive_with_staged_tests_says_what_to_do(kernel: Kernel) -> None:
    _, kc = kernel
    await execute(kc, "%%test one\n1\n%%expect\n1\n")
    out = await execute(kc, "%%run --interactive\ncat\n")
    assert out.status == "error"
    ename, evalue = out.error
    assert ename == "CellSyntaxError"
    assert "line 1" in evalue and "--interactive" in evalue and "%reset tests" in evalue
