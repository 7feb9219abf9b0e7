"""Wasm jobs run in worker processes: what happens when a worker dies, lies or loses its agent."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import trio

from p2psched.agent.agent import PREFETCH_PATIENCE_S, PREFETCHED_WAIT, WAITING_PER_WORKER
from p2psched.jobs.spec import JobSpec
from p2psched.sandbox.wasm_workers import WasmWorkers

from agents import FAST_MEMBERSHIP, new_agent, running_agent, wasm_spec, wasm_worker_pids

LOOP = {"limits": {"wall_ms": 60_000}}


async def wait_state(agent, job_id: str, state: str) -> None:
    with trio.fail_after(30):
        while agent.get(job_id).state.value != state:
            await trio.sleep(0.01)


async def _kill_the_worker_of_a_running(agent, http, spec) -> tuple[str, int]:
    job = (await http.post("/v1/jobs", json=spec)).json()
    await wait_state(agent, job["id"], "running")
    with trio.fail_after(30):
        while not agent._wasm.pids():  # the job is handed over before its worker is up
            await trio.sleep(0.01)
    [pid] = agent._wasm.pids()
    os.kill(pid, signal.SIGKILL)
    return job["id"], pid


async def test_a_killed_worker_sends_its_job_back_to_the_queue_and_a_new_worker_runs_it(tmp_path):
    """A worker's death is the host's failure, not the job's: the job runs again."""
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        job_id, pid = await _kill_the_worker_of_a_running(agent, http, wasm_spec("loop.wasm", limits={"wall_ms": 1500}))
        done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
        assert done["state"] == "timed_out" and done["result"]["reason"] == "wall_timeout", done["result"]
        details = [t["detail"] for t in done["timeline"]]
        assert any(d.startswith("this host could not run it: wasm worker process 0 ended") and "exit status -9" in d
                   and d.endswith("trying again in 1 s") for d in details), details
        assert [t["state"] for t in done["timeline"]].count("running") == 2
        assert agent._wasm.pids() and agent._wasm.pids() != [pid]
        assert agent.cpu_used == 0
        assert 'p2psched_job_host_retries_total{runtime="wasm"} 1.0' in (await http.get("/metrics")).text


async def test_with_no_host_retries_a_killed_worker_fails_its_job_and_the_next_job_gets_a_new_worker(tmp_path):
    async with running_agent(tmp_path, cpus=1, host_retries=0) as (agent, http):
        job_id, pid = await _kill_the_worker_of_a_running(agent, http, wasm_spec("loop.wasm", **LOOP))
        done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
        assert done["state"] == "failed"
        assert done["result"]["reason"].startswith("sandbox_error: wasm worker process 0 ended")
        assert "exit status -9" in done["result"]["reason"]
        assert agent.cpu_used == 0  # its slot is free again

        again = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()
        again = (await http.get(f"/v1/jobs/{again['id']}", params={"wait": 30})).json()
        assert again["state"] == "succeeded", again
        assert again["result"]["stdout"] == "hello from p2psched\n"
        assert agent._wasm.pids() and agent._wasm.pids() != [pid]


async def test_three_dead_workers_in_a_row_impair_wasm_until_a_trial_job_runs(tmp_path, caplog):
    """No user job needs to fail to find the host mended: while wasm is impaired the
    agent runs a trial job of its own each second, and the first that runs ends it."""
    caplog.set_level("WARNING", logger="p2psched.agent")
    async with running_agent(tmp_path, cpus=1, host_retries=0, host_cooldown_s=600) as (agent, http):
        for _ in range(3):
            job_id, _pid = await _kill_the_worker_of_a_running(agent, http, wasm_spec("loop.wasm", **LOOP))
            await wait_state(agent, job_id, "failed")
        assert "wasm jobs: this host could not run 3 in a row" in caplog.text
        with trio.fail_after(15):
            while agent.health.failing:
                await trio.sleep(0.05)
        assert agent.health.impaired == ()
        assert "impaired" not in (await http.get("/healthz")).json()
        assert "wasm jobs: a trial job ran on this host" in caplog.text  # no user job ran since:
        jobs = (await http.get("/v1/jobs")).json()["jobs"]
        assert [j["state"] for j in jobs] == ["failed"] * 3


