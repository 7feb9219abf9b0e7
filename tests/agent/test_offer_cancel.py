"""A cancel reaches a job at a peer even when the moment is awkward.

A job cancelled while its origin is offering it ends at the origin at once (it has
not started anywhere the origin knows of). The offer is still on its way: the peer
may accept it a moment later and start it, and the origin must not leave it running
there, nor offer it to the next candidate.

A job running at a peer that the cancel cannot reach (paused, cut off) ends at the
origin, and the cancel keeps trying the peer, so that it does not run to its end.
"""

import trio

from agents import FAST_MEMBERSHIP, await_peers, running_agent, start_running, wasm_spec


async def test_a_job_cancelled_while_its_offer_is_in_flight_is_stopped_at_the_peer_that_accepted_it(tmp_path):
    """The origin cancels a job it is offering; the peer accepts it a moment later and
    starts it. The origin must follow up with a cancel, or an endless guest the user
    cancelled would hold the peer's CPUs until its wall limit."""
    async with running_agent(tmp_path / "e", node_id="exec", cpus=2, membership=FAST_MEMBERSHIP) as (executor, _):
        offered, cancelled = trio.Event(), trio.Event()
        accept = executor._on_offer

        async def offer_held_until_cancelled(peer, msg):
            offered.set()
            await cancelled.wait()
            return await accept(peer, msg)

        executor._on_offer = offer_held_until_cancelled
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(origin, "exec")
            spec = wasm_spec("loop.wasm", resources={"cpu": 2}, limits={"wall_ms": 120_000})
            job = (await http.post("/v1/jobs", json=spec)).json()["id"]
            with trio.fail_after(30):
                await offered.wait()
            r = await http.delete(f"/v1/jobs/{job}")
            assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
            cancelled.set()

            with trio.fail_after(20):  # not the guest's 120 s wall limit
                while (ran := executor.store.get(job)) is None or not ran.state.final:
                    await trio.sleep(0.05)
            assert ran.state.value == "cancelled", ran.as_dict()
            rec = (await http.get(f"/v1/jobs/{job}")).json()
            assert rec["state"] == "cancelled" and rec["executor"] == "exec", rec
            assert not origin.store.get(job).duplicates  # the peer's cancelled run is this same ending


async def test_a_job_cancelled_while_one_peer_holds_its_offer_is_offered_to_no_other_peer(tmp_path):
    offers: list[str] = []
    first_held, cancelled = trio.Event(), trio.Event()

    def refusing_after_cancel(name):
        async def on_offer(peer, msg):
            offers.append(name)
            if len(offers) == 1:
                first_held.set()
                await cancelled.wait()
            return {"t": "refuse", "id": msg["id"], "reason": f"{name} is busy"}
        return on_offer

    async with running_agent(tmp_path / "a", node_id="exec-a", cpus=2, membership=FAST_MEMBERSHIP) as (a, _):
        async with running_agent(tmp_path / "b", node_id="exec-b", cpus=2, join=[a.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (b, _):
            a._on_offer, b._on_offer = refusing_after_cancel("exec-a"), refusing_after_cancel("exec-b")
            async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[a.settings.gossip],
                                     membership=FAST_MEMBERSHIP) as (origin, http):
                await await_peers(origin, "exec-a", "exec-b")
                job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", resources={"cpu": 2}))).json()["id"]
                with trio.fail_after(30):
                    await first_held.wait()
                assert (await http.delete(f"/v1/jobs/{job}")).json()["state"] == "cancelled"
                cancelled.set()
                await trio.sleep(1.0)  # time enough for a second offer, were one sent
                assert offers == offers[:1], offers
                assert (await http.get(f"/v1/jobs/{job}")).json()["state"] == "cancelled"


async def test_a_cancel_that_cannot_reach_the_executor_is_retried_until_it_does(tmp_path):
    async with running_agent(tmp_path / "e", node_id="exec", cpus=2, membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(origin, "exec")
            spec = wasm_spec("loop.wasm", resources={"cpu": 2}, limits={"wall_ms": 120_000})
            job = await start_running(http, spec)
            assert (await http.get(f"/v1/jobs/{job}")).json()["executor"] == "exec"

            answer = executor._on_cancel
            reachable = False
            tries = []

            async def cut_off_until_the_origin_gave_up(msg):
                tries.append(reachable)
                if not reachable:
                    raise ConnectionError("cut off")  # the origin's cancel fails, as to a paused peer
                return await answer(msg)

            executor._on_cancel = cut_off_until_the_origin_gave_up
            rec = (await http.delete(f"/v1/jobs/{job}")).json()
            assert rec["state"] == "cancelled", rec
            assert any("did not confirm" in t["detail"] for t in rec["timeline"]), rec["timeline"]
            reachable = True  # the peer is back

            with trio.fail_after(20):  # not the guest's 120 s wall limit
                while not executor.store.get(job).state.final:
                    await trio.sleep(0.05)
            assert executor.store.get(job).state.value == "cancelled"
            assert tries[0] is False and True in tries
