"""Declared GPUs through a real agent: grants, isolation by environment, release.

Declared, not discovered: CI has no GPU. tests/gpu holds the NVML test that runs
where a real one exists.
"""

import signal

import trio

from agents import new_agent, running_agent

ENV = {"runtime": "process", "command": ["/usr/bin/env"], "limits": {"wall_ms": 20000}}


def env_of(rec):
    return dict(line.split("=", 1) for line in rec["result"]["stdout"].splitlines() if "=" in line)


async def test_granted_job_sees_only_its_gpu_and_others_see_none(tmp_path):
    async with running_agent(tmp_path, gpus="2xH100-80GB") as (agent, http):
        with_gpu = (await http.post("/v1/jobs", json={**ENV, "resources": {"gpu": 1}})).json()
        without = (await http.post("/v1/jobs", json=ENV)).json()
        a = (await http.get(f"/v1/jobs/{with_gpu['id']}", params={"wait": 30})).json()
        b = (await http.get(f"/v1/jobs/{without['id']}", params={"wait": 30})).json()
        assert a["state"] == b["state"] == "succeeded", (a, b)
        assert env_of(a)["CUDA_VISIBLE_DEVICES"].startswith("GPU-declared-")
        assert env_of(a)["NVIDIA_VISIBLE_DEVICES"] == env_of(a)["CUDA_VISIBLE_DEVICES"]
        assert env_of(b)["CUDA_VISIBLE_DEVICES"] == "" and env_of(b)["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert agent.gpus.free_by_type() == {"whole": 2}


async def test_a_third_gpu_job_waits_for_a_slot_and_slots_are_freed(tmp_path):
    async with running_agent(tmp_path, gpus="2xH100-80GB") as (agent, http):
        sleep = {"runtime": "process", "command": ["/bin/sleep", "30"], "resources": {"gpu": 1}}
        ids = [(await http.post("/v1/jobs", json=sleep)).json()["id"] for _ in range(3)]
        while sum(agent.get(i).state.value == "running" for i in ids) < 2:
            await trio.sleep(0.02)
        await trio.sleep(0.2)
        waiting = [i for i in ids if agent.get(i).state.value == "queued"]
        assert len(waiting) == 1
        assert "capacity" in agent.get(waiting[0]).wait_reason
        assert agent.gpus.free_by_type() == {"whole": 0}
        grants = {agent.gpus.grant(i).env["CUDA_VISIBLE_DEVICES"] for i in ids if i not in waiting}
        assert len(grants) == 2  # two different GPUs
        assert (await http.get("/metrics")).status_code == 200
        assert agent.registry.get_sample_value("p2psched_gpu_slots_in_use", {"type": "whole", "declared": "true"}) == 2
        assert agent.registry.get_sample_value("p2psched_slots_in_use", {"kind": "gpu"}) == 2
        for i in ids:
            await http.delete(f"/v1/jobs/{i}")
        assert agent.gpus.free_by_type() == {"whole": 2}
        assert agent.registry.get_sample_value("p2psched_slots_in_use", {"kind": "gpu"}) == 0


async def test_job_needing_more_gpus_than_exist_is_rejected_with_the_reason(tmp_path):
    async with running_agent(tmp_path, gpus="1xL4-24GB") as (agent, http):
        job = (await http.post("/v1/jobs", json={**ENV, "resources": {"gpu": 2}})).json()
        rec = (await http.get(f"/v1/jobs/{job['id']}", params={"wait": 10})).json()
        assert rec["state"] == "rejected"
        assert "needs 2 GPU slots" in rec["result"]["reason"]


def test_slots_are_free_after_the_agent_is_killed_and_restarted(tmp_path):
    agent = new_agent(tmp_path, "gpu-crash", "--gpus", "1xH100-80GB").start()
    with agent.client() as http:
        job = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "2"],
                                          "resources": {"gpu": 1}}).json()["id"]
        while http.get(f"/v1/jobs/{job}").json()["state"] != "running":
            trio.run(trio.sleep, 0.02)
        assert http.get("/v1/peers").json()["peers"][0]["vector"]["gpu_free"] == {"whole": 0}
    agent.kill(signal.SIGKILL)
    agent.start()
    with agent.client() as http:
        rec = http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
        assert rec["state"] == "succeeded" and rec["attempts"] == 2
        assert http.get("/v1/peers").json()["peers"][0]["vector"]["gpu_free"] == {"whole": 1}
    agent.stop()


