"""The raw wasmtime baseline for the noop benchmarks, and the sandbox's own overhead.

``raw_noop_loop(n)`` instantiates examples/wasm/noop.wasm in a fresh store and
calls its ``noop`` export ``n`` times, with plain wasmtime-py and nothing of
p2psched: the fastest a Python process can run noop jobs one after another.
``benchmarks/noop_throughput.py`` compares the agent's path against it.

    .venv/bin/python benchmarks/wasm_raw.py [N [ROUNDS]]

prints the raw loop against ``run_wasm`` (the sandbox alone, no agent) for the
``noop`` function and for ``_start``, best of ROUNDS interleaved rounds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime

NOOP = Path(__file__).resolve().parent.parent / "examples" / "wasm" / "noop.wasm"


def raw_noop_loop(n: int, module_path: Path = NOOP, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds taken by ``n`` iterations of: new Store, instantiate, call ``noop``."""
    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, str(module_path))
    start = clock()
    for _ in range(n):
        store = wasmtime.Store(engine)
        instance = wasmtime.Instance(store, module, [])
        instance.exports(store)["noop"](store)
    return clock() - start


def sandbox_noop_loop(
    n: int, entry: str = "noop", module_path: Path = NOOP, clock: Callable[[], float] = time.perf_counter
) -> float:
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
        start = clock()
        for request in requests[:n]:
            result = run_wasm(request, engine)
        elapsed = clock() - start
        assert result.reason == "exit 0", result.reason
    return elapsed


def main() -> None:
    # On a shared machine single runs swing by 2x; interleave the loops and keep
    # each one's best round, by wall time and by this thread's CPU time.
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    loops: dict[str, Callable[[Callable[[], float]], float]] = {
        "raw wasmtime loop": lambda clock: raw_noop_loop(n, clock=clock),
        "run_wasm entry=noop": lambda clock: sandbox_noop_loop(n, "noop", clock=clock),
        "run_wasm entry=_start": lambda clock: sandbox_noop_loop(n, "_start", clock=clock),
    }
    best = {name: [float("inf"), float("inf")] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            best[name][0] = min(best[name][0], loop(time.perf_counter))
            best[name][1] = min(best[name][1], loop(time.thread_time))
    raw_wall, raw_cpu = best["raw wasmtime loop"]
    print(f"{n} runs x best of {rounds} rounds, per run: wall (CPU)")
    for name, (wall, cpu) in best.items():
        print(f"{name:22}: {n / wall:7.0f} runs/s  {wall / n * 1e6:6.1f} us ({cpu / n * 1e6:5.1f} us CPU)"
              f"  {raw_wall / wall:4.0%} of raw by wall, {raw_cpu / cpu:4.0%} by CPU")
    print(thread_dispatch(n))


def thread_dispatch(n: int, batch: int = 64) -> str:
    """noop jobs/s through trio.to_thread: one job per round trip, and batches."""
    import hashlib

    import trio

    from p2psched.jobs.spec import Limits, Resources
    from p2psched.sandbox.base import SandboxRequest
    from p2psched.sandbox.wasm import WasmEngine, run_wasm, run_wasm_many

    sha = hashlib.sha256(NOOP.read_bytes()).hexdigest()
    limits, resources = Limits(), Resources()
    requests = [
        SandboxRequest(job_id=f"j{i}", runtime="wasm", limits=limits, resources=resources,
                       module_sha256=sha, module_path=NOOP)
        for i in range(n)
    ]

    async def measure(engine: WasmEngine) -> tuple[float, float]:
        run_wasm(requests[0], engine)
        start = time.perf_counter()
        for request in requests:
            await trio.to_thread.run_sync(run_wasm, request, engine)
        single = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, n, batch):
            await trio.to_thread.run_sync(run_wasm_many, requests[i : i + batch], engine)
        return single, time.perf_counter() - start

    with WasmEngine(None) as engine:
        single, batched = trio.run(measure, engine)
    return (f"trio.to_thread, one job per call : {n / single:7.0f} jobs/s\n"
            f"trio.to_thread, {batch} jobs per call: {n / batched:7.0f} jobs/s")


if __name__ == "__main__":
    main()
