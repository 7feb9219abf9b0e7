"""A real agent's gossip port (UDP, and TCP push-pull on the same port) under hostile
input: whatever arrives, the agent drops it with a rate-limited log line, keeps its
memory bounded, and goes on serving; an honest agent can still join it.

These agents run --insecure, where anyone on the network may send gossip: the worst
case. Packets are built by hand, as an attacker would."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from pathlib import Path

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest

from agents import FAST_MEMBERSHIP, AgentProcess, alive_view, new_agent, stop_all, wait_converged, wasm_spec

pytestmark = pytest.mark.cluster

#: The insecure envelope for the default cluster name (keyring.PlainSealer).
PLAIN = bytes([0, len(b"p2psched")]) + b"p2psched"


def agent(tmp_path: Path, node_id: str, *extra: str) -> AgentProcess:
    a = new_agent(tmp_path, node_id, *extra)
    a.env["P2PSCHED_MEMBERSHIP"] = json.dumps(FAST_MEMBERSHIP)
    return a.start()


def datagram(parts: list[list[object]], sender: str = "evil") -> bytes:
    return PLAIN + msgpack.packb([1, sender, parts], use_bin_type=True)


def send_udp(a: AgentProcess, *packets: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in packets:
            s.sendto(p, ("127.0.0.1", a.gossip_port))
            time.sleep(0.0005)  # loopback's socket buffer would drop a burst


def still_serving(a: AgentProcess) -> None:
    assert a.proc is not None and a.proc.poll() is None, a.log()
    t0 = time.monotonic()
    assert httpx.get(a.url + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 2, "healthz was slow"
    with a.client() as http:
        job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()
        rec = http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
        assert rec["state"] == "succeeded", rec


def honest_agent_joins(tmp_path: Path, a: AgentProcess) -> None:
    b = agent(tmp_path, "honest", "--join", a.gossip)
    try:
        wait_converged([a, b], timeout=30)
    finally:
        stop_all([b])


def rss_kib(a: AgentProcess) -> int:
    assert a.proc is not None
    for line in Path(f"/proc/{a.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def log_text(a: AgentProcess) -> str:
    assert a.log_path is not None
    return a.log_path.read_text(errors="replace")


MAX_U64 = 2**64 - 1


@pytest.mark.parametrize("parts", [
    [[4, MAX_U64, "hw", "evil"]],         # suspect: we are accused at the largest incarnation msgpack holds
    [[6, MAX_U64, "hw", "evil"]],         # dead, the same
    [[7, "hw", MAX_U64, False, {}]],      # a state of ours at the largest version
    [[4, 2**63 - 1, "hw", "evil"]],       # the largest a counter may be on the wire
    [[7, "hw", 2**63 - 1, False, {}]],
    [[5, MAX_U64, "other", "127.0.0.1", 9], [4, MAX_U64, "other", "evil"]],
], ids=["suspect-u64", "dead-u64", "state-u64", "suspect-max", "state-max", "other-u64"])
def test_forged_counters_do_not_stop_the_agent(tmp_path: Path, parts: list[list[object]]) -> None:
    """A counter one below what msgpack can hold made the agent refute with one above it:
    msgpack raised OverflowError in the receive loop, and the agent exited."""
    a = agent(tmp_path, "hw")
    try:
        send_udp(a, datagram(parts))
        time.sleep(1.0)  # several probe periods and gossip rounds with FAST_MEMBERSHIP
        still_serving(a)
        honest_agent_joins(tmp_path, a)
        assert "Traceback" not in log_text(a)
    finally:
        stop_all([a])


@pytest.mark.parametrize("host", ["a" * 100, "..", "a\x00b", "bad host", "ä" * 30],
                         ids=["long-label", "empty-labels", "nul", "space", "non-ascii"])
def test_a_member_with_an_unusable_address_is_refused(tmp_path: Path, host: str) -> None:
    """Sending to a host name that Python cannot even encode raised UnicodeError (a
    ValueError, not an OSError) in the send loop, and the agent exited."""
    a = agent(tmp_path, "hw")
    try:
        send_udp(a, datagram([[5, 1, "fake", host, 7946]]))
        time.sleep(1.0)
        still_serving(a)
        assert "fake" not in alive_view(a)
        assert "membership: dropped" in log_text(a) and "schema" in log_text(a)
        assert "Traceback" not in log_text(a)
    finally:
        stop_all([a])


def test_bad_datagrams_get_a_clear_rate_limited_log_line(tmp_path: Path) -> None:
    a = agent(tmp_path, "hw")
    try:
        rng = random.Random(7)
        junk = [rng.randbytes(rng.randrange(1, 1300)) for _ in range(300)]
        junk += [PLAIN + rng.randbytes(rng.randrange(1, 1100)) for _ in range(300)]
        junk += [datagram([[5, "x", "y"]]), PLAIN + b"\x91" * 3000, PLAIN + os.urandom(60_000)]
        junk += [datagram([[5, 1, "fake", "127.0.0.1", 70_000]])] * 200
        send_udp(a, *junk)
        time.sleep(0.5)
        still_serving(a)
        lines = [ln for ln in log_text(a).splitlines() if "membership: dropped" in ln]
        assert lines, log_text(a)
        # One line per reason per interval, whatever the flood: a few, not hundreds.
        assert len(lines) <= 10, "\n".join(lines)
        # Each names the sender and what was wrong with the packet.
        assert all("from 127.0.0.1:" in ln for ln in lines), "\n".join(lines)
        assert any("schema: alive has 2 fields, expected 4" in ln for ln in lines), "\n".join(lines)
        assert "Traceback" not in log_text(a)
    finally:
        stop_all([a])


def _stuff(socks: list[socket.socket], port: int, n: int, frame: int) -> None:
    """Open ``n`` TCP connections that each announce a ``frame``-byte frame and send all
    of it but the last bytes, as fast as the agent takes them; never block."""
    chunk = b"\x00" * (1 << 20)
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        data = memoryview(struct.pack(">I", frame) + PLAIN + b"\x00" * (frame - len(PLAIN) - 16))
        for _ in range(200):
            try:
                sent = s.send(data[: len(chunk)])
            except (BlockingIOError, ConnectionError):
                break
            data = data[sent:]
            if not data:
                break


def test_stalled_push_pull_connections_keep_memory_and_descriptors_bounded(tmp_path: Path) -> None:
    """Each TCP connection to the gossip port could hold a frame of up to max_tcp_message
    (8 MiB) for 5 s, before any key is checked, and there was no limit on connections:
    64 of them took half a GB in half a second."""
    a = agent(tmp_path, "hw")
    socks: list[socket.socket] = []
    try:
        before = rss_kib(a)
        _stuff(socks, a.gossip_port, 64, 8 * 1024 * 1024)
        for _ in range(400):  # and many that send nothing at all
            try:
                socks.append(socket.create_connection(("127.0.0.1", a.gossip_port), timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        grown_mib = (rss_kib(a) - before) / 1024
        fds = len(os.listdir(f"/proc/{a.proc.pid}/fd"))  # type: ignore[union-attr]
        assert grown_mib < 250, f"RSS grew by {grown_mib:.0f} MiB"
        assert fds < 250, f"{fds} open descriptors"
        still_serving(a)
        for s in socks:
            s.close()
        socks.clear()
        honest_agent_joins(tmp_path, a)
        assert "Traceback" not in log_text(a)
    finally:
        for s in socks:
            s.close()
        stop_all([a])
