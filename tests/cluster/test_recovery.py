"""No accepted job is lost: executors die, origins restart, ids are submitted twice."""

import hashlib
import json
import signal
import time

import httpx
import pytest

from agents import FAST_MEMBERSHIP, new_agent, start_cluster, stop_all, wait_converged, wasm_spec

pytestmark = pytest.mark.cluster


def wait_state(http: httpx.Client, job_id: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rec = http.get(f"/v1/jobs/{job_id}").json()
        if rec["state"] == state:
            return rec
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)


def test_job_of_a_killed_executor_is_placed_again_and_succeeds(tmp_path):
    agents = start_cluster(tmp_path, ["o", "e1", "e2"], "--cpus", "1")
    origin = agents[0]
    try:
        with origin.client() as http:
            busy = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000})).json()["id"]
            wait_state(http, busy, "running")
            time.sleep(0.5)
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 4000})).json()["id"]
            first = wait_state(http, job, "running")
            victim = next(a for a in agents if a.node_id == first["executor"])
            victim.kill(signal.SIGKILL)
            http.delete(f"/v1/jobs/{busy}")
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
        # The loop guest ends by its wall limit: timed_out is its deterministic end.
        assert rec["state"] == "timed_out", rec
        assert rec["attempts"] == 2
        assert rec["executor"] != victim.node_id
        assert any(f"executor {victim.node_id} was declared dead" in t["detail"] for t in rec["timeline"])
    finally:
        stop_all(agents)


def test_result_waits_on_the_executor_until_its_origin_is_back(tmp_path):
    agents = start_cluster(tmp_path, ["home", "worker"], "--cpus", "1")
    origin, worker = agents
    try:
        with origin.client() as http:
            busy = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000})).json()["id"]
            wait_state(http, busy, "running")
            time.sleep(0.5)
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 2500})).json()["id"]
            assert wait_state(http, job, "running")["executor"] == "worker"
        origin.kill(signal.SIGKILL)
        with worker.client() as http:  # the worker finishes while the origin is down
            assert http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()["state"] == "timed_out"
        time.sleep(1.0)
        origin.start()
        with origin.client() as http:
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert rec["state"] == "timed_out", rec
            assert rec["executor"] == "worker" and rec["attempts"] == 1
            assert "duplicate_attempts" not in rec
            http.delete(f"/v1/jobs/{busy}")
    finally:
        stop_all(agents)


def submit_as_a_client_does(url, spec):
    """POST a job, retrying a 503 after its Retry-After as a client should: an agent
    that has just joined answers 503 "joining" for a client-chosen id until it has
    the seed's member list (all agents seeing each other alive does not imply it)."""
    for _ in range(20):
        r = httpx.post(url + "/v1/jobs", json=spec, timeout=30)
        if r.status_code != 503:
            return r
        assert r.json()["error"]["reason"] in ("joining", "home_unreachable"), r.text
        time.sleep(float(r.headers["retry-after"]))
    return r


