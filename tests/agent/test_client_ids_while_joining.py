"""An agent that has not yet learned the cluster's members refuses client-chosen ids.

Client-chosen ids are homed by hashing over the member list; an agent that just
started and has not heard from its seeds could pick a different home than its peers
and make a second origin for the id. It answers 503 and the client retries.
"""

from agents import free_port, running_agent, wasm_spec


async def test_a_client_id_waits_for_the_first_sync_and_a_generated_id_does_not(tmp_path):
    unreachable_seed = f"127.0.0.1:{free_port()}"
    async with running_agent(tmp_path, join=[unreachable_seed]) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="mine-1"))
        assert r.status_code == 503, r.text
        body = r.json()["error"]
        assert body["reason"] == "joining"
        assert "retry with the same id" in body["message"]
        assert r.headers["retry-after"]
        generated = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert generated.status_code == 202, generated.text
        assert (await http.get(f"/v1/jobs/{'mine-1'}")).status_code == 404  # nothing was kept


async def test_an_agent_with_no_seeds_takes_client_ids_at_once(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="mine-2"))
        assert r.status_code == 202, r.text


async def test_ids_left_in_doubt_come_back_after_a_restart_and_expire(tmp_path):
    """An id handed to a home that never answered stays with that home across a
    restart (else the restarted agent hashes it elsewhere and takes it anew), for a day
    at most; an expired or unreadable entry is dropped."""
    import time

    from p2psched.agent.remote import IN_DOUBT_KEY, IN_DOUBT_S

    async with running_agent(tmp_path) as (agent, http):
        agent.store.stage_kv(IN_DOUBT_KEY + "old-1", f"far\t{time.time() - IN_DOUBT_S - 5:.0f}")
        agent.store.stage_kv(IN_DOUBT_KEY + "kept-1", f"far\t{time.time():.0f}")
        agent.store.stage_kv(IN_DOUBT_KEY + "bad-1", "far\tsoon")
        await agent.store.sync()
    async with running_agent(tmp_path) as (agent, http):
        assert {j: home for j, (home, _) in agent._in_doubt.items()} == {"kept-1": "far"}
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="kept-1"))
        assert r.status_code == 503 and "was handed to agent far" in r.json()["error"]["message"], r.text
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="old-1"))
        assert r.status_code == 202, r.text  # its day is over: placed anew
        await agent.store.sync()
        assert set(agent.store.kv_items(IN_DOUBT_KEY)) == {IN_DOUBT_KEY + "kept-1"}
