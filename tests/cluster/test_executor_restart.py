"""An executor killed mid-run comes back while its origin still holds the job queued.

Found with the compose cluster (`docker kill` of a replica running forwarded jobs, then
`docker start` of it while the rest of the cluster was full): the restarted executor
ran the job again, its origin kept the job queued and, once a slot freed, ran it a
second time, so two copies ran at once until the first result; the other was cancelled
and listed under `duplicate_attempts`, and the origin's timeline never showed the
restarted executor's run. The origin now takes that run as the job's attempt.
"""

import signal
import time

import httpx
import pytest

from agents import start_cluster, stop_all, wait_converged, wait_for, wasm_spec

pytestmark = pytest.mark.cluster


def state_at(http: httpx.Client, job_id: str) -> dict:
    r = http.get(f"/v1/jobs/{job_id}")
    return r.json() if r.status_code == 200 else {}


def test_origin_does_not_run_a_job_again_while_its_restarted_executor_runs_it(tmp_path):
    agents = start_cluster(tmp_path, ["o", "e"], "--cpus", "1")
    origin, executor = agents
    try:
        with origin.client() as ho:
            busy = ho.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000})).json()["id"]
            wait_for(lambda: state_at(ho, busy).get("executor") == "o" and state_at(ho, busy).get("state") == "running",
                     what="the busy job running at the origin")
            job = ho.post("/v1/jobs", json=wasm_spec("sleep.wasm", limits={"wall_ms": 8000})).json()["id"]
            wait_for(lambda: state_at(ho, job).get("executor") == "e" and state_at(ho, job).get("state") == "running",
                     what="the job running on e")
            executor.kill(signal.SIGKILL)
            wait_for(lambda: any("was declared dead" in t["detail"] for t in state_at(ho, job).get("timeline", [])),
                     what="the origin declaring e dead and queueing the job")
            assert state_at(ho, job)["state"] == "queued"  # the origin is full: the job waits there
            executor.start()
            with executor.client() as he:
                wait_for(lambda: state_at(he, job).get("state") == "running", timeout=60,
                         what="the restarted executor running the job again")
                wait_converged(agents)
                ho.delete(f"/v1/jobs/{busy}")  # a slot frees at the origin
                both = []
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and state_at(ho, job).get("state") not in ("timed_out", "failed"):
                    at_origin, at_executor = state_at(ho, job), state_at(he, job)
                    if (at_origin.get("state") == "running" and at_origin.get("executor") == "o"
                            and at_executor.get("state") == "running"):
                        both.append(at_origin["timeline"][-1])
                    time.sleep(0.05)
            final = ho.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
        assert final["state"] == "timed_out", final
        assert not both, f"the job ran at the origin and on the restarted executor at once: {both[:1]}"
        # The origin took the restarted executor's run as the job's attempt, and says so.
        assert final["executor"] == "e" and not final.get("duplicate_attempts"), final
        assert any(t["state"] == "placed" and "e came back and runs it again" in t["detail"]
                   for t in final["timeline"]), final["timeline"]
    finally:
        stop_all(agents)