async def test_cancelling_a_job_queued_behind_a_busy_worker_never_runs_it(tmp_path):
    """With half-CPU jobs two share a worker: the second waits in the worker and is
    cancelled there before it starts."""
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        half = {"resources": {"cpu": 0.5}}
        first = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP, **half))).json()
        second = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP, **half))).json()
        await wait_state(agent, second["id"], "running")
        r = await http.delete(f"/v1/jobs/{second['id']}")
        assert r.json()["state"] == "cancelled" and r.json()["result"]["reason"] == "cancelled"
        assert r.json()["result"]["cpu_ms"] == 0  # it never started
        assert agent.get(first["id"]).state.value == "running"
        await http.delete(f"/v1/jobs/{first['id']}")


#: A worker that answers its first frames with bytes that are not msgpack, then
#: waits for the end of its input as a real worker does.
LIAR = "import os, sys\nos.read(0, 1 << 16)\nos.write(1, b'\\xc1\\xc1')\nwhile os.read(0, 1 << 16): pass\n"
#: One that answers with a well-formed result of a job it was never given.
STRANGER = ("import os, msgpack\nos.read(0, 1 << 16)\n"
            "os.write(1, msgpack.packb({'id': 'someone-else', 'result': {'exit_code': 0, 'reason': 'exit 0'}}))\n"
            "while os.read(0, 1 << 16): pass\n")


async def _run_one_against(tmp_path: Path, script: str) -> tuple[object, str | None]:
    ended: list[tuple[object, str | None]] = []
    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m", command=[sys.executable, "-c", script])
        spec = JobSpec.model_validate({"module_sha256": "0" * 64, "entry": "noop"})
        workers.submit("j1", spec, None, lambda result, error: ended.append((result, error)))
        with trio.fail_after(20):
            while not ended:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert not workers.pids()
    return ended[0]


async def test_a_worker_that_sends_something_else_than_a_result_is_stopped_and_its_job_ends(tmp_path, caplog):
    result, error = await _run_one_against(tmp_path, LIAR)
    assert result is None
    assert error is not None and "wasm worker process 0 ended (it sent something that is not a result" in error
    assert "sent something that is not a result" in caplog.text


#: One that answers with a result for the right job, with a field of the wrong type.
MISTYPED = ("import os, pickle, struct, msgpack\n"
            "def frame():\n    n = struct.unpack('>I', os.read(0, 4))[0]\n    return pickle.loads(os.read(0, n))\n"
            "frame()\njob = frame()\n"
            "os.write(1, msgpack.packb({'run': job[1], 'id': job[2], 'result': {'exit_code': 0, 'reason': 'exit 0', 'stdout': 5}}))\n"
            "while os.read(0, 1 << 16): pass\n")


async def test_a_result_with_a_field_of_the_wrong_type_stops_the_worker(tmp_path):
    result, error = await _run_one_against(tmp_path, MISTYPED)
    assert result is None
    assert error is not None and "result of j1 is not a sandbox result" in error and "'stdout': 5" in error


async def test_a_result_for_a_job_the_worker_was_not_given_stops_it(tmp_path):
    result, error = await _run_one_against(tmp_path, STRANGER)
    assert result is None
    assert error is not None and "not a result of a job it runs" in error and "someone-else" in error


def test_a_worker_dies_with_its_agent(tmp_path):
    agent = new_agent(tmp_path, "solo", "--cpus", "1").start()
    try:
        with agent.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP)).json()
            deadline = time.monotonic() + 30
            while http.get(f"/v1/jobs/{job['id']}").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert agent.proc is not None
        deadline = time.monotonic() + 30
        while not (workers := wasm_worker_pids(agent.proc.pid)):
            assert time.monotonic() < deadline, "no wasm worker process"
            time.sleep(0.05)
        assert len(workers) == 1
        os.kill(agent.proc.pid, signal.SIGKILL)  # the agent alone, not its process group
        agent.proc.wait(30)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{workers[0]}").exists() and "Z" not in _state(workers[0]):
            assert time.monotonic() < deadline, "the worker outlived its agent"
            time.sleep(0.05)
    finally:
        agent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# ---------------------------------------------------------------- a job waiting in a worker
