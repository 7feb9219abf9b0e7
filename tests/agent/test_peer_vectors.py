"""An origin keeps the newest vector a peer sent it, whatever order messages arrive in.

An executor's acceptance of an offer is taken while the job still holds its slot;
for a short job the result (taken after the slot was freed) can reach the origin
first. Applied in arrival order, the acceptance would make the idle peer look full
for seconds and the origin would queue work that the peer could run.
"""

from contextlib import asynccontextmanager

import trio

from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.placement.core import Forward, QueueHere

from agents import FAST_MEMBERSHIP, running_agent, wasm_spec


async def joined(a, b) -> None:
    with trio.fail_after(20):
        while not (a.cluster.is_member(b.node_id) and b.cluster.is_member(a.node_id)
                   and a.cluster.state_of(b.node_id) is not None):
            await trio.sleep(0.05)


@asynccontextmanager
async def origin_and_executor(tmp_path):
    """Two joined agents of one slot; the origin's slot is taken, so its jobs go to the peer."""
    async with running_agent(tmp_path / "e", node_id="exec", cpus=1, membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await joined(origin, executor)
            origin.cpu_used = origin.cpu_total
            yield origin, executor, http


async def test_an_acceptance_that_arrives_after_the_result_does_not_make_the_peer_look_full(tmp_path):
    async with origin_and_executor(tmp_path) as (origin, executor, _):
        rec = JobRecord(id="origin:j1", spec=JobSpec(runtime="process", command=["/bin/true"]), origin="origin")

        executor.cpu_used = executor.cpu_total
        acceptance = {"t": "accept", **executor._vector_wire()}  # taken while the job runs
        executor.cpu_used = 0.0
        result = {"t": "result", **executor._vector_wire()}  # taken once it ended

        origin._note_vector("exec", result)
        origin._note_vector("exec", acceptance)  # overtaken on the wire
        decision = origin._place(rec)
        assert isinstance(decision, Forward) and decision.node_id == "exec", decision

        # In order, the newer full vector does count.
        executor.cpu_used = executor.cpu_total
        origin._note_vector("exec", {"t": "refuse", **executor._vector_wire()})
        assert isinstance(origin._place(rec), QueueHere)


async def test_a_burst_goes_to_a_free_peer_one_offer_at_a_time_without_refusals(tmp_path):
    # A dispatch pass places every queued job before the first offer is answered.
    # Each offer holds its job's resources against the peer until the reply (with the
    # peer's vector) comes, so the rest wait for the peer to free instead of being
    # offered, refused, and put back for half a second each.
    async with origin_and_executor(tmp_path) as (origin, executor, http):
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("noop.wasm") for _ in range(30)]})
        ids = [item["job"]["id"] for item in r.json()["results"]]
        with trio.fail_after(30):
            done = (await http.post("/v1/jobs:wait", json={"ids": ids, "wait": 30})).json()["results"]
        assert [(d["job"]["state"], d["job"]["executor"]) for d in done] == [("succeeded", "exec")] * 30
        assert origin.placement_metrics.forward_refusals._value.get() == 0
        assert origin.cluster.holding() == 0  # every hold was released with its reply
