"""An agent process that ran wasm jobs exits cleanly.

wasmtime drops WASI output streams on its own tokio threads; a Python callback
there while the interpreter shuts down once made such processes abort (exit
134) about one time in three. Each run here is a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pathlib import Path
from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox.base import SandboxRequest
from p2psched.sandbox.wasm import WasmEngine, run_wasm
engine = WasmEngine(sys.argv[1])  # deliberately never closed
for guest in ("noop", "hello", "sha256", "printenv", "vecadd"):
    request = SandboxRequest(job_id=guest, runtime="wasm", limits=Limits(), resources=Resources(),
                             module_path=Path("examples/wasm") / f"{guest}.wasm", stdin=b"12345678")
    assert run_wasm(request, engine).reason == "exit 0"
print("ran")
"""


def test_process_that_ran_guests_exits_zero(tmp_path):
    for _ in range(6):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert (done.returncode, done.stdout) == (0, "ran\n"), done.stderr[-2000:]
