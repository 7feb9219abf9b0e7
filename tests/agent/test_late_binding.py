"""Late binding: an executor checks its real capacity when an offer arrives, and the
origin takes a refusal to the next candidate.

Gossip is about 200 ms old, so an origin can see a peer as free after it filled
up. Here the origin's view of one peer is made stale on purpose (the vector a
reply from that peer would leave, from before it filled), so the refusal is
certain rather than a race.
"""

from dataclasses import replace

import trio

from agents import FAST_MEMBERSHIP, await_peers, running_agent, start_running, wasm_spec

ENDLESS = wasm_spec("loop.wasm", limits={"wall_ms": 120_000})


async def test_a_full_peer_that_looked_free_refuses_and_the_next_candidate_runs_the_job(tmp_path):
    async with running_agent(tmp_path / "a", node_id="full", cpus=1, membership=FAST_MEMBERSHIP) as (full, full_http):
        async with running_agent(tmp_path / "b", node_id="free", cpus=1, join=[full.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (free, _):
            async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[full.settings.gossip],
                                     membership=FAST_MEMBERSHIP) as (origin, http):
                await await_peers(origin, "full", "free")
                busy_here = await start_running(http, ENDLESS)
                busy_there = await start_running(full_http, ENDLESS)

                # The origin's view: "full" idle (stale), "free" free but busier, so
                # that "full" is the first candidate.
                view = origin.cluster
                stale = replace(full.vector(), cpu_free=1.0, running=0, queue_len=0)
                view.note_fresh_vector("full", stale)
                view.note_fresh_vector("free", replace(free.vector(), queue_len=3))
                job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
                with trio.fail_after(30):
                    rec = (await http.get(f"/v1/jobs/{job}", params={"wait": 30})).json()
                assert rec["state"] == "succeeded" and rec["executor"] == "free", rec
                assert full.store.get(job) is None  # it refused: no record of the job there
                assert origin.placement_metrics.forward_refusals._value.get() == 1
                assert 'p2psched_forward_refusals_total 1.0' in (await http.get("/metrics")).text

                await http.delete(f"/v1/jobs/{busy_here}")
                await full_http.delete(f"/v1/jobs/{busy_there}")
