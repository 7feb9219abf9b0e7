"""An idle agent sleeps: its publisher and housekeeping loops wake for work, not on timers.

Each test forbids the idle timer's fallback (IDLE_PUBLISH_S) so that only the wake-up
under test can make peers see the change.
"""

import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2psched.agent import agent as agent_module
from p2psched.security.attestation import verify_report

from agents import FAST_MEMBERSHIP, new_agent, running_agent, wasm_spec

SLEEP_JOB = {"runtime": "process", "command": ["/bin/sleep", "30"]}


async def cpu_free_seen(observer, node_id: str, expect: float) -> None:
    with trio.fail_after(20):
        while True:
            state = observer.cluster.state_of(node_id)
            if state is not None and state.vector.cpu_free == expect:
                return
            await trio.sleep(0.05)


@asynccontextmanager
async def idle_executor_and_watcher(tmp_path, monkeypatch):
    """An idle agent ``exec`` (its timer fallback off) and a peer that watches its vector."""
    monkeypatch.setattr(agent_module, "IDLE_PUBLISH_S", 3600.0)
    async with running_agent(tmp_path / "e", node_id="exec", cpus=1, membership=FAST_MEMBERSHIP) as (executor, http):
        async with running_agent(tmp_path / "o", node_id="watcher", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (watcher, _):
            await cpu_free_seen(watcher, "exec", 1.0)
            yield executor, http, watcher


async def test_an_idle_agent_publishes_a_job_start_and_its_end(tmp_path, monkeypatch):
    async with idle_executor_and_watcher(tmp_path, monkeypatch) as (_, http, watcher):
        job = (await http.post("/v1/jobs", json=SLEEP_JOB)).json()
        await cpu_free_seen(watcher, "exec", 0.0)
        await http.delete(f"/v1/jobs/{job['id']}")
        await cpu_free_seen(watcher, "exec", 1.0)


async def test_an_idle_agent_publishes_that_it_drains(tmp_path, monkeypatch):
    async with idle_executor_and_watcher(tmp_path, monkeypatch) as (executor, _, watcher):
        await executor.drain(stop=False)
        with trio.fail_after(20):
            while not watcher.cluster.state_of("exec").vector.draining:
                await trio.sleep(0.05)


#: Runs `p2psched agent` exactly as the command line does, plus a thread that writes
#: the names of the imported modules to argv[1] each time argv[1] + ".ask" appears.
MODULE_REPORTER = r"""
import os, sys, threading, time
out = sys.argv.pop(1)
def report():
    while True:
        if os.path.exists(out + ".ask"):
            names = list(sys.modules)
            with open(out + ".tmp", "w") as f:
                f.write("\n".join(names))
            os.replace(out + ".tmp", out)
            os.unlink(out + ".ask")
        time.sleep(0.05)
threading.Thread(target=report, daemon=True).start()
sys.argv[0] = "p2psched"
from p2psched.cli.main import main
main()
"""

NOT_AT_START = {"wasmtime", "networkx", "zeroconf", "pynvml", "pydantic_settings", "p2psched.sandbox.process",
                "yaml", "rich", "httpx", "cryptography"}


def imported_modules(report: Path) -> set[str]:
    report.unlink(missing_ok=True)
    Path(str(report) + ".ask").touch()
    deadline = time.monotonic() + 30
    while not report.exists():
        assert time.monotonic() < deadline, "the agent never reported its modules"
        time.sleep(0.05)
    return set(report.read_text().split())


def test_an_idle_agent_has_not_loaded_what_only_jobs_need_and_still_runs_the_first_wasm_job(tmp_path):
    agent = new_agent(tmp_path, "idle")
    report = tmp_path / "modules.txt"
    agent.command = lambda: [sys.executable, "-c", MODULE_REPORTER, str(report), "agent", "--node-id", "idle",
                             "--api", agent.url.removeprefix("http://"), "--gossip", agent.gossip,
                             "--transfer", f"127.0.0.1:{agent.transfer_port}", "--data-dir", str(agent.data_dir),
                             *agent.extra]
    agent.start()
    try:
        at_start = imported_modules(report)
        assert "p2psched.agent.agent" in at_start  # the report comes from the running agent
        assert not NOT_AT_START & at_start, sorted(NOT_AT_START & at_start)
        with agent.client() as http:
            gossiped = http.get("/v1/peers").json()
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()
            done = http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
        assert done["state"] == "succeeded", done
        # The node key, not loaded at start, signs the first report as the key peers were told.
        node_pubkey = (agent.data_dir / "node.pub").read_text().strip()
        assert [p["node_pubkey"] for p in gossiped["peers"] if p["node_id"] == "idle"] == [node_pubkey]
        verify_report(done["result"]["attestation"], node_pubkey)
        # The agent loaded wasmtime to check the module at submission; the run and its
        # signature happened in a wasm worker process, so the agent has no use for
        # the private key and has not loaded cryptography.
        after_job = imported_modules(report)
        assert "wasmtime" in after_job
        assert "cryptography" not in after_job
    finally:
        agent.stop()
