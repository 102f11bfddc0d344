"""The WebSocket's own messages: what a client may send, and the JSON of each answer."""

from __future__ import annotations

import json

import pytest

from cellblock.errors import InvalidRequest
from cellblock.service.protocol.interactive import Resize, SignalInput, StdinData, StdinEnd
from cellblock.service.protocol.messages import (
    Accepted,
    ErrorAnswer,
    PackagesQuery,
    Submit,
    Watch,
    encode_message,
    parse_client_message,
    request_id_of,
    stage_input,
)


def test_each_message_type_parses_to_its_model():
    submit = parse_client_message(
        '{"type": "submit", "submission": {"run": "true"}, "request_id": 7}'
    )
    assert isinstance(submit, Submit) and submit.request_id == 7
    watch = parse_client_message('{"type": "watch", "id": "s1", "since": 3, "extra": true}')
    assert isinstance(watch, Watch) and (watch.id, watch.since) == ("s1", 3)
    assert parse_client_message('{"type": "watch", "id": "s1"}').since == 0  # type: ignore[union-attr]
    assert isinstance(parse_client_message('{"type": "packages"}'), PackagesQuery)


def test_stage_messages_parse_to_the_input_they_hand_the_stage():
    def parsed(raw: str) -> object:
        return stage_input(parse_client_message(raw))  # type: ignore[arg-type]

    assert parsed('{"type": "stdin", "id": "s", "data": "4\\n"}') == StdinData(b"4\n")
    assert parsed('{"type": "stdin", "id": "s", "data": "AP8=", "encoding": "base64"}') == (
        StdinData(b"\x00\xff")
    )
    assert parsed('{"type": "stdin", "id": "s", "eof": true}') == StdinEnd()
    assert parsed('{"type": "signal", "id": "s", "signal": "SIGINT"}') == SignalInput("SIGINT")
    assert parsed('{"type": "resize", "id": "s", "tty_size": [30, 90]}') == Resize(30, 90)


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ("{nope", "", "the message is not JSON"),
        ("[" * 100_000, "", "the message is not JSON"),
        ("[1]", "", "the message must be a JSON object"),
        ('{"type": "dance"}', "type", "unknown message type 'dance'"),
        ("{}", "type", "unknown message type None"),
        ('{"type": "submit"}', "submission", "must be a submission object"),
        ('{"type": "submit", "submission": []}', "submission", "must be a submission object"),
        ('{"type": "watch", "id": ""}', "id", "must be a submission id"),
        ('{"type": "cancel", "id": 5}', "id", "must be a submission id"),
        ('{"type": "status"}', "id", "must be a submission id"),
        ('{"type": "watch", "id": "s", "since": -1}', "since", "must be a whole number"),
        ('{"type": "watch", "id": "s", "since": true}', "since", "must be a whole number"),
        ('{"type": "watch", "id": "s", "since": 1.5}', "since", "must be a whole number"),
        ('{"type": "watch", "id": 1, "since": -1}', "id", "must be a submission id"),
        ('{"type": "stdin", "id": "s"}', "data", "give either data or eof"),
        ('{"type": "stdin", "id": "s", "data": "x", "eof": true}', "data", "give either data"),
        ('{"type": "stdin", "id": "s", "data": 5}', "data", "must be a string"),
        ('{"type": "stdin", "id": "s", "data": "!", "encoding": "base64"}', "data", "not base64"),
        ('{"type": "stdin", "id": "s", "data": "x", "encoding": "hex"}', "encoding", "utf8 or"),
        ('{"type": "stdin", "id": "s", "eof": false}', "eof", "must be true"),
        ('{"type": "stdin", "data": "x"}', "id", "must be a submission id"),
        ('{"type": "signal", "id": "s", "signal": "SIGSTOP"}', "signal", "SIGINT, SIGTERM"),
        ('{"type": "signal", "id": "s"}', "signal", "must be one of"),
        ('{"type": "resize", "id": "s", "tty_size": [24]}', "tty_size", "[rows, cols]"),
        ('{"type": "resize", "id": "s", "tty_size": [24, 0]}', "tty_size", "[rows, cols]"),
    ],
)
def test_a_bad_message_names_its_first_bad_field(raw, field, message):
    with pytest.raises(InvalidRequest) as info:
        parse_client_message(raw)
    [problem] = info.value.problems
    assert problem.field == field and message in problem.message


def test_the_request_id_of_a_bad_message_is_still_found_to_echo():
    assert request_id_of('{"type": "watch", "request_id": "r9"}') == "r9"
    assert request_id_of("{nope") is None and request_id_of("[1]") is None


def test_answers_put_type_first_and_request_id_last_and_leave_out_what_they_lack():
    assert list(json.loads(encode_message(Accepted(id="s1", request_id="r1")))) == [
        "type",
        "id",
        "request_id",
    ]
    assert json.loads(encode_message(Accepted(id="s1"))) == {"type": "accepted", "id": "s1"}
    error = ErrorAnswer(code="not_found", message="no submission x")
    assert json.loads(encode_message(error)) == {
        "type": "error",
        "code": "not_found",
        "message": "no submission x",
    }
    detailed = ErrorAnswer(
        code="invalid_request", message="m", details=[{"field": "f", "message": "m"}]
    )
    assert list(json.loads(encode_message(detailed))) == ["type", "code", "message", "details"]


def test_a_client_message_encodes_to_what_it_parses_from():
    for message in (
        Submit(type="submit", submission={"run": "true"}, request_id="r1"),
        Watch(type="watch", id="s1", since=4),
        PackagesQuery(type="packages"),
    ):
        assert parse_client_message(encode_message(message)) == message
    assert list(json.loads(encode_message(Watch(type="watch", id="s1", request_id=2)))) == [
        "type",
        "id",
        "since",
        "request_id",
    ]
