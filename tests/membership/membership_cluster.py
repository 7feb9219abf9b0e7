"""A cluster of real membership agents, each its own process, on loopback.

Each agent is ``python -m p2psched.membership.standalone`` with compressed timings
(probe every 200 ms, as memberlist's tests compress theirs) and real AES-GCM sealing.
Tests read each agent's status file; ``wait_for`` polls a condition with a generous
bound, so slow machines make tests slower, not flaky.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

FAST = {
    "probe_interval": 0.2, "probe_timeout": 0.1, "gossip_interval": 0.05, "push_pull_interval": 2.0,
    "state_min_interval": 0.1, "dead_retention": 60.0, "rejoin_interval": 1.0, "join_retry_interval": 0.2,
}


class Agent:
    def __init__(self, cluster: "Cluster", node_id: str, port: int = 0, join: list[str] | None = None,
                 files: str | None = None) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.status_file = cluster.dir / f"{files or node_id}.json"
        self.log_file = cluster.dir / f"{files or node_id}.log"
        self.status_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "p2psched.membership.standalone", "--node-id", node_id,
               "--bind", f"127.0.0.1:{port}", "--no-mdns", "--key-file", str(cluster.key_file),
               "--cluster", cluster.name, "--settings", json.dumps(FAST), "--status-file", str(self.status_file),
               "--log-level", "INFO"]
        for seed in join or []:
            cmd += ["--join", seed]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log_file, "a"), text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY "):
            raise RuntimeError(f"agent {node_id} did not start: {self.log_file.read_text()[-2000:]}")
        self.addr = line.split()[1]
        self.port = int(self.addr.rsplit(":", 1)[1])

    def status(self) -> dict[str, Any]:
        for _ in range(20):
            try:
                return json.loads(self.status_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise AssertionError(f"no status from {self.node_id}; log: {self.log_file.read_text()[-2000:]}")

    def view(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.status()["members"]}

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


class Cluster:
    def __init__(self, directory: Path, key_file: Path, name: str = "test-cluster") -> None:
        self.dir = directory
        self.key_file = key_file
        self.name = name
        self.agents: dict[str, Agent] = {}

    def start(self, n: int) -> None:
        seed = Agent(self, "m0")
        self.agents["m0"] = seed
        for i in range(1, n):
            self.agents[f"m{i}"] = Agent(self, f"m{i}", join=[seed.addr])

    def restart(self, node_id: str) -> Agent:
        old = self.agents[node_id]
        old.stop()
        agent = Agent(self, node_id, port=old.port, join=[self.agents["m0"].addr])
        self.agents[node_id] = agent
        return agent

    def running(self, exclude: set[str] = frozenset()) -> list[Agent]:  # type: ignore[assignment]
        return [a for a in self.agents.values() if a.proc.poll() is None and a.node_id not in exclude]

    def close(self) -> None:
        for a in self.agents.values():
            a.stop()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
