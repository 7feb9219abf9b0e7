"""kill -9 an agent with jobs queued and running; after a restart every job ends."""

import os
import signal
import time

import pytest

from p2psched.agent.agent import WAITING_PER_WORKER

from agents import new_agent, wasm_spec

pytestmark = pytest.mark.cluster


def test_kill_9_then_restart_finishes_every_job(tmp_path):
    agent = new_agent(tmp_path, "crashy", "--cpus", "1").start()
    try:
        with agent.client() as http:
            slow = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 1500})).json()["id"]
            queued = [http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"] for _ in range(5)]
            deadline = time.monotonic() + 10
            while http.get(f"/v1/jobs/{slow}").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # The first ones may already wait in the wasm worker, placed behind the slow job.
            states = [http.get(f"/v1/jobs/{j}").json()["state"] for j in queued]
            n = WAITING_PER_WORKER
            assert set(states[:n]) <= {"queued", "placed"} and states[n:] == ["queued"] * (5 - n), states
        agent.kill(signal.SIGKILL)

        agent.start()
        with agent.client() as http:
            final = {j: http.get(f"/v1/jobs/{j}", params={"wait": 30}).json() for j in [slow, *queued]}
        assert final[slow]["state"] == "timed_out"
        assert final[slow]["attempts"] == 2
        assert any("restarted" in t["detail"] for t in final[slow]["timeline"])
        for j in queued:
            assert final[j]["state"] == "succeeded", final[j]
            assert final[j]["result"]["stdout"] == "hello from p2psched\n"
        assert agent.stop() == 0
    finally:
        agent.kill()  # a failed assertion must not leave the agent running


def test_finished_results_are_served_after_kill_9(tmp_path):
    agent = new_agent(tmp_path, "keeper").start()
    with agent.client() as http:
        job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
        assert http.get(f"/v1/jobs/{job}", params={"wait": 10}).json()["state"] == "succeeded"
    agent.kill(signal.SIGKILL)
    agent.start()
    with agent.client() as http:
        assert http.get(f"/v1/jobs/{job}").json()["state"] == "succeeded"
        assert http.get(f"/v1/jobs/{job}/result").content == b"hello from p2psched\n"
    agent.stop()


def test_sigterm_lets_running_jobs_finish_and_exits_0(tmp_path):
    agent = new_agent(tmp_path, "graceful", "--grace-s", "20").start()
    with agent.client() as http:
        job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 800})).json()["id"]
        while http.get(f"/v1/jobs/{job}").json()["state"] != "running":
            time.sleep(0.02)
    assert agent.stop() == 0
    assert "stopped; state flushed" in agent.log()
    agent.start()
    with agent.client() as http:
        rec = http.get(f"/v1/jobs/{job}").json()
    assert rec["state"] == "timed_out" and rec["attempts"] == 1
    agent.stop()


def test_ctrl_c_stops_the_agent_not_its_jobs(tmp_path):
    """Ctrl-C in the agent's terminal sends SIGINT to its whole process group: the
    agent stops and lets running jobs finish within grace. Its sandboxes and wasm
    workers were in that group, so process jobs died of it (failed, `signal 2`)."""
    agent = new_agent(tmp_path, "terminal", "--grace-s", "30").start()
    try:
        with agent.client() as http:
            proc = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "1.5"]}).json()["id"]
            wasm = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 1500})).json()["id"]
            for job in (proc, wasm):
                while http.get(f"/v1/jobs/{job}").json()["state"] != "running":
                    time.sleep(0.02)
        assert agent.proc is not None
        os.killpg(agent.proc.pid, signal.SIGINT)  # the agent leads its own group (start_new_session)
        assert agent.proc.wait(60) == 0
        agent.start()
        with agent.client() as http:
            recs = {job: http.get(f"/v1/jobs/{job}").json() for job in (proc, wasm)}
        if recs[proc]["state"] != "succeeded":  # queued again (see below): it runs again after the restart
            with agent.client() as http:
                recs[proc] = http.get(f"/v1/jobs/{proc}", params={"wait": 30}).json()
        # Known race: a Ctrl-C while the first process job fills the warm pool can fail that
        # fill (ECHILD); the job is then queued again, as a host fault, and runs after the
        # restart: a second attempt, never a failed job.
        assert (recs[proc]["state"], recs[proc]["result"]["reason"]) == ("succeeded", "exit 0")
        assert recs[proc]["attempts"] in (1, 2)
        assert not any("signal 2" in t["detail"] for t in recs[proc]["timeline"])
        assert (recs[wasm]["state"], recs[wasm]["result"]["reason"], recs[wasm]["attempts"]) == (
            "timed_out", "wall_timeout", 1)
    finally:
        agent.stop()  # whatever failed above: no agent (or its jobs) outlives the test


def test_grace_expiry_requeues_the_interrupted_job_and_says_why(tmp_path):
    agent = new_agent(tmp_path, "impatient", "--grace-s", "0.2").start()
    with agent.client() as http:
        job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 2000})).json()["id"]
        while http.get(f"/v1/jobs/{job}").json()["state"] != "running":
            time.sleep(0.02)
    assert agent.stop() == 0
    agent.start()
    with agent.client() as http:
        rec = http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
    assert rec["state"] == "timed_out" and rec["attempts"] == 2
    assert any("agent stopping" in t["detail"] for t in rec["timeline"])
    agent.stop()
