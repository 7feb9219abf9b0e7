"""`p2psched batch`: a spec file submitted through a real agent subprocess, waited
for, run again without running twice, drained into a full queue, and refused whole
when it holds an invalid job."""

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from agents import ROOT, cli, new_agent, wait_for, wasm_spec

pytestmark = pytest.mark.cluster


def count_jobs(agent) -> int:
    with agent.client() as http:
        return sum(http.get("/v1/jobs:counts").json()["counts"].values())


def test_batch_runs_a_file_waits_for_it_and_submits_nothing_twice(tmp_path):
    agent = new_agent(tmp_path, "batcher").start()
    try:
        p = cli("batch", "examples/jobs/guests.yaml", "--id-prefix", "g", "--wait", agent=agent)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.decode().splitlines()
        assert [line.split()[:2] for line in lines] == [[f"g-{n}", "succeeded"] for n in range(1, 7)]
        assert b"6 job(s): 6 succeeded" in p.stderr
        assert cli("result", "g-5", agent=agent, check=True).stdout == b"42\n"  # add(2, 40)
        digest = hashlib.sha256(b"the quick brown fox\n").hexdigest().encode()
        assert cli("result", "g-2", agent=agent, check=True).stdout.strip() == digest
        status = json.loads(cli("status", "g-6", "--json", agent=agent, check=True).stdout)
        assert status["tenant"] == "default" and status["result"]["stdout"].splitlines()[-1] == "env: MODEL=tiny-mlp"

        again = cli("batch", "examples/jobs/guests.yaml", "--id-prefix", "g", agent=agent)
        assert again.returncode == 0 and again.stdout.decode().count("(submitted before)") == 6
        assert count_jobs(agent) == 6  # nothing ran twice

        listed = json.loads(cli("batch", "examples/jobs/sweep.jsonl", "--json", "--wait", agent=agent,
                                check=True).stdout)
        assert [cli("result", j["id"], agent=agent).stdout for j in listed["jobs"]] == [b"2\n", b"4\n", b"6\n", b"8\n"]
        assert listed["refused"] == []
    finally:
        agent.stop()


def jobs_file(path, *jobs: str):
    """A spec file of ``jobs``, each a YAML flow mapping; ``GUEST`` names examples/wasm/."""
    path.write_text("jobs:\n" + "".join(f"  - {job.replace('GUEST', f'{ROOT}/examples/wasm')}\n" for job in jobs))
    return path


LONG_LOOP = "{module_file: GUEST/loop.wasm, limits: {wall_ms: 120000}}"


def test_a_failing_job_sets_the_exit_status_and_says_why(tmp_path):
    spec = jobs_file(tmp_path / "mixed.yaml", "{module_file: GUEST/hello.wasm}", "{module_file: GUEST/exit3.wasm}",
                     "{module_file: GUEST/hello.wasm, id: huge, resources: {cpu: 64}}")
    agent = new_agent(tmp_path, "failing").start()
    try:
        p = cli("batch", str(spec), "--wait", agent=agent)
        assert p.returncode == 1
        assert b"1 failed, 1 rejected, 1 succeeded" in p.stderr and b"failed: exit 3" in p.stderr
        # Said once, as `submit --wait` says it: "rejected: rejected: needs ..." said it twice.
        said = p.stderr.decode()
        assert "p2psched: job huge rejected: needs 64 cpus" in said and "rejected: rejected" not in said, said
    finally:
        agent.stop()


