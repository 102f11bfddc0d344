"""The status state machine: which event may follow which, and the document it keeps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cellblock.service.protocol import (
    SKIPPED_MESSAGE,
    EventRecorder,
    InvalidTransition,
    SandboxResult,
    SubmissionRequest,
    SubmissionState,
    apply_event,
    decode_event,
    stage_result,
)

# -- the state machine ----------------------------------------------------------------------

T0, T1, T2 = "2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:01.000000Z", "2024-01-01T00:00:02Z"


def request(**fields: Any) -> SubmissionRequest:
    return SubmissionRequest.model_validate({"run": "./main", **fields})


FULL = {"dependencies": ["gcc"], "compile": "gcc -o main main.c"}


def result(status: str = "ok", **fields: Any) -> dict[str, Any]:
    if status == "skipped":
        return SandboxResult.skipped().wire()
    return {"status": status, "exit_code": 0 if status == "ok" else 1, **fields}


def deps_result(status: str = "ok") -> dict[str, Any]:
    return {"status": status, "cache": "hit", "packages": [], "log": "", "wall_time": 0.1}


class Recorder:
    """The protocol's ``EventRecorder``, fed and read as JSON, as events travel."""

    def __init__(self, recorder: EventRecorder) -> None:
        self.recorder = recorder

    @property
    def state(self) -> SubmissionState:
        return self.recorder.state

    @property
    def seq(self) -> int:
        return self.recorder.seq

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.recorder.record(decode_event(body)).wire()


def recorder_for(**fields: Any) -> Recorder:
    return Recorder(EventRecorder(SubmissionState.new("sub-1", request(**fields), created_at=T0)))


def play(rec: Recorder, *bodies: dict[str, Any]) -> list[dict[str, Any]]:
    return [rec.record(body) for body in bodies]


def apply(state: SubmissionState, body: dict[str, Any]) -> SubmissionState:
    return apply_event(state, decode_event(body))


QUEUED = {"type": "status", "status": "queued"}
RUNNING = {"type": "status", "status": "running", "worker": "executor-a-1"}


def started(stage: str) -> dict[str, Any]:
    return {"type": "stage_started", "stage": stage}


def stage_done(stage: str, res: dict[str, Any]) -> dict[str, Any]:
    return {"type": "stage_finished", "stage": stage, "result": res}


FINISHED = {"type": "finished"}


def test_a_new_submission_is_queued_and_knows_nothing_yet():
    state = SubmissionState.new("sub-1", request(**FULL), created_at=T0)
    assert state.as_json() == {
        "id": "sub-1",
        "status": "queued",
        "stage": None,
        "picked_up": None,
        "worker": None,
        "dependencies_installed": None,
        "compiled": None,
        "ran": None,
        "created_at": T0,
        "started_at": None,
        "finished_at": None,
        "stages": {"deps": None, "compile": None, "run": None},
        "error": None,
        "attempts": 0,
    }
    assert not state.done


def test_stages_a_submission_lacks_are_done_at_once():
    state = SubmissionState.new("sub-1", request())
    assert state.dependencies_installed is True
    assert state.compiled is True
    assert state.ran is None
    assert state.created_at.endswith("Z")
    only_deps = SubmissionState.new("sub-2", request(dependencies=["gcc"]))
    assert (only_deps.dependencies_installed, only_deps.compiled) == (None, True)
    only_compile = SubmissionState.new("sub-3", request(compile="make"))
    assert (only_compile.dependencies_installed, only_compile.compiled) == (True, None)


