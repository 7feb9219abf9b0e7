"""A result that comes home from a peer says how much of its output the record holds,
also when that peer is an older agent whose results do not say so."""

from __future__ import annotations

import hashlib
import threading
from contextlib import asynccontextmanager

import trio

from agents import FAST_MEMBERSHIP, running_agent

#: More stdout and stderr than a record holds (64 KiB); less than a job keeps.
LONG_OUTPUT = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' o; head -c 70000 /dev/zero | tr '\\0' e >&2"]
#: The result fields agents added when the record began to say this.
NEW_FIELDS = ("output_bytes", "stdout_in_record_truncated", "stderr_in_record_truncated")


@asynccontextmanager
async def origin_and_executor(tmp_path):
    """Two joined agents; the origin's slot is taken, so its jobs run on the peer."""
    async with running_agent(tmp_path / "e", node_id="exec", cpus=1, membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            with trio.fail_after(20):
                while not (origin.cluster.is_member("exec") and origin.cluster.state_of("exec") is not None
                           and executor.cluster.is_member("origin")):
                    await trio.sleep(0.05)
            origin.cpu_used = origin.cpu_total
            yield origin, executor, http


async def run_there(http, spec) -> tuple[dict, bytes, bytes]:
    job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
    done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
    assert done["state"] == "succeeded" and done["executor"] == "exec", done
    out = (await http.get(f"/v1/jobs/{job_id}/result")).content
    err = (await http.get(f"/v1/jobs/{job_id}/output", params={"stream": "stderr"})).content
    return done["result"], out, err


async def test_a_result_from_a_peer_says_its_text_is_the_first_part_and_how_long_the_whole_is(tmp_path):
    async with origin_and_executor(tmp_path) as (_, _, http):
        res, out, err = await run_there(http, {"runtime": "process", "command": LONG_OUTPUT})
    assert out == b"o" * 100_000 and err == b"e" * 70_000
    assert res["output_bytes"] == 100_000 and res["stdout_in_record_truncated"] is True
    assert res["stderr_in_record_truncated"] is True and res["stderr_truncated"] is True
    assert res["stdout_truncated"] is False


async def test_the_origin_measures_the_output_an_older_executor_sent(tmp_path, monkeypatch):
    async with origin_and_executor(tmp_path) as (_, executor, http):
        request = executor.transfer.request

        async def as_an_older_agent(node_id, address, msg, **kw):
            if msg.get("t") == "result":
                msg = {**msg, "result": {k: v for k, v in msg["result"].items() if k not in NEW_FIELDS}}
            return await request(node_id, address, msg, **kw)

        monkeypatch.setattr(executor.transfer, "request", as_an_older_agent)
        res, out, _ = await run_there(http, {"runtime": "process", "command": LONG_OUTPUT})
        assert res["output_bytes"] == len(out) == 100_000 and res["stdout_in_record_truncated"] is True
        assert res["stderr_in_record_truncated"] is True
        res, out, _ = await run_there(http, {"runtime": "process", "command": ["/bin/echo", "hi"]})
        assert res["output_bytes"] == 3 and res["stdout_in_record_truncated"] is False
        assert res["stderr_in_record_truncated"] is False
        assert res["output_sha256"] == hashlib.sha256(out).hexdigest()


async def test_a_big_output_is_signed_off_the_event_loop_and_checks_out(tmp_path, monkeypatch):
    """Past SIGN_IN_THREAD_BYTES a process job's report is hashed and signed in a
    thread (128 MiB held the event loop a third of a second); the record's
    output_sha256 is the report's, and both are the stored bytes'."""
    from p2psched.agent.agent import SIGN_IN_THREAD_BYTES
    from p2psched.security.attestation import verify_report

    size = 3 * SIGN_IN_THREAD_BYTES
    spec = {"runtime": "process", "command": ["/bin/sh", "-c", f"head -c {size} /dev/urandom"],
            "limits": {"stdout_bytes": 4 * SIGN_IN_THREAD_BYTES}}
    async with running_agent(tmp_path) as (agent, http):
        signed_in: list[str] = []
        attest = type(agent.gate).attest

        def watched(gate, **kw):
            signed_in.append(threading.current_thread().name)
            return attest(gate, **kw)

        monkeypatch.setattr(type(agent.gate), "attest", watched)
        job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
        done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
        out = (await http.get(f"/v1/jobs/{job_id}/result")).content
    assert len(signed_in) == 1 and signed_in[0] != threading.main_thread().name, signed_in
    result = done["result"]
    assert done["state"] == "succeeded" and len(out) == size == result["output_bytes"]
    assert result["output_sha256"] == hashlib.sha256(out).hexdigest() == result["attestation"]["output_sha256"]
    verify_report(result["attestation"], agent.gate.node_pubkey, output=out)
    assert result["attestation"]["ended_at_ms"] == round(done["timeline"][-1]["at"] * 1000)


async def test_a_run_learned_from_its_result_is_one_running_entry(tmp_path, monkeypatch):
    """When the executor's "running" report never reached the origin, the result
    brings the executor's own entry for it: the timeline holds that one, not that
    one and the origin's "(learned from the result)" beside it."""
    async with origin_and_executor(tmp_path) as (origin, executor, http):
        monkeypatch.setattr(origin, "_on_status", lambda msg: None)  # the report is lost
        done, _, _ = await run_there(http, {"runtime": "process", "command": ["/bin/true"]})
        job_id = (await http.get("/v1/jobs", params={"limit": 1})).json()["jobs"][0]["id"]
        rec = (await http.get(f"/v1/jobs/{job_id}")).json()
    running = [t for t in rec["timeline"] if t["state"] == "running"]
    assert len(running) == 1 and rec["attempts"] == 1, rec["timeline"]
    assert running[0]["node"] == "exec" and running[0]["detail"] == "attempt 1"
    assert [t["state"] for t in rec["timeline"]][-2:] == ["running", "succeeded"]
