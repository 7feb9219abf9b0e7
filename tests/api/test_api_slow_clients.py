"""Clients that stop sending a request body, trickle it, or leave in the middle of it,
against a real agent over raw sockets: the one that stalls or trickles gets a 408 that
names the fix and loses its connection; the one that leaves is nothing to answer and no
error in the log; a body that keeps flowing gets through however long it takes; and
the agent serves on throughout."""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agents import AgentProcess, new_agent, wait_for, wasm_spec

pytestmark = pytest.mark.cluster

#: The agent's request_body_timeout_s here: short, so that a stalled body is cut quickly.
BODY_TIMEOUT_S = 2
#: How long a test waits for an answer at most: far past the deadline, only so that it cannot hang.
PATIENCE_S = 30


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = new_agent(tmp_path_factory.mktemp("slow"), "slow")
    a.env["P2PSCHED_REQUEST_BODY_TIMEOUT_S"] = str(BODY_TIMEOUT_S)
    a.env["P2PSCHED_LOG_LEVEL"] = "debug"  # the line that says a client left is a debug line
    a.start()
    try:
        yield a
    finally:
        a.stop()


def _head(agent: AgentProcess, length: int, path: str = "/v1/jobs", expect: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{agent.api_port}", "Content-Type: application/json",
             f"Content-Length: {length}", *(["Expect: 100-continue"] if expect else [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _connect(agent: AgentProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", agent.api_port), timeout=PATIENCE_S)


def _answer(s: socket.socket) -> tuple[int, dict[str, str], dict]:
    """The agent's answer on ``s``: status, headers and JSON body (a timeout fails the test)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the agent closed the connection without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(65536)
        assert chunk, f"the agent closed the connection within its answer: {data!r}"
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body)


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _log(agent: AgentProcess) -> str:
    assert agent.log_path is not None
    return agent.log_path.read_text(errors="replace")


def _rejections(agent: AgentProcess, reason: str) -> float:
    text = httpx.get(agent.url + "/metrics", timeout=10).text
    m = re.search(rf'^p2psched_admission_rejections_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_body_that_stops_arriving_gets_408_and_its_connection_closed(agent):
    before = _rejections(agent, "body_timeout")
    with _connect(agent) as s:
        s.sendall(_head(agent, 100) + b"{")
        started = time.monotonic()
        status, headers, body = _answer(s)
        assert time.monotonic() - started < PATIENCE_S
        assert _closed(s)
    assert status == 408 and headers["content-type"] == "application/json"
    assert headers["connection"] == "close"  # RFC 9110: a 408 says the server is closing
    error = body["error"]
    assert error["status"] == 408 and error["reason"] == "body_timeout"
    assert re.search(r"1 of 100 bytes came in \d+ s, none in the last \d+ s", error["message"]), error
    assert "send the request again" in error["message"] and "request_body_timeout_s" in error["message"]
    assert _rejections(agent, "body_timeout") == before + 1  # a refused submission, counted as the others are
    assert httpx.get(agent.url + "/healthz", timeout=10).status_code == 200


def test_a_body_trickled_a_byte_at_a_time_is_cut_though_bytes_keep_coming(agent):
    # A deadline for each chunk alone would keep this connection for 100 x 0.5 s and
    # more; the body's average rate cuts it soon after its first BODY_TIMEOUT_S.
    with _connect(agent) as s:
        s.sendall(_head(agent, 100))
        started = time.monotonic()
        while not select.select([s], [], [], 0.5)[0]:
            assert time.monotonic() - started < PATIENCE_S, "no answer to a trickled body"
            try:
                s.sendall(b" ")
            except OSError:  # answered and closed since select looked
                break
        status, _, body = _answer(s)
        assert _closed(s)
    assert status == 408 and body["error"]["reason"] == "body_timeout"
    message = body["error"]["message"]
    assert re.search(r"\d+ of 100 bytes came in \d+ s", message) and "KiB/s on average" in message, message


def test_a_body_that_keeps_flowing_gets_through_however_long_it_takes(agent):
    # Twice BODY_TIMEOUT_S in all, with a pause of a quarter of it between pieces.
    spec = json.dumps(wasm_spec("hello.wasm")).encode()
    body = spec + b" " * (8 * 32 * 1024 - len(spec))  # JSON may end in whitespace
    with _connect(agent) as s:
        s.sendall(_head(agent, len(body)))
        for i in range(0, len(body), 32 * 1024):
            s.sendall(body[i:i + 32 * 1024])
            time.sleep(BODY_TIMEOUT_S / 4)
        status, _, answer = _answer(s)
    assert status == 202, answer
    assert answer["state"] in ("queued", "placed", "running", "succeeded")


def test_a_client_that_leaves_mid_body_is_no_error_and_the_agent_serves_on(agent):
    leaving = 20
    for i in range(leaving):
        s = _connect(agent)
        if i % 2:  # half reset the connection, half close it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(_head(agent, 100, "/v1/jobs" if i % 4 < 2 else "/v1/jobs:batch", expect=True))
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")  # the agent has the request and waits for its body
        s.sendall(b'{"runtime": ')
        s.close()
    said = "the client left before its request body ended"
    wait_for(lambda: _log(agent).count(said) >= leaving or " E p2psched.api" in _log(agent), timeout=PATIENCE_S,
             what="the agent to see every client leave")
    log = _log(agent)
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-4000:]
    assert not re.search(r"^\S+ E ", log, re.M), log[-4000:]
    assert log.count(said) == leaving  # at debug only
    assert httpx.get(agent.url + "/healthz", timeout=10).status_code == 200


async def test_an_idle_connection_is_closed_soon_and_a_long_poll_outlasts_that(tmp_path, monkeypatch):
    """keep_alive_timeout was 305 s so that long-polls would not be cut; hypercorn stops
    it while a request is in flight, so they need no such thing, and connections their
    clients had closed unnoticed held an fd each for five minutes. Here it is 1 s: a
    3 s long-poll is answered, its connection serves the next request, then closes idle."""
    import trio

    from p2psched.api import server
    from agents import running_agent

    monkeypatch.setattr(server, "KEEP_ALIVE_S", 1)

    async def ask(stream: trio.SocketStream, target: str, port: int) -> bytes:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", data.lower()).group(1) if b"content-length" in data.lower()
                else b"0"):
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed without an answer: {data!r}"
            data += chunk
        return data

    async with running_agent(tmp_path) as (agent, http):
        port = int(agent.settings.api.rsplit(":", 1)[1])
        job = (await http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "3"]})).json()["id"]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(PATIENCE_S):
            answer = await ask(stream, f"/v1/jobs/{job}?wait=30", port)
            assert answer.startswith(b"HTTP/1.1 200") and b'"state":"succeeded"' in answer, answer[:300]
            assert (await ask(stream, "/healthz", port)).startswith(b"HTTP/1.1 200")
            assert await stream.receive_some(65536) == b""  # closed once idle past KEEP_ALIVE_S
        await stream.aclose()


async def test_the_dashboard_proxy_cuts_a_cancel_body_that_stops_arriving(monkeypatch, nursery):
    """The dashboard's proxy reads a cancel's body as the agent does: one that stalls
    gets a 408 rather than holding the connection open for good."""
    import trio

    from p2psched.dashboard import proxy
    from agents import free_port

    monkeypatch.setattr(proxy, "CANCEL_BODY_TIMEOUT_S", 1.0)
    port = free_port()
    app = proxy.create_proxy(f"http://127.0.0.1:{free_port()}", auth=None, allowed_hosts={f"127.0.0.1:{port}"})
    await nursery.start(proxy.serve_proxy, app, f"127.0.0.1:{port}")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"POST /v1/jobs:cancel HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                          "\r\nContent-Length: 100\r\n\r\n{".encode())
    data = b""
    with trio.fail_after(PATIENCE_S):
        while b"}}" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b'"reason":"body_timeout"' in data, data
    await stream.aclose()


def _close_waits(port: int, clients: set[int]) -> int:
    """The agent's sockets on ``port`` to these client ports that the client has closed
    (CLOSE_WAIT), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in clients and state == "08":
            count += 1
    return count


def test_a_long_poll_its_client_gave_up_on_ends_then(agent):
    """A long-poll held its handler and its connection's descriptor for the whole wait
    (up to 300 s) after its client had gone: 94 of 100 abandoned ones were still open
    10 s later. The agent now sees the client leave and ends the wait."""
    job = httpx.post(f"{agent.url}/v1/jobs", json={"runtime": "process", "command": ["/bin/sleep", "120"],
                                                         "limits": {"wall_ms": 150_000}}).json()["id"]
    try:
        for target in (f"/v1/jobs/{job}?wait=60", f"/v1/jobs/{job}/result?wait=60",
                       f"/v1/jobs/{job}/output?offset=0&wait=60"):
            clients = []
            for _ in range(5):
                s = _connect(agent)
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{agent.api_port}\r\n\r\n".encode())
                clients.append(s)
            ports = {s.getsockname()[1] for s in clients}
            time.sleep(0.5)
            for s in clients:
                s.close()
            wait_for(lambda: _close_waits(agent.api_port, ports) == 0, timeout=PATIENCE_S,
                     what=f"the agent to close the abandoned long-polls of {target}")
        assert httpx.get(f"{agent.url}/healthz").status_code == 200
    finally:
        httpx.delete(f"{agent.url}/v1/jobs/{job}")