def test_the_normal_path_sets_every_flag_as_the_protocol_says():
    rec = recorder_for(**FULL)

    rec.record(QUEUED)
    assert rec.state.status == "queued"
    assert rec.state.picked_up is None

    rec.record({**RUNNING, "time": T1})
    s = rec.state
    assert (s.status, s.picked_up, s.worker, s.started_at, s.attempts) == (
        "running",
        True,
        "executor-a-1",
        T1,
        1,
    )
    assert (s.dependencies_installed, s.compiled, s.ran, s.stage) == (None, None, None, None)

    rec.record(started("deps"))
    assert rec.state.stage == "deps"
    rec.record(stage_done("deps", deps_result()))
    assert rec.state.dependencies_installed is True
    assert rec.state.stages["deps"] == stage_result("deps", deps_result())
    assert rec.state.compiled is None

    rec.record(started("compile"))
    assert rec.state.stage == "compile"
    rec.record({"type": "output", "stage": "compile", "stream": "stderr", "data": "warning"})
    rec.record(stage_done("compile", result("ok")))
    assert rec.state.compiled is True
    assert rec.state.ran is None

    rec.record(started("run"))
    assert rec.state.stage == "run"
    rec.record(stage_done("run", result("ok")))
    assert rec.state.ran is True
    assert rec.state.status == "running"

    finished = rec.record({**FINISHED, "time": T2})
    s = rec.state
    assert (s.status, s.stage, s.finished_at) == ("finished", None, T2)
    assert s.done
    assert s.stages == {
        "deps": stage_result("deps", deps_result()),
        "compile": stage_result("compile", result("ok")),
        "run": stage_result("run", result("ok")),
    }
    assert finished["submission"] == s.as_json()
    assert finished["submission"]["status"] == "finished"
    assert finished["submission"]["ran"] is True


def test_events_are_numbered_one_two_three_without_gaps_and_carry_the_id():
    rec = recorder_for()
    events = play(
        rec,
        QUEUED,
        RUNNING,
        started("run"),
        {"type": "output", "stage": "run", "stream": "stdout", "data": "hi\n"},
        stage_done("run", result("ok")),
        FINISHED,
    )
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e["id"] for e in events} == {"sub-1"}
    assert all(e["time"].endswith("Z") for e in events)
    assert events[3]["data"] == "hi\n"
    assert [e["type"] for e in events][-1] == "finished"
    assert rec.seq == 6


def test_a_refused_event_takes_no_sequence_number():
    rec = recorder_for()
    play(rec, QUEUED)
    with pytest.raises(InvalidTransition):
        rec.record(started("run"))  # while queued
    assert rec.seq == 1
    assert rec.record(RUNNING)["seq"] == 2


def test_a_recorder_resumes_after_the_last_stored_sequence_number():
    rec = Recorder(EventRecorder(SubmissionState.new("sub-1", request()), seq=41))
    assert rec.record(QUEUED)["seq"] == 42


def test_recording_leaves_the_body_alone_and_keeps_a_given_time():
    rec = recorder_for()
    body = {**RUNNING, "time": T1}
    event = rec.record(body)
    assert body == {**RUNNING, "time": T1}
    assert event == {**RUNNING, "time": T1, "id": "sub-1", "seq": 1}


def test_the_finished_event_carries_the_full_submission():
    rec = recorder_for(**FULL)
    events = play(
        rec,
        QUEUED,
        RUNNING,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
        stage_done("compile", result("ok")),
        started("run"),
        stage_done("run", result("failed")),
        FINISHED,
    )
    submission = events[-1]["submission"]
    assert submission == rec.state.as_json()
    assert set(submission) >= {
        "id",
        "status",
        "stage",
        "picked_up",
        "worker",
        "dependencies_installed",
        "compiled",
        "ran",
        "created_at",
        "started_at",
        "finished_at",
        "stages",
        "error",
    }
    assert submission["stages"]["run"]["status"] == "failed"
    assert submission["ran"] is True  # it ran, and failed
    json.dumps(events)  # every event is JSON


def test_a_compile_failure_skips_the_run():
    rec = recorder_for(compile="gcc main.c")
    play(rec, QUEUED, RUNNING)
    assert rec.state.dependencies_installed is True
    play(rec, started("compile"), stage_done("compile", result("failed")))
    assert rec.state.compiled is False
    play(rec, stage_done("run", result("skipped")), FINISHED)
    s = rec.state
    assert (s.status, s.compiled, s.ran) == ("finished", False, False)
    assert s.stages["run"] is not None and s.stages["run"].status == "skipped"


