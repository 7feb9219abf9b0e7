"""The raw wasmtime baseline for the noop benchmarks, and the sandbox's own overhead.

``raw_noop_loop(n)`` instantiates examples/wasm/noop.wasm in a fresh store and
calls its ``noop`` export ``n`` times, with plain wasmtime-py and nothing of
p2psched: the fastest a Python process can run noop jobs one after another.
``benchmarks/noop_throughput.py`` compares the agent's path against it.

    .venv/bin/python benchmarks/wasm_raw.py [N]

prints the raw loop against ``run_wasm`` (the sandbox alone, no agent) for the
``noop`` function and for ``_start``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import wasmtime

NOOP = Path(__file__).resolve().parent.parent / "examples" / "wasm" / "noop.wasm"


def raw_noop_loop(n: int, module_path: Path = NOOP) -> float:
    """Seconds taken by ``n`` iterations of: new Store, instantiate, call ``noop``."""
    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, str(module_path))
    start = time.perf_counter()
    for _ in range(n):
        store = wasmtime.Store(engine)
        instance = wasmtime.Instance(store, module, [])
        instance.exports(store)["noop"](store)
    return time.perf_counter() - start


def sandbox_noop_loop(n: int, entry: str = "noop", module_path: Path = NOOP) -> float:
    """Seconds taken by ``n`` calls of ``run_wasm`` on the noop module, warm caches."""
    import hashlib

    from p2psched.jobs.spec import Limits, Resources
    from p2psched.sandbox.base import SandboxRequest
    from p2psched.sandbox.wasm import WasmEngine, run_wasm

    sha = hashlib.sha256(module_path.read_bytes()).hexdigest()
    limits, resources = Limits(), Resources()
    with WasmEngine(None) as engine:
        requests = [
            SandboxRequest(job_id=f"j{i}", runtime="wasm", limits=limits, resources=resources,
                           module_sha256=sha, module_path=module_path, entry=entry)
            for i in range(n + 1)
        ]
        run_wasm(requests[-1], engine)  # compile outside the timing
        start = time.perf_counter()
        for request in requests[:n]:
            result = run_wasm(request, engine)
        elapsed = time.perf_counter() - start
        assert result.reason == "exit 0", result.reason
    return elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    raw = raw_noop_loop(n)
    print(f"raw wasmtime loop      : {n / raw:9.0f} runs/s  {raw / n * 1e6:6.1f} us/run")
    for entry in ("noop", "_start"):
        t = sandbox_noop_loop(n, entry)
        print(f"run_wasm entry={entry:7}: {n / t:9.0f} runs/s  {t / n * 1e6:6.1f} us/run  "
              f"({raw / t:.0%} of raw, +{(t - raw) / n * 1e6:.1f} us/run)")


if __name__ == "__main__":
    main()