#
# A wasm job that must wait for a slot is placed in a worker behind a job running
# alone there, and starts when that job ends. These check that it still waits
# like a queued job in every other way.


async def submit_together(http, *specs) -> list[str]:
    """One batch: the agent dispatches them in one pass, so a job can wait behind
    one that has just started (never behind one running PREFETCH_PATIENCE_S)."""
    results = (await http.post("/v1/jobs:batch", json={"jobs": list(specs)})).json()["results"]
    return [r["job"]["id"] for r in results]


async def _one_running_one_waiting(agent, http) -> tuple[str, str]:
    long, waiting = await submit_together(http, wasm_spec("loop.wasm", **LOOP), wasm_spec("hello.wasm"))
    await wait_state(agent, long, "running")
    await wait_state(agent, waiting, "placed")
    rec = agent.get(waiting)
    assert rec.wait_reason == f"{PREFETCHED_WAIT} {long} ends"
    assert agent.waiting() == 1 and agent.cpu_used == 1  # it waits, and holds no slot
    metrics = (await http.get("/metrics")).text
    assert "p2psched_jobs_running 1.0" in metrics and "p2psched_queue_length 1.0" in metrics
    assert 'p2psched_slots_in_use{kind="cpu"} 1.0' in metrics
    assert 'p2psched_slots_in_use{kind="mem_mb"} 256.0' in metrics  # the loop's default memory
    return long, waiting


async def test_a_waiting_job_starts_when_the_job_ahead_of_it_ends(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long, waiting = await _one_running_one_waiting(agent, http)
        await http.delete(f"/v1/jobs/{long}")
        done = (await http.get(f"/v1/jobs/{waiting}", params={"wait": 30})).json()
        assert done["state"] == "succeeded"
        assert [t["state"] for t in done["timeline"]] == ["submitted", "queued", "placed", "running", "succeeded"]
        assert done["timeline"][2]["detail"] == f"runs here next, after {long}"
        assert agent.get(waiting).wait_reason is None


async def test_a_waiting_job_is_taken_back_to_run_in_a_slot_that_frees_first(tmp_path):
    async with running_agent(tmp_path, cpus=2) as (agent, http):
        *ahead, waiting = await submit_together(http, wasm_spec("loop.wasm", **LOOP), wasm_spec("loop.wasm", **LOOP),
                                                wasm_spec("hello.wasm"))
        for j in ahead:
            await wait_state(agent, j, "running")
        await wait_state(agent, waiting, "placed")
        behind = agent.get(waiting).wait_reason.rsplit(" ", 2)[-2]
        other = next(j for j in ahead if j != behind)
        await http.delete(f"/v1/jobs/{other}")  # the slot that frees is not the one it waits on
        done = (await http.get(f"/v1/jobs/{waiting}", params={"wait": 30})).json()
        assert done["state"] == "succeeded"
        assert agent.get(behind).state.value == "running"  # it did not wait for that one
        details = [t["detail"] for t in done["timeline"]]
        assert any(d.startswith("taken back before it started (taken back: a slot is free)") for d in details)
        assert done["attempts"] == 1 and "attempt 1" in [t["detail"] for t in done["timeline"]
                                                          if t["state"] == "running"]
        await http.delete(f"/v1/jobs/{behind}")


async def test_a_job_of_higher_priority_goes_before_a_waiting_one(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long, waiting = await _one_running_one_waiting(agent, http)
        urgent = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", priority=5))).json()["id"]
        with trio.fail_after(30):
            while not any(f"job {urgent} comes first" in t["detail"] for t in agent.get(waiting).timeline):
                await trio.sleep(0.01)
        await http.delete(f"/v1/jobs/{long}")
        for j in (urgent, waiting):
            assert (await http.get(f"/v1/jobs/{j}", params={"wait": 30})).json()["state"] == "succeeded"
        started = {j: next(t["at"] for t in agent.get(j).timeline if t["state"] == "running") for j in (urgent, waiting)}
        assert started[urgent] < started[waiting]


async def test_jobs_of_one_tenant_waiting_in_a_worker_give_another_tenant_its_turn(tmp_path):
    # Six jobs of tenant a, alone in the queue, fill the worker's waiting places; b's
    # job, arriving next, would wait behind all of them without being taken back.
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        short = {"limits": {"wall_ms": 300}}
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("loop.wasm", tenant="a", **short)] * 6})
        a_jobs = [x["job"]["id"] for x in r.json()["results"]]
        await wait_state(agent, a_jobs[0], "running")
        await wait_state(agent, a_jobs[WAITING_PER_WORKER], "placed")
        b_job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", tenant="b"))).json()["id"]
        with trio.fail_after(60):
            while not all(agent.get(j).state.final for j in (*a_jobs, b_job)):
                for j in a_jobs:  # one taken back waits in the queue again, and says so
                    rec = agent.get(j)
                    assert rec.state.value != "queued" or not rec.wait_reason.startswith(PREFETCHED_WAIT), rec
                await trio.sleep(0.005)
        started = {j: next(t["at"] for t in agent.get(j).timeline if t["state"] == "running")
                   for j in (*a_jobs, b_job)}
        order = sorted(started, key=started.__getitem__)
        assert order.index(b_job) <= 2, order  # a's running job, maybe its next, then b's turn
        taken = [t["detail"] for j in a_jobs for t in agent.get(j).timeline if "takes its turn first" in t["detail"]]
        assert taken and all("tenant 'b'" in d for d in taken)
        assert [t["state"] for t in agent.get(a_jobs[-1]).timeline][-1] == "timed_out"


