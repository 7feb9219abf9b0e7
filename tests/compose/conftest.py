"""A compose cluster for the tests in this folder: `scripts/cluster.sh up 3`, torn down after.

The cluster runs under its own compose project, subnet and entry port, so it neither
collides with an operator's `cluster.sh up` nor with agents other tests start on 7700.
Without a reachable Docker engine (or compose) every test here is skipped, saying so.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Iterator

import pytest
from cluster_env import CLUSTER_SH, PROJECT, ROOT, SUBNET, ComposeCluster, docker_missing_reason, free_port


@pytest.fixture(scope="session")
def compose_cluster() -> Iterator[ComposeCluster]:
    reason = docker_missing_reason()
    if reason:
        pytest.skip(reason)
    port = free_port()
    env = dict(os.environ, P2PSCHED_PROJECT=PROJECT, P2PSCHED_SUBNET=SUBNET, P2PSCHED_ENTRY_PORT=str(port),
               P2PSCHED_UP_TIMEOUT=os.environ.get("P2PSCHED_UP_TIMEOUT", "240"))
    subprocess.run([str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=300, cwd=ROOT)
    start = time.monotonic()
    up = subprocess.run([str(CLUSTER_SH), "up", "3"], env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    cluster = ComposeCluster(env, f"http://127.0.0.1:{port}", up, time.monotonic() - start)
    try:
        yield cluster
    finally:
        subprocess.run([str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=300, cwd=ROOT)
