"""A measurement allow-list binds both ways: an agent neither sends jobs to nor takes
jobs from a peer running other code or settings (docs/security.md)."""

import trio

from agents import FAST_MEMBERSHIP, await_peers, running_agent, wasm_spec


async def test_an_agent_with_an_allow_list_refuses_offers_from_peers_not_on_it(tmp_path):
    someone_else = "0" * 64
    async with running_agent(tmp_path / "e", node_id="exec", cpus=2, allow_measurements=[someone_else],
                             membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(origin, "exec")
            await await_peers(executor, "origin")
            # Two CPUs: only the executor could run it, and it will not take it.
            job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", resources={"cpu": 2}))).json()["id"]
            with trio.fail_after(20):
                while "allow-list" not in ((rec := (await http.get(f"/v1/jobs/{job}")).json())["wait_reason"] or ""):
                    await trio.sleep(0.05)
            assert rec["state"] == "queued" and "measurement of origin is not on exec's allow-list" in rec["wait_reason"]
            assert executor.store.get(job) is None
