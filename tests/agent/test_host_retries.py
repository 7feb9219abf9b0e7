"""A job the host could not run waits and runs again; it fails only when the tries are spent.

The host failure here is real: the agent process's open-file limit is lowered
under it (prlimit), so building a sandbox fails with EMFILE, as on a host whose
agent runs out of descriptors. Warm sandboxes are turned off, so that each job
builds its own.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agents import new_agent, wait_for

pytestmark = pytest.mark.root


def nofile(pid: int, soft: str | None = None) -> str:
    """The process's open-file limit as SOFT:HARD, after setting its soft limit to ``soft``."""
    if soft is not None:
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:"], check=True)
    out = subprocess.run(["prlimit", "--pid", str(pid), "--nofile", "--raw", "--noheadings", "-o", "SOFT,HARD"],
                         check=True, capture_output=True, text=True).stdout.split()
    return f"{out[0]}:{out[1]}"


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def run_one(http) -> dict:
    """A process job, to its end: the first also loads the process sandbox (libseccomp, the host probe)."""
    job = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "ran"]}).json()
    return http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()


def test_a_process_job_the_host_could_not_start_waits_and_runs_once_the_host_recovers(tmp_path):
    agent = new_agent(tmp_path, "solo", "--process-warm-pool", "0").start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        normal = nofile(pid).split(":")[0]
        with agent.client() as http:
            assert run_one(http)["state"] == "succeeded"
            nofile(pid, f"{open_fds(pid) + 3}")  # the request's socket fits, the sandbox's pipes do not
            job = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "ran"]}).json()
            waiting = wait_for(lambda: (r := http.get(f"/v1/jobs/{job['id']}").json())["state"] == "queued"
                               and len(r["timeline"]) > 4 and r, what="a host failure")
            assert "this host could not run it: [Errno 24] Too many open files; trying again in 1 s" \
                in waiting["timeline"][-1]["detail"]
            assert waiting["wait_reason"].startswith("this host could not run it")
            nofile(pid, normal)
            done = http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            assert done["state"] == "succeeded", done["result"]
            assert done["result"]["stdout"] == "ran\n"
            assert 'p2psched_job_host_retries_total{runtime="process"}' in http.get("/metrics").text
    finally:
        agent.kill()


def test_a_process_job_fails_with_the_hosts_error_once_the_tries_are_spent(tmp_path):
    agent = new_agent(tmp_path, "solo", "--process-warm-pool", "0", "--host-retries", "1").start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        with agent.client() as http:
            assert run_one(http)["state"] == "succeeded"
            nofile(pid, f"{open_fds(pid) + 3}")
            done = run_one(http)
            assert done["state"] == "failed"
            assert done["result"]["reason"] == "sandbox_error: [Errno 24] Too many open files"
            assert [t["state"] for t in done["timeline"]].count("running") == 2  # the first try, and one more
    finally:
        agent.kill()


def test_a_job_cancelled_while_it_waits_for_the_host_stays_cancelled(tmp_path):
    agent = new_agent(tmp_path, "solo", "--process-warm-pool", "0").start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        normal = nofile(pid).split(":")[0]
        with agent.client() as http:
            assert run_one(http)["state"] == "succeeded"
            nofile(pid, f"{open_fds(pid) + 3}")
            job = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "ran"]}).json()
            wait_for(lambda: "this host could not run it" in (http.get(f"/v1/jobs/{job['id']}").json()
                                                             .get("wait_reason") or ""), what="a host failure")
            nofile(pid, normal)
            cancelled = http.delete(f"/v1/jobs/{job['id']}").json()
            assert cancelled["state"] == "cancelled"
            time.sleep(2)  # past the retry pause
            after = http.get(f"/v1/jobs/{job['id']}").json()
            assert after["state"] == "cancelled"
            assert [t["state"] for t in after["timeline"]].count("running") == 1
    finally:
        agent.kill()
