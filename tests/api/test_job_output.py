"""A job's output while it runs: GET /v1/jobs/{id}/output, `p2psched logs` and `submit --follow`.

Real agent subprocesses and real process sandboxes. The jobs pause between their
writes (seconds), so that "while it runs" is a state the test can see; the reads
wait for news rather than poll, so a slow host only makes them wait longer.
"""

from __future__ import annotations

import pytest

from agents import cli, new_agent, start_cluster, stop_all, wait_for, wasm_spec

#: Writes "one", pauses, then "two" on stderr and "three" on stdout.
STAGED = ["/bin/sh", "-c", "echo one; sleep 5; echo two >&2; echo three"]


def read(http, job_id: str, **params):
    r = http.get(f"/v1/jobs/{job_id}/output", params=params)
    assert r.status_code == 200, r.text
    return r


def follow(http, job_id: str, stream: str = "stdout") -> bytes:
    """Everything of ``stream``, asked for as a follower does, until the job has ended."""
    got, offset = b"", 0
    while True:
        r = read(http, job_id, stream=stream, offset=offset, wait=30)
        got += r.content
        offset = int(r.headers["x-output-next"])
        if r.headers["x-output-complete"] == "true":
            return got


@pytest.fixture
def agent(tmp_path):
    a = new_agent(tmp_path, "solo").start()
    try:
        yield a
    finally:
        a.kill()


@pytest.mark.parametrize("sandbox", ["cold", "warm"])
def test_a_process_jobs_output_is_served_while_it_runs_and_the_rest_when_it_ends(tmp_path, sandbox):
    flags = ["--process-warm-pool", "0"] if sandbox == "cold" else []
    agent = new_agent(tmp_path, "solo", *flags).start()
    try:
        with agent.client() as http:
            staged_job_streams_as_it_runs(http, sandbox)
    finally:
        agent.kill()


def staged_job_streams_as_it_runs(http, sandbox: str) -> None:
    if sandbox == "warm":  # a first job starts the pool of pre-built sandboxes (2); once one ran warm, one is left
        def ran_warm() -> bool:
            job = http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/true"]}).json()["id"]
            done = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            return done["result"]["attestation"]["sandbox"]["started"] == "warm"
        wait_for(ran_warm, what="a job in a warm sandbox")
    job_id = http.post("/v1/jobs", json={"runtime": "process", "command": STAGED}).json()["id"]
    first = read(http, job_id, wait=30)
    assert first.content == b"one\n"
    assert first.headers["x-job-state"] == "running"
    assert first.headers["x-output-complete"] == "false"
    assert first.headers["x-output-next"] == "4" and first.headers["x-output-attempt"] == "1"
    rest = read(http, job_id, offset=4, wait=30)  # waits for the next write
    assert rest.content == b"three\n" and rest.headers["x-output-next"] == "10"
    assert follow(http, job_id) == b"one\nthree\n"
    assert follow(http, job_id, "stderr") == b"two\n"
    end = read(http, job_id, offset=10)
    assert end.content == b"" and end.headers["x-output-complete"] == "true"
    assert end.headers["x-job-state"] == "succeeded"
    # The whole, from the start, after the end: the stored output.
    assert read(http, job_id).content == http.get(f"/v1/jobs/{job_id}/result").content == b"one\nthree\n"
    attestation = http.get(f"/v1/jobs/{job_id}").json()["result"]["attestation"]
    assert attestation["sandbox"]["started"] == sandbox


def test_output_a_mask_must_scrub_is_withheld_until_the_job_ends(agent):
    with agent.client() as http:
        job_id = http.post("/v1/jobs", json={
            "runtime": "process", "command": ["/bin/sh", "-c", "echo token-1234; sleep 3; echo done"],
            "mask_patterns": [r"token-\d+"]}).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "running", what="the job running")
        early = read(http, job_id, wait=1)
        assert early.content == b"" and early.headers["x-job-state"] == "running"
        assert early.headers["x-output-note"] == \
            "withheld while it runs: the job's mask_patterns apply to its whole output"
        assert follow(http, job_id) == b"[masked]\ndone\n"


