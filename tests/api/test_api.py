"""The HTTP API against a real agent and real hypercorn, on a free port."""

import base64
import gzip
import json
import re
import time
from types import SimpleNamespace

import trio

from agents import WASM, running_agent, wasm_spec


async def test_submit_wait_and_fetch_result(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 202
        job = r.json()
        assert job["state"] == "queued" and job["origin"] == "t1" and job["id"].startswith("t1:")
        r = await http.get(f"/v1/jobs/{job['id']}", params={"wait": 10})
        done = r.json()
        assert done["state"] == "succeeded"
        assert done["executor"] == "t1" and done["attempts"] == 1
        assert [t["state"] for t in done["timeline"]] == ["submitted", "queued", "placed", "running", "succeeded"]
        assert done["result"]["stdout"] == "hello from p2psched\n"
        out = await http.get(f"/v1/jobs/{job['id']}/result")
        assert out.content == b"hello from p2psched\n"
        assert out.headers["x-job-state"] == "succeeded"


async def test_a_job_that_reserves_little_memory_is_held_to_it(tmp_path):
    # --mem-mb 8 and nothing else: the memory bomb stops near 8 MiB, not at the default 256 MiB.
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("membomb.wasm", resources={"mem_mb": 8}))
        assert r.status_code == 202
        done = (await http.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 30})).json()
        assert done["result"]["reason"] == "memory_limit"
        assert 7 << 20 < done["result"]["peak_mem_bytes"] <= 8 << 20


async def test_same_id_twice_runs_once(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        first = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="once"))
        second = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="once"))
        assert first.status_code == 202 and second.status_code == 200
        assert second.json()["id"] == "once"
        done = (await http.get("/v1/jobs/once", params={"wait": 10})).json()
        assert done["attempts"] == 1
        assert agent.metrics.jobs_total.labels("running", "wasm")._value.get() == 1


async def test_invalid_spec_names_each_field(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json={"runtime": "wasm", "module": "AGFzbQEAAAA=",
                                              "limits": {"wall_ms": -1, "mem_bytes": 10**20}, "colour": "red"})
        assert r.status_code == 400
        fields = {f["field"] for f in r.json()["error"]["fields"]}
        assert fields == {"limits.wall_ms", "limits.mem_bytes", "colour"}
        assert r.json()["error"]["reason"] == "invalid_spec"
        assert (await http.get("/healthz")).status_code == 200


