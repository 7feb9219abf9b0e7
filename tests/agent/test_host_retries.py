"""A job the host could not run waits and runs again; it fails only when the tries are spent.

The host failures here are real: the agent process's open-file limit is lowered
under it (prlimit), so building a sandbox fails with EMFILE, as on a host whose
agent runs out of descriptors (warm sandboxes are turned off, so that each job
builds its own); or the wasm worker running the job is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents import cli, new_agent, start_cluster, stop_all, wait_for, wasm_spec, wasm_worker_pids



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
        assert details[failed_at].endswith("; placing it on a peer"), details  # no pause: h2 has room
        assert any(d.startswith("forwarded to h2") for d in details[failed_at:]), details
    finally:
        stop_all([h1, h2])


def health(http) -> dict:
    return http.get("/healthz").json()


@pytest.mark.root
def test_a_runtime_whose_jobs_keep_failing_is_impaired_and_a_job_that_runs_ends_that(tmp_path):
    """Three host failures in a row impair the runtime, visibly; a lone agent still
    runs its jobs (nobody else could), and the first that runs clears it."""
    with short_of_files(tmp_path, "--host-cooldown-s", "600") as (http, recover):
        ids = [submit(http) for _ in range(3)]
        impaired = wait_for(lambda: health(http).get("impaired"), what="the process runtime impaired")
        assert health(http)["status"] == "ok"  # it still serves, and would forward
        assert impaired["process"]["state"] == "impaired"
        assert impaired["process"]["failures_in_a_row"] >= 3
        # EMFILE hits wherever the descriptors run out first: a pipe, the scratch dir,
        # or a file of the job's cgroup (then the error names the cgroup first).
        assert "[Errno 24] Too many open files" in impaired["process"]["last_error"], impaired
        assert 'p2psched_runtime_impaired{runtime="process"} 1.0' in http.get("/metrics").text
        [me] = http.get("/v1/peers").json()["peers"]
        assert me["vector"]["impaired"] == ["process"]
        assert me["runtimes"]["process"]["state"] == "impaired"
        recover()
        for job_id in ids:
            done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert done["state"] == "succeeded", done["timeline"]
        assert "impaired" not in health(http)
        assert 'p2psched_runtime_impaired{runtime="process"} 0.0' in http.get("/metrics").text
        [me] = http.get("/v1/peers").json()["peers"]
        assert me["vector"]["impaired"] == [] and me["runtimes"] == {}


def h1_without_bubblewrap(tmp_path: Path) -> tuple[Any, Any, Path]:
    """Two agents of one CPU slot; h1's PATH holds the tools the process sandbox needs
    but bubblewrap (returned: link bwrap into it to mend h1). Its pause after a host
    failure is longer than a test, so only h1's own trial jobs can find it mended."""
    bin_dir = tmp_path / "h1-bin"
    bin_dir.mkdir()
    for tool in ("prlimit", "setpriv"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    h1, h2 = start_cluster(tmp_path, ["h1", "h2"], "--cpus", "1", "--host-cooldown-s", "600",
                           "--process-warm-pool", "0", per_agent_env={"h1": {"PATH": str(bin_dir)}})
    return h1, h2, bin_dir


@pytest.mark.cluster
def test_a_host_without_bubblewrap_leaves_process_jobs_to_peers_until_it_has_it(tmp_path):
    """h1 lacks bubblewrap. Its own process job runs on h2 instead of failing; h2
    sends h1 none, even while h2 is full; once bubblewrap is installed on h1, h1's
    next trial job finds it, and h1 takes process jobs again."""
    h1, h2, bin_dir = h1_without_bubblewrap(tmp_path)
    try:
        with h1.client() as c1, h2.client() as c2:
            moved = c1.get(f"/v1/jobs/{submit(c1)}", params={"wait": 60}).json()
            assert moved["state"] == "succeeded" and moved["executor"] == "h2", moved["timeline"]
            details = [t["detail"] for t in moved["timeline"]]
            assert "this host could not run it: process jobs need bubblewrap: install it with " \
                   "'apt-get install bubblewrap'; placing it on a peer" in details
            assert health(c1)["impaired"]["process"]["failures_in_a_row"] == 1

            def h1_seen_by_h2() -> dict:
                return next(p for p in c2.get("/v1/peers").json()["peers"] if p["node_id"] == "h1")
            wait_for(lambda: h1_seen_by_h2()["vector"]["impaired"] == ["process"], what="h2 to hear it")
            table = cli("peers", agent=h2, check=True).stdout.decode()
            assert "alive (process impaired)" in next(line for line in table.splitlines() if "h1" in line)
            busy = c2.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "60"]}).json()["id"]
            wait_for(lambda: c2.get(f"/v1/jobs/{busy}").json()["state"] == "running", what="h2 full")
            waiting = c2.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "ran"]}).json()["id"]
            reason = wait_for(lambda: c2.get(f"/v1/jobs/{waiting}").json()["wait_reason"], what="a wait reason")
            assert reason.startswith("the one peer that could run it cannot run process jobs now"), reason
            assert c2.get(f"/v1/jobs/{waiting}").json()["state"] == "queued"

            (bin_dir / "bwrap").symlink_to(shutil.which("bwrap"))  # the operator installs it
            done = c2.get(f"/v1/jobs/{waiting}", params={"wait": 60}).json()
            assert done["state"] == "succeeded" and done["executor"] == "h1", done["timeline"]
            assert "impaired" not in health(c1)
            wait_for(lambda: h1_seen_by_h2()["vector"]["impaired"] == [], what="h2 to hear h1 recovered")
            c2.delete(f"/v1/jobs/{busy}")
        assert "process jobs: this host could not run 1 in a row" in h1.log()
        assert "process jobs: a trial job ran on this host" in h1.log()
        assert "process jobs run on this host again" in h1.log()
    finally:
        stop_all([h1, h2])