def test_a_dependency_failure_is_recorded():
    rec = recorder_for(**FULL)
    play(rec, RUNNING, started("deps"), stage_done("deps", deps_result("failed")))
    assert rec.state.dependencies_installed is False
    assert rec.state.compiled is None


@pytest.mark.parametrize(
    ("status", "ran"),
    [
        ("ok", True),
        ("failed", True),
        ("signaled", True),
        ("time_limit", True),
        ("memory_limit", True),
        ("output_limit", True),
        ("skipped", False),
        ("error", False),
    ],
)
def test_ran_says_whether_the_program_ran(status, ran):
    rec = recorder_for()
    play(rec, RUNNING, started("run"), stage_done("run", result(status)))
    assert rec.state.ran is ran


def test_a_reclaim_by_another_worker_starts_every_stage_over():
    rec = recorder_for(**FULL)
    play(
        rec,
        QUEUED,
        RUNNING,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
    )
    assert rec.state.dependencies_installed is True
    rec.record({"type": "status", "status": "running", "worker": "executor-b-2", "time": T2})
    s = rec.state
    assert (s.status, s.worker, s.attempts, s.picked_up, s.started_at) == (
        "running",
        "executor-b-2",
        2,
        True,
        T2,
    )
    assert (s.stage, s.dependencies_installed, s.compiled, s.ran) == (None, None, None, None)
    assert s.stages == {"deps": None, "compile": None, "run": None}
    events = play(
        rec,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
        stage_done("compile", result()),
        started("run"),
        stage_done("run", result()),
        FINISHED,
    )
    assert rec.state.status == "finished"
    assert events[-1]["submission"]["attempts"] == 2
    assert events[-1]["seq"] == 13


def test_a_reclaim_keeps_the_stages_a_submission_lacks_done():
    rec = recorder_for()
    play(rec, RUNNING, started("run"), RUNNING)
    assert (rec.state.dependencies_installed, rec.state.compiled, rec.state.ran) == (
        True,
        True,
        None,
    )
    assert rec.state.attempts == 2


def test_a_cancelled_submission_stays_cancelled_through_its_finished_event():
    rec = recorder_for()
    play(rec, QUEUED, RUNNING, started("run"))
    rec.record({"type": "status", "status": "cancelled", "time": T2})
    assert (rec.state.status, rec.state.stage, rec.state.finished_at) == ("cancelled", None, T2)
    assert rec.state.done
    finished = rec.record(FINISHED)
    assert rec.state.status == "cancelled"
    assert finished["submission"]["status"] == "cancelled"
    assert finished["submission"]["finished_at"] == T2
    with pytest.raises(InvalidTransition):
        rec.record(started("run"))


def test_a_queued_submission_can_be_cancelled():
    rec = recorder_for()
    play(rec, QUEUED, {"type": "status", "status": "cancelled"})
    assert rec.state.status == "cancelled"
    assert rec.state.picked_up is None
    assert rec.record(FINISHED)["submission"]["status"] == "cancelled"


def test_a_system_error_says_why():
    rec = recorder_for()
    play(rec, QUEUED, RUNNING)
    rec.record({"type": "status", "status": "error", "error": "executor crashed 3 times"})
    assert (rec.state.status, rec.state.error) == ("error", "executor crashed 3 times")
    assert rec.state.finished_at is not None
    assert rec.record(FINISHED)["submission"]["error"] == "executor crashed 3 times"


def finished_state() -> SubmissionState:
    rec = recorder_for()
    play(rec, QUEUED, RUNNING, started("run"), stage_done("run", result()), FINISHED)
    assert rec.state.status == "finished"
    return rec.state


@pytest.mark.parametrize(
    "event",
    [
        QUEUED,
        RUNNING,
        {"type": "status", "status": "cancelled"},
        {"type": "status", "status": "error", "error": "x"},
        {"type": "status", "status": "finished"},
        started("run"),
        stage_done("run", result()),
        FINISHED,
    ],
    ids=lambda e: e["type"] + ":" + str(e.get("status", "")),
)
def test_nothing_follows_finished(event):
    state = finished_state()
    with pytest.raises(InvalidTransition, match="sub-1 is finished"):
        apply(state, event)


