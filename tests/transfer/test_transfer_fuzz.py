"""Whatever a peer sends to a real agent's transfer port (in --insecure mode anyone
may), the agent replies or drops that connection, and goes on serving: messages of
every type with arbitrary fields, bodies that are not msgpack, and lengths past the
frame limit."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import AgentProcess, new_agent

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
