"""Finished jobs are deleted after the retention time, so an agent's store does not grow for good."""

import hashlib

import trio

from agents import WASM, running_agent, wasm_spec


async def test_a_finished_job_is_deleted_after_the_retention_time_and_a_running_one_is_not(tmp_path):
    async with running_agent(tmp_path, job_retention_h=1 / 3600) as (agent, http):  # one second
        done = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        assert (await http.get(f"/v1/jobs/{done}", params={"wait": 30})).json()["state"] == "succeeded"
        sleeper = (await http.post("/v1/jobs", json=wasm_spec("sleep.wasm"))).json()["id"]

        with trio.fail_after(30):
            while (r := await http.get(f"/v1/jobs/{done}")).status_code != 404:
                await trio.sleep(0.2)
        assert "finished jobs are kept for 0.000277778 h" in r.json()["error"]["message"]
        assert (await http.get(f"/v1/jobs/{sleeper}")).json()["state"] == "running"  # older, but not finished
        assert [j["id"] for j in (await http.get("/v1/jobs")).json()["jobs"]] == [sleeper]
        assert "p2psched_jobs_pruned_total 1.0" in (await http.get("/metrics")).text

        # hello.wasm is no longer named by any job: deleted in turn, so it must be sent again.
        by_hash = {"module_sha256": hashlib.sha256((WASM / "hello.wasm").read_bytes()).hexdigest()}
        with trio.fail_after(30):
            while (r := await http.post("/v1/jobs", json=by_hash)).status_code != 400:
                await http.delete(f"/v1/jobs/{r.json()['id']}")
                await trio.sleep(0.5)
        assert r.json()["error"]["reason"] == "unknown_module"
        sleeping = hashlib.sha256((WASM / "sleep.wasm").read_bytes()).hexdigest()
        assert agent.store.has_module(sleeping)  # the running job's module stays
        await http.delete(f"/v1/jobs/{sleeper}")


async def test_retention_0_keeps_every_job(tmp_path):
    async with running_agent(tmp_path, job_retention_h=0) as (agent, http):
        done = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        await http.get(f"/v1/jobs/{done}", params={"wait": 30})
        await trio.sleep(1.5)
        assert (await http.get(f"/v1/jobs/{done}")).status_code == 200
        assert "finished jobs are kept" not in (await http.get("/v1/jobs/nope")).json()["error"]["message"]
