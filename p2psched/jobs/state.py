"""The job state machine: pure, with every legal transition listed in one place.

    submitted -> queued -> placed -> running -> succeeded | failed | cancelled | timed_out
                    \\-> rejected            \\-> queued   (executor lost: placed again)
               queued -> an ending          (an earlier attempt's result arrived)

An illegal transition raises :class:`IllegalTransition`: it is a bug in the agent,
not something a user can cause, so it must be loud rather than drift (h11 does the
same with its connection states).
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    SUBMITTED = "submitted"
    QUEUED = "queued"
    PLACED = "placed"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT, JobState.REJECTED}
)
_ENDINGS = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT}

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SUBMITTED: frozenset({JobState.QUEUED, JobState.REJECTED, JobState.CANCELLED}),
    # A queued job may also end at once: an earlier attempt's result can arrive
    # while the job waits to be placed again (the first final result wins).
    JobState.QUEUED: frozenset({JobState.PLACED, JobState.REJECTED} | _ENDINGS),
    # A placed job may be re-queued when its executor refuses or is lost, and the
    # origin may learn a forwarded job's ending without ever seeing it run.
    JobState.PLACED: frozenset({JobState.RUNNING, JobState.QUEUED} | _ENDINGS),
    JobState.RUNNING: frozenset({JobState.QUEUED} | _ENDINGS),
}


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: str, current: JobState, target: JobState) -> None:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS.get(current, frozenset()))) or "none (final)"
        super().__init__(
            f"job {job_id}: illegal transition {current.value} -> {target.value}; "
            f"from {current.value} the allowed states are: {allowed}"
        )
        self.current = current
        self.target = target


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    if target not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(job_id, current, target)


def state_for_reason(reason: str, exit_code: int | None) -> JobState:
    """The final state a sandbox outcome maps to."""
    if reason == "cancelled":
        return JobState.CANCELLED
    if reason == "wall_timeout":
        return JobState.TIMED_OUT
    if reason == "exit 0" and exit_code == 0:
        return JobState.SUCCEEDED
    return JobState.FAILED
