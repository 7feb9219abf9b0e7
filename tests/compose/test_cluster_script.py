"""`scripts/cluster.sh` refuses clearly when it cannot work; no Docker engine needed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cluster_env import CLUSTER_SH, ROOT

BASH = shutil.which("bash") or "/bin/bash"


def run(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([BASH, str(CLUSTER_SH), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_missing_docker_is_named_with_the_fix(tmp_path: Path) -> None:
    # a PATH with the tools the script needs, but no docker
    for tool in ("dirname", "sed", "date", "python3"):
        found = shutil.which(tool)
        assert found, tool
        (tmp_path / tool).symlink_to(found)
    out = run("status", path=str(tmp_path))
    assert out.returncode == 1
    assert "docker is not installed" in out.stderr
    assert "install Docker Engine" in out.stderr


def test_a_bad_agent_count_is_refused_before_touching_docker() -> None:
    for bad in ("0", "three", ""):
        out = run("up", bad)
        assert out.returncode == 1
        assert "is not a number of agents" in out.stderr


def test_an_unknown_command_lists_the_known_ones() -> None:
    out = run("restart")
    assert out.returncode == 1
    assert "unknown command 'restart'" in out.stderr
    assert "up N, scale N, status, stop, down, build" in out.stderr
