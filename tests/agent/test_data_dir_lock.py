"""One agent per data dir: a second one refuses to start, and a killed one leaves no lock."""

import time

import pytest

from p2psched.agent.datadir import DataDirLock
from p2psched.agent.errors import StartupError

from agents import AgentProcess, free_port, new_agent, wasm_spec


def test_the_lock_is_exclusive_names_its_holder_and_is_free_once_released(tmp_path):
    first = DataDirLock.acquire(tmp_path / "d", "n1")
    with pytest.raises(StartupError) as refused:
        DataDirLock.acquire(tmp_path / "d", "n2")  # another open of the file, as another agent's would be
    assert "pid" in str(refused.value) and "node n1" in str(refused.value) and "--data-dir" in str(refused.value)
    first.release()
    DataDirLock.acquire(tmp_path / "d", "n2").release()


def wait_state(http, job_id, state, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (rec := http.get(f"/v1/jobs/{job_id}").json())["state"] != state:
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)
    return rec


@pytest.mark.cluster
def test_a_second_agent_on_a_data_dir_in_use_refuses_and_runs_nothing_twice(tmp_path):
    a = new_agent(tmp_path, "a").start()
    # The same agent started twice by mistake (say by hand beside its service), on other ports.
    b = AgentProcess("a", a.data_dir, free_port(), free_port(), free_port(), ["--insecure", "--no-mdns"])
    try:
        with a.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("sleep.wasm")).json()["id"]
            wait_state(http, job, "running")

            b.start(wait=False)
            assert b.proc is not None and b.proc.wait(60) == 2
            assert f"in use by another agent (pid {a.proc.pid}, node a)" in b.log(), b.log()
            # b recovered nothing: the job still runs its first attempt on a.
            rec = http.get(f"/v1/jobs/{job}").json()
            assert rec["state"] == "running" and rec["attempts"] == 1, rec

        a.kill()  # SIGKILL: the kernel drops the lock with the process
        b.start()
        with b.client() as http:
            rec = wait_state(http, job, "running")
            assert rec["attempts"] == 2, rec["timeline"]  # b took over the data dir and runs the job again
            assert http.delete(f"/v1/jobs/{job}").json()["state"] == "cancelled"
        assert b.stop() == 0
    finally:
        a.kill()
        b.kill()
