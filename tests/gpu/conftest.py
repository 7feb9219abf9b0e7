"""Helpers for GPU tests: run the example GPU job the way a job runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gpu" / "matmul.py"

RunExample = Callable[..., tuple[int, dict[str, Any], str]]


def _run_example(gpu_env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    """A clean environment plus the grant's variables, as the process sandbox builds it."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **gpu_env}
    p = subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=60)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    return p.returncode, report, p.stdout


@pytest.fixture
def run_example() -> RunExample:
    return _run_example


async def run_example_sandboxed(work_dir: Path, gpu_env: dict[str, str], gpu_devices: list[str],
                                *args: str) -> tuple[int | None, dict[str, Any], str]:
    """Run the example as a process job in the real process sandbox.

    The system Python runs it (``-c`` with the example's source, so no host path
    needs binding); the sandbox applies the grant's environment and lets only the
    grant's device nodes through. Skips where this host cannot run process jobs.
    """
    from p2psched.jobs.spec import Limits, Resources
    from p2psched.sandbox.base import SandboxRequest
    from p2psched.sandbox.process import SandboxError, run_process

    req = SandboxRequest(job_id="gpu-example", runtime="process", limits=Limits.model_validate({"wall_ms": 60_000}),
                         resources=Resources.model_validate({}), command=["/usr/bin/python3", "-c", EXAMPLE.read_text(), *args],
                         gpu_env=gpu_env, gpu_devices=gpu_devices)
    try:
        result = await run_process(req, work_dir)
    except SandboxError as e:
        pytest.skip(f"this host cannot run process jobs: {e}")
    out = result.stdout.decode()
    lines = out.strip().splitlines()
    assert lines, f"the job printed nothing: {result.reason} {result.stderr.decode()[-500:]}"
    return result.exit_code, json.loads(lines[-1]), out + "\n" + "\n".join(result.warnings)


@pytest.fixture
def run_in_sandbox() -> Callable[..., Any]:
    return run_example_sandboxed
