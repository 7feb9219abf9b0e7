"""Offers name a module by hash once the peer holds it, and a peer that lost it asks for the bytes.

Modules are content-addressed, so an executor that accepted a module once can run
later jobs of it from its own store; sending the bytes with every offer would cost
a read, a copy and a hash per forward for nothing.
"""

import hashlib

import trio

from agents import FAST_MEMBERSHIP, WASM, await_peers, running_agent, wasm_spec

HELLO_SHA = hashlib.sha256((WASM / "hello.wasm").read_bytes()).hexdigest()


async def forwarded(http) -> dict:
    # Two CPUs: only the executor has that many, so the origin forwards it.
    job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", resources={"cpu": 2}))).json()["id"]
    rec = (await http.get(f"/v1/jobs/{job}", params={"wait": 30})).json()
    assert rec["state"] == "succeeded" and rec["executor"] == "exec", rec
    return rec


async def test_a_peer_that_holds_the_module_gets_it_by_hash_and_one_that_lost_it_gets_the_bytes(tmp_path):
    async with running_agent(tmp_path / "e", node_id="exec", cpus=2, membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(origin, "exec")

            await forwarded(http)
            assert HELLO_SHA in origin.peer_modules["exec"]

            # Asked for a module it does not hold, by hash alone, an executor says so.
            executor.store.module_path(HELLO_SHA).unlink()
            reply = await executor._on_offer("origin", {
                "t": "offer", "id": "origin:probe", "module": None,
                "job": {"spec": {"runtime": "wasm", "module_sha256": HELLO_SHA}, "origin": "origin"}})
            assert reply["t"] == "refuse" and reply["need_module"], reply
            assert "origin:probe" not in executor.active

            # The origin still believes the executor holds it: it offers by hash, is
            # refused for the module, and offers again with the bytes.
            await forwarded(http)
            assert executor.store.has_module(HELLO_SHA)