def test_an_output_event_after_finished_is_refused():
    with pytest.raises(InvalidTransition):
        apply(finished_state(), {"type": "output", "stage": "run", "stream": "stdout", "data": ""})


def test_a_finished_event_while_queued_is_refused():
    rec = recorder_for()
    rec.record(QUEUED)
    with pytest.raises(InvalidTransition):
        rec.record(FINISHED)


@pytest.mark.parametrize(
    "event", [started("run"), stage_done("run", result())], ids=["started", "finished"]
)
def test_stage_events_while_queued_are_refused(event):
    rec = recorder_for()
    rec.record(QUEUED)
    with pytest.raises(InvalidTransition, match="while queued"):
        rec.record(event)
    assert rec.state.status == "queued"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "status", "status": "finished"},  # finished needs an executor first
        {"type": "status", "status": "bogus"},
        {"type": "bogus"},
    ],
)
def test_impossible_events_are_refused(event):
    # A status or type the protocol lacks is no event at all: its decoding refuses it, before
    # the state machine could (both are ValueErrors).
    state = SubmissionState.new("sub-1", request())
    with pytest.raises(ValueError) as info:
        apply(state, event)
    assert isinstance(info.value, InvalidTransition) or event != {
        "type": "status",
        "status": "finished",
    }


def test_running_cannot_go_back_to_queued():
    rec = recorder_for()
    play(rec, RUNNING)
    with pytest.raises(InvalidTransition, match="running cannot become queued"):
        rec.record(QUEUED)


def test_a_running_submission_can_finish_by_a_status_event():
    rec = recorder_for()
    play(rec, RUNNING, {"type": "status", "status": "finished", "time": T2})
    assert (rec.state.status, rec.state.finished_at) == ("finished", T2)


def test_apply_event_leaves_the_old_state_alone():
    state = SubmissionState.new("sub-1", request(**FULL), created_at=T0)
    running = apply(state, RUNNING)
    assert state.status == "queued"
    assert state.attempts == 0
    assert running.status == "running"


def test_output_events_change_nothing_while_running():
    rec = recorder_for()
    play(rec, RUNNING, started("run"))
    before = rec.state
    rec.record({"type": "output", "stage": "run", "stream": "stdout", "data": "x"})
    assert rec.state == before


def mid_run_state() -> SubmissionState:
    rec = recorder_for(**FULL)
    play(
        rec,
        QUEUED,
        RUNNING,
        started("deps"),
        stage_done("deps", deps_result()),
        started("compile"),
        stage_done("compile", result(stdout="é\n")),
    )
    return rec.state


def test_a_state_round_trips_through_its_record():
    state = mid_run_state()
    record = json.loads(json.dumps(state.as_record()))
    assert SubmissionState.from_record(record) == state
    assert record["has_dependencies"] is True
    assert record["has_compile"] is True


def test_the_record_keeps_what_a_reclaim_needs_to_know():
    state = SubmissionState.new("sub-1", request(), created_at=T0)
    again = SubmissionState.from_record(json.loads(json.dumps(state.as_record())))
    # Restarted after a reload, the stages the request lacks stay done.
    running = apply(again, RUNNING)
    assert (running.dependencies_installed, running.compiled) == (True, True)


def test_the_clients_view_hides_the_bookkeeping():
    as_json = mid_run_state().as_json()
    assert "has_dependencies" not in as_json
    assert "has_compile" not in as_json


def test_a_skipped_stage_is_a_stage_result():
    skipped = SandboxResult.skipped().wire()
    assert skipped["status"] == "skipped"
    assert skipped["exit_code"] is None
    assert (skipped["stdout_encoding"], skipped["stderr_encoding"]) == ("utf8", "utf8")
    with pytest.raises(ValueError):  # shared by every caller, so nobody may change it
        SandboxResult.skipped().status = "ok"  # type: ignore[misc]


