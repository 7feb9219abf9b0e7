"""The agent decides plain placements itself (fits here; full with no peer) and must
agree with place() on each, through a real agent and its real dispatcher."""

import random

import trio

from agents import running_agent, wasm_spec
from p2psched.agent.agent import PREFETCHED_WAIT
from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.placement.core import NO_PEERS_FULL, JobRequest, QueueHere, RunHere, place


def decision_of_place(agent, rec):
    req = JobRequest.from_spec(rec.id, rec.spec, hops=rec.hops)
    decision, _ = place(req, agent.local_state(with_tenants=False), [], agent.topology, rng=random.Random(0),
                        policy=agent.settings.placement_policy)
    return decision


async def test_shortcut_decisions_match_place(tmp_path):
    async with running_agent(tmp_path, cpus=2) as (agent, http):
        def rec(**spec):
            return JobRecord(id="t1:x", spec=JobSpec.model_validate({"module_sha256": "0" * 64, **spec}),
                             origin="t1")

        small, big, labelled = rec(), rec(resources={"cpu": 4}), rec(labels={"node.zone": "a"})
        assert agent._plain_decision(small) == decision_of_place(agent, small) == RunHere()
        assert agent._plain_decision(big) is None  # place() rejects it, naming the CPUs
        assert agent._plain_decision(labelled) is None
        agent.cpu_used = 2.0
        try:
            assert agent._plain_decision(small) == decision_of_place(agent, small) == QueueHere(NO_PEERS_FULL)
            small.hops = 4  # at its hop limit place() says so: left to place()
            assert agent._plain_decision(small) is None
        finally:
            agent.cpu_used = 0.0


async def test_a_too_big_job_is_rejected_and_a_third_waits_on_a_full_agent(tmp_path):
    async with running_agent(tmp_path, cpus=2) as (agent, http):
        big = (await http.post("/v1/jobs", json=wasm_spec("noop.wasm", entry="noop", resources={"cpu": 4}))).json()
        done = (await http.get(f"/v1/jobs/{big['id']}", params={"wait": 10})).json()
        assert done["state"] == "rejected" and "cpu" in done["result"]["reason"], done
        ids = [(await http.post("/v1/jobs", json=wasm_spec("sleep.wasm"))).json()["id"] for _ in range(3)]
        with trio.fail_after(10):
            while sum(agent.get(i).state.value == "running" for i in ids) < 2:
                await trio.sleep(0.02)
        # The third waits: in the queue, or already in a wasm worker behind one of the two.
        [waiting] = [agent.get(i) for i in ids if agent.get(i).state.value != "running"]
        if waiting.state.value == "queued":
            assert waiting.wait_reason == NO_PEERS_FULL
        else:
            assert waiting.state.value == "placed" and waiting.wait_reason.startswith(PREFETCHED_WAIT), waiting
        for i in ids:
            await http.delete(f"/v1/jobs/{i}")


async def test_a_job_no_node_could_ever_run_is_rejected_at_once_not_behind_the_queue(tmp_path):
    # Behind a long job, a job no node could run even idle was queued and rejected only
    # once it reached the queue's head: after every job ahead of it had started.
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        first = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60_000}))).json()["id"]
        queued = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60_000}))).json()["id"]
        r = await http.post("/v1/jobs", json=wasm_spec("noop.wasm", entry="noop", resources={"cpu": 64}))
        assert r.status_code == 202
        rec = r.json()
        assert [t["state"] for t in rec["timeline"]] == ["submitted", "queued", "rejected"], rec["timeline"]
        assert rec["result"]["reason"] == "rejected: needs 64 cpus; the largest node has 1", rec["result"]
        batch = (await http.post("/v1/jobs:batch", json={"jobs": [
            wasm_spec("noop.wasm", entry="noop", resources={"gpu": 1}), wasm_spec("hello.wasm")]})).json()
        gpu, fits = (x["job"] for x in batch["results"])
        assert gpu["state"] == "rejected" and "gpu" in gpu["result"]["reason"].lower(), gpu["result"]
        assert fits["state"] == "queued"
        assert agent.waiting() == 2 and rec["id"] not in agent.active  # the rejected jobs wait nowhere
        again = (await http.get(f"/v1/jobs/{rec['id']}")).json()
        assert again["state"] == "rejected"
        for job in (first, queued, fits["id"]):
            await http.delete(f"/v1/jobs/{job}")