#: A WASI guest that writes "tick" and then computes until its wall-clock limit.
TICK_THEN_SPIN = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "tick\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (loop $spin (br $spin))))
"""


def test_a_wasm_jobs_output_comes_from_its_worker_while_it_runs(agent):
    import base64

    import wasmtime

    module = base64.b64encode(wasmtime.wat2wasm(TICK_THEN_SPIN)).decode()
    with agent.client() as http:
        job_id = http.post("/v1/jobs", json={"module": module, "limits": {"wall_ms": 2500}}).json()["id"]
        first = read(http, job_id, wait=30)
        assert first.content == b"tick\n" and first.headers["x-job-state"] == "running"
        assert read(http, job_id, offset=5).content == b""  # nothing more while it spins
        assert follow(http, job_id) == b"tick\n"
        done = http.get(f"/v1/jobs/{job_id}").json()
        assert done["state"] == "timed_out" and done["result"]["stdout"] == "tick\n"


#: 100,000 bytes of stderr: more than a record holds (64 KiB), less than a job keeps (256 KiB).
LONG_STDERR = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x >&2"]


def test_stderr_past_what_the_record_holds_is_kept_whole_beside_it(agent):
    with agent.client() as http:
        job_id = http.post("/v1/jobs", json={"runtime": "process", "command": LONG_STDERR}).json()["id"]
        done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        assert done["state"] == "succeeded", done["result"]
        assert len(done["result"]["stderr"]) == 64 * 1024 and done["result"]["stderr_truncated"] is True
        assert done["result"]["stderr_in_record_truncated"] is True  # the rest is not lost: /output has it
        assert follow(http, job_id, "stderr") == b"x" * 100_000
    assert (agent.data_dir / "outputs" / f"{job_id}.err").stat().st_size == 100_000


def test_bad_output_requests_name_what_is_wrong(agent):
    with agent.client() as http:
        job_id = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
        for params, says in (({"stream": "stdin"}, "stream='stdin' is not an output stream; use stdout or stderr"),
                             ({"offset": "-1"}, "offset='-1' must be a whole number of bytes >= 0"),
                             ({"offset": "x"}, "offset='x' must be a whole number of bytes"),
                             ({"wait": "999"}, "wait=999 is out of range"),
                             ({"since": "1"}, "unknown query parameter(s) ['since']")):
            r = http.get(f"/v1/jobs/{job_id}/output", params=params)
            assert r.status_code == 400 and says in r.json()["error"]["message"], (params, r.text)
        r = http.get("/v1/jobs/no-such-job/output")
        assert r.status_code == 404 and r.json()["error"]["reason"] == "unknown_job"
        assert http.get("/healthz").status_code == 200


def test_the_cli_follows_a_jobs_output_and_exits_as_the_job_did(agent):
    run = cli("submit", "--process", "--follow", "--", "/bin/sh", "-c", "echo hi; sleep 1; echo bye; exit 3",
              agent=agent)
    assert run.stdout == b"hi\nbye\n"
    assert run.returncode == 1 and b"failed: exit 3" in run.stderr
    job_id = cli("submit", "--process", "--", *STAGED, agent=agent, check=True).stdout.decode().strip()
    assert cli("logs", "-f", "--stderr", job_id, agent=agent, check=True).stdout == b"two\n"
    assert cli("logs", job_id, agent=agent, check=True).stdout == b"one\nthree\n"
    clash = cli("submit", "--process", "--follow", "--json", "--", "/bin/true", agent=agent)
    assert clash.returncode == 2 and b"choose one" in clash.stderr


@pytest.mark.cluster
def test_the_origin_serves_the_output_of_a_job_running_on_a_peer(tmp_path):
    """h1 can never run a 2-cpu job, so it runs on h2; a client of h1 follows it there."""
    h1, h2 = start_cluster(tmp_path, ["h1", "h2"], per_agent={"h1": ["--cpus", "1"], "h2": ["--cpus", "2"]})
    try:
        with h1.client() as http:
            job_id = http.post("/v1/jobs", json={"runtime": "process", "command": STAGED,
                                                 "resources": {"cpu": 2}}).json()["id"]
            first = read(http, job_id, wait=30)
            assert first.content == b"one\n" and first.headers["x-job-state"] in ("placed", "running")
            assert http.get(f"/v1/jobs/{job_id}").json()["executor"] == "h2"
            assert follow(http, job_id, "stderr") == b"two\n"
            assert follow(http, job_id) == b"one\nthree\n"
            assert cli("logs", "-f", job_id, agent=h1, check=True).stdout == b"one\nthree\n"
            # stderr longer than a record holds comes home whole with the result
            long_id = http.post("/v1/jobs", json={"runtime": "process", "command": LONG_STDERR,
                                                  "resources": {"cpu": 2}}).json()["id"]
            done = http.get(f"/v1/jobs/{long_id}", params={"wait": 60}).json()
            assert done["executor"] == "h2" and done["result"]["stderr_truncated"] is True
            assert read(http, long_id, stream="stderr").content == b"x" * 100_000
    finally:
        stop_all([h1, h2])
