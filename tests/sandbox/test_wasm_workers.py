"""Wasm jobs run in worker processes: what happens when a worker dies, lies or loses its agent."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import trio

from p2psched.jobs.spec import JobSpec
from p2psched.sandbox.base import SandboxRequest
from p2psched.sandbox.wasm_workers import WasmWorkers

from agents import new_agent, running_agent, wasm_spec

LOOP = {"limits": {"wall_ms": 60_000}}


async def wait_state(agent, job_id: str, state: str) -> None:
    with trio.fail_after(30):
        while agent.get(job_id).state.value != state:
            await trio.sleep(0.01)


async def test_a_killed_worker_fails_its_job_and_the_next_job_gets_a_new_worker(tmp_path):
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        job = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP))).json()
        await wait_state(agent, job["id"], "running")
        with trio.fail_after(30):
            while not agent._wasm.pids():  # the job is handed over before its worker is up
                await trio.sleep(0.01)
        [pid] = agent._wasm.pids()
        os.kill(pid, signal.SIGKILL)
        done = (await http.get(f"/v1/jobs/{job['id']}", params={"wait": 30})).json()
        assert done["state"] == "failed"
        assert done["result"]["reason"].startswith("sandbox_error: wasm worker process 0 ended")
        assert "exit status -9" in done["result"]["reason"]
        assert agent.cpu_used == 0  # its slot is free again

        again = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()
        again = (await http.get(f"/v1/jobs/{again['id']}", params={"wait": 30})).json()
        assert again["state"] == "succeeded", again
        assert again["result"]["stdout"] == "hello from p2psched\n"
        assert agent._wasm.pids() and agent._wasm.pids() != [pid]


async def test_cancelling_a_job_queued_behind_a_busy_worker_never_runs_it(tmp_path):
    """With half-CPU jobs two share a worker: the second waits in the worker and is
    cancelled there before it starts."""
    async with running_agent(tmp_path, cpus=1) as (agent, http):
        half = {"resources": {"cpu": 0.5}}
        first = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP, **half))).json()
        second = (await http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP, **half))).json()
        await wait_state(agent, second["id"], "running")
        r = await http.delete(f"/v1/jobs/{second['id']}")
        assert r.json()["state"] == "cancelled" and r.json()["result"]["reason"] == "cancelled"
        assert r.json()["result"]["cpu_ms"] == 0  # it never started
        assert agent.get(first["id"]).state.value == "running"
        await http.delete(f"/v1/jobs/{first['id']}")


def _request(job_id: str) -> tuple[SandboxRequest, JobSpec]:
    spec = JobSpec.model_validate({"module_sha256": "0" * 64, "entry": "noop"})
    req = SandboxRequest(job_id=job_id, runtime="wasm", limits=spec.limits, resources=spec.resources,
                         module_sha256=spec.module_sha256, module_path=None, entry="noop", command=[], args=[],
                         env={}, stdin=b"", network=False, mask_patterns=[], artifacts=[], gpu_env={},
                         gpu_devices=[])
    return req, spec


#: A worker that answers its first frames with bytes that are not msgpack, then
#: waits for the end of its input as a real worker does.
LIAR = "import os, sys\nos.read(0, 1 << 16)\nos.write(1, b'\\xc1\\xc1')\nwhile os.read(0, 1 << 16): pass\n"
#: One that answers with a well-formed result of a job it was never given.
STRANGER = ("import os, msgpack\nos.read(0, 1 << 16)\n"
            "os.write(1, msgpack.packb({'id': 'someone-else', 'result': {'exit_code': 0, 'reason': 'exit 0'}}))\n"
            "while os.read(0, 1 << 16): pass\n")


async def _run_one_against(tmp_path: Path, script: str) -> tuple[object, str | None]:
    ended: list[tuple[object, str | None]] = []
    async with trio.open_nursery() as nursery:
        workers = WasmWorkers(nursery, 1, cache_dir=tmp_path / "c", key_dir=tmp_path / "k", node_pubkey="",
                              node_id="t", measurement="m", command=[sys.executable, "-c", script])
        req, spec = _request("j1")
        workers.submit("j1", req, spec, lambda result, error: ended.append((result, error)))
        with trio.fail_after(20):
            while not ended:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert not workers.pids()
    return ended[0]


async def test_a_worker_that_sends_something_else_than_a_result_is_stopped_and_its_job_ends(tmp_path, caplog):
    result, error = await _run_one_against(tmp_path, LIAR)
    assert result is None
    assert error is not None and "wasm worker process 0 ended (it sent something that is not a result" in error
    assert "sent something that is not a result" in caplog.text


async def test_a_result_for_a_job_the_worker_was_not_given_stops_it(tmp_path):
    result, error = await _run_one_against(tmp_path, STRANGER)
    assert result is None
    assert error is not None and "not a result of a job it runs" in error and "someone-else" in error


def test_a_worker_dies_with_its_agent(tmp_path):
    agent = new_agent(tmp_path, "solo", "--cpus", "1").start()
    try:
        with agent.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("loop.wasm", **LOOP)).json()
            deadline = time.monotonic() + 30
            while http.get(f"/v1/jobs/{job['id']}").json()["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert agent.proc is not None
        deadline = time.monotonic() + 30
        while not (workers := _wasm_workers_of(agent.proc.pid)):
            assert time.monotonic() < deadline, "no wasm worker process"
            time.sleep(0.05)
        assert len(workers) == 1
        os.kill(agent.proc.pid, signal.SIGKILL)  # the agent alone, not its process group
        agent.proc.wait(30)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{workers[0]}").exists() and "Z" not in _state(workers[0]):
            assert time.monotonic() < deadline, "the worker outlived its agent"
            time.sleep(0.05)
    finally:
        agent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _wasm_workers_of(pid: int) -> list[int]:
    """Child processes of any of ``pid``'s threads (trio starts processes from a worker thread)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:
            continue
    return [int(c) for c in children if b"wasm_workers" in Path(f"/proc/{c}/cmdline").read_bytes()]
