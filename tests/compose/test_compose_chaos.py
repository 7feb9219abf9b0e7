"""The short compose chaos run CI does wherever a Docker engine is present.

Five agents in containers, 60 s of container faults (docker kill, pause, network
disconnect) from the same nemesis and checker as the network-namespace harness, then
the checker's verdict: no acknowledged job lost, each with exactly one final result.
Without a reachable Docker engine it is skipped, saying why.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from cluster_env import CLUSTER_SH, ROOT, docker_missing_reason, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

AGENTS = 5
DURATION_S = 60


def test_a_short_compose_chaos_run_passes_the_checker() -> None:
    reason = docker_missing_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, P2PSCHED_PROJECT="p2psched-chaos-test", P2PSCHED_SUBNET="172.30.79.0/24",
               P2PSCHED_ENTRY_PORT=str(free_port()), P2PSCHED_UP_TIMEOUT=os.environ.get("P2PSCHED_UP_TIMEOUT", "300"))
    subprocess.run([str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=300, cwd=ROOT)
    try:
        up = subprocess.run([str(CLUSTER_SH), "up", str(AGENTS)], env=env, capture_output=True, text=True,
                            timeout=1800, cwd=ROOT)
        assert up.returncode == 0, up.stderr
        run = subprocess.run(
            [str(ROOT / "scripts" / "chaos.sh"), "--compose", "--agents", str(AGENTS), "--duration", str(DURATION_S),
             "--seed", "1"],
            env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT,
        )
        assert "verdict: PASS" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
        assert run.returncode == 0
    finally:
        subprocess.run([str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=300, cwd=ROOT)
