"""Status reports from an executor reach the origin's record, even when they race the offer."""

from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState

from agents import running_agent


def offered(agent, executor: str) -> JobRecord:
    """A job the origin has offered to ``executor`` and not yet heard back on."""
    rec = JobRecord(id="t1:race", spec=JobSpec(runtime="process", command=["/bin/true"]), origin=agent.node_id)
    rec.advance(JobState.QUEUED, 1.0, agent.node_id, "accepted")
    rec.executor = executor
    agent.active[rec.id] = rec
    return rec


async def test_running_that_overtakes_the_acceptance_is_applied_once_placed(tmp_path):
    async with running_agent(tmp_path) as (agent, _http):
        rec = offered(agent, "e1")
        agent._on_status({"id": rec.id, "entry": {"state": "running", "node": "e1", "at": 2.0, "detail": "started"}})
        assert rec.state is JobState.QUEUED  # not placed yet: kept for later, not dropped
        agent._accepted(rec, "forwarded to e1")
        assert rec.state is JobState.RUNNING
        assert rec.id not in agent.early_status


async def test_a_report_from_another_node_than_the_executor_is_ignored(tmp_path):
    async with running_agent(tmp_path) as (agent, _http):
        rec = offered(agent, "e1")
        agent._on_status({"id": rec.id, "entry": {"state": "running", "node": "e2", "at": 2.0}})
        agent._accepted(rec, "forwarded to e1")
        assert rec.state is JobState.PLACED
