"""A job asked of an agent that does not hold it: the answer names the agent to ask.

Job ids carry their origin, and every agent gossips its API address, so a 404 for a
job of another origin says where it lives.
"""

import trio

from agents import FAST_MEMBERSHIP, await_peers, running_agent, wasm_spec


async def test_a_job_asked_of_another_agent_is_pointed_to_its_origin(tmp_path):
    async with running_agent(tmp_path / "e", node_id="exec", membership=FAST_MEMBERSHIP) as (executor, other):
        async with running_agent(tmp_path / "o", node_id="origin", join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(executor, "origin")
            job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
            r = await other.get(f"/v1/jobs/{job}")
            assert r.status_code == 404, r.text
            assert f"ask that agent: --agent http://{origin.settings.api}" in r.json()["error"]["message"], r.text
