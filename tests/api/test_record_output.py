"""A record's stdout and stderr are text of at most 64 KiB; the record says when that
is only the first part, and how long the whole is. Real agent, real wasm guests.

Two cuts, two flags: ``stdout_truncated`` (the job's own ``stdout_bytes`` cut it, the
rest is lost) and ``stdout_in_record_truncated`` (the record's text is the first part;
``/result`` has all ``output_bytes`` of it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest

from agents import cli, new_agent, wasm_spec

#: Floats vecadd.wasm adds: 100,000 bytes of stdout, more than a record holds (64 KiB).
FLOATS = 25_000


def vecadd_input(n: int = FLOATS) -> bytes:
    """What makes vecadd.wasm print 4·n bytes: the floats 0..n-1, and n ones, to add."""
    return struct.pack(f"<{n}f", *range(n)) + struct.pack(f"<{n}f", *[1.0] * n)


def vecadd(**extra):
    return wasm_spec("vecadd.wasm", input=base64.b64encode(vecadd_input()).decode(), **extra)


def expected_output(n: int = FLOATS) -> bytes:
    return struct.pack(f"<{n}f", *range(1, n + 1))


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = new_agent(tmp_path_factory.mktemp("record-output"), "solo").start()
    try:
        yield a
    finally:
        a.kill()


def run(http, spec) -> tuple[dict, bytes]:
    job_id = http.post("/v1/jobs", json=spec).json()["id"]
    done = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert done["state"] in ("succeeded", "failed", "timed_out"), done
    return done, http.get(f"/v1/jobs/{job_id}/result").content


def test_a_record_says_its_stdout_is_only_the_first_part_and_how_long_the_whole_is(agent):
    with agent.client() as http:
        done, whole = run(http, vecadd())
    res = done["result"]
    assert done["state"] == "succeeded", res["reason"]
    assert whole == expected_output() and len(whole) == 100_000
    assert res["stdout_in_record_truncated"] is True and res["output_bytes"] == len(whole)
    assert res["stdout_truncated"] is False  # nothing is lost: /result has it all
    assert res["output_sha256"] == hashlib.sha256(whole).hexdigest()
    assert res["stdout"] == whole[:64 * 1024].decode("utf-8", "replace")
    assert res["stderr_in_record_truncated"] is False and res["stderr_truncated"] is False


def test_a_small_output_is_whole_in_the_record(agent):
    with agent.client() as http:
        done, whole = run(http, wasm_spec("hello.wasm"))
    res = done["result"]
    assert res["stdout"] == whole.decode() == "hello from p2psched\n"
    assert res["output_bytes"] == len(whole) == 20
    assert res["stdout_in_record_truncated"] is False and res["stdout_truncated"] is False


@pytest.mark.parametrize("cap", [1_000, 70_000])
def test_output_cut_by_the_jobs_own_limit_is_flagged_as_lost(agent, cap):
    """Under the record's 64 KiB the two cuts are one; over it, both flags are set."""
    with agent.client() as http:
        done, whole = run(http, vecadd(limits={"stdout_bytes": cap}))
    res = done["result"]
    assert whole == expected_output()[:cap]
    assert res["stdout_truncated"] is True and res["output_bytes"] == cap
    assert res["stdout_in_record_truncated"] is (cap > 64 * 1024)


def test_stderr_cut_by_the_jobs_own_limit_is_not_said_to_be_whole_elsewhere(agent):
    with agent.client() as http:
        done, _ = run(http, {"runtime": "process", "command": ["/bin/sh", "-c", "head -c 1000 /dev/zero >&2"],
                             "limits": {"stderr_bytes": 100}})
        res = done["result"]
        assert res["stderr"] == "\0" * 100 and res["stderr_truncated"] is True
        assert res["stderr_in_record_truncated"] is False
        r = http.get(f"/v1/jobs/{done['id']}/output", params={"stream": "stderr"})
        assert r.content == b"\0" * 100


def test_the_cli_says_when_it_printed_only_the_first_part_and_what_prints_the_whole(agent):
    # --wait writes /result, the whole: nothing to say
    plain = cli("submit", "--wait", "--input", "-", "examples/wasm/vecadd.wasm",
                input_bytes=vecadd_input(), agent=agent, check=True)
    assert plain.stdout == expected_output() and plain.stderr == b""

    as_json = cli("submit", "--wait", "--json", "--input", "-", "examples/wasm/vecadd.wasm",
                  input_bytes=vecadd_input(), agent=agent, check=True)
    job_id = json.loads(as_json.stdout)["id"]
    says = (f"p2psched: the record holds only the first part of job {job_id}'s stdout (100000 bytes in all); "
            f"`p2psched result {job_id}` writes all of it")
    assert as_json.stderr.decode().strip() == says
    status = cli("status", "--json", job_id, agent=agent, check=True)
    assert json.loads(status.stdout)["result"]["stdout_in_record_truncated"] is True
    assert status.stderr.decode().strip() == says
    assert cli("result", job_id, agent=agent, check=True).stdout == expected_output()
    small = cli("status", "--json", json.loads(cli("submit", "--json", "--wait", "examples/wasm/hello.wasm",
                                                   agent=agent, check=True).stdout)["id"], agent=agent, check=True)
    assert small.stderr == b""

    # a failed job's stderr comes from the record: the first 64 KiB, and where the rest is
    failed = cli("submit", "--process", "--wait", "--", "/bin/sh", "-c",
                 "head -c 100000 /dev/zero | tr '\\0' x >&2; exit 3", agent=agent)
    assert failed.returncode == 1
    lines = failed.stderr.decode().splitlines()
    job_id = lines[0].split()[2]
    assert lines[0] == f"p2psched: job {job_id} failed: exit 3" and lines[1] == "x" * 64 * 1024
    assert lines[2:] == [f"p2psched: the record holds only the first part of job {job_id}'s stderr; "
                         f"`p2psched logs --stderr {job_id}` writes all of it"]
    assert cli("logs", "--stderr", job_id, agent=agent, check=True).stdout == b"x" * 100_000


def test_the_openapi_description_names_every_field_of_a_result(agent):
    with agent.client() as http:
        done, _ = run(http, wasm_spec("hello.wasm"))
        doc = http.get("/openapi.json").json()
    described = doc["components"]["schemas"]["JobRecord"]["properties"]["result"]["properties"]
    assert sorted(described) == sorted(done["result"])
    assert "/v1/jobs/{id}/result" in described["stdout_in_record_truncated"]["description"]
