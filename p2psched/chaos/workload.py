"""Deterministic jobs whose outcome is known before they run.

Two kinds, both WebAssembly guests from ``examples/wasm``:

* ``sha256``: ``sha256.wasm`` with a random input; its stdout must be the input's
  SHA-256 in hex and a newline, so a succeeded job's output is checked exactly.
  These are short (milliseconds), so most of them are queued or in flight when a
  fault hits.
* ``sleep``: ``sleep.wasm`` under a wall-clock limit of 1-4 s; it ends
  ``timed_out`` with reason ``wall_timeout``, never ``succeeded``. These hold an
  executor's slot long enough that kills and partitions catch them running, which
  is what re-placement is about. A sleep costs no CPU, which matters on a small
  machine shared by several agents.

The same seed gives the same jobs, ids and inputs in the same order.
"""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WASM_DIR = Path(__file__).resolve().parent.parent.parent / "examples" / "wasm"

#: Share of ``sleep`` jobs: enough that every kill finds something running, few
#: enough that most outcomes are checked byte for byte.
SLEEP_SHARE = 0.3
SLEEP_WALL_MS = (1000, 4000)
#: Inputs up to 512 bytes: several SHA-256 blocks, so padding bugs would show.
MAX_INPUT = 512


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a job's final record must show if it succeeded (or how it should end)."""

    kind: str
    #: The state a fault-free run ends in; other final states are legal under faults
    #: (e.g. ``failed`` when the retry budget is spent) and only counted.
    state: str
    #: sha256 of the stdout a succeeded job must have produced; None: it must not succeed.
    output_sha256: str | None
    stdout: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "state": self.state, "output_sha256": self.output_sha256, "stdout": self.stdout}


class Modules:
    """The guests' bytes, read once and sent base64 with every submission."""

    def __init__(self, wasm_dir: Path = WASM_DIR) -> None:
        self.b64 = {}
        for name in ("sha256", "sleep"):
            path = wasm_dir / f"{name}.wasm"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing; run ./scripts/build-guests.sh to build the example guests")
            self.b64[name] = base64.b64encode(path.read_bytes()).decode()


def make_job(rng: random.Random, job_id: str, modules: Modules) -> tuple[dict[str, Any], Expectation]:
    """One job spec (JSON, as POSTed) and what its outcome must be."""
    if rng.random() < SLEEP_SHARE:
        wall = rng.randint(*SLEEP_WALL_MS)
        spec = {"id": job_id, "runtime": "wasm", "module": modules.b64["sleep"], "limits": {"wall_ms": wall},
                "labels": {"chaos": "sleep"}}
        return spec, Expectation("sleep", "timed_out", None, None)
    data = rng.randbytes(rng.randint(0, MAX_INPUT))
    stdout = hashlib.sha256(data).hexdigest() + "\n"
    spec = {"id": job_id, "runtime": "wasm", "module": modules.b64["sha256"],
            "input": base64.b64encode(data).decode(), "labels": {"chaos": "sha256"}}
    return spec, Expectation("sha256", "succeeded", hashlib.sha256(stdout.encode()).hexdigest(), stdout)
