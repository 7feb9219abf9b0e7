"""Helpers for the compose tests: the cluster handle, Docker checks, polling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agents import free_port  # noqa: F401 - the compose tests import it from here

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"
PROJECT = "p2psched-test"
SUBNET = "172.30.78.0/24"


def docker_missing_reason() -> str | None:
    """Why compose tests cannot run here, or None when they can."""
    if shutil.which("docker") is None:
        return "no docker CLI on this host: install Docker Engine to run the compose cluster tests"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "the Docker engine is not reachable ('docker info' fails): start dockerd to run the compose cluster tests"
    has_v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0
    if not has_v2 and shutil.which("docker-compose") is None:
        return "neither 'docker compose' nor 'docker-compose' is installed: install compose to run these tests"
    return None


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def wait_for(what: str, predicate: Any, timeout: float, interval: float = 1.0) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what`` otherwise.

    A bound on waiting for a condition, not a timing assertion: the tests assert the
    state reached, and ``timeout`` only keeps a broken cluster from hanging the run.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s; last seen: {last!r}")


@dataclass
class ComposeCluster:
    env: dict[str, str]
    entry_url: str
    up: subprocess.CompletedProcess[str]
    up_seconds: float
    size: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def script(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CLUSTER_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def peers(self) -> list[dict[str, Any]]:
        body = get_json(self.entry_url + "/v1/peers")
        peers: list[dict[str, Any]] = body["peers"]
        return peers

    def states(self) -> dict[str, str]:
        return {p["node_id"]: p["state"] for p in self.peers()}

    def containers(self) -> list[str]:
        from p2psched.chaos import docker_faults

        return docker_faults.list_agents(PROJECT)

    def node_id(self, container: str) -> str:
        """The node id the agent in ``container`` reports on its own /healthz."""
        code = ("import json, urllib.request; "
                "print(json.load(urllib.request.urlopen('http://127.0.0.1:7700/healthz', timeout=5))['node_id'])")
        out = subprocess.run(["docker", "exec", container, "python3", "-c", code],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