async def test_a_tenant_whose_job_cannot_wait_in_a_worker_takes_no_waiting_job_back(tmp_path):
    # b's process job waits (its runtime is impaired here and no peer has room: that
    # state is set by hand, the placement it leads to is the agent's own) while the
    # dispatcher goes on past it with a's wasm jobs. Taking a's waiting jobs back gives
    # b nothing; it was done on every pass, each time a job's transitions and writes.
    from p2psched.placement.core import QueueHere

    async with running_agent(tmp_path, cpus=2) as (agent, http):
        place = agent._place
        agent._place = lambda rec: (QueueHere("all peers that could run it are full; waiting here for capacity")
                                    if rec.runtime == "process" else place(rec))
        agent.health.impaired = ("process",)
        b_job = (await http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/true"],
                                                  "tenant": "b"})).json()["id"]
        a_jobs: list[str] = []
        for _ in range(3):
            r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("noop.wasm", entry="noop", tenant="a")] * 300})
            a_jobs += [x["job"]["id"] for x in r.json()["results"]]
        with trio.fail_after(120):
            while not all(agent.get(j).state.final for j in a_jobs):
                await trio.sleep(0.05)
        taken = sum("takes its turn first" in t["detail"] for j in a_jobs for t in agent.get(j).timeline)
        assert taken == 0, taken
        assert agent.get(b_job).state.value == "queued"
        await http.delete(f"/v1/jobs/{b_job}")