async def test_malformed_json_and_wrong_body_shape(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", content=b'{"runtime": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "malformed_json"
        r = await http.post("/v1/jobs", json=[1, 2])
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        r = await http.post("/v1/jobs:batch", json={"specs": []})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_batch"
        metrics = (await http.get("/metrics")).text  # each refusal at the door is counted by its reason
        for reason in ("malformed_json", "invalid_spec", "invalid_batch"):
            assert f'p2psched_admission_rejections_total{{reason="{reason}"}} 1.0' in metrics, reason


async def test_a_compressed_body_gets_415_naming_its_encoding_and_nothing_is_done(tmp_path):
    spec = json.dumps(wasm_spec("hello.wasm")).encode()
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", content=gzip.compress(spec),
                            headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert r.status_code == 415 and r.headers["accept-encoding"] == "identity"
        error = r.json()["error"]
        assert error["reason"] == "unsupported_encoding" and "'gzip'" in error["message"]
        assert "send it uncompressed" in error["message"]
        assert 'p2psched_admission_rejections_total{reason="unsupported_encoding"} 1.0' in (
            await http.get("/metrics")).text
        r = await http.post("/v1/drain", content=gzip.compress(b"{}"), headers={"content-encoding": "gzip"})
        assert r.status_code == 415 and agent.accepting
        assert (await http.get("/v1/jobs")).json()["jobs"] == []
        r = await http.post("/v1/jobs", content=spec, headers={"content-encoding": "Identity"})
        assert r.status_code == 202, r.text


async def test_a_draining_agent_refuses_submissions_with_503_and_counts_them(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        await agent.drain(stop=False)
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 503 and r.json()["error"]["reason"] == "shutting_down"
        assert "submit to another agent" in r.json()["error"]["message"]
        assert 'p2psched_admission_rejections_total{reason="shutting_down"} 1.0' in (await http.get("/metrics")).text


async def test_module_that_is_not_wasm_is_refused(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json={"runtime": "wasm", "module": base64.b64encode(b"#!/bin/sh\n").decode()})
        assert r.status_code == 400
        assert r.json()["error"]["reason"] == "invalid_module"
        assert "not valid WebAssembly" in r.json()["error"]["message"]


async def test_a_module_refused_on_purpose_says_so_and_how_to_build_it(tmp_path):
    import wasmtime

    # Two memories said only "multiple memories (at offset 0x14)"; a shared memory
    # (threads) already said how to build without it.
    cases = [
        ('(module (import "env" "m" (memory 1)) (memory 1))',
         "multiple memories; p2psched refuses a second memory on purpose (mem_bytes bounds each "
         "memory alone, not their total): build the module with one memory, without the multi-memory feature"),
        ("(module (memory 1 1 shared))",
         "threads must be enabled for shared memories; p2psched runs single-threaded guests"),
        ('(module (type (array (mut i32))) (func (export "f") (result i32) (i32.const 0)))',
         "array indexed types not supported without the gc feature; p2psched refuses the GC and typed function "
         "references proposals on purpose"),
    ]
    async with running_agent(tmp_path) as (agent, http):
        for source, says in cases:
            module = base64.b64encode(wasmtime.wat2wasm(source)).decode()
            r = await http.post("/v1/jobs", json={"runtime": "wasm", "module": module})
            assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_module", r.text
            said = re.sub(r" \(at offset 0x[0-9a-f]+\)", "", r.json()["error"]["message"])
            assert said.startswith(f"module is not valid WebAssembly: {says}"), said


async def test_oversized_body_gets_413(tmp_path):
    async with running_agent(tmp_path, max_request_bytes=4096) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", input=base64.b64encode(b"x" * 8192).decode()))
        assert r.status_code == 413
        assert "4096" in r.json()["error"]["message"]
        assert (await http.get("/healthz")).status_code == 200
        assert 'p2psched_admission_rejections_total{reason="body_too_large"} 1.0' in (await http.get("/metrics")).text


async def test_a_drain_request_with_an_oversized_body_gets_413_and_drains_nothing(tmp_path):
    async with running_agent(tmp_path, max_request_bytes=4096) as (agent, http):
        r = await http.post("/v1/drain", content=b"x" * 8192)
        assert r.status_code == 413 and r.json()["error"]["reason"] == "body_too_large", r.text
        assert agent.accepting and (await http.get("/healthz")).status_code == 200


async def test_module_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    import p2psched.jobs.spec as spec_mod

    monkeypatch.setattr(spec_mod, "MAX_MODULE_BYTES", 16)
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 400
        assert r.json()["error"]["fields"][0]["field"] == "module"
        assert "limit is 16" in r.json()["error"]["fields"][0]["message"]


async def test_unknown_job_and_cancel_of_finished_job(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.get("/v1/jobs/nope")
        assert r.status_code == 404 and "no job 'nope'" in r.json()["error"]["message"]
        r = await http.get("/v1/jobs/other-node:abc")
        assert "submitted to other-node" in r.json()["error"]["message"]
        job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()
        await http.get(f"/v1/jobs/{job['id']}", params={"wait": 10})
        r = await http.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 409 and "already ended (succeeded)" in r.json()["error"]["message"]


async def test_cancel_stops_a_running_job(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        job = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(job["id"]).state.value != "running":
            await trio.sleep(0.01)
        early = await http.get(f"/v1/jobs/{job['id']}/result")
        assert early.status_code == 409 and early.json()["error"]["reason"] == "not_finished"
        assert "`p2psched result --wait SECONDS`" in early.json()["error"]["message"]
        r = await http.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 200
        assert r.json()["state"] == "cancelled" and r.json()["result"]["reason"] == "cancelled"


async def test_queue_full_gets_429_with_retry_after(tmp_path):
    async with running_agent(tmp_path, queue_limit=2, cpus=1) as (agent, http):
        running = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(running["id"]).state.value != "running":
            await trio.sleep(0.01)
        assert (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="mine"))).status_code == 202
        assert (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).status_code == 202
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["reason"] == "queue_full"
        # A client that lost the answer for a job it named gets that job, full queue or not.
        again = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="mine"))
        assert again.status_code == 200 and again.json()["id"] == "mine", again.text
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm", id="mine")]})
        assert r.json()["results"][0]["job"]["id"] == "mine", r.text
        metrics = (await http.get("/metrics")).text
        assert 'p2psched_admission_rejections_total{reason="queue_full"} 1.0' in metrics
        assert "p2psched_queue_length 2.0" in metrics
        await http.delete(f"/v1/jobs/{running['id']}")