@pytest.mark.cluster
def test_jobs_of_a_runtime_impaired_here_do_not_hold_up_other_runtimes_behind_them(tmp_path):
    """h1 cannot run process jobs (no bubblewrap) and h2 is full: h1's process jobs
    wait for h2, but the wasm job queued behind them runs on h1 at once; the process
    jobs go to h2 once it has room."""
    h1, h2, _ = h1_without_bubblewrap(tmp_path)
    try:
        with h1.client() as c1, h2.client() as c2:
            moved = c1.get(f"/v1/jobs/{submit(c1)}", params={"wait": 60}).json()
            assert moved["executor"] == "h2" and health(c1)["impaired"]["process"]["state"] == "impaired"
            busy = c2.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "60"]}).json()["id"]
            wait_for(lambda: c2.get(f"/v1/jobs/{busy}").json()["state"] == "running", what="h2 full")
            wait_for(lambda: next(p for p in c1.get("/v1/peers").json()["peers"] if p["node_id"] == "h2")
                     ["vector"]["cpu_free"] == 0, what="h1 to hear h2 is full")
            waiting = [submit(c1) for _ in range(2)]
            wasm = c1.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
            done = c1.get(f"/v1/jobs/{wasm}", params={"wait": 30}).json()
            assert done["state"] == "succeeded" and done["executor"] == "h1", done["timeline"]
            for job_id in waiting:
                rec = c1.get(f"/v1/jobs/{job_id}").json()
                assert rec["state"] == "queued" and rec["executor"] is None, rec["timeline"]
            c2.delete(f"/v1/jobs/{busy}")  # h2 has room again: they go there
            ended = [c1.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in waiting]
            assert [(r["state"], r["executor"]) for r in ended] == [("succeeded", "h2")] * 2, ended
    finally:
        stop_all([h1, h2])


@pytest.mark.cluster
def test_a_job_pausing_after_a_host_failure_leaves_with_a_draining_agent(tmp_path):
    """With no peer free when its host failed it, a job pauses before trying again;
    a drain meanwhile waits for it and hands it to a peer once one has room, rather
    than stopping with it queued or running it here again."""
    h1, h2 = start_cluster(tmp_path, ["h1", "h2"], "--cpus", "1", "--host-retries", "5")
    try:
        with h1.client() as c1, h2.client() as c2:
            busy = c2.post("/v1/jobs", json=wasm_spec("sleep.wasm", limits={"wall_ms": 60000})).json()["id"]
            wait_for(lambda: c2.get(f"/v1/jobs/{busy}").json()["state"] == "running", what="h2 busy")
            wait_for(lambda: next(p for p in c1.get("/v1/peers").json()["peers"] if p["node_id"] == "h2")
                     ["vector"]["cpu_free"] == 0, what="h1 to hear h2 is full")
            job_id = c1.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 1500})).json()["id"]
            wait_for(lambda: c1.get(f"/v1/jobs/{job_id}").json()["state"] == "running", what="the job running")
            assert h1.proc is not None
            [worker] = wait_for(lambda: wasm_worker_pids(h1.proc.pid), what="h1's wasm worker")
            os.kill(worker, signal.SIGKILL)
            reason = wait_for(lambda: c1.get(f"/v1/jobs/{job_id}").json().get("wait_reason") or "", what="the pause")
            assert "this host could not run it" in reason and "trying again in 1 s" in reason, reason
            assert c1.post("/v1/drain").json()["draining"] is True
            c2.delete(f"/v1/jobs/{busy}")  # h2 has room again
        assert h1.proc.wait(timeout=60) == 0
        with h2.client() as c2:
            done = wait_for(lambda: (r := c2.get(f"/v1/jobs/{job_id}").json())["state"] == "timed_out" and r,
                            what="the job ended on h2")
        assert done["executor"] == "h2" and done["result"]["reason"] == "wall_timeout"
        assert "drained: 0 running, 0 still queued here" in h1.log()
    finally:
        stop_all([h1, h2])


