"""A job store that cannot be written (a full disk) and one that cannot be opened.

The agent must keep serving, refuse new jobs with a clear, retryable error, never
accept a job it could not write, keep the states of the jobs it holds in memory,
and write them once the disk has room again. A damaged store stops the agent at
start with what to do, not a traceback.
"""

import base64
import hashlib
import subprocess
import sys
import time

import pytest

from agents import ROOT, WASM, new_agent, wait_for, wasm_spec
from disks import fill, small_disk


@pytest.mark.root
@pytest.mark.cluster
def test_a_full_disk_refuses_jobs_keeps_serving_and_writes_the_held_states_when_space_returns(tmp_path):
    agent = new_agent(tmp_path, "full")
    with small_disk(agent.data_dir) as disk:  # the data dir is the small disk; the agent's log is not on it
        agent.start()
        try:
            with agent.client() as http:
                hello = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()
                assert http.get(f"/v1/jobs/{hello['id']}", params={"wait": 30}).json()["state"] == "succeeded"
                slow = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 3000})).json()["id"]
                wait_for(lambda: http.get(f"/v1/jobs/{slow}").json()["state"] == "running")

                fill(disk)
                # By hash (the module is stored), with an input that makes each row big.
                spec = {"module_sha256": hashlib.sha256((WASM / "hello.wasm").read_bytes()).hexdigest(),
                        "input": base64.b64encode(b"x" * 6000).decode()}
                accepted = []

                def refused_batch():
                    r = http.post("/v1/jobs:batch", json={"jobs": [spec] * 50}).json()["results"]
                    accepted.extend(x["job"]["id"] for x in r if "job" in x)
                    return all(x.get("error", {}).get("reason") == "store_unwritable" for x in r) and r

                refusal = wait_for(refused_batch)[0]["error"]
                assert refusal["status"] == 503 and "free space" in refusal["message"]
                # A small write (a state change) may still fit in free pages of the full
                # disk's WAL, and a write that lands clears the agent's store_unwritable until
                # the next one fails: look again rather than at one instant.
                def refused_one():
                    r = http.post("/v1/jobs", json=spec)
                    if r.status_code == 202:
                        accepted.append(r.json()["id"])
                        return None
                    return r

                one = wait_for(refused_one)
                assert one.status_code == 503 and one.headers["retry-after"] == "1"
                health = wait_for(lambda: (h := http.get("/healthz")).status_code == 503 and h)
                assert health.json()["status"] == "store_unwritable"
                assert "disk is full" in health.json()["detail"]
                assert 'p2psched_admission_rejections_total{reason="store_unwritable"}' in http.get("/metrics").text

                time.sleep(3.5)  # the slow job times out while its state cannot be written
                assert agent.proc.poll() is None  # the agent kept serving

                (disk / "filler").unlink()
                wait_for(lambda: http.get("/healthz").status_code == 200)
                assert http.get(f"/v1/jobs/{slow}").json()["state"] == "timed_out"
                again = http.post("/v1/jobs", json=spec).json()["id"]
                assert http.get(f"/v1/jobs/{again}", params={"wait": 30}).json()["state"] == "succeeded"
                listed = {j["id"] for j in http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
            # Only what was accepted exists: the refused submissions left nothing behind.
            assert listed == {hello["id"], slow, again, *accepted}
            assert agent.stop() == 0
            agent.start()
            with agent.client() as http:
                assert http.get(f"/v1/jobs/{slow}").json()["state"] == "timed_out"
                assert {j["id"] for j in http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]} == listed
        finally:
            agent.kill()
            agent.stop()


def test_a_damaged_job_store_stops_the_agent_at_start_with_what_to_do(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.db").write_bytes(b"this is not a database, it was cut by a bad copy" * 100)
    p = subprocess.run([sys.executable, "-m", "p2psched", "agent", "--data-dir", str(data), "--api", "127.0.0.1:0",
                        "--gossip", "127.0.0.1:0", "--transfer", "127.0.0.1:0", "--insecure", "--no-mdns"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert f"cannot open the job store {data / 'jobs.db'}: file is not a database" in p.stderr
    assert "move it aside to start with an empty store" in p.stderr


@pytest.mark.root
@pytest.mark.cluster
def test_an_agent_whose_log_disk_is_full_keeps_running_jobs(tmp_path):
    """`p2psched agent >> agent.log 2>&1` on a disk that fills: the log lines are lost,
    the agent is not."""
    agent = new_agent(tmp_path, "chatty")
    with small_disk(tmp_path / "logdisk") as disk:
        agent.data_dir.mkdir(parents=True)
        log = open(disk / "agent.log", "ab")  # noqa: SIM115
        agent.proc = subprocess.Popen(agent.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      start_new_session=True)
        try:
            agent.wait_healthy()
            fill(disk)
            with agent.client() as http:
                for _ in range(3):  # some 600 job lines, more than the disk has room for
                    batch = http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")] * 40}).json()
                    last = batch["results"][-1]["job"]["id"]
                    assert http.get(f"/v1/jobs/{last}", params={"wait": 30}).json()["state"] == "succeeded"
                    time.sleep(1.2)  # past the idle log flush
                assert http.get("/healthz").status_code == 200
            assert agent.proc.poll() is None
            assert agent.stop() == 0
        finally:
            agent.kill()
            log.close()


@pytest.mark.root
@pytest.mark.cluster
def test_stopping_while_the_store_cannot_be_written_exits_1_and_the_restart_runs_the_job_again(tmp_path):
    agent = new_agent(tmp_path, "stuck")
    with small_disk(agent.data_dir) as disk:
        agent.start()
        try:
            with agent.client() as http:
                job = http.post("/v1/jobs", json=wasm_spec("sleep.wasm")).json()["id"]
                wait_for(lambda: http.get(f"/v1/jobs/{job}").json()["state"] == "running")
                fill(disk)
                # Cancelled in memory, but its end cannot be written: the client is told so.
                r = http.delete(f"/v1/jobs/{job}")
                assert r.status_code == 503 and r.json()["error"]["reason"] == "store_unwritable"
            assert agent.stop() == 1
            assert "stopping with job states not written" in agent.log()
            (disk / "filler").unlink()
            agent.start()
            with agent.client() as http:
                rec = wait_for(lambda: (r := http.get(f"/v1/jobs/{job}").json())["state"] == "running" and r)
                assert rec["attempts"] == 2  # at least once: it ran again rather than being lost
                assert http.delete(f"/v1/jobs/{job}").json()["state"] == "cancelled"
            assert agent.stop() == 0
        finally:
            agent.kill()