async def test_a_batch_counts_against_the_queue_bound_and_says_when_to_retry(tmp_path):
    async with running_agent(tmp_path, queue_limit=2, cpus=1) as (agent, http):
        running = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(running["id"]).state.value != "running":
            await trio.sleep(0.01)
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm") for _ in range(4)]})
        assert r.status_code == 207
        results = r.json()["results"]
        assert [item.get("status") for item in results[:2]] == [202, 202]
        for item in results[2:]:  # jobs of the same batch fill the queue as they are accepted
            assert item["error"]["status"] == 429 and item["error"]["reason"] == "queue_full"
            assert item["error"]["retry_after"] >= 1
        assert agent.waiting() == 2  # queued, or waiting in a worker behind the loop
        await http.delete(f"/v1/jobs/{running['id']}")


async def test_retry_after_follows_how_fast_the_queue_has_drained(tmp_path):
    async with running_agent(tmp_path, queue_limit=20, cpus=1) as (agent, http):
        batch = (await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")] * 10})).json()
        for item in batch["results"]:
            await http.get(f"/v1/jobs/{item['job']['id']}", params={"wait": 30})
        assert agent._drain.per_second(time.time()) >= 10 / 11  # the ten endings were counted
        # From here on, the meter (its arithmetic is tests/jobs/test_queue.py's) says 5 a second.
        agent._drain = SimpleNamespace(per_second=lambda now: 5.0, measured_s=lambda now: 10.0, add=lambda now: None)
        running = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(running["id"]).state.value != "running":
            await trio.sleep(0.01)
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")] * 21})
        refused = r.json()["results"][20]["error"]
        # 5 a second: 20 waiting need 4 s.
        assert refused["reason"] == "queue_full" and refused["retry_after"] == 4
        await http.delete(f"/v1/jobs/{running['id']}")


async def test_retry_after_with_no_ending_yet_goes_by_how_long_jobs_have_run(tmp_path):
    async with running_agent(tmp_path, queue_limit=2, cpus=1) as (agent, http):
        # A burst into an idle agent: nothing runs yet, nothing has ended: ask again in 1 s.
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("loop.wasm", limits={"wall_ms": 60000})]
                                                    + [wasm_spec("hello.wasm")] * 3})
        assert r.json()["results"][3]["error"]["retry_after"] == 1
        loop_id = r.json()["results"][0]["job"]["id"]
        while agent.get(loop_id).state.value != "running":
            await trio.sleep(0.01)
        # The loop has run 40 s (as the agent is told) and nothing has ended: jobs here
        # take at least that long, so the two waiting need 80 s; the answer caps at 60.
        assert (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).status_code == 202  # fills the queue
        agent.running[loop_id].started -= 40
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 429 and r.headers["retry-after"] == "60"
        agent.running[loop_id].started += 30  # 10 s: 2 waiting, 1 slot: 20 s
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert 20 <= int(r.headers["retry-after"]) <= 21
        await http.delete(f"/v1/jobs/{loop_id}")


