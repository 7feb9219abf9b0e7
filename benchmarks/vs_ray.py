"""One p2psched agent against a local Ray instance, the same work on the same host, in one run.

    python3 -m venv .venv-ray && .venv-ray/bin/pip install 'ray==2.60.0' psutil   # once
    .venv/bin/python benchmarks/vs_ray.py [--ray-python .venv-ray/bin/python] [--tasks 20000] [--rounds 2]

Ray is what many of our users would otherwise run short tasks on. Both sides get
the same host, the same CPU count (``--cpus``, default 2) and a unit of work that
does nothing, measured the same way, each side alone on the host while it is
measured, the two sides alternating for ``--rounds`` rounds:

- ready: from starting the system until its first task (p2psched: the first noop
  job, its module uploaded) has returned;
- idle footprint, warm: after that first task and 200 more, every process the system
  started (Ray: its GCS, raylet, agents and workers; p2psched: the agent and its wasm
  workers), RSS now and CPU over ``--idle-s``;
- a burst: ``--tasks`` submitted at once (Ray: ``ray.get([noop.remote() ...])``;
  p2psched: ``POST /v1/jobs:batch`` of 1,000 a request, then ``POST /v1/jobs:wait``),
  per second until the last result is back;
- one after another: ``--latency`` round trips (Ray: ``ray.get(noop.remote())``;
  p2psched: ``POST /v1/jobs`` then ``GET /v1/jobs/ID?wait=``), p50 and p99.

The work is not the same in kind, and the print says so: a Ray task is a Python
function in a pooled worker, kept in memory; a p2psched job is a WebAssembly module
instantiated afresh in a sandbox with fuel and memory limits, its record and every
state change written to SQLite before it is acknowledged, its result signed by the
node's key. Ray runs its own Python in the driver, where p2psched's client speaks
HTTP; the driver's (client's) own memory is left out on both sides.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from agents import free_port  # noqa: E402
from footprint import cpu_s, family, rss_mb  # noqa: E402
from wasm_raw import NOOP  # noqa: E402

CHUNK = 1_000  # the batch API's and the wait API's most ids a request


def run_ray(python: str, args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run(
        [python, str(HERE / "ray_side.py"), "--cpus", str(args.cpus), "--tasks", str(args.tasks),
         "--latency", str(args.latency), "--idle-s", str(args.idle_s)],
        capture_output=True, text=True, timeout=900,
    )
    if out.returncode != 0:
        raise SystemExit(f"the Ray side failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_p2psched(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2psched", "agent", "--node-id", "bench", "--api", f"127.0.0.1:{port}",
             "--gossip", f"127.0.0.1:{free_port()}", "--transfer", f"127.0.0.1:{free_port()}",
             "--data-dir", f"{tmp}/data", "--insecure", "--no-mdns", "--cpus", str(args.cpus),
             "--queue-limit", str(args.tasks + 1_000)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
                while True:
                    try:
                        if http.get("/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.01)
                    if proc.poll() is not None:
                        raise SystemExit(f"the agent exited ({proc.returncode}) before it served")
                module = NOOP.read_bytes()
                first = http.post("/v1/jobs", json={"module": base64.b64encode(module).decode(), "entry": "noop"})
                http.get(f"/v1/jobs/{first.json()['id']}", params={"wait": 60})
                start_s = time.perf_counter() - t0
                spec = {"module_sha256": hashlib.sha256(module).hexdigest(), "entry": "noop"}
                burst(http, spec, 200)  # warm-up, as Ray's side gets

                time.sleep(1.0)
                procs = family(proc.pid)
                c0 = cpu_s(procs)
                time.sleep(args.idle_s)
                idle_cpu = (cpu_s(procs) - c0) / args.idle_s * 100
                idle_rss = rss_mb(procs)

                t = time.perf_counter()
                burst(http, spec, args.tasks)
                burst_s = time.perf_counter() - t

                lat = []
                for _ in range(args.latency):
                    t = time.perf_counter()
                    job = http.post("/v1/jobs", json=spec).json()
                    final = http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
                    lat.append((time.perf_counter() - t) * 1000)
                    if final["state"] != "succeeded":
                        raise SystemExit(f"a noop job ended {final['state']}: {final.get('result')}")
                procs = family(proc.pid)
                busy_rss = rss_mb(procs)
        finally:
            proc.terminate()
            proc.wait(60)
    return {
        "start_s": start_s, "processes": len(procs), "idle_rss_mb": idle_rss, "idle_cpu_pct": idle_cpu,
        "per_s": args.tasks / burst_s, "latency_ms": lat, "busy_rss_mb": busy_rss,
    }


def burst(http: httpx.Client, spec: dict[str, Any], n: int) -> None:
    """Submit ``n`` noop jobs in batches, then wait until every one has succeeded."""
    ids: list[str] = []
    for start in range(0, n, CHUNK):
        results = http.post("/v1/jobs:batch", json={"jobs": [spec] * min(CHUNK, n - start)}).json()["results"]
        if bad := [r for r in results if "error" in r]:
            raise SystemExit(f"the batch API refused jobs: {bad[0]}")
        ids.extend(r["job"]["id"] for r in results)
    for start in range(0, len(ids), CHUNK):
        done = http.post("/v1/jobs:wait", json={"ids": ids[start:start + CHUNK], "wait": 300}).json()["results"]
        states = {r["job"]["state"] for r in done}
        if states != {"succeeded"}:
            raise SystemExit(f"noop jobs ended {sorted(states)}, not all succeeded")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def line(name: str, r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (f"{name:10} ready {r['start_s']:5.2f} s | idle {r['processes']:2d} processes, "
            f"RSS {r['idle_rss_mb']:6.1f} MB, CPU {r['idle_cpu_pct']:4.2f}% | burst {r['per_s']:6.0f}/s | "
            f"one by one p50 {statistics.median(lat):5.2f} ms, p99 {pct(lat, 0.99):5.2f} ms | "
            f"RSS after {r['busy_rss_mb']:6.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ray-python", default=str(HERE.parent / ".venv-ray" / "bin" / "python"),
                    help="an interpreter with ray and psutil installed (see the docstring)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--latency", type=int, default=300)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not os.access(args.ray_python, os.X_OK):
        raise SystemExit(f"no interpreter with Ray at {args.ray_python}: create one with\n"
                         "  python3 -m venv .venv-ray && .venv-ray/bin/pip install 'ray==2.60.0' psutil\n"
                         "or pass --ray-python PATH")
    print(f"{args.tasks} noop units a burst, {args.latency} one by one, --cpus {args.cpus}, "
          f"idle over {args.idle_s:g} s")
    for n in range(args.rounds):
        ray_r = run_ray(args.ray_python, args)
        ours = run_p2psched(args)
        print(f"round {n + 1}:")
        print("  " + line(f"Ray {ray_r['version']}", ray_r))
        print("  " + line("p2psched", ours))
        print(f"  p2psched / Ray: burst rate {ours['per_s'] / ray_r['per_s']:.2f}x, idle RSS "
              f"{ours['idle_rss_mb'] / ray_r['idle_rss_mb']:.2f}x, one-by-one p50 time "
              f"{statistics.median(ours['latency_ms']) / statistics.median(ray_r['latency_ms']):.2f}x")
    print("Ray: a Python function in a pooled worker, kept in memory. p2psched: a fresh wasm instance in a sandbox "
          "with fuel and memory limits, every state change in SQLite before it is acknowledged, a signed result.")


if __name__ == "__main__":
    main()
