"""Cancelling forwarded jobs across real agents, at the stages where a cancel meets a forward."""

import os
import signal
import time

import httpx
import pytest

from agents import start_cluster, stop_all, wait_for, wasm_spec

pytestmark = pytest.mark.cluster


def sleeper() -> dict:
    return wasm_spec("sleep.wasm", limits={"wall_ms": 60000})


def wait_running(http: httpx.Client, job_id: str) -> dict:
    return wait_for(lambda: (rec := http.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and rec,
                    what=f"job {job_id} running")


def running_here(http: httpx.Client) -> int:
    return next(p for p in http.get("/v1/peers").json()["peers"] if p["self"])["vector"]["running"]


def test_a_cancel_that_outlives_its_hung_executor_is_not_placed_again(tmp_path):
    # The executor hangs (SIGSTOP) while a cancel waits on it; membership declares it
    # dead meanwhile. The origin must end the job there and then, not place it again
    # on the free peer (which would run a cancelled job to its end, holding its slot).
    agents = start_cluster(tmp_path, ["k0", "k1", "k2"], "--cpus", "1")
    by_id = {a.node_id: a for a in agents}
    hung = None
    try:
        origin = agents[0]
        with origin.client() as http:
            wait_running(http, http.post("/v1/jobs", json=sleeper()).json()["id"])
            time.sleep(0.5)
            job = http.post("/v1/jobs", json=sleeper()).json()["id"]
            executor = wait_running(http, job)["executor"]
            hung = by_id[executor]
            free = by_id[({"k1", "k2"} - {executor}).pop()]
            os.kill(hung.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            r = http.delete(f"/v1/jobs/{job}")
            took = time.monotonic() - t0
            assert r.status_code == 200 and r.json()["state"] == "cancelled", r.json()
            rec = http.get(f"/v1/jobs/{job}").json()
            assert rec["state"] == "cancelled"
            assert [t for t in rec["timeline"] if t["state"] == "placed"][-1]["detail"].startswith(
                f"forwarded to {executor}"), rec["timeline"]
        with free.client() as http:
            assert http.get(f"/v1/jobs/{job}").status_code == 404  # never offered to it
            assert running_here(http) == 0
        # The origin decides once membership has the executor dead, without waiting out
        # the cancel's timeouts.
        assert took < 10, took
    finally:
        if hung is not None:
            os.kill(hung.proc.pid, signal.SIGCONT)
        stop_all(agents)
