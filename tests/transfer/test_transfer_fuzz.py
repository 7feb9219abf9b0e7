"""Whatever a peer sends to a real agent's transfer port (in --insecure mode anyone
may), the agent replies or drops that connection, and goes on serving: messages of
every type with arbitrary fields, bodies that are not msgpack, and lengths past the
frame limit."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import AgentProcess, new_agent, wasm_spec

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=16) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
#: Each request type with the fields the agent requires of it.
REQUIRED = {"offer": ["id", "job"], "result": ["id", "executor", "result"], "status": ["id", "entry"],
            "cancel": ["id"], "submit": ["spec"], "output": ["id", "stream", "offset"], "handback": ["id", "executor"]}
OPTIONAL = ["module", "attempt", "output", "stderr", "artifacts", "timeline", "auth", "wait", "error", "state",
            "vector", "vector_at", "duplicate"]
JOBISH = st.fixed_dictionaries({}, optional={k: VALUES for k in (
    "spec", "origin", "origin_transfer", "route", "cost", "hops", "attempts", "timeline", "auth", "node", "at",
    "state", "exit_code", "reason", "stdout")})


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    t = draw(st.sampled_from(sorted(REQUIRED)))
    msg: dict[str, Any] = {"t": t}
    for name in REQUIRED[t]:
        msg[name] = draw(st.text(max_size=20) if name == "id" else VALUES | JOBISH)
    msg.update(draw(st.dictionaries(st.sampled_from(OPTIONAL), VALUES, max_size=3)))
    return msg


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = new_agent(tmp_path_factory.mktemp("tfuzz"), "tf").start()
    yield a
    assert a.stop() == 0
    assert "Traceback" not in a.log_path.read_text(errors="replace")  # type: ignore[union-attr]


def exchange(agent: AgentProcess, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", agent.transfer_port), timeout=10) as s:
        s.sendall(raw)
        try:
            return s.recv(1 << 20)
        except ConnectionError:
            return b""


def still_serving(agent: AgentProcess) -> None:
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    assert httpx.get(agent.url + "/healthz", timeout=10).status_code == 200


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(msg=messages())
def test_every_request_gets_a_reply(agent: AgentProcess, msg: dict[str, Any]) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    data = exchange(agent, struct.pack(">I", len(body)) + body)
    (n,) = struct.unpack(">I", data[:4])
    reply = msgpack.unpackb(data[4:4 + n], raw=False)
    assert isinstance(reply, dict) and isinstance(reply.get("t"), str), reply
    if reply["t"] == "error":
        assert reply["message"], reply
    still_serving(agent)


@FUZZ
@given(raw=st.binary(min_size=1, max_size=300))
def test_bytes_that_are_not_frames_are_dropped_and_the_agent_goes_on(agent: AgentProcess, raw: bytes) -> None:
    exchange(agent, struct.pack(">I", len(raw)) + raw)
    exchange(agent, struct.pack(">I", 2**32 - 1) + raw)  # past the frame limit: refused before it is read
    still_serving(agent)


def request(agent: AgentProcess, msg: dict[str, Any]) -> dict[str, Any]:
    body = msgpack.packb(msg, use_bin_type=True)
    data = exchange(agent, struct.pack(">I", len(body)) + body)
    (n,) = struct.unpack(">I", data[:4])
    reply = msgpack.unpackb(data[4:4 + n], raw=False)
    assert isinstance(reply, dict), reply
    return reply


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProcess, httpx.Client]]:
    """An agent with one CPU slot, held by a long guest: every job submitted next waits queued."""
    a = new_agent(tmp_path_factory.mktemp("tbusy"), "tb", "--cpus", "1").start()
    http = httpx.Client(base_url=a.url, timeout=30)
    loop = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 600_000})).json()
    while http.get(f"/v1/jobs/{loop['id']}").json()["state"] != "running":
        time.sleep(0.05)
    yield a, http
    http.delete(f"/v1/jobs/{loop['id']}")
    http.close()
    assert a.stop() == 0
    assert "Traceback" not in a.log_path.read_text(errors="replace")  # type: ignore[union-attr]


def queued_job(http: httpx.Client) -> str:
    job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()
    assert job["state"] == "queued", job  # it may be placed behind the long guest in its worker next
    return str(job["id"])


def ends_whole(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job, cancelled if nothing ended it, read back final: no half-changed job is stuck."""
    http.delete(f"/v1/jobs/{job_id}")
    r = http.get(f"/v1/jobs/{job_id}", params={"wait": 20})
    assert r.status_code == 200, r.text
    assert r.json()["state"] in ("succeeded", "failed", "cancelled", "timed_out"), r.json()
    return dict(r.json())


GOOD_RESULT = {"exit_code": 0, "reason": "exit 0"}


@pytest.mark.parametrize(("bad", "named"), [
    ({"state": "bogus"}, "state: Input should be 'succeeded', 'failed', 'cancelled' or 'timed_out'"),
    ({"state": "rejected"}, "state: Input should be"),
    ({"result": {**GOOD_RESULT, "cpu_ms": "x"}}, "result.cpu_ms: Input should be a valid number"),
    ({"result": {**GOOD_RESULT, "warnings": "w"}}, "result.warnings: Input should be a valid list"),
    ({"result": {"reason": "exit 0"}}, "result.exit_code: Field required"),
    ({"timeline": [{"state": "running", "at": "now", "node": "x"}]}, "timeline.0.at: Input should be a valid number"),
    ({"output": "text"}, "output: Input should be a valid bytes"),
    ({"artifacts": {"a": 5}}, "artifacts.a: Input should be a valid bytes"),
    ({"executor": 7}, "executor: Input should be a valid string"),
])
def test_a_malformed_result_for_a_queued_job_is_refused_whole_and_the_job_still_runs(
        busy: tuple[AgentProcess, httpx.Client], bad: dict[str, Any], named: str) -> None:
    """A result whose fields are checked one by one as the handler goes could take the
    job out of the queue and then fail on its state: a job lost, or a record the API
    could not serve. The whole message is checked first; the job is untouched."""
    agent, http = busy
    job_id = queued_job(http)
    msg = {"t": "result", "id": job_id, "executor": "elsewhere", "result": GOOD_RESULT, **bad}
    reply = request(agent, msg)
    assert reply["t"] == "error" and reply["message"].startswith("result message: ") and named in reply["message"]
    rec = http.get(f"/v1/jobs/{job_id}").json()
    # Untouched: still waiting here (queued, or placed behind the long guest in its worker).
    assert rec["state"] in ("queued", "placed") and rec["result"] is None, rec
    assert rec["executor"] in (None, "tb") and all(t["node"] == "tb" for t in rec["timeline"]), rec
    assert ends_whole(http, job_id)["state"] == "cancelled"


@FUZZ
@given(msg=messages())
def test_whatever_a_peer_sends_about_a_queued_job_leaves_it_whole(
        busy: tuple[AgentProcess, httpx.Client], msg: dict[str, Any]) -> None:
    agent, http = busy
    job_id = queued_job(http)
    reply = request(agent, {**msg, "id": job_id})
    assert isinstance(reply.get("t"), str), reply
    ends_whole(http, job_id)
    still_serving(agent)
