"""The agent writes one structured log line per job transition, with the job id."""

from __future__ import annotations

import json

import pytest

from agents import new_agent, wasm_spec

pytestmark = pytest.mark.cluster


def job_lines(log: str, job_id: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("job") == job_id:
            out.append(entry)
    return out


def test_each_transition_of_a_job_is_one_json_log_line_with_its_id(tmp_path):
    agent = new_agent(tmp_path, "logs", "--log-format", "json").start()
    try:
        with agent.client() as http:
            ok = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
            bad = http.post("/v1/jobs", json=wasm_spec("exit3.wasm")).json()["id"]
            records = {i: http.get(f"/v1/jobs/{i}", params={"wait": 30}).json() for i in (ok, bad)}
    finally:
        assert agent.stop() == 0
    log = agent.log_path.read_text()
    for job_id, rec in records.items():
        lines = job_lines(log, job_id)
        # Every transition after the job's creation (submitted), in order, once.
        expected = [step["state"] for step in rec["timeline"][1:]]
        assert [entry["state"] for entry in lines] == expected, (expected, lines)
        assert all(entry["logger"] == "p2psched.jobs" and entry["level"] == "info" for entry in lines)
        assert lines[-1]["detail"] == rec["result"]["reason"]
    assert [e["state"] for e in job_lines(log, ok)] == ["queued", "placed", "running", "succeeded"]
    assert job_lines(log, bad)[-1]["state"] == "failed"


def test_log_level_warning_turns_the_job_lines_off(tmp_path):
    agent = new_agent(tmp_path, "quiet", "--log-format", "json", "--log-level", "warning").start()
    try:
        with agent.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
            assert http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()["state"] == "succeeded"
    finally:
        assert agent.stop() == 0
    assert job_lines(agent.log_path.read_text(), job) == []


def test_a_forwarded_job_is_logged_at_its_origin_and_at_its_executor(tmp_path):
    import time

    from agents import start_cluster, stop_all

    agents = start_cluster(tmp_path, ["lo", "le"], "--cpus", "1", "--log-format", "json")
    try:
        with agents[0].client() as http:
            busy = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 30000})).json()["id"]
            deadline = time.monotonic() + 30
            while http.get(f"/v1/jobs/{busy}").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "le", rec
            http.delete(f"/v1/jobs/{busy}")
    finally:
        stop_all(agents)
    at_origin = job_lines(agents[0].log_path.read_text(), job)
    at_executor = job_lines(agents[1].log_path.read_text(), job)
    # The origin logs what it learns of the run at the executor too (running), naming where.
    assert [e["state"] for e in at_origin] == ["queued", "placed", "running", "succeeded"], at_origin
    assert "on le" in at_origin[2]["detail"]
    assert [e["state"] for e in at_executor] == ["queued", "placed", "running", "succeeded"], at_executor
