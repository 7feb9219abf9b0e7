"""An idle agent sleeps: its publisher and housekeeping loops wake for work, not on timers.

Each test forbids the idle timer's fallback (IDLE_PUBLISH_S) so that only the wake-up
under test can make peers see the change.
"""

import trio

from p2psched.agent import agent as agent_module

from agents import FAST_MEMBERSHIP, running_agent

SLEEP_JOB = {"runtime": "process", "command": ["/bin/sleep", "30"]}


async def cpu_free_seen(observer, node_id: str, expect: float) -> None:
    with trio.fail_after(20):
        while True:
            state = observer.cluster.state_of(node_id)
            if state is not None and state.vector.cpu_free == expect:
                return
            await trio.sleep(0.05)


async def test_an_idle_agent_publishes_a_job_start_and_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "IDLE_PUBLISH_S", 3600.0)
    async with running_agent(tmp_path / "e", node_id="exec", cpus=1, membership=FAST_MEMBERSHIP) as (executor, http):
        async with running_agent(tmp_path / "o", node_id="watcher", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (watcher, _):
            await cpu_free_seen(watcher, "exec", 1.0)
            job = (await http.post("/v1/jobs", json=SLEEP_JOB)).json()
            await cpu_free_seen(watcher, "exec", 0.0)
            await http.delete(f"/v1/jobs/{job['id']}")
            await cpu_free_seen(watcher, "exec", 1.0)


async def test_an_idle_agent_publishes_that_it_drains(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "IDLE_PUBLISH_S", 3600.0)
    async with running_agent(tmp_path / "e", node_id="exec", cpus=1, membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="watcher", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (watcher, _):
            await cpu_free_seen(watcher, "exec", 1.0)
            await executor.drain(stop=False)
            with trio.fail_after(20):
                while not watcher.cluster.state_of("exec").vector.draining:
                    await trio.sleep(0.05)