async def test_cancelling_a_waiting_job_ends_it_at_once(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long, waiting = await _one_running_one_waiting(agent, http)
        r = (await http.delete(f"/v1/jobs/{waiting}")).json()
        assert r["state"] == "cancelled" and r["result"]["reason"] == "cancelled"
        assert agent.get(long).state.value == "running" and agent.waiting() == 0
        await http.delete(f"/v1/jobs/{long}")


async def test_a_waiting_job_whose_worker_dies_runs_again_on_a_new_one(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long, waiting = await _one_running_one_waiting(agent, http)
        with trio.fail_after(30):
            while not agent._wasm.pids():
                await trio.sleep(0.01)
        os.kill(agent._wasm.pids()[0], signal.SIGKILL)
        done = (await http.get(f"/v1/jobs/{waiting}", params={"wait": 30})).json()
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 1  # it never ran before: being taken back is not an attempt
        assert any("taken back before it started (wasm worker process 0 ended" in t["detail"]
                   for t in done["timeline"])
        # the running one was not taken back: it ran, so it waits out the host's retry pause
        assert any(t["detail"].startswith("this host could not run it: wasm worker process 0 ended")
                   for t in agent.get(long).timeline)
        await http.delete(f"/v1/jobs/{long}")


async def test_draining_takes_a_waiting_job_back_to_the_queue(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long, waiting = await _one_running_one_waiting(agent, http)
        await agent.drain(stop=False)
        await wait_state(agent, waiting, "queued")
        assert agent.get(waiting).timeline[-1]["detail"].startswith(
            "taken back before it started (taken back: the agent is draining)")
        await http.delete(f"/v1/jobs/{long}")


async def test_jobs_waiting_in_a_worker_start_in_order_and_no_more_wait_than_allowed(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long, *ids = await submit_together(http, wasm_spec("loop.wasm", **LOOP),
                                           *[wasm_spec("hello.wasm")] * (WAITING_PER_WORKER + 1))
        await wait_state(agent, long, "running")
        await wait_state(agent, ids[WAITING_PER_WORKER - 1], "placed")
        assert [agent.get(i).state.value for i in ids] == ["placed"] * WAITING_PER_WORKER + ["queued"]
        assert agent.get(ids[1]).wait_reason == f"{PREFETCHED_WAIT} {ids[0]} ends"
        await http.delete(f"/v1/jobs/{long}")
        for i in ids:
            assert (await http.get(f"/v1/jobs/{i}", params={"wait": 30})).json()["state"] == "succeeded"
        started = [next(t["at"] for t in agent.get(i).timeline if t["state"] == "running") for i in ids]
        assert started == sorted(started)


async def test_a_peer_that_joins_takes_a_job_waiting_in_a_worker(tmp_path):
    """Only an agent alone lets jobs wait in its workers: once a peer is up, the job
    goes back to the queue and placement sends it to the free peer."""
    async with running_agent(tmp_path / "a", node_id="busy", cpus=1, membership=FAST_MEMBERSHIP) as (agent, http):
        long, waiting = await _one_running_one_waiting(agent, http)
        async with running_agent(tmp_path / "b", node_id="free", cpus=1, join=[agent.settings.gossip],
                                 membership=FAST_MEMBERSHIP):
            done = (await http.get(f"/v1/jobs/{waiting}", params={"wait": 30})).json()
            assert done["state"] == "succeeded", done
            assert done["executor"] == "free"
            assert any("free has room for it" in t["detail"] for t in done["timeline"])
            assert agent.get(long).state.value == "running"
            await http.delete(f"/v1/jobs/{long}")


async def test_with_every_peer_full_a_job_waits_in_a_worker_until_a_peer_has_room(tmp_path):
    """A peer that is up but full takes nothing: the job waits in a worker here, as on
    an agent alone, and goes to the peer once gossip shows it a free slot."""
    async with running_agent(tmp_path / "b", node_id="free", cpus=1, membership=FAST_MEMBERSHIP) as (peer, peer_http):
        held = (await peer_http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP))).json()["id"]
        await wait_state(peer, held, "running")
        async with running_agent(tmp_path / "a", node_id="busy", cpus=1, join=[peer.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (agent, http):
            with trio.fail_after(30):
                while not (agent.cluster.state_of("free") and agent.cluster.state_of("free").vector.cpu_free == 0):
                    await trio.sleep(0.05)
            long, waiting = await submit_together(http, wasm_spec("loop.wasm", **LOOP), wasm_spec("hello.wasm"))
            await wait_state(agent, waiting, "placed")
            assert agent.get(waiting).wait_reason == f"{PREFETCHED_WAIT} {long} ends"  # in a worker here
            await peer_http.delete(f"/v1/jobs/{held}")  # the peer frees its slot
            done = (await http.get(f"/v1/jobs/{waiting}", params={"wait": 30})).json()
            assert done["state"] == "succeeded", done
            assert done["executor"] == "free" and done["attempts"] == 1
            assert any("free has room for it" in t["detail"] for t in done["timeline"])
            assert agent.get(long).state.value == "running"
            await http.delete(f"/v1/jobs/{long}")


async def test_an_idle_worker_stops_and_the_next_job_starts_a_new_one(tmp_path):
    import hashlib

    from agents import WASM

    module = WASM / "noop.wasm"
    spec = JobSpec.model_validate({"module_sha256": hashlib.sha256(module.read_bytes()).hexdigest(), "entry": "noop"})

    async def run_one(workers: WasmWorkers, job_id: str) -> object:
        ended: list[tuple[object, str | None]] = []
        workers.submit(job_id, spec, module, lambda result, error: ended.append((result, error)))
        with trio.fail_after(30):
            while not ended:
                await trio.sleep(0.01)
        result, error = ended[0]
        assert error is None and result.reason == "exit 0", ended
        return result

    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m", idle_s=0.3)
        await run_one(workers, "first")
        [pid] = workers.pids()
        with trio.fail_after(10):
            while Path(f"/proc/{pid}").exists():  # reaped by trio once it exits
                await trio.sleep(0.05)
        assert workers.pids() == []
        await run_one(workers, "second")
        assert len(workers.pids()) == 1 and workers.pids() != [pid]
        nursery.cancel_scope.cancel()


async def test_no_job_waits_behind_one_that_has_run_a_while(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        long = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP))).json()["id"]
        await wait_state(agent, long, "running")
        await trio.sleep(PREFETCH_PATIENCE_S * 2)
        later = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        await trio.sleep(0.2)
        assert agent.get(later).state.value == "queued" and agent.waiting() == 1
        await http.delete(f"/v1/jobs/{long}")
        assert (await http.get(f"/v1/jobs/{later}", params={"wait": 30})).json()["state"] == "succeeded"


async def test_a_cancel_that_reaches_a_worker_after_the_job_ended_there_spares_its_next_run(tmp_path):
    """A job taken back from behind another (cancelled, in the agent's view, before
    it started) may already have run in the worker: the cancel arrives after its end.
    The same job given to that worker again must run, not meet the old cancel."""
    import hashlib

    from agents import WASM

    module = WASM / "noop.wasm"
    spec = JobSpec.model_validate({"module_sha256": hashlib.sha256(module.read_bytes()).hexdigest(), "entry": "noop"})
    ended: dict[str, list[tuple[object, str | None]]] = {}

    def done(job_id: str):
        return lambda result, error: ended.setdefault(job_id, []).append((result, error))

    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m")
        workers.submit("warm", spec, module, done("warm"))
        with trio.fail_after(30):
            while "warm" not in ended:
                await trio.sleep(0.01)
        # No checkpoint from here to the sleep: the agent's side reads nothing while
        # the worker runs both jobs and writes their results into the pipe.
        workers.submit("ahead", spec, module, done("ahead"))
        workers.submit("again", spec, module, done("again"), behind="ahead")
        time.sleep(1.0)
        workers.cancel("again")  # "ahead" has not ended in the agent's view
        assert ended.pop("again")[0][0].reason == "cancelled"
        workers.submit("again", spec, module, done("again"), behind="ahead")
        with trio.fail_after(30):
            while "again" not in ended:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # nothing more comes for it
        [(result, error)] = ended["again"]
        assert error is None and result.reason == "exit 0", ended["again"]
        assert ended["ahead"][0][0].reason == "exit 0"
        nursery.cancel_scope.cancel()


async def test_a_worker_runs_the_spec_it_was_given_and_signs_that_spec(tmp_path):
    """The run frame carries the spec as JSON and its input as raw bytes: a binary
    input, args, env and limits arrive intact, and the report names the spec the
    agent holds (its digest) and the input it got."""
    import hashlib

    from agents import WASM
    from p2psched.security.attestation import spec_sha256

    data = bytes(range(256)) * 3 + b"\xff\xfe not utf-8"
    runs = {
        "sha": (WASM / "sha256.wasm", {"input": data}),
        "env": (WASM / "printenv.wasm", {"args": ["printenv", "--x"], "env": {"GREETING": "hé"},
                                          "limits": {"wall_ms": 5_000}, "priority": 3, "labels": {"team": "ml"}}),
    }
    ended: dict[str, tuple[object, str | None]] = {}
    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m")
        specs = {}
        for job_id, (module, fields) in runs.items():
            sha = hashlib.sha256(module.read_bytes()).hexdigest()
            specs[job_id] = JobSpec.model_validate({"module_sha256": sha, **fields})
            specs[job_id].input = fields.get("input", b"")  # as the agent holds it: bytes
            workers.submit(job_id, specs[job_id], module,
                           lambda result, error, job_id=job_id: ended.__setitem__(job_id, (result, error)))
        with trio.fail_after(30):
            while len(ended) < len(runs):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    result, error = ended["sha"]
    assert error is None and result.stdout == hashlib.sha256(data).hexdigest().encode() + b"\n"
    report = result.sandbox["attestation"]
    assert report["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert report["spec_sha256"] == spec_sha256(specs["sha"])
    result, error = ended["env"]
    assert error is None and result.reason == "exit 0", result
    assert "GREETING=hé" in result.stdout.decode()
    report = result.sandbox["attestation"]
    assert report["spec_sha256"] == spec_sha256(specs["env"])
    assert report["limits"]["wall_ms"] == 5_000


async def test_jobs_submitted_in_a_hold_go_to_the_worker_together_when_it_ends(tmp_path):
    import hashlib

    from agents import WASM

    module = WASM / "noop.wasm"
    spec = JobSpec.model_validate({"module_sha256": hashlib.sha256(module.read_bytes()).hexdigest(), "entry": "noop"})
    ended: list[str] = []

    def done(job_id: str):
        def record(result, error):
            assert error is None and result.reason == "exit 0", (result, error)
            ended.append(job_id)
        return record

    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m")
        workers.submit("warm", spec, module, done("warm"))
        with trio.fail_after(30):
            while not ended:
                await trio.sleep(0.01)
        with workers.holding():
            for i in range(3):
                workers.submit(f"j{i}", spec, module, done(f"j{i}"))
            await trio.sleep(0.5)
            assert ended == ["warm"]  # held: the worker has not had them
        with trio.fail_after(30):
            while len(ended) < 4:
                await trio.sleep(0.01)
        assert ended == ["warm", "j0", "j1", "j2"]
        nursery.cancel_scope.cancel()


async def test_a_worker_runs_its_guests_as_batch_work(tmp_path):
    """SCHED_BATCH: a worker that wakes for its next job does not preempt the agent's
    event loop on its CPU (it keeps its fair share of CPU time)."""
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        job = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP))).json()
        await wait_state(agent, job["id"], "running")
        with trio.fail_after(30):
            while not agent._wasm.pids():
                await trio.sleep(0.01)
        [pid] = agent._wasm.pids()
        with trio.fail_after(30):  # the worker sets it as it starts, before it reads its first job
            while os.sched_getscheduler(pid) != os.SCHED_BATCH:
                await trio.sleep(0.01)
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the agent itself is not
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)  # nor niced
        await http.delete(f"/v1/jobs/{job['id']}")