def test_same_id_submitted_to_two_agents_is_one_job(tmp_path):
    agents = start_cluster(tmp_path, ["a", "b", "c"])
    try:
        for n in range(6):
            job_id = f"twice-{n}"
            replies = [submit_as_a_client_does(a.url, wasm_spec("hello.wasm", id=job_id)) for a in agents]
            assert sorted(r.status_code for r in replies) == [200, 200, 202], [r.text for r in replies]
            origins = {r.json()["origin"] for r in replies}
            assert len(origins) == 1
            home = next(a for a in agents if a.node_id in origins)
            rec = httpx.get(f"{home.url}/v1/jobs/{job_id}", params={"wait": 30}, timeout=40).json()
            assert rec["state"] == "succeeded" and rec["attempts"] == 1
            holders = [a.node_id for a in agents if a.node_id != home.node_id
                       and httpx.get(f"{a.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
                       and httpx.get(f"{a.url}/v1/jobs/{job_id}", timeout=10).json()["origin"] != home.node_id]
            assert holders == []
    finally:
        stop_all(agents)


def test_an_id_an_agent_holds_is_answered_there_after_its_home_moved(tmp_path):
    """A client id's home is a hash over the members, so it moves when one joins (or
    leaves). The agent that holds the job answers a resubmission itself: it handed
    it to the new home, which accepted the id anew and ran the job a second time."""
    first = new_agent(tmp_path, "first").start()
    second = new_agent(tmp_path, "second", "--join", first.gossip)
    second.env["P2PSCHED_MEMBERSHIP"] = json.dumps(FAST_MEMBERSHIP)
    # an id whose home is "second" once it has joined (the agents' rendezvous hash)
    job_id = next(i for i in (f"moved-{n}" for n in range(1000))
                  if max(("first", "second"), key=lambda n: hashlib.sha256(f"{n}\x00{i}".encode()).digest())
                  == "second")
    try:
        r = httpx.post(f"{first.url}/v1/jobs", json=wasm_spec("hello.wasm", id=job_id), timeout=30)
        assert r.status_code == 202 and r.json()["origin"] == "first", r.text
        assert httpx.get(f"{first.url}/v1/jobs/{job_id}", params={"wait": 30}, timeout=40).json()["state"] == "succeeded"
        second.start()
        wait_converged([first, second])
        again = httpx.post(f"{first.url}/v1/jobs", json=wasm_spec("hello.wasm", id=job_id), timeout=30)
        assert again.status_code == 200 and again.json()["origin"] == "first", again.text
        assert httpx.get(f"{second.url}/v1/jobs/{job_id}", timeout=10).status_code == 404  # no second origin
    finally:
        stop_all([first, second])


def test_graceful_leave_is_seen_as_left_not_dead(tmp_path):
    agents = start_cluster(tmp_path, ["s0", "s1", "s2"])
    try:
        assert agents[2].stop() == 0
        wait_converged(agents[:2], expect={"s0": "alive", "s1": "alive", "s2": "left"})
    finally:
        stop_all(agents)


def test_drain_hands_queued_jobs_to_peers_and_leaves(tmp_path):
    agents = start_cluster(tmp_path, ["d0", "d1"], "--cpus", "1", "--grace-s", "30")
    d0, d1 = agents
    try:
        with d0.client() as http:
            running = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 8000})).json()["id"]
            wait_state(http, running, "running")
            # d1 is full too, so these wait in d0's queue until the drain hands them over.
            with d1.client() as h1:
                blocker = h1.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 8000})).json()["id"]
                wait_state(h1, blocker, "running")
            queued = [http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"] for _ in range(3)]
            assert http.post("/v1/drain").json()["draining"] is True
            r = http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
            states = {p["node_id"]: p["state"] for p in d1.client().get("/v1/peers").json()["peers"]}
            assert states["d0"] in ("draining", "alive")  # gossip may not have carried it yet
        assert d0.proc.wait(60) == 0
        wait_converged([d1], expect={"d0": "left", "d1": "alive"})
        d0.start()
        with d0.client() as http:
            recs = [http.get(f"/v1/jobs/{j}", params={"wait": 30}).json() for j in queued]
            assert [(r["state"], r["executor"]) for r in recs] == [("succeeded", "d1")] * 3, [r["timeline"] for r in recs]
            assert http.get(f"/v1/jobs/{running}").json()["state"] == "timed_out"
    finally:
        stop_all(agents)


def test_a_drain_gives_running_jobs_one_grace_not_two(tmp_path):
    # The drain waited --grace-s for running jobs, then the stop it ends in waited
    # --grace-s again: a drain with a job that would not end took twice the grace.
    agent = new_agent(tmp_path, "g", "--grace-s", "1")
    agent.start()
    try:
        with agent.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000})).json()["id"]
            wait_state(http, job, "running")
            assert http.post("/v1/drain").json()["draining"] is True
        assert agent.proc.wait(60) == 0
        assert "stopping: no new jobs; 1 running may finish within 0.0s" in agent.log(), agent.log()
    finally:
        agent.kill()
    agent.start()
    with agent.client() as http:
        rec = http.get(f"/v1/jobs/{job}").json()
        assert any("agent stopping: run interrupted" in t["detail"] for t in rec["timeline"]), rec["timeline"]
    agent.stop()


def test_a_job_its_executor_can_no_longer_run_goes_back_to_its_origin_and_ends_there(tmp_path):
    """An executor restarted with less (here 1 CPU, was 2) finds a job it accepted that
    it can never run now. Only the job's origin may end it or place it again: it is
    given back, and the origin, where no agent can run it either, rejects it saying
    why. Nothing waits forever on a job that ended only at its executor."""
    # The origin is slow to suspect (30 s): big is back, a new incarnation, before it
    # could be declared dead, so the origin never places the job again on its own.
    patient = json.dumps({**FAST_MEMBERSHIP, "suspicion_mult": 300})
    agents = start_cluster(tmp_path, ["home", "big"], per_agent={"home": ["--cpus", "1"], "big": ["--cpus", "2"]},
                           per_agent_env={"home": {"P2PSCHED_MEMBERSHIP": patient}})
    home, big = agents
    try:
        with home.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", resources={"cpu": 2},
                                                       limits={"wall_ms": 60000})).json()["id"]
            assert wait_state(http, job, "running")["executor"] == "big"
            big.kill(signal.SIGKILL)
            big.extra[big.extra.index("--cpus") + 1] = "1"
            big.start()
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
        assert rec["state"] == "rejected", rec
        assert "2 CPU" in rec["result"]["reason"] or "cpu" in rec["result"]["reason"], rec["result"]
        details = " | ".join(t["detail"] for t in rec["timeline"])
        assert "big could not run it" in details and "can never run it" in details, details
        with big.client() as http:
            there = http.get(f"/v1/jobs/{job}").json()
        assert there["state"] == "cancelled" and "given back to its origin home" in there["timeline"][-1]["detail"]
    finally:
        stop_all(agents)


