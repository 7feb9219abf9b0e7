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