async def test_a_worker_process_runs_a_job_without_importing_trio_or_the_agent(tmp_path, capfd):
    """A worker imports what running and signing a guest take, and no more: it starts
    with the first job after an idle minute, and each holds its own copy."""
    from p2psched.security.node_key import load_or_create_private_key

    load_or_create_private_key(tmp_path / "k")
    hello = Path(__file__).parents[2] / "examples" / "wasm" / "hello.wasm"
    ended: list[tuple[object, str | None]] = []
    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m",
                              command=[sys.executable, "-X", "importtime", "-m", "p2psched.sandbox.wasm_worker"])
        spec = JobSpec.model_validate({"module_sha256": hashlib.sha256(hello.read_bytes()).hexdigest()})
        workers.submit("j1", spec, hello, lambda result, error: ended.append((result, error)))
        with trio.fail_after(30):
            while not ended:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    result, error = ended[0]
    assert error is None and result.reason == "exit 0" and result.stdout == b"hello from p2psched\n"
    assert result.sandbox["attestation"]["job_id"] == "j1"  # signed in the worker
    imported = {line.rsplit("|", 1)[1].strip() for line in capfd.readouterr().err.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert {"wasmtime", "msgpack", "p2psched.sandbox.wasm"} <= imported
    assert not {name for name in imported if name.split(".")[0] in ("trio", "anyio", "starlette", "hypercorn")}
    assert not {name for name in imported if name.startswith("p2psched.agent")}