# -- tests (v1.1) ---------------------------------------------------------------------------

TESTS = [
    {"name": "small", "expected_output": "6\n", "points": 2},
    {"name": "mean", "points": 1.5},
    {"name": "big", "expected_output": "big\n"},
]


def with_tests(**fields: Any) -> Recorder:
    return recorder_for(tests=TESTS, **fields)


def started_test(i: int) -> dict[str, Any]:
    return {"type": "test_started", "stage": "run", "test": i, "name": TESTS[i]["name"]}


def finished_test(i: int, verdict: str = "passed", **fields: Any) -> dict[str, Any]:
    points = float(TESTS[i].get("points", 1.0))
    status = {"passed": "ok", "wrong_answer": "ok", "runtime_error": "failed"}.get(verdict, verdict)
    result = {
        "status": status,
        "name": TESTS[i]["name"],
        "verdict": verdict,
        "points": points if verdict == "passed" else 0.0,
        "max_points": points,
        "expected_output": TESTS[i].get("expected_output"),
        **fields,
    }
    return {"type": "test_finished", "stage": "run", "test": i, "result": result}


SKIPPED_BY_CANCEL = "skipped: the submission was cancelled"


def test_a_queued_submission_with_tests_shows_every_test_unknown_and_a_zero_score():
    document = SubmissionState.new("sub-1", request(tests=TESTS), created_at=T0).as_json()
    assert document["stages"] == {
        "deps": None, "compile": None, "run": None, "tests": [None, None, None]}  # fmt: skip
    assert document["score"] == {"passed": 0, "total": 3, "points": 0.0, "max_points": 4.5}
    assert list(document)[-1] == "score"


def test_a_submission_without_tests_has_neither_tests_nor_a_score():
    document = SubmissionState.new("sub-1", request()).as_json()
    assert "tests" not in document["stages"] and "score" not in document


def test_test_events_fill_the_tests_and_the_score_as_they_finish():
    rec = with_tests()
    play(rec, QUEUED, RUNNING, started("run"), started_test(0))
    assert rec.state.as_json()["stages"]["tests"] == [None, None, None]  # started is not done
    play(rec, finished_test(0, wall_time=0.5))
    document = rec.state.as_json()
    assert document["stages"]["tests"][0]["verdict"] == "passed"
    assert document["stages"]["tests"][0]["wall_time"] == 0.5
    assert document["stages"]["tests"][1:] == [None, None]
    assert document["score"] == {"passed": 1, "total": 3, "points": 2.0, "max_points": 4.5}
    play(rec, started_test(1), finished_test(1, "wrong_answer", message="differs"))
    play(rec, started_test(2), finished_test(2))
    play(rec, stage_done("run", result("failed")))
    finished = rec.record(FINISHED)
    submission = finished["submission"]
    assert [t["verdict"] for t in submission["stages"]["tests"]] == [
        "passed", "wrong_answer", "passed"]  # fmt: skip
    assert submission["stages"]["tests"][1]["message"] == "differs"
    assert submission["score"] == {"passed": 2, "total": 3, "points": 3.0, "max_points": 4.5}
    assert submission["stages"]["run"]["status"] == "failed"
    assert submission == rec.state.as_json()


def test_test_events_are_numbered_like_any_other():
    rec = with_tests()
    events = play(rec, QUEUED, RUNNING, started("run"), started_test(0), finished_test(0))
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert events[3] == {**started_test(0), "id": "sub-1", "time": events[3]["time"], "seq": 4}


@pytest.mark.parametrize("event", [started_test(0), finished_test(0)], ids=["started", "finished"])
def test_a_test_event_outside_the_run_stage_is_refused(event):
    rec = with_tests(compile="make")
    play(rec, QUEUED)
    with pytest.raises(InvalidTransition):
        rec.record(event)  # while queued
    play(rec, RUNNING)
    with pytest.raises(InvalidTransition, match="inside the run stage"):
        rec.record(event)  # running, but no stage yet
    play(rec, started("compile"))
    with pytest.raises(InvalidTransition, match="inside the run stage"):
        rec.record(event)


