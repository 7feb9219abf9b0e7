"""Cancelling forwarded jobs across real agents, at the stages where a cancel meets a forward."""

import os
import signal
import time

import httpx
import pytest

from agents import start_cluster, stop_all, wait_for, wasm_spec

pytestmark = pytest.mark.cluster


FINAL = ("succeeded", "failed", "cancelled", "timed_out", "rejected")


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


def test_a_cancel_that_missed_an_executor_away_for_minutes_reaches_it_when_it_returns(tmp_path):
    # The origin tries a cancel for about a minute (CANCEL_TRIES); an executor down for
    # longer came back and ran the cancelled job again, to its wall limit.
    from p2psched.agent.remote import CANCEL_TRIES

    agents = start_cluster(tmp_path, ["c0", "c1"], "--cpus", "1")
    origin, away = agents
    tries_s = sum(min(10.0, 0.2 * 2 ** i) for i in range(CANCEL_TRIES))
    try:
        with origin.client() as http:
            wait_running(http, http.post("/v1/jobs", json=sleeper()).json()["id"])
            time.sleep(0.5)  # the peer sees the origin full
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 600_000})).json()["id"]
            assert wait_running(http, job)["executor"] == "c1"
            away.kill()
            assert http.delete(f"/v1/jobs/{job}").json()["state"] == "cancelled"
            time.sleep(tries_s + 3)  # every try has failed
        away.start()
        with away.client() as http:
            rec = wait_for(lambda: (r := http.get(f"/v1/jobs/{job}").json())["state"] in FINAL and r,
                           timeout=30, what=f"job {job} ended on c1")
            assert rec["state"] == "cancelled", rec
            assert running_here(http) == 0
    finally:
        stop_all(agents)
