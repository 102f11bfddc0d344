"""The WebSocket's own messages: what a client may send, and the JSON of each answer."""

from __future__ import annotations

import json

import pytest

from cellblock.errors import InvalidRequest
from cellblock.service.protocol.messages import (
    Accepted,
    ErrorAnswer,
    PackagesQuery,
    Submit,
    Watch,
    encode_message,
    parse_client_message,
    request_id_of,
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