def test_a_retry_of_an_id_its_home_holds_is_answered_through_an_agent_whose_queue_is_full(tmp_path):
    """The agent a client asks only passes a job another agent is home to on: its own
    full queue refused a retry that the home would have answered with the record. The
    home's full queue refused it too, though the home holds the job."""
    one = ["--queue-limit", "1"]
    # Each queue is filled with a job only its own agent can run, so none is forwarded.
    agents = start_cluster(tmp_path, ["full", "home"], per_agent={"full": [*one, "--cpus", "1", "--mem-mb", "4096"],
                                                                  "home": [*one, "--cpus", "2", "--mem-mb", "1024"]})
    full, home = agents
    job_id = next(i for i in (f"kept-{n}" for n in range(1000))
                  if max(("full", "home"), key=lambda n: hashlib.sha256(f"{n}\x00{i}".encode()).digest()) == "home")

    def long(cpu: int, mem_mb: int) -> dict:
        return wasm_spec("loop.wasm", limits={"wall_ms": 60_000}, resources={"cpu": cpu, "mem_mb": mem_mb})

    try:
        with home.client() as http:
            assert http.post("/v1/jobs", json=wasm_spec("hello.wasm", id=job_id)).status_code == 202
            assert http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["state"] == "succeeded"
            wait_state(http, http.post("/v1/jobs", json=long(2, 256)).json()["id"], "running")
            http.post("/v1/jobs", json=long(2, 256)).raise_for_status()
            assert http.post("/v1/jobs", json=long(2, 256)).status_code == 429
        with full.client() as http:
            wait_state(http, http.post("/v1/jobs", json=long(1, 2048)).json()["id"], "running")
            http.post("/v1/jobs", json=long(1, 2048)).raise_for_status()
            refused = http.post("/v1/jobs", json=long(1, 2048))
            assert refused.status_code == 429 and refused.json()["error"]["reason"] == "queue_full", refused.text
            again = http.post("/v1/jobs", json=wasm_spec("hello.wasm", id=job_id))
            assert again.status_code == 200, again.text
            assert (again.json()["origin"], again.json()["state"]) == ("home", "succeeded")
            batch = http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm", id=job_id)]}).json()
            assert batch["results"][0]["status"] == 200 and batch["results"][0]["job"]["origin"] == "home", batch
    finally:
        stop_all(agents)


def test_an_id_handed_to_a_home_that_did_not_answer_goes_to_that_home_alone(tmp_path):
    """The asked agent handed the id to its home, which hung before answering. Once
    membership had forgotten the home, the id hashed to the asked agent, which took it
    anew; the hung home then woke, read the submission and took it too: two origins,
    two runs, for a client that only ever retried at one agent."""
    import os

    quick = {"P2PSCHED_MEMBERSHIP": json.dumps({**FAST_MEMBERSHIP, "dead_retention": 2.0})}
    agents = start_cluster(tmp_path, ["asks", "home"], per_agent_env={"asks": quick, "home": quick})
    asks, home = agents
    job_id = next(i for i in (f"doubt-{n}" for n in range(1000))
                  if max(("asks", "home"), key=lambda n: hashlib.sha256(f"{n}\x00{i}".encode()).digest()) == "home")
    spec = wasm_spec("hello.wasm", id=job_id)
    try:
        os.kill(home.proc.pid, signal.SIGSTOP)  # before membership notices: the submission reaches its socket
        first = httpx.post(f"{asks.url}/v1/jobs", json=spec, timeout=60)
        assert first.status_code == 503 and first.json()["error"]["reason"] == "home_unreachable", first.text
        assert "it may hold the job" in first.json()["error"]["message"]
        deadline = time.monotonic() + 8  # well past the home's death and its dead_retention
        while time.monotonic() < deadline:
            r = httpx.post(f"{asks.url}/v1/jobs", json=spec, timeout=60)
            assert r.status_code == 503 and "was handed to agent home" in r.json()["error"]["message"], r.text
            time.sleep(0.5)
        os.kill(home.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while (r := httpx.post(f"{asks.url}/v1/jobs", json=spec, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.5)
        assert r.status_code in (200, 202) and r.json()["origin"] == "home", r.text
        assert httpx.get(f"{asks.url}/v1/jobs/{job_id}", timeout=10).status_code == 404  # no second origin
        done = httpx.get(f"{home.url}/v1/jobs/{job_id}", params={"wait": 30}, timeout=40).json()
        assert done["state"] == "succeeded" and done["attempts"] == 1
    finally:
        os.kill(home.proc.pid, signal.SIGCONT)
        stop_all(agents)
