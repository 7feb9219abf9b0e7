import pytest

from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import FINAL_STATES, IllegalTransition, JobState, state_for_reason


def record() -> JobRecord:
    return JobRecord(id="n1:1", spec=JobSpec(runtime="process", command=["/bin/true"]), origin="n1")


def test_happy_path_stamps_every_transition():
    rec = record()
    for i, s in enumerate([JobState.QUEUED, JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED]):
        rec.advance(s, at=float(i), node="n1", detail=s.value)
    assert [t["state"] for t in rec.timeline] == ["queued", "placed", "running", "succeeded"]
    assert rec.timeline[-1] == {"state": "succeeded", "at": 3.0, "node": "n1", "detail": "succeeded"}


def test_an_ended_job_keeps_no_wait_reason():
    # A forwarded job's result can arrive before the offer's acceptance: the origin
    # then never clears its "offering to ..." reason, and listings showed it as waiting.
    rec = record()
    rec.advance(JobState.QUEUED, at=0.0, node="n1")
    rec.wait_reason = "offering to n2"
    rec.advance(JobState.PLACED, at=1.0, node="n1")
    assert rec.wait_reason == "offering to n2"  # only an ending clears it
    rec.advance(JobState.SUCCEEDED, at=2.0, node="n1")
    assert rec.wait_reason is None and rec.as_dict()["wait_reason"] is None


def test_running_job_can_be_queued_again_after_losing_its_executor():
    rec = record()
    for s in (JobState.QUEUED, JobState.PLACED, JobState.RUNNING, JobState.QUEUED, JobState.PLACED):
        rec.advance(s, 0, "n1")
    assert rec.state is JobState.PLACED


@pytest.mark.parametrize("final", sorted(FINAL_STATES, key=lambda s: s.value))
def test_final_states_are_final(final):
    rec = record()
    rec.state = final
    for target in JobState:
        with pytest.raises(IllegalTransition, match="allowed states are: none"):
            rec.advance(target, 0, "n1")


def test_illegal_transition_names_the_allowed_ones():
    rec = record()
    with pytest.raises(IllegalTransition) as e:
        rec.advance(JobState.RUNNING, 0, "n1")
    assert "submitted -> running" in str(e.value) and "queued" in str(e.value)
    assert rec.state is JobState.SUBMITTED and rec.timeline == []


@pytest.mark.parametrize(("reason", "code", "state"), [
    ("exit 0", 0, JobState.SUCCEEDED), ("exit 3", 3, JobState.FAILED), ("wall_timeout", None, JobState.TIMED_OUT),
    ("cancelled", None, JobState.CANCELLED), ("memory_limit", None, JobState.FAILED),
    ("out_of_fuel", None, JobState.FAILED), ("trap: unreachable", None, JobState.FAILED),
])
def test_sandbox_reasons_map_to_states(reason, code, state):
    assert state_for_reason(reason, code) is state
