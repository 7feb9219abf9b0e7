"""`p2psched up --nodes N`, as the README shows it: N real agents on loopback that form
one cluster, print their URLs, and all stop on Ctrl-C."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from agents import ROOT, free_port, new_agent, wait_for, wasm_spec
from p2psched.agent.datadir import DataDirLock

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


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _node_of(pid: int) -> str | None:
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return None
    return argv[argv.index(b"--node-id") + 1].decode() if b"--node-id" in argv else None


def run_up(tmp_path, *args: str, timeout: float = 90) -> tuple[int | None, str, str]:
    """``p2psched up ARGS`` to its end; (None, ...) when it was still running after ``timeout``
    (it and the agents it started are killed then, by pid)."""
    up = subprocess.Popen([sys.executable, "-m", "p2psched", "up", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = up.communicate(timeout=timeout)
        return up.returncode, out, err
    except subprocess.TimeoutExpired:
        agents = _children(up.pid)
        up.kill()
        for pid in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = up.communicate()
        return None, out, err


def test_up_refuses_flags_it_cannot_use_before_starting_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = run_up(tmp_path, "--nodes", "1", "--data-root", str(tmp_path / "file"))
    assert rc == 2 and "Traceback" not in err, err
    assert f"Invalid value for --data-root: {tmp_path / 'file'} is a file, not a directory" in err
    rc, _, err = run_up(tmp_path, "--nodes", "1", "--cpus", "-1", "--data-root", str(tmp_path / "data"))
    assert rc == 2 and "Invalid value for '--cpus': -1.0 is not in the range x>0" in err, err


def test_up_refuses_a_base_port_another_agent_answers_on(tmp_path):
    other = new_agent(tmp_path, "other").start()
    try:
        rc, out, err = run_up(tmp_path, "--nodes", "1", "--base-port", str(other.api_port),
                              "--data-root", str(tmp_path / "data"))
    finally:
        other.stop()
    assert rc == 1, (rc, out, err)
    assert "agents up" not in err and out == "", err
    assert (f"port {other.api_port} (TCP), the API port of agent n0, is taken by agent other "
            f"(http://127.0.0.1:{other.api_port})") in err
    assert "pass a --base-port" in err and "Traceback" not in err


def test_up_says_why_an_agent_did_not_start_without_a_log_dir(tmp_path):
    held = DataDirLock.acquire(tmp_path / "data" / "n1", "n9")  # as another agent holds it
    try:
        rc, out, err = run_up(tmp_path, "--nodes", "2", "--base-port", str(base_port_with_room()),
                              "--data-root", str(tmp_path / "data"))
    finally:
        held.release()
    assert rc == 1, (rc, out, err)
    assert "agents up" not in err and "Traceback" not in err, err
    assert "agent n1 exited with status" in err
    assert f"  | p2psched agent: data dir {tmp_path / 'data' / 'n1'} is in use by another agent" in err
    assert err.index("agent n1 exited") < err.index("all agents stopped")


def test_up_stops_the_cluster_and_exits_1_when_an_agent_it_started_dies(tmp_path):
    base = base_port_with_room()
    up = subprocess.Popen(
        [sys.executable, "-m", "p2psched", "up", "--nodes", "2", "--base-port", str(base),
         "--data-root", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    agents: list[int] = []
    try:
        assert up.stdout is not None
        assert [up.stdout.readline().decode().split()[0] for _ in range(2)] == ["n0", "n1"]
        agents = _children(up.pid)
        victim = next(pid for pid in agents if _node_of(pid) == "n1")
        os.kill(victim, signal.SIGKILL)
        assert up.wait(60) == 1
        err = up.stderr.read().decode() if up.stderr else ""
        assert "Error: agent n1 was killed by SIGKILL" in err, err
        assert "all agents stopped" in err and "Traceback" not in err
        with pytest.raises(httpx.ConnectError):  # n0 was stopped with it: no half cluster is left
            httpx.get(f"http://127.0.0.1:{base}/healthz", timeout=2)
    finally:
        if up.poll() is None:
            agents = agents or _children(up.pid)
            up.kill()
            up.wait()
        for pid in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