@pytest.mark.parametrize("index", [3, -1, 99])
def test_a_test_event_for_a_test_the_submission_lacks_is_refused(index):
    rec = with_tests()
    play(rec, RUNNING, started("run"))
    with pytest.raises(InvalidTransition, match=f"has no test {index}"):
        rec.record({"type": "test_started", "stage": "run", "test": index, "name": "x"})
    event = finished_test(0)
    event["test"] = index
    with pytest.raises(InvalidTransition, match=f"has no test {index}"):
        rec.record(event)
    assert rec.seq == 2


def test_a_submission_without_tests_takes_no_test_event():
    rec = recorder_for()
    play(rec, RUNNING, started("run"))
    with pytest.raises(InvalidTransition, match="has no test 0"):
        rec.record(started_test(0))


def test_a_cancel_marks_the_tests_that_did_not_run_skipped():
    rec = with_tests()
    play(rec, QUEUED, RUNNING, started("run"), started_test(0), finished_test(0), started_test(1))
    rec.record({"type": "status", "status": "cancelled", "time": T2})
    tests = rec.state.as_json()["stages"]["tests"]
    assert tests[0]["verdict"] == "passed"
    for test, plan in zip(tests[1:], TESTS[1:], strict=True):
        assert (test["status"], test["verdict"], test["points"]) == ("skipped", "skipped", 0.0)
        assert test["message"] == SKIPPED_BY_CANCEL
        assert test["name"] == plan["name"]
        assert test["max_points"] == float(plan.get("points", 1.0))
        assert test["expected_output"] == plan.get("expected_output")
    finished = rec.record(FINISHED)
    assert finished["submission"]["stages"]["tests"] == tests
    assert finished["submission"]["score"] == {
        "passed": 1, "total": 3, "points": 2.0, "max_points": 4.5}  # fmt: skip


def test_a_queued_submission_cancelled_marks_every_test_skipped():
    rec = with_tests()
    play(rec, QUEUED, {"type": "status", "status": "cancelled"})
    tests = rec.state.as_json()["stages"]["tests"]
    assert [t["verdict"] for t in tests] == ["skipped"] * 3
    assert {t["message"] for t in tests} == {SKIPPED_BY_CANCEL}


def test_a_system_error_marks_the_tests_that_did_not_run_error():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0, "time_limit"))
    rec.record({"type": "status", "status": "error", "error": "executor crashed 3 times"})
    tests = rec.state.as_json()["stages"]["tests"]
    assert tests[0]["verdict"] == "time_limit"
    for test in tests[1:]:
        assert (test["status"], test["verdict"], test["points"]) == ("error", "error", 0.0)
        assert "executor crashed 3 times" in test["message"]
    assert rec.state.score is not None and rec.state.score.passed == 0


def test_a_compile_failure_skips_the_run_and_so_every_test():
    rec = with_tests(compile="gcc -o sum sum.c")
    play(rec, RUNNING, started("compile"), stage_done("compile", result("failed")))
    play(rec, stage_done("run", result("skipped")))
    tests = rec.state.as_json()["stages"]["tests"]
    assert [(t["status"], t["verdict"]) for t in tests] == [("skipped", "skipped")] * 3
    assert {t["message"] for t in tests} == {SKIPPED_MESSAGE}
    play(rec, FINISHED)
    assert rec.state.ran is False
    assert rec.state.score is not None and rec.state.score.wire() == {
        "passed": 0, "total": 3, "points": 0.0, "max_points": 4.5}  # fmt: skip


def test_tests_without_a_result_when_the_run_ends_are_skipped():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0))
    play(rec, stage_done("run", result("failed")))
    assert [t.verdict for t in rec.state.tests if t] == ["passed", "skipped", "skipped"]


def test_a_run_stage_the_sandbox_failed_errs_the_tests_that_did_not_run():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0))
    play(rec, stage_done("run", result("error", message="no shell")))
    assert [t.verdict for t in rec.state.tests if t] == ["passed", "error", "error"]
    assert rec.state.tests[1] is not None and "no shell" in (rec.state.tests[1].message or "")


