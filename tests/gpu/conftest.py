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