async def test_batch_returns_one_result_per_spec(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        specs = [wasm_spec("hello.wasm"), {"runtime": "wasm"}, wasm_spec("exit3.wasm")]
        r = await http.post("/v1/jobs:batch", json={"jobs": specs})
        assert r.status_code == 207
        results = r.json()["results"]
        assert results[0]["status"] == 202 and results[2]["status"] == 202
        assert results[1]["error"]["reason"] == "invalid_spec"
        assert results[1]["error"]["fields"][0]["field"].startswith("jobs.1")
        ids = [results[0]["job"]["id"], results[2]["job"]["id"]]
        states = [(await http.get(f"/v1/jobs/{i}", params={"wait": 10})).json()["state"] for i in ids]
        assert states == ["succeeded", "failed"]


async def test_a_batch_item_that_is_no_object_is_named_by_its_field(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm"), "hello.wasm", None, [1]]})
        assert r.status_code == 207
        errors = [item["error"] for item in r.json()["results"][1:]]
        assert [e["message"] for e in errors] == [
            f"jobs.{i} must be a JSON object holding a job spec, not {kind}"
            for i, kind in ((1, "a string"), (2, "null"), (3, "an array"))]
        assert [e["fields"] for e in errors] == [
            [{"field": f"jobs.{i}", "message": "must be a JSON object holding a job spec"}] for i in (1, 2, 3)]
        r = await http.post("/v1/jobs", json=[wasm_spec("hello.wasm")])
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "the body must be a JSON object holding a job spec, not an array")


async def test_a_batch_error_names_the_job_id_the_client_gave(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        specs = [
            {"id": "sweep-1", "runtime": "wasm"},  # no module: refused
            {"spec": {"id": "sweep-2", "runtime": "wasm", "limits": {"wall_ms": -1}}},  # signed shape, refused
            {"id": "not a valid id!", "runtime": "wasm"},  # its id is itself wrong: not echoed
            {"runtime": "wasm"},  # no id to give
            {**wasm_spec("hello.wasm"), "id": "sweep-3"},
        ]
        r = await http.post("/v1/jobs:batch", json={"jobs": specs})
        assert r.status_code == 207
        results = r.json()["results"]
        assert [item.get("id") for item in results[:4]] == ["sweep-1", "sweep-2", None, None]
        assert all(item["error"]["reason"] == "invalid_spec" for item in results[:4])
        assert "id" not in results[4] and results[4]["job"]["id"] == "sweep-3"


async def test_wait_for_many_jobs_in_one_request(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        running = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        batch = (await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm"),
                                                                  wasm_spec("exit3.wasm")]})).json()
        ids = [item["job"]["id"] for item in batch["results"]]
        # Behind the loop nothing ends: the long-poll gives up after its wait and says so.
        r = await http.post("/v1/jobs:wait", json={"ids": ids, "wait": 0.2})
        assert r.status_code == 200
        assert [item["job"]["state"] in ("queued", "placed") for item in r.json()["results"]] == [True, True]
        async with trio.open_nursery() as nursery:
            got: list = []

            async def wait_all() -> None:
                got.append(await http.post("/v1/jobs:wait", json={"ids": ids + ["nope"], "wait": 30}))

            nursery.start_soon(wait_all)
            await trio.sleep(0.2)
            assert not got  # still waiting for both
            await http.delete(f"/v1/jobs/{running['id']}")
        r = got[0]
        assert r.status_code == 207  # one of the three is not a job
        results = r.json()["results"]
        assert [(item["job"]["id"], item["job"]["state"]) for item in results[:2]] == [
            (ids[0], "succeeded"), (ids[1], "failed")]
        assert results[0]["job"]["result"]["stdout"] == "hello from p2psched\n"
        assert results[2]["id"] == "nope" and results[2]["error"]["status"] == 404
        assert results[2]["error"]["reason"] == "unknown_job"