async def test_only_an_origin_that_forwards_sends_a_gpu_job_on_to_a_tighter_fit(tmp_path):
    # fit-first placement may prefer a peer that the job fills over this agent's two
    # free GPUs. The origin forwards; a job accepted here for another origin must run
    # here, since only origins forward (a Forward for it would leave it waiting), and
    # so must the origin's own job when forwarding is off.
    # The peer is a gossiped state handed to the real agent's placement.
    from p2psched.jobs.record import JobRecord
    from p2psched.jobs.spec import JobSpec
    from p2psched.placement.core import Forward, RunHere
    from p2psched.resources import NodeState, ResourceVector

    async with running_agent(tmp_path, gpus="2xH100-80GB", gpu_placement="fit-first") as (agent, http):
        tight = NodeState("peer", vector=ResourceVector(cpu_total=4, cpu_free=4, mem_total_mb=8192, mem_free_mb=8192,
                                                        gpu_free={"whole": 1}, gpu_total={"whole": 4}))
        agent.cluster.alive_states = lambda: [tight]
        spec = JobSpec.model_validate({**ENV, "resources": {"gpu": 1}})
        mine = JobRecord(id=f"{agent.node_id}:a", spec=spec, origin=agent.node_id)
        theirs = JobRecord(id="other:b", spec=spec, origin="other", hops=1)
        decision = agent._place(mine)
        assert isinstance(decision, Forward) and decision.node_id == "peer", decision
        assert agent._place(theirs) == RunHere()
        # With forwarding off (no --tls-dir, no --insecure) nothing is offered: here.
        transfer, agent.transfer = agent.transfer, None
        try:
            assert agent._place(mine) == RunHere()
        finally:
            agent.transfer = transfer


async def test_fit_first_is_the_agents_default_and_fit_last_keeps_the_job_here(tmp_path):
    # The same view as above: a peer that the 1-GPU job fills, and two free GPUs here.
    from p2psched.jobs.record import JobRecord
    from p2psched.jobs.spec import JobSpec
    from p2psched.placement.core import Forward, RunHere
    from p2psched.resources import NodeState, ResourceVector

    tight = NodeState("peer", vector=ResourceVector(cpu_total=4, cpu_free=4, mem_total_mb=8192, mem_free_mb=8192,
                                                    gpu_free={"whole": 1}, gpu_total={"whole": 4}))
    spec = JobSpec.model_validate({**ENV, "resources": {"gpu": 1}})
    for overrides, expected in (({"gpu_placement": "fit-last"}, RunHere), ({}, Forward)):
        async with running_agent(tmp_path / str(len(overrides)), gpus="2xH100-80GB", **overrides) as (agent, http):
            assert agent.placement_settings.gpu_first is (expected is Forward)
            agent.cluster.alive_states = lambda: [tight]
            decision = agent._place(JobRecord(id=f"{agent.node_id}:a", spec=spec, origin=agent.node_id))
            assert isinstance(decision, expected), (overrides, decision)


async def test_a_gpu_job_waiting_here_keeps_first_claim_on_slots_against_offers(tmp_path):
    # The executor's own 2-GPU job waits for its second slot. Before the fix, a peer's
    # 1-GPU jobs were accepted into every slot that freed, and the big job waited forever.
    from agents import FAST_MEMBERSHIP, await_peers, start_running

    sleep = {"runtime": "process", "command": ["/bin/sleep", "60"], "limits": {"wall_ms": 90_000}}
    async with running_agent(tmp_path / "o", node_id="origin", membership=FAST_MEMBERSHIP) as (origin, ohttp):
        async with running_agent(tmp_path / "g", node_id="gpu", gpus="2xH100-80GB", join=[origin.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (gpu, ghttp):
            await await_peers(origin, "gpu")
            first = await start_running(ghttp, {**sleep, "resources": {"gpu": 1}})
            big = (await ghttp.post("/v1/jobs", json={**ENV, "resources": {"gpu": 2}})).json()["id"]
            with trio.fail_after(10):
                while origin.cluster.state_of("gpu").vector.gpu_free != {"whole": 1}:
                    await trio.sleep(0.05)
            small = (await ohttp.post("/v1/jobs", json={**sleep, "resources": {"gpu": 1}})).json()["id"]
            await trio.sleep(2)
            rec = (await ohttp.get(f"/v1/jobs/{small}")).json()
            assert rec["state"] == "queued", rec  # refused by the executor: its slot is the big job's
            assert gpu.gpus.free_by_type() == {"whole": 1}
            await ghttp.delete(f"/v1/jobs/{first}")
            done = (await ghttp.get(f"/v1/jobs/{big}", params={"wait": 30})).json()
            assert done["state"] == "succeeded", done
            await ohttp.delete(f"/v1/jobs/{small}")