def test_an_invalid_job_stops_the_whole_file_before_anything_is_sent(tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text(f"defaults: {{module_file: {ROOT}/examples/wasm/hello.wasm}}\n"
                    "jobs:\n  - {}\n  - {limits: {wall_ms: 0}}\n")
    agent = new_agent(tmp_path, "strict").start()
    try:
        p = cli("batch", str(spec), agent=agent)
        assert p.returncode == 2
        assert str(spec).encode() + b": jobs[1].limits.wall_ms: Input should be greater than or equal to 1" \
            in p.stderr
        assert count_jobs(agent) == 0
        dry = cli("batch", "examples/jobs/guests.yaml", "--dry-run", agent=agent, check=True)
        assert b"6 valid job(s)" in dry.stdout and count_jobs(agent) == 0
    finally:
        agent.stop()


def test_a_file_larger_than_the_queue_drains_into_it(tmp_path):
    lines = [json.dumps({"module_file": f"{ROOT}/examples/wasm/hello.wasm", "labels": {"n": str(i)}})
             for i in range(5)]
    spec = tmp_path / "five.jsonl"
    spec.write_text("\n".join(lines) + "\n")
    agent = new_agent(tmp_path, "narrow", "--cpus", "1", "--queue-limit", "2").start()
    try:
        with agent.client() as http:
            blocker = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 120000})).json()["id"]
            wait_for(lambda: http.get(f"/v1/jobs/{blocker}").json()["state"] == "running", what="the loop to run")
            batch = subprocess.Popen(
                [sys.executable, "-m", "p2psched", "batch", str(spec), "--wait", "--agent", agent.url],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(3)  # two jobs fill the queue; the other three wait to be sent again
            assert batch.poll() is None
            assert http.get("/v1/jobs:counts").json()["counts"]["queued"] == 2
            http.delete(f"/v1/jobs/{blocker}")
            out, err = batch.communicate(timeout=120)
        assert batch.returncode == 0, err
        assert b"refusing jobs for now (queue_full); sending 3 more" in err
        assert out.decode().count("succeeded") == 5 and b"5 job(s): 5 succeeded" in err
    finally:
        agent.stop()


def test_wait_shows_each_result_as_it_comes_not_when_all_have_ended(tmp_path):
    spec = jobs_file(tmp_path / "quick-then-slow.yaml", "{module_file: GUEST/hello.wasm}", LONG_LOOP)
    agent = new_agent(tmp_path, "streaming").start()
    batch = subprocess.Popen(
        [sys.executable, "-m", "p2psched", "batch", str(spec), "--id-prefix", "s", "--wait", "--agent", agent.url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(90, batch.kill)  # a missing line fails the test instead of hanging it
    watchdog.start()
    try:
        first = batch.stdout.readline().decode()
        assert first.split()[:2] == ["s-1", "succeeded"], first
        assert batch.poll() is None  # the loop still runs: the first result did not wait for it
        with agent.client() as http:
            assert http.get("/v1/jobs/s-2").json()["state"] == "running"
            http.delete("/v1/jobs/s-2")
        out, err = batch.communicate(timeout=60)
        assert batch.returncode == 1
        assert out.decode().split()[:2] == ["s-2", "cancelled"]
        assert b"1 cancelled, 1 succeeded" in err
    finally:
        watchdog.cancel()
        batch.kill()
        agent.stop()


def test_ctrl_c_stops_waiting_not_the_jobs_and_says_how_to_cancel_them(tmp_path):
    spec = jobs_file(tmp_path / "long.yaml", LONG_LOOP)
    agent = new_agent(tmp_path, "interrupted").start()
    try:
        # Ctrl-C as from a terminal: a runner that starts the suite in the background
        # (sh's `cmd &`) passes SIGINT on ignored, and Python then leaves it ignored.
        batch = subprocess.Popen(
            [sys.executable, "-m", "p2psched", "batch", str(spec), "--label", "run=7", "--wait", "--agent",
             agent.url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        with agent.client() as http:
            def running() -> list:
                return http.get("/v1/jobs", params={"label": "run=7", "state": "running"}).json()["jobs"]

            wait_for(lambda: running(), what="the labelled loop to run")
            batch.send_signal(signal.SIGINT)
            _, err = batch.communicate(timeout=60)
            assert batch.returncode == 130
            assert b"go on" in err and b"p2psched cancel --label run=7" in err, err
            assert len(running()) == 1  # still running
        p = cli("cancel", "--label", "run=7", agent=agent, check=True)
        assert b"1 unfinished job(s) labelled run=7 cancelled" in p.stderr
    finally:
        agent.stop()
