"""A real agent whose job store misbehaves under it: files removed by a tmp cleaner or an
operator while it runs, a store another process holds locked, an empty jobs.db at
start. Nothing it accepted may be lost, and it must say what is wrong."""

import subprocess
import sys
import time

import httpx
import pytest

from agents import ROOT, new_agent, wait_for, wasm_spec


def ran_hello(http: httpx.Client) -> str:
    """Submit hello.wasm and wait until it succeeded; its id."""
    job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
    assert http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()["state"] == "succeeded"
    return str(job)


@pytest.mark.cluster
def test_a_job_store_removed_while_the_agent_runs_is_written_again_and_loses_nothing(tmp_path):
    """`rm jobs.db*` (or a tmp cleaner) while the agent ran: SQLite went on writing to the
    removed files, /healthz said ok, and a restart found an empty store: every job gone."""
    agent = new_agent(tmp_path, "rm")
    agent.start()
    try:
        with agent.client() as http:
            before = ran_hello(http)
            for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
                (agent.data_dir / name).unlink()
            after = [x["job"]["id"] for x in
                     http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")] * 20}).json()["results"]]
            assert http.get(f"/v1/jobs/{after[-1]}", params={"wait": 30}).json()["state"] == "succeeded"
            wait_for(lambda: (agent.data_dir / "jobs.db").exists(), timeout=10, what="jobs.db written again")
            assert "was removed while the agent ran" in agent.log()
            assert http.get("/healthz").status_code == 200
        assert agent.stop() == 0
        agent.start()
        with agent.client() as http:
            for job_id in (before, *after):
                assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", job_id
    finally:
        agent.kill()


def test_an_empty_job_store_stops_the_agent_at_start_instead_of_forgetting_every_job(tmp_path):
    """jobs.db cut to 0 bytes (a copy that failed, a file system that lost its blocks in a
    crash) opened as a new, empty store: every job it held was silently forgotten."""
    agent = new_agent(tmp_path, "cut")
    agent.start()
    try:
        with agent.client() as http:
            ran_hello(http)
        assert agent.stop() == 0
    finally:
        agent.kill()
    db = agent.data_dir / "jobs.db"
    db.write_bytes(b"")
    p = subprocess.run(agent.command(), capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert f"cannot open the job store {db}: it is empty (0 bytes)" in p.stderr
    assert "restore it from a backup, or delete it to start with an empty store" in p.stderr
    assert db.stat().st_size == 0  # left as it was, for whoever looks into it
