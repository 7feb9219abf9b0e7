"""The transfer port under hostile connections: a peer that stalls after a header, or
sends nothing, is closed after a time limit; the frames being received, over all
connections together, have a memory budget; refusals are logged, rate-limited."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
import trio

from agents import ROOT, AgentProcess, free_port, new_agent, stop_all, wasm_spec
from p2psched.transfer.service import TransferService


async def _echo(peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
    return {"t": "ack", "id": msg.get("id")}


async def _closed_within(port: int, first: bytes, limit: float) -> float:
    """Seconds until the server closes a connection that sent ``first`` and then nothing."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = trio.current_time()
    await stream.send_all(first)
    with trio.fail_after(limit):
        while True:
            try:
                if not await stream.receive_some(65536):
                    break
            except trio.BrokenResourceError:
                break
    await stream.aclose()
    return trio.current_time() - t0


async def test_a_connection_that_stalls_is_closed_and_pooled_clients_carry_on() -> None:
    port = free_port()
    server = TransferService(("127.0.0.1", port), _echo, node_id="server", idle_timeout=0.5, frame_timeout=0.5)
    client = TransferService(("127.0.0.1", free_port()), _echo, node_id="client")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert await _closed_within(port, b"", 5) >= 0.4  # connects, sends nothing
        assert await _closed_within(port, b"\x00\x00", 5) >= 0.4  # half a header
        assert await _closed_within(port, struct.pack(">I", 1000) + b"\x80" * 10, 5) >= 0.4  # a header, then stalls
        # A client's pooled connection, closed by the server as idle, is replaced at once.
        address = f"127.0.0.1:{port}"
        assert (await client.request("server", address, {"t": "cancel", "id": "a"}))["id"] == "a"
        await trio.sleep(1.0)
        assert (await client.request("server", address, {"t": "cancel", "id": "b"}))["id"] == "b"
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_frames_in_progress_share_one_memory_budget(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    server = TransferService(("127.0.0.1", port), _echo, node_id="server", max_frame=4 << 20, max_buffered=6 << 20)
    caplog.set_level(logging.WARNING, "p2psched.transfer")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        partial = struct.pack(">I", 3 << 20) + b"\x00" * ((3 << 20) - 10)
        holders = []
        for _ in range(2):  # 6 MiB buffered: the whole budget
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(partial)
            holders.append(s)
        await trio.sleep(0.3)
        third = await trio.open_tcp_stream("127.0.0.1", port)
        data = b""
        with trio.move_on_after(5):
            try:
                await third.send_all(partial)
            except trio.BrokenResourceError:
                pass  # refused while still sending
        with trio.fail_after(5):
            try:
                while chunk := await third.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:
                pass  # the refusal's reset can overtake the error reply, as the client is still sending
        if data:
            reply = msgpack.unpackb(data[4:], raw=False)
            assert reply["t"] == "error" and "busy" in reply["message"], reply
        for s in [*holders, third]:
            await s.aclose()
        await trio.sleep(0.2)
        # The budget is free again: a whole request goes through.
        client = TransferService(("127.0.0.1", free_port()), _echo, node_id="client")
        assert (await client.request("server", f"127.0.0.1:{port}", {"t": "cancel", "id": "c"}))["id"] == "c"
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert any("busy" in r.getMessage() and "127.0.0.1:" in r.getMessage() for r in caplog.records)


def _rss_mib(a: AgentProcess) -> float:
    for line in Path(f"/proc/{a.proc.pid}/status").read_text().splitlines():  # type: ignore[union-attr]
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.cluster
def test_an_agent_holds_few_large_partial_frames(tmp_path: Path) -> None:
    """Each connection to a real agent's transfer port could hold a frame of up to
    160 MiB half sent, forever: four took 400 MiB."""
    a = new_agent(tmp_path, "tw").start()
    socks: list[socket.socket] = []
    try:
        before = _rss_mib(a)
        chunk = b"\x00" * (1 << 20)
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", a.transfer_port))
            s.settimeout(3)
            socks.append(s)
            try:
                s.sendall(struct.pack(">I", 150 << 20))
                for _ in range(149):
                    s.sendall(chunk)
            except (TimeoutError, ConnectionError):
                pass  # refused or no longer read: what the budget is for
        time.sleep(1)
        grown = _rss_mib(a) - before
        assert grown < 450, f"RSS grew by {grown:.0f} MiB"
        assert httpx.get(a.url + "/healthz", timeout=5).status_code == 200
        with a.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()
            assert http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()["state"] == "succeeded"
    finally:
        for s in socks:
            s.close()
        stop_all([a])
    assert "Traceback" not in a.log_path.read_text()  # type: ignore[union-attr]


@pytest.mark.cluster
def test_connections_without_a_cluster_certificate_are_logged_rate_limited(tmp_path: Path) -> None:
    def p2p(*args: object) -> None:
        subprocess.run([sys.executable, "-m", "p2psched", *map(str, args)], check=True, cwd=ROOT, capture_output=True)

    p2p("ca", "init", "--out", tmp_path / "ca")
    p2p("cert", "issue", "tt", "--ca", tmp_path / "ca", "--out", tmp_path / "tls")
    p2p("keygen", "--gossip", "-o", tmp_path / "gossip.key")
    a = new_agent(tmp_path, "tt", "--tls-dir", str(tmp_path / "tls"), "--gossip-key", str(tmp_path / "gossip.key"))
    a.extra.remove("--insecure")
    a.start()
    try:
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", a.transfer_port), timeout=5) as s:
                s.sendall(os.urandom(64))
        time.sleep(1)
        assert httpx.get(a.url + "/healthz", timeout=5).status_code == 200
    finally:
        stop_all([a])
    lines = [ln for ln in a.log_path.read_text().splitlines()  # type: ignore[union-attr]
              if "without a valid cluster certificate" in ln]
    assert 1 <= len(lines) <= 3, "\n".join(lines)
    assert "127.0.0.1:" in lines[0], lines[0]
