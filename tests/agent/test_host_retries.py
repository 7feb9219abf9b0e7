"""A job the host could not run waits and runs again; it fails only when the tries are spent.

The host failures here are real: the agent process's open-file limit is lowered
under it (prlimit), so building a sandbox fails with EMFILE, as on a host whose
agent runs out of descriptors (warm sandboxes are turned off, so that each job
builds its own); or the wasm worker running the job is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agents import new_agent, start_cluster, stop_all, wait_for, wasm_spec, wasm_worker_pids



def nofile(pid: int, soft: str | None = None) -> str:
    """The process's open-file limit as SOFT:HARD, after setting its soft limit to ``soft``."""
    if soft is not None:
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:"], check=True)
    out = subprocess.run(["prlimit", "--pid", str(pid), "--nofile", "--raw", "--noheadings", "-o", "SOFT,HARD"],
                         check=True, capture_output=True, text=True).stdout.split()
    return f"{out[0]}:{out[1]}"


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def submit(http) -> str:
    return http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "ran"]}).json()["id"]


def run_one(http) -> dict:
    """A process job, to its end: the first also loads the process sandbox (libseccomp, the host probe)."""
    return http.get(f"/v1/jobs/{submit(http)}", params={"wait": 60}).json()


@contextlib.contextmanager
def short_of_files(tmp_path, *flags: str) -> Iterator[tuple[httpx.Client, Callable[[], object]]]:
    """A real agent that has run a process job, then has its open-file limit lowered
    under it so that the request's socket fits and a sandbox's pipes do not.
    Yields a client and a function that gives the limit back."""
    agent = new_agent(tmp_path, "solo", "--process-warm-pool", "0", *flags).start()
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        normal = nofile(pid).split(":")[0]
        with agent.client() as http:
            assert run_one(http)["state"] == "succeeded"
            nofile(pid, f"{open_fds(pid) + 3}")
            yield http, lambda: nofile(pid, normal)
    finally:
        agent.kill()


@pytest.mark.root
def test_a_process_job_the_host_could_not_start_waits_and_runs_once_the_host_recovers(tmp_path):
    with short_of_files(tmp_path) as (http, recover):
        job_id = submit(http)
        waiting = wait_for(lambda: (r := http.get(f"/v1/jobs/{job_id}").json())["state"] == "queued"
                           and len(r["timeline"]) > 4 and r, what="a host failure")
        assert "this host could not run it: [Errno 24] Too many open files; trying again in 1 s" \
            in waiting["timeline"][-1]["detail"]
        assert waiting["wait_reason"].startswith("this host could not run it")
        recover()
        done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        assert done["state"] == "succeeded", done["result"]
        assert done["result"]["stdout"] == "ran\n"
        assert 'p2psched_job_host_retries_total{runtime="process"}' in http.get("/metrics").text


@pytest.mark.root
def test_a_process_job_fails_with_the_hosts_error_once_the_tries_are_spent(tmp_path):
    with short_of_files(tmp_path, "--host-retries", "1") as (http, _):
        done = run_one(http)
        assert done["state"] == "failed"
        assert done["result"]["reason"] == "sandbox_error: [Errno 24] Too many open files"
        assert [t["state"] for t in done["timeline"]].count("running") == 2  # the first try, and one more


@pytest.mark.root
def test_a_job_cancelled_while_it_waits_for_the_host_stays_cancelled(tmp_path):
    with short_of_files(tmp_path) as (http, recover):
        job_id = submit(http)
        wait_for(lambda: "this host could not run it" in (http.get(f"/v1/jobs/{job_id}").json()
                                                         .get("wait_reason") or ""), what="a host failure")
        recover()
        cancelled = http.delete(f"/v1/jobs/{job_id}").json()
        assert cancelled["state"] == "cancelled"
        time.sleep(2)  # past the retry pause
        after = http.get(f"/v1/jobs/{job_id}").json()
        assert after["state"] == "cancelled"
        assert [t["state"] for t in after["timeline"]].count("running") == 1


@pytest.mark.root
def test_a_host_without_the_sandbox_tools_fails_a_process_job_at_once_with_the_fix(tmp_path):
    """Missing tools do not come back by waiting: no retry, and the message says what to install."""
    agent = new_agent(tmp_path, "solo")
    agent.env["PATH"] = str(tmp_path / "empty")  # no bwrap, prlimit or setpriv on it
    agent.start()
    try:
        with agent.client() as http:
            done = run_one(http)
        assert done["state"] == "failed"
        assert done["result"]["reason"] == \
            "sandbox_error: process jobs need bubblewrap: install it with 'apt-get install bubblewrap'"
        assert not any("could not run it" in t["detail"] for t in done["timeline"])
    finally:
        agent.kill()


@pytest.mark.cluster
def test_a_job_this_host_could_not_run_goes_to_a_peer_that_fits(tmp_path):
    """A host that failed a job is the last place to try it again: with a peer that
    has room, the job goes there."""
    h1, h2 = start_cluster(tmp_path, ["h1", "h2"], "--cpus", "1")
    try:
        with h1.client() as http:
            job_id = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 1500})).json()["id"]
            wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "running", what="the job running")
            assert h1.proc is not None
            [worker] = wait_for(lambda: wasm_worker_pids(h1.proc.pid), what="h1's wasm worker")
            os.kill(worker, signal.SIGKILL)
            done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        assert done["state"] == "timed_out" and done["result"]["reason"] == "wall_timeout", done["result"]
        assert done["executor"] == "h2"
        details = [t["detail"] for t in done["timeline"]]
        failed_at = next(i for i, d in enumerate(details) if d.startswith("this host could not run it"))
        assert any(d.startswith("forwarded to h2") for d in details[failed_at:]), details
    finally:
        stop_all([h1, h2])
