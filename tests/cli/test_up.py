"""`p2psched up --nodes N`, as the README shows it: N real agents on loopback that form
one cluster, print their URLs, and all stop on Ctrl-C."""

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from agents import ROOT, free_port, wait_for, wasm_spec

pytestmark = pytest.mark.cluster


def base_port_with_room() -> int:
    """A base port whose agents' ports (base + 10i + 0..2, two agents) are free now."""
    for _ in range(50):
        base = free_port()
        if base > 60000:
            continue
        ports = [base + 10 * i + k for i in range(2) for k in range(3)]
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise AssertionError("no free run of ports")


def test_up_starts_a_cluster_prints_its_urls_and_ctrl_c_stops_every_agent(tmp_path):
    base = base_port_with_room()
    up = subprocess.Popen(
        [sys.executable, "-m", "p2psched", "up", "--nodes", "2", "--base-port", str(base),
         "--data-root", str(tmp_path / "data"), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert up.stdout is not None
        lines = [up.stdout.readline().decode().split() for _ in range(2)]
        assert [node for node, _ in lines] == ["n0", "n1"], lines
        urls = [url for _, url in lines]
        assert urls == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 10}"]

        def both_alive() -> bool:
            peers = httpx.get(urls[0] + "/v1/peers", timeout=5).json()["peers"]
            return sorted(p["node_id"] for p in peers if p["state"] == "alive") == ["n0", "n1"]

        wait_for(both_alive, timeout=30, what="both agents alive in one cluster")
        job = httpx.post(urls[1] + "/v1/jobs", json=wasm_spec("hello.wasm"), timeout=10).json()["id"]
        done = httpx.get(f"{urls[1]}/v1/jobs/{job}", params={"wait": 30}, timeout=40).json()
        assert done["state"] == "succeeded", done

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        assert b"all agents stopped" in up.stderr.read()
        for url in urls:
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/healthz", timeout=2)
        for node in ("n0", "n1"):
            assert "stopped; state flushed" in (tmp_path / "logs" / f"{node}.log").read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        subprocess.run(["pkill", "-f", str(tmp_path / "data")], check=False)
