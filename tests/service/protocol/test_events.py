"""The events' one JSON codec: what goes on the wire, in which order, and what is refused."""

from __future__ import annotations

import json

import pytest

from cellblock.service.protocol import (
    DepsResult,
    EventRecorder,
    FinishedEvent,
    OutputEvent,
    OutputFile,
    SandboxResult,
    StageFinishedEvent,
    StatusEvent,
    SubmissionRequest,
    SubmissionState,
    TestFinishedEvent,
    TestResult,
    TestStartedEvent,
    decode_event,
    encode_event,
)


def recorder() -> EventRecorder:
    request = SubmissionRequest.model_validate({"run": "true"})
    return EventRecorder(SubmissionState.new("sub-1", request))


def test_an_event_goes_out_with_its_fields_then_id_time_and_seq_in_that_order():
    event = recorder().record(StatusEvent(status="queued"))
    assert list(json.loads(encode_event(event))) == ["type", "status", "id", "time", "seq"]
    assert "seq" not in json.loads(encode_event(event, numbered=False))


def test_the_finished_event_carries_the_submission_just_before_seq():
    rec = recorder()
    rec.record(StatusEvent(status="running", worker="w"))
    event = rec.record(FinishedEvent())
    keys = list(json.loads(encode_event(event)))
    assert keys == ["type", "id", "time", "submission", "seq"]
    assert json.loads(encode_event(event))["submission"] == rec.state.as_json()


def test_optional_fields_are_absent_not_null():
    wire = json.loads(encode_event(StatusEvent(status="cancelled")))
    assert "worker" not in wire and "error" not in wire
    assert "submission" not in json.loads(encode_event(FinishedEvent()))
    deps = DepsResult(status="ok").wire()
    assert "message" not in deps
    assert DepsResult(status="failed", message="no").wire()["message"] == "no"


RESULT = TestResult(
    status="failed",
    exit_code=1,
    stdout="7\n",
    name="big",
    verdict="runtime_error",
    max_points=2.0,
    message="exit 1",
    expected_output="6\n",
    files=[OutputFile(name="a.txt", content="aGk=", size=2, media_type="text/plain")],
    missing=["b.png"],
)


@pytest.mark.parametrize(
    "event",
    [
        StatusEvent(status="error", error="the executor failed", id="s", seq=3, time="t"),
        OutputEvent(stage="run", stream="stderr", data="é\n", id="s", seq=4, time="t"),
        StageFinishedEvent(stage="run", result=SandboxResult.skipped(), id="s", seq=5, time="t"),
        StageFinishedEvent(stage="deps", result=DepsResult(status="ok", cache="hit"), seq=2),
        TestStartedEvent(test=0, name="small", id="s", seq=6, time="t"),
        TestFinishedEvent(test=2, result=RESULT, id="s", seq=7, time="t"),
        OutputEvent(stage="run", stream="stdout", data="6\n", test=1, id="s", seq=8, time="t"),
    ],
)
def test_every_event_round_trips_through_its_json(event):
    assert decode_event(encode_event(event)) == event
    assert decode_event(json.loads(encode_event(event))) == event


def test_a_stage_result_is_read_by_its_stage_not_guessed_from_its_fields():
    deps = decode_event({"type": "stage_finished", "stage": "deps", "result": {"status": "ok"}})
    run = decode_event({"type": "stage_finished", "stage": "run", "result": {"status": "ok"}})
    assert isinstance(deps, StageFinishedEvent) and isinstance(deps.result, DepsResult)
    assert isinstance(run, StageFinishedEvent) and isinstance(run.result, SandboxResult)


def test_the_stored_seq_is_the_events_position():
    stored = encode_event(StatusEvent(status="queued", id="s", seq=1, time="t"), numbered=False)
    assert decode_event(stored, seq=7).seq == 7


def test_fields_a_newer_version_adds_are_kept_through_the_codec():
    raw = {"type": "output", "stage": "run", "stream": "stdout", "data": "x", "color": "red"}
    assert json.loads(encode_event(decode_event(raw)))["color"] == "red"


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "bogus"},
        {"type": "status", "status": "bogus"},
        {"type": "output", "stage": "run", "stream": "stdin", "data": ""},
        {"type": "stage_finished", "stage": "lint", "result": {"status": "ok"}},
        {"type": "stage_finished", "stage": "deps", "result": {"status": "signaled"}},
        {"status": "queued"},
        "not json",
    ],
)
def test_what_is_no_event_is_refused_as_a_value_error(raw):
    with pytest.raises(ValueError):
        decode_event(raw)


def test_a_test_result_is_a_stage_result_with_its_verdict():
    result = TestResult(status="failed", exit_code=1, name="small", verdict="wrong_answer")
    wire = result.wire()
    assert set(SandboxResult.skipped().wire()) < set(wire)
    assert (wire["name"], wire["verdict"], wire["points"], wire["max_points"]) == (
        "small",
        "wrong_answer",
        0.0,
        1.0,
    )
    with pytest.raises(ValueError):
        TestResult(status="ok", name="x", verdict="close_enough")  # type: ignore[arg-type]


def test_test_events_go_out_as_the_protocol_writes_them():
    started = json.loads(encode_event(TestStartedEvent(test=0, name="small", id="s", seq=3)))
    assert started == {"type": "test_started", "stage": "run", "test": 0, "name": "small",
                       "id": "s", "time": None, "seq": 3}  # fmt: skip
    assert list(started) == ["type", "stage", "test", "name", "id", "time", "seq"]
    finished = json.loads(encode_event(TestFinishedEvent(test=2, result=RESULT, id="s", seq=4)))
    assert list(finished) == ["type", "stage", "test", "result", "id", "time", "seq"]
    assert finished["result"] == RESULT.wire()
    assert (finished["result"]["name"], finished["result"]["verdict"]) == ("big", "runtime_error")
    assert finished["result"]["files"][0]["media_type"] == "text/plain"


def test_a_test_finished_event_decodes_its_result_as_a_test_result():
    result = {"status": "ok", "name": "a", "verdict": "passed"}
    event = decode_event({"type": "test_finished", "test": 0, "result": result})
    assert isinstance(event, TestFinishedEvent) and isinstance(event.result, TestResult)
    assert (event.stage, event.result.points, event.result.max_points) == ("run", 0.0, 1.0)


def test_an_output_event_names_its_test_only_when_it_has_one():
    plain = json.loads(encode_event(OutputEvent(stage="run", stream="stdout", data="x")))
    assert "test" not in plain
    of_test = OutputEvent(stage="run", stream="stderr", data="x", test=4)
    wire = json.loads(encode_event(of_test))
    assert wire["test"] == 4
    assert list(wire)[:5] == ["type", "stage", "stream", "data", "test"]
    decoded = decode_event(wire)
    assert isinstance(decoded, OutputEvent) and decoded.test == 4


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "test_started", "stage": "compile", "test": 0, "name": "a"},
        {"type": "test_started", "test": 0},
        {"type": "test_started", "test": "first", "name": "a"},
        {"type": "test_finished", "test": 0},
        {"type": "test_finished", "test": 0, "result": {"status": "ok", "name": "a"}},
        {"type": "test_finished", "test": 0,
         "result": {"status": "ok", "name": "a", "verdict": "close_enough"}},
        {"type": "test_finished", "stage": "deps", "test": 0,
         "result": {"status": "ok", "name": "a", "verdict": "passed"}},
        {"type": "output", "stage": "run", "stream": "stdout", "data": "", "test": "x"},
    ],
)  # fmt: skip
def test_a_malformed_test_event_is_refused(raw):
    with pytest.raises(ValueError):
        decode_event(raw)
