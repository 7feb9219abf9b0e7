"""A job of another origin that waits for room here does not hold up this agent's own
jobs that a peer can take.

Only its origin may forward a job, so an executor keeps a job it holds for another
origin until it has room for it: after a restart, or when its host failed the job and
the origin could not take it back. Such a job keeps first claim on this agent's room,
but the agent's own jobs queued behind it, which a peer has room for, are forwarded
meanwhile rather than wait for it.
"""

import hashlib
import time

import trio

from agents import FAST_MEMBERSHIP, WASM, await_peers, running_agent, start_running, wasm_spec

HELLO = (WASM / "hello.wasm").read_bytes()


def hold_for_another_origin(agent, job_id: str, origin: str, cpu: float = 1) -> None:
    """Queue a hello job at ``agent`` as an executor holds one for ``origin``: as
    ``_on_offer`` records an accepted job, but waiting in the queue rather than started
    (where a restart or a failed hand-back leaves it)."""
    from p2psched.jobs.record import JobRecord
    from p2psched.jobs.spec import JobSpec
    from p2psched.jobs.state import JobState

    sha = hashlib.sha256(HELLO).hexdigest()
    agent.store.put_module(sha, HELLO)
    now = time.time()
    rec = JobRecord(id=job_id, spec=JobSpec.model_validate({"module_sha256": sha, "resources": {"cpu": cpu}}), origin=origin, created_at=now,
                    seq=agent._next_seq(), hops=1, attempts=1, origin_transfer="127.0.0.1:9")
    rec.state = JobState.QUEUED
    rec.timeline = [{"state": "queued", "at": now, "node": agent.node_id, "detail": f"accepted from {origin}"}]
    agent.store.stage(rec, new=True)
    agent.active[rec.id] = rec
    agent._enqueue(rec)


async def test_own_jobs_behind_a_job_held_for_another_origin_go_to_a_peer_and_it_keeps_first_claim(tmp_path):
    async with running_agent(tmp_path / "p", node_id="peer", cpus=2, membership=FAST_MEMBERSHIP) as (peer, _):
        async with running_agent(tmp_path / "e", node_id="exec", cpus=1, join=[peer.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (executor, http):
            await await_peers(executor, "peer")
            # This agent's one CPU is taken by a job of its own that runs until cancelled.
            loop = await start_running(http, wasm_spec("loop.wasm", limits={"wall_ms": 120_000}))
            hold_for_another_origin(executor, "elsewhere:held", "elsewhere")

            # Two CPUs: only the peer can run it. It is queued behind the held job.
            own = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", resources={"cpu": 2}))).json()["id"]
            with trio.fail_after(20):  # before the fix it waited for the held job, which waits for `loop`
                rec = (await http.get(f"/v1/jobs/{own}", params={"wait": 20})).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "peer", rec

            # Still waiting for room here: in the queue, or (once the peer is full and
            # no job could go anywhere else) in a wasm worker behind the running job.
            held = (await http.get("/v1/jobs/elsewhere:held")).json()
            assert held["state"] in ("queued", "placed"), held

            # Room here goes to the held job once the running one ends.
            assert (await http.delete(f"/v1/jobs/{loop}")).json()["state"] == "cancelled"
            with trio.fail_after(20):
                while not executor.store.get("elsewhere:held").state.final:
                    await trio.sleep(0.05)
            done = executor.store.get("elsewhere:held")
            assert done.state.value == "succeeded" and done.executor == "exec", done.as_dict()



async def test_an_own_job_that_fits_in_the_room_a_held_job_waits_for_goes_to_a_peer_or_waits_its_turn(tmp_path):
    async with running_agent(tmp_path / "p", node_id="peer", cpus=1, membership=FAST_MEMBERSHIP) as (peer, peer_http):
        async with running_agent(tmp_path / "e", node_id="exec", cpus=2, join=[peer.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (executor, http):
            await await_peers(executor, "peer")
            endless = wasm_spec("loop.wasm", limits={"wall_ms": 120_000})
            loop = await start_running(http, endless)
            # Held for another origin, it needs both CPUs here; one is free.
            hold_for_another_origin(executor, "elsewhere:big", "elsewhere", cpu=2)

            # One CPU: it would fit here, but that room is the held job's. The peer has room.
            first = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
            with trio.fail_after(20):
                rec = (await http.get(f"/v1/jobs/{first}", params={"wait": 20})).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "peer", rec

            # With the peer full too, the next one waits its turn here.
            busy = (await peer_http.post("/v1/jobs", json=endless)).json()["id"]
            with trio.fail_after(30):
                while (executor.cluster.state_of("peer").vector.cpu_free > 0
                       or (await peer_http.get(f"/v1/jobs/{busy}")).json()["state"] != "running"):
                    await trio.sleep(0.05)
            second = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
            await trio.sleep(1.0)  # passes enough to have started it, were it let past
            rec = (await http.get(f"/v1/jobs/{second}")).json()
            assert rec["state"] == "queued" and "behind elsewhere:big" in rec["wait_reason"], rec

            assert (await http.delete(f"/v1/jobs/{loop}")).json()["state"] == "cancelled"
            with trio.fail_after(20):
                rec = (await http.get(f"/v1/jobs/{second}", params={"wait": 20})).json()
            big = executor.store.get("elsewhere:big")
            assert rec["state"] == "succeeded" and rec["executor"] == "exec", rec
            assert big.state.value == "succeeded", big.as_dict()

            def started(timeline):
                return next(t["at"] for t in timeline if t["state"] == "running")
            assert started(big.timeline) <= started(rec["timeline"])
            await peer_http.delete(f"/v1/jobs/{busy}")  # rather than wait out the stop's grace period


async def test_a_cancel_from_the_origin_ends_a_job_backing_off_here_before_it_runs_again(tmp_path):
    # A job this agent's host failed waits out a pause out of the queue before it runs
    # again; its origin's cancel was acknowledged and did nothing, and it ran after all.
    async with running_agent(tmp_path, node_id="exec", cpus=1) as (executor, http):
        loop = await start_running(http, wasm_spec("loop.wasm", limits={"wall_ms": 120_000}))
        hold_for_another_origin(executor, "elsewhere:paused", "elsewhere")
        rec = executor.active["elsewhere:paused"]
        executor.queue.remove(rec.id)
        executor._requeue_later(rec, 2.0)  # as _retry_later does after a host fault
        reply = await executor._on_cancel({"id": rec.id})
        assert reply["state"] == "cancelling"
        assert rec.state.value == "cancelled" and rec.result.reason == "cancelled"
        await trio.sleep(2.5)  # the pause is over: it is not queued again
        assert rec.id not in executor.queue and executor.waiting() == 0
        assert executor.get(rec.id).state.value == "cancelled"
        await http.delete(f"/v1/jobs/{loop}")
