"""A job placed again starts its hop count anew: the hop limit bounds one route, and
MAX_ATTEMPTS bounds the retries. Kept across placements, four executor deaths left a
job that only peers can run with its hop limit spent at its origin, a retry to spare."""

from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState
from p2psched.placement.core import DEFAULT_TTL, JobRequest

from agents import running_agent


def placed_on_a_peer(origin: str, hops: int) -> JobRecord:
    spec = JobSpec.model_validate({"module_sha256": "0" * 64, "entry": "noop", "labels": {"node.zone": "b"}})
    rec = JobRecord(id=f"{origin}:{hops}", spec=spec, origin=origin, state=JobState.QUEUED, attempts=hops)
    rec.advance(JobState.PLACED, 1.0, origin, "forwarded to e")
    rec.advance(JobState.RUNNING, 2.0, "e", "attempt 1")
    rec.executor, rec.route, rec.hops = "e", [origin, "leaf-0", "e"], hops
    return rec


async def test_a_job_placed_again_after_its_executor_is_lost_starts_its_hops_anew(tmp_path):
    async with running_agent(tmp_path) as (agent, _):
        rec = placed_on_a_peer(agent.node_id, DEFAULT_TTL)
        agent.active[rec.id] = rec
        agent.on_member_down("e", "was declared dead")
        assert rec.state is JobState.QUEUED and rec.executor is None
        assert rec.hops == 0
        assert JobRequest.from_spec(rec.id, rec.spec, hops=rec.hops).hops < DEFAULT_TTL  # peers may take it


async def test_a_job_given_back_starts_its_hops_anew(tmp_path):
    async with running_agent(tmp_path) as (agent, _):
        rec = placed_on_a_peer(agent.node_id, 3)
        agent.active[rec.id] = rec
        reply = await agent._on_handback(None, {"id": rec.id, "executor": "e", "error": "no bwrap"})
        assert reply["taken"] is True
        assert any("could not run it (no bwrap); placing it again" in t["detail"] for t in rec.timeline)
        assert rec.hops == 0  # (alone, with no node labelled zone=b, it is then rejected at once)