@pytest.mark.cluster
def test_a_peer_that_could_not_run_a_job_gives_it_back_and_its_origin_places_it_elsewhere(tmp_path):
    """h1 can never run a 2-cpu job, so it forwards it to h2 or h3. That executor's
    wasm worker dies under the job: the executor gives it back to h1 at once (only
    the origin may place it elsewhere), and h1 places it on the other peer."""
    h1, h2, h3 = start_cluster(tmp_path, ["h1", "h2", "h3"], per_agent={"h1": ["--cpus", "1"],
                                                                       "h2": ["--cpus", "2"], "h3": ["--cpus", "2"]})
    try:
        by_id = {a.node_id: a for a in (h1, h2, h3)}
        with h1.client() as http:
            job_id = http.post("/v1/jobs", json=wasm_spec("loop.wasm", resources={"cpu": 2},
                                                          limits={"wall_ms": 1500})).json()["id"]
            first = wait_for(lambda: (r := http.get(f"/v1/jobs/{job_id}").json())["state"] == "running"
                             and r["executor"], what="the job running on a peer")
            executor = by_id[first]
            assert executor.proc is not None
            [worker] = wait_for(lambda: wasm_worker_pids(executor.proc.pid), what="the executor's wasm worker")
            os.kill(worker, signal.SIGKILL)
            done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        other = ({"h2", "h3"} - {first}).pop()
        assert done["state"] == "timed_out" and done["executor"] == other, done["timeline"]
        details = [(t["node"], t["detail"]) for t in done["timeline"]]
        back = next(i for i, (node, d) in enumerate(details)
                    if node == "h1" and d.startswith(f"executor {first} could not run it (wasm worker process"))
        assert details[back][1].endswith("placing it again")
        assert any(node == "h1" and d.startswith(f"forwarded to {other}") for node, d in details[back:]), details
        # The first executor's own record says it gave the job back, and owes no result.
        with executor.client() as c:
            mine = c.get(f"/v1/jobs/{job_id}").json()
        assert mine["state"] == "cancelled" and mine["result"]["reason"].startswith("handed back: this host could not")
        assert mine["timeline"][-1]["detail"] == "given back to its origin h1, which places it again"
        assert not done.get("duplicate_attempts")
    finally:
        stop_all([h1, h2, h3])


@pytest.mark.cluster
def test_a_peer_without_bubblewrap_gives_a_forwarded_process_job_back(tmp_path):
    """h1 can never run the 2-cpu job; h3 is full, so h1 offers it to h2, which lacks
    bubblewrap. No wait mends that, but h2 is not the job's origin: it gives the job
    back, and h1 holds it for h3 rather than offer it to h2 again."""
    bin_dir = tmp_path / "h2-bin"
    bin_dir.mkdir()
    h1, h2, h3 = start_cluster(tmp_path, ["h1", "h2", "h3"], "--process-warm-pool", "0",
                               per_agent={"h1": ["--cpus", "1"], "h2": ["--cpus", "2"], "h3": ["--cpus", "2"]},
                               per_agent_env={"h2": {"PATH": str(bin_dir)}})
    try:
        with h1.client() as c1, h3.client() as c3:
            busy = c3.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "60"],
                                             "resources": {"cpu": 2}}).json()["id"]
            wait_for(lambda: c3.get(f"/v1/jobs/{busy}").json()["state"] == "running", what="h3 full")
            wait_for(lambda: next(p for p in c1.get("/v1/peers").json()["peers"] if p["node_id"] == "h3")
                     ["vector"]["cpu_free"] == 0, what="h1 to hear h3 is full")
            job_id = c1.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/echo", "ran"],
                                               "resources": {"cpu": 2}}).json()["id"]
            back = wait_for(lambda: next((t for t in c1.get(f"/v1/jobs/{job_id}").json()["timeline"]
                                          if t["detail"].startswith("executor h2 could not run it")), None),
                            what="h2 to give the job back")
            assert "process jobs need bubblewrap" in back["detail"], back
            reason = wait_for(lambda: c1.get(f"/v1/jobs/{job_id}").json()["wait_reason"], what="a wait reason")
            assert "full" in reason, reason  # it waits for h3, not for h2 again
            c3.delete(f"/v1/jobs/{busy}")
            done = c1.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert done["state"] == "succeeded" and done["executor"] == "h3", done["timeline"]
            assert done["result"]["stdout"] == "ran\n"
            assert sum(t["detail"].startswith("forwarded to h2") for t in done["timeline"]) == 1
        with h2.client() as c2:
            assert "process" in c2.get("/healthz").json()["impaired"]  # taken out at the first failure
    finally:
        stop_all([h1, h2, h3])