def test_a_finished_event_gives_every_test_a_result():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0))
    finished = rec.record(FINISHED)
    assert [t["verdict"] for t in finished["submission"]["stages"]["tests"]] == [
        "passed", "skipped", "skipped"]  # fmt: skip


def test_a_finished_status_event_gives_every_test_a_result():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0))
    rec.record({"type": "status", "status": "finished", "time": T2})
    assert None not in rec.state.tests
    assert [t.verdict for t in rec.state.tests if t] == ["passed", "skipped", "skipped"]
    finished = rec.record(FINISHED)
    assert None not in finished["submission"]["stages"]["tests"]


def test_a_reclaim_starts_the_tests_over():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0), started_test(1))
    assert rec.state.score is not None and rec.state.score.passed == 1
    rec.record({"type": "status", "status": "running", "worker": "executor-b-2"})
    assert rec.state.tests == (None, None, None)
    assert rec.state.as_json()["stages"]["tests"] == [None, None, None]
    assert rec.state.as_json()["score"]["passed"] == 0
    # And the tests run again under the new attempt.
    play(rec, started("run"), started_test(0), finished_test(0, "runtime_error"))
    assert rec.state.tests[0] is not None and rec.state.tests[0].verdict == "runtime_error"


def test_a_state_with_tests_round_trips_through_its_record():
    rec = with_tests()
    play(rec, QUEUED, RUNNING, started("run"), started_test(0),
         finished_test(0, stdout="6\n", limits={"cpu": 1}, wall_time=0.1))  # fmt: skip
    record = json.loads(json.dumps(rec.state.as_record()))
    assert record["test_plan"] == [
        {"name": "small", "max_points": 2.0, "expected_output": "6\n"},
        {"name": "mean", "max_points": 1.5, "expected_output": None},
        {"name": "big", "max_points": 1.0, "expected_output": "big\n"},
    ]
    again = SubmissionState.from_record(record)
    assert again == rec.state
    assert again.as_json() == rec.state.as_json()
    # The reloaded state goes on: a cancel still knows what the unrun tests were worth.
    cancelled = apply(again, {"type": "status", "status": "cancelled"})
    assert cancelled.score is not None and cancelled.score.max_points == 4.5
    assert [t.name for t in cancelled.tests if t] == ["small", "mean", "big"]


def test_a_finished_record_with_tests_round_trips():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0),
         stage_done("run", result("failed")), FINISHED)  # fmt: skip
    record = json.loads(json.dumps(rec.state.as_record()))
    assert SubmissionState.from_record(record) == rec.state


def test_the_clients_view_reads_back_with_its_test_results():
    rec = with_tests()
    play(rec, RUNNING, started("run"), started_test(0), finished_test(0))
    view = json.loads(json.dumps(rec.state.as_json()))
    assert "test_plan" not in view
    again = SubmissionState.from_record(view)
    assert again.tests == rec.state.tests
    assert again.as_json()["stages"]["tests"] == view["stages"]["tests"]
    assert again.test_plan[0].name == "small"


# -- interactive stdin --------------------------------------------------------------------------

WANTED = {"type": "input_wanted", "stage": "run"}


def test_input_is_wanted_only_by_an_interactive_run_stage_and_changes_nothing():
    rec = recorder_for(stdin_mode="interactive", tty=True)
    assert rec.state.interactive and rec.state.as_record()["interactive"] is True
    play(rec, QUEUED, RUNNING)
    with pytest.raises(InvalidTransition, match="only an interactive run stage wants input"):
        rec.record(WANTED)  # no stage yet
    rec.record(started("run"))
    before = rec.state
    rec.record(WANTED)
    rec.record(WANTED)
    assert rec.state is before
    plain = recorder_for()
    play(plain, QUEUED, RUNNING, started("run"))
    with pytest.raises(InvalidTransition):
        plain.record(WANTED)
    assert SubmissionState.from_record(before.as_record()).interactive