async def test_wait_for_many_refuses_a_bad_body_by_name(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        cases = [
            ([1], "ids"),
            ({"ids": "a"}, "ids"),
            ({"ids": []}, "name 1 to 10000"),
            ({"ids": ["a"] * 10_001}, "name 1 to 10000"),
            ({"ids": ["a", 7]}, "ids.1 is 7"),
            ({"ids": ["a"], "wait": -1}, "wait=-1"),
            ({"ids": ["a"], "wait": 301}, "0 to 300"),
            ({"ids": ["a"], "wait": "soon"}, "wait='soon'"),
            ({"ids": ["a"], "timeout": 3}, "unknown field(s) ['timeout']"),
        ]
        for body, says in cases:
            r = await http.post("/v1/jobs:wait", json=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["reason"] == "invalid_wait" and says in r.json()["error"]["message"], body
        r = await http.post("/v1/jobs:wait", content=b'{"ids": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "malformed_json"
        assert (await http.get("/healthz")).status_code == 200


async def test_cancel_many_by_id_cancels_waiting_jobs_before_it_stops_running_ones(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        done = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()
        await http.get(f"/v1/jobs/{done['id']}", params={"wait": 10})
        running = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(running["id"]).state.value != "running":
            await trio.sleep(0.01)
        waiting = [item["job"]["id"] for item in (await http.post("/v1/jobs:batch", json={
            "jobs": [wasm_spec("hello.wasm"), wasm_spec("hello.wasm")]})).json()["results"]]
        # The running job comes first: it is stopped only once the waiting ones are
        # cancelled, so neither starts in the slot it frees.
        r = await http.post("/v1/jobs:cancel", json={"ids": [running["id"], *waiting, "nope", done["id"]]})
        assert r.status_code == 207
        body = r.json()
        assert body["cancelled"] == 3 and body["more"] is False
        results = body["results"]
        assert [item["job"]["id"] for item in results[:3]] == [running["id"], *waiting]
        assert [item["job"]["state"] for item in results[:3]] == ["cancelled"] * 3
        assert results[0]["job"]["result"]["reason"] == "cancelled"
        for item in results[1:3]:  # queued, or placed in the wasm worker behind the loop: never started
            states = [t["state"] for t in item["job"]["timeline"]]
            assert states[-1] == "cancelled" and "running" not in states, states
            assert item["job"]["attempts"] == 0
        assert (results[3]["id"], results[3]["error"]["status"], results[3]["error"]["reason"]) == (
            "nope", 404, "unknown_job")
        assert (results[4]["id"], results[4]["error"]["status"]) == (done["id"], 409)
        assert "already ended (succeeded)" in results[4]["error"]["message"]
        assert agent.metrics.jobs_total.labels("cancelled", "wasm")._value.get() == 3
        assert not agent.running and agent.waiting() == 0


async def test_cancel_by_labels_takes_a_page_at_a_time_and_leaves_other_jobs(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        blocker = (await http.post("/v1/jobs", json=wasm_spec(
            "loop.wasm", limits={"wall_ms": 60000}, labels={"sweep": "lr", "n": "0"}))).json()
        while agent.get(blocker["id"]).state.value != "running":
            await trio.sleep(0.01)
        sweep = [item["job"]["id"] for item in (await http.post("/v1/jobs:batch", json={"jobs": [
            wasm_spec("hello.wasm", labels={"sweep": "lr", "n": str(n)}) for n in range(1, 4)]})).json()["results"]]
        other = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels={"sweep": "wd"}))).json()
        first = (await http.post("/v1/jobs:cancel", json={"labels": {"sweep": "lr"}, "limit": 2})).json()
        # Waiting jobs first, oldest first: the running one is left for the next page.
        assert [item["job"]["id"] for item in first["results"]] == sweep[:2]
        assert first["more"] is True and first["cancelled"] == 2
        second = (await http.post("/v1/jobs:cancel", json={"labels": {"sweep": "lr"}, "limit": 2})).json()
        assert [item["job"]["id"] for item in second["results"]] == [sweep[2], blocker["id"]]
        assert second["more"] is False and second["cancelled"] == 2
        assert agent.get(blocker["id"]).state.value == "cancelled"
        done = (await http.get(f"/v1/jobs/{other['id']}", params={"wait": 10})).json()
        assert done["state"] == "succeeded"  # another label: it ran in the slot freed for it
        empty = (await http.post("/v1/jobs:cancel", json={"labels": {"sweep": "lr"}})).json()
        assert empty == {"results": [], "cancelled": 0, "more": False}
        both = (await http.post("/v1/jobs:cancel", json={"labels": {"sweep": "wd", "n": "1"}})).json()
        assert both["results"] == []  # every label must match


async def test_cancel_many_refuses_a_bad_body_by_name(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        cases = [
            ([1], "body must be"),
            ({}, "not both or neither"),
            ({"ids": ["a"], "labels": {"a": "b"}}, "not both or neither"),
            ({"ids": []}, "1 to 10000 job ids"),
            ({"ids": ["a"] * 10_001}, "1 to 10000 job ids"),
            ({"ids": ["a", ""]}, "ids.1 is ''"),
            ({"ids": ["a"], "limit": 3}, "tenant and limit go with labels"),
            ({"labels": {}}, "labels must map 1 to 8"),
            ({"labels": "sweep=lr"}, "labels must map"),
            ({"labels": {"sweep": 1}}, "labels.sweep"),
            ({"labels": {"a": "b"}, "limit": 0}, "limit=0"),
            ({"labels": {"a": "b"}, "limit": True}, "limit=True"),
            ({"labels": {"a": "b"}, "limit": 2.5}, "limit=2.5"),
            ({"labels": {"a": "b"}, "tenant": ""}, "tenant=''"),
            ({"ids": ["a"], "wait": 3}, "unknown field(s) ['wait']"),
        ]
        for body, says in cases:
            r = await http.post("/v1/jobs:cancel", json=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["reason"] == "invalid_cancel" and says in r.json()["error"]["message"], (
                body, r.json())
        # a whole number written as 384.0 is a JSON integer, as the OpenAPI schema says
        r = await http.post("/v1/jobs:cancel", json={"labels": {"a": "b"}, "limit": 384.0})
        assert r.status_code == 200 and r.json()["cancelled"] == 0, r.text
        r = await http.post("/v1/jobs:cancel", content=b'{"ids": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["reason"] == "malformed_json"
        assert (await http.get("/healthz")).status_code == 200


async def test_list_filters_and_pages(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm") for _ in range(5)]
                                                    + [wasm_spec("exit3.wasm")]})
        for item in r.json()["results"]:
            await http.get(f"/v1/jobs/{item['job']['id']}", params={"wait": 10})
        page1 = (await http.get("/v1/jobs", params={"limit": 4})).json()
        assert len(page1["jobs"]) == 4 and page1["next_cursor"] is not None
        page2 = (await http.get("/v1/jobs", params={"limit": 4, "cursor": page1["next_cursor"]})).json()
        assert len(page2["jobs"]) == 2
        failed = (await http.get("/v1/jobs", params={"state": "failed"})).json()["jobs"]
        assert len(failed) == 1 and failed[0]["result"]["reason"] == "exit 3"
        bad = await http.get("/v1/jobs", params={"state": "sleepy"})
        assert bad.status_code == 400 and "not a job state" in bad.json()["error"]["message"]


async def test_list_and_count_by_label(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        specs = [wasm_spec("hello.wasm", labels={"sweep": "lr", "seed": str(i % 2)}) for i in range(6)]
        specs += [wasm_spec("exit3.wasm", labels={"sweep": "lr", "seed": "1"}), wasm_spec("hello.wasm")]
        ids = [item["job"]["id"] for item in
               (await http.post("/v1/jobs:batch", json={"jobs": specs})).json()["results"]]
        await http.post("/v1/jobs:wait", json={"ids": ids, "wait": 30})
        r = await http.get("/v1/jobs", params={"label": "sweep=lr"})
        assert [j["id"] for j in r.json()["jobs"]] == ids[:7]
        assert r.json()["jobs"][0]["labels"] == {"sweep": "lr", "seed": "0"}  # the record carries them
        assert "labels" not in (await http.get(f"/v1/jobs/{ids[7]}")).json()  # none: no key
        r = await http.get("/v1/jobs", params=[("label", "sweep=lr"), ("label", "seed=1"), ("limit", "2")])
        assert [j["id"] for j in r.json()["jobs"]] == [ids[1], ids[3]]
        r = await http.get("/v1/jobs", params=[("label", "sweep=lr"), ("label", "seed=1"),
                                               ("cursor", r.json()["next_cursor"])])
        assert [j["id"] for j in r.json()["jobs"]] == [ids[5], ids[6]]
        r = await http.get("/v1/jobs:counts", params=[("label", "sweep=lr"), ("label", "seed=1")])
        counts = r.json()
        assert counts["labels"] == {"sweep": "lr", "seed": "1"}
        assert (counts["counts"]["succeeded"], counts["counts"]["failed"]) == (3, 1)
        for bad, says in [("sweep", "must be KEY=VALUE"), ("=lr", "must be KEY=VALUE")]:
            r = await http.get("/v1/jobs", params={"label": bad})
            assert r.status_code == 400 and says in r.json()["error"]["message"]
        r = await http.get("/v1/jobs:counts", params=[("label", f"k{i}=v") for i in range(9)])
        assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


async def test_list_newest_first_pages_backwards_and_counts_by_state(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm") for _ in range(4)]
                                                    + [wasm_spec("exit3.wasm")]})
        ids = [item["job"]["id"] for item in r.json()["results"]]
        for job_id in ids:
            await http.get(f"/v1/jobs/{job_id}", params={"wait": 10})
        page1 = (await http.get("/v1/jobs", params={"order": "newest", "limit": 3})).json()
        assert [j["id"] for j in page1["jobs"]] == ids[::-1][:3]
        page2 = (await http.get("/v1/jobs", params={"order": "newest", "limit": 3,
                                                     "cursor": page1["next_cursor"]})).json()
        assert [j["id"] for j in page2["jobs"]] == ids[::-1][3:] and page2["next_cursor"] is None
        newest_failed = (await http.get("/v1/jobs", params={"order": "newest", "state": "failed"})).json()["jobs"]
        assert [j["id"] for j in newest_failed] == [ids[-1]]
        bad = await http.get("/v1/jobs", params={"order": "sideways"})
        assert bad.status_code == 400 and "oldest (the default) or newest" in bad.json()["error"]["message"]

        counts = (await http.get("/v1/jobs:counts")).json()["counts"]
        assert counts == {"submitted": 0, "queued": 0, "placed": 0, "running": 0, "succeeded": 4, "failed": 1,
                          "cancelled": 0, "timed_out": 0, "rejected": 0}
        bad = await http.get("/v1/jobs:counts", params={"state": "failed"})
        assert bad.status_code == 400 and "use tenant" in bad.json()["error"]["message"]


async def test_state_changes_sent_by_a_page_of_another_site_are_refused(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        own = f"http://{http.base_url.host}:{http.base_url.port}"
        evil = {"origin": "http://evil.example"}
        r = await http.post("/v1/jobs", json=wasm_spec("sleep.wasm"), headers=evil)
        assert r.status_code == 403 and r.json()["error"]["reason"] == "cross_site_request"
        assert "http://evil.example" in r.json()["error"]["message"]
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")]}, headers={"origin": "null"})
        assert r.status_code == 403
        assert (await http.get("/v1/jobs")).json()["jobs"] == []  # nothing was accepted

        job = (await http.post("/v1/jobs", json=wasm_spec("sleep.wasm"), headers={"origin": own})).json()
        assert job["state"] in ("queued", "placed", "running")  # the agent's own dashboard may
        assert (await http.delete(f"/v1/jobs/{job['id']}", headers=evil)).status_code == 403
        assert (await http.post("/v1/drain", headers=evil)).status_code == 403
        assert agent.accepting
        assert (await http.delete(f"/v1/jobs/{job['id']}")).json()["state"] == "cancelled"  # a client may


async def test_priority_and_fair_share_order_of_dispatch(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        blocker = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(blocker["id"]).state.value != "running":
            await trio.sleep(0.01)
        order = [("a", 0), ("a", 0), ("b", 0), ("c", 9)]
        ids = []
        for tenant, prio in order:
            ids.append((await http.post("/v1/jobs", json=wasm_spec("hello.wasm", tenant=tenant, priority=prio))).json()["id"])
        await http.delete(f"/v1/jobs/{blocker['id']}")
        for i in ids:
            await http.get(f"/v1/jobs/{i}", params={"wait": 10})
        started = sorted(ids, key=lambda i: next(t["at"] for t in agent.get(i).timeline if t["state"] == "running"))
        assert started == [ids[3], ids[0], ids[2], ids[1]]


async def test_openapi_and_metrics_describe_the_agent(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        doc = (await http.get("/openapi.json")).json()
        assert "/v1/jobs:batch" in doc["paths"] and "JobSpec" in doc["components"]["schemas"]
        await http.get(f"/v1/jobs/{(await http.post('/v1/jobs', json=wasm_spec('hello.wasm'))).json()['id']}",
                       params={"wait": 10})
        text = (await http.get("/metrics")).text
        for name in ("p2psched_queue_length", 'p2psched_jobs_total{runtime="wasm",state="succeeded"} 1.0',
                     "p2psched_job_run_seconds_bucket", "p2psched_job_queue_seconds_bucket",
                     'p2psched_slots_in_use{kind="cpu"}',
                     'p2psched_slots_in_use{kind="gpu"} 0.0'):  # before any GPU job, on a host with none
            assert name in text
        r = await http.get("/v2/nothing")
        assert r.status_code == 404 and "openapi.json" in r.json()["error"]["message"]


async def test_a_reported_state_is_already_on_disk(tmp_path):
    import hashlib
    import sqlite3

    from agents import WASM

    module = (WASM / "noop.wasm").read_bytes()
    async with running_agent(tmp_path) as (agent, http):
        first = (await http.post("/v1/jobs", json=wasm_spec("noop.wasm", entry="noop"))).json()
        await http.get(f"/v1/jobs/{first['id']}", params={"wait": 10})
        spec = {"module_sha256": hashlib.sha256(module).hexdigest(), "entry": "noop"}
        batch = (await http.post("/v1/jobs:batch", json={"jobs": [spec] * 200})).json()["results"]
        pending = {r["job"]["id"] for r in batch}
        order = ["submitted", "queued", "placed", "running", "succeeded"]
        db = sqlite3.connect(agent.store.path)
        with trio.fail_after(30):
            while pending:
                for job_id in list(pending):
                    reported = (await http.get(f"/v1/jobs/{job_id}")).json()["state"]
                    (on_disk,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    # The disk may be ahead of what was reported, never behind it.
                    assert order.index(on_disk) >= order.index(reported), (job_id, reported, on_disk)
                    if reported == "succeeded":
                        pending.discard(job_id)
        db.close()


async def test_every_queued_job_says_why_it_waits(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        running = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60000}))).json()
        while agent.get(running["id"]).state.value != "running":
            await trio.sleep(0.01)
        ids = [(await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"] for _ in range(8)]
        await trio.sleep(0.5)  # dispatch passes have looked at the queue
        records = [(await http.get(f"/v1/jobs/{i}")).json() for i in ids]
        waiting = [r for r in records if r["state"] in ("queued", "placed")]
        assert [r for r in waiting if r["state"] == "queued"], records  # some are still in the queue
        for rec in waiting:
            assert rec["wait_reason"], rec
        assert any("behind the jobs ahead of it" in r["wait_reason"] for r in waiting), records
        await http.delete(f"/v1/jobs/{running['id']}")


def _with_custom_section(module: bytes, size: int) -> bytes:
    """``module`` grown by a custom section of ``size`` bytes: still valid, and as big as a real model's."""
    name = b"pad"
    body = bytes([len(name)]) + name + b"\0" * size
    n, leb = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        leb.append(byte | (0x80 if n else 0))
        if not n:
            break
    return module + b"\x00" + bytes(leb) + body


async def test_a_module_is_validated_once_and_a_large_one_off_the_event_loop(tmp_path, monkeypatch):
    import threading

    from p2psched.sandbox import wasm

    calls: list[tuple[int, bool]] = []
    validate = wasm.validate_module

    def counting(data: bytes) -> None:
        calls.append((len(data), threading.current_thread() is threading.main_thread()))
        validate(data)

    monkeypatch.setattr(wasm, "validate_module", counting)
    async with running_agent(tmp_path) as (agent, http):
        # Five jobs of one module in a batch: checked once. Sent again: it is stored, valid.
        r = await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")] * 5})
        assert [x["status"] for x in r.json()["results"]] == [202] * 5
        assert (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).status_code == 202
        assert len(calls) == 1 and calls[0][1]  # small: checked inline

        big = _with_custom_section((WASM / "hello.wasm").read_bytes(), 1 << 20)
        r = await http.post("/v1/jobs", json={"module": base64.b64encode(big).decode()})
        assert r.status_code == 202, r.text
        assert calls[-1] == (len(big), False)  # checked on a worker thread, not the event loop's

        bad = {"module": base64.b64encode(b"\0asm\x01\0\0\0\x7f").decode()}
        r = await http.post("/v1/jobs:batch", json={"jobs": [bad] * 3})
        errors = [x["error"] for x in r.json()["results"]]
        assert [e["reason"] for e in errors] == ["invalid_module"] * 3  # each item says so, checked once
        assert [e["fields"][0]["field"] for e in errors] == ["jobs.0.module", "jobs.1.module", "jobs.2.module"]
        assert len(calls) == 3
