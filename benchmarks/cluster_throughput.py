"""Short jobs through a two-agent cluster, against one agent alone in the same run.

    .venv/bin/python benchmarks/cluster_throughput.py [--jobs 1000]

Two real agents (1 CPU slot each) on loopback, noop wasm jobs through the batch API,
timed from the batch request until `POST /v1/jobs:wait` has every result:
  - baseline: agent B alone (agent A stopped), all jobs run on B;
  - the cluster: the same batch to B with A alive: B runs some, forwards the rest;
  - all forwarded: A's slot is held by a looping job, every job submitted to A
    runs on B, one forward each.
Each line gives jobs/s, where they ran, and the forwards the target refused on late
binding (`p2psched_forward_refusals_total` at the origin; a refused job waits before
it is offered again). No target: a burst must not run slower on a cluster than on
one of its agents, and a free peer should refuse nothing.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from agents import start_cluster, stop_all, wasm_spec  # noqa: E402


def burst(http: Any, n: int, spec: dict) -> tuple[float, collections.Counter]:
    t = time.perf_counter()
    results = http.post("/v1/jobs:batch", json={"jobs": [spec] * n}).json()["results"]
    ids = [item["job"]["id"] for item in results]
    done = http.post("/v1/jobs:wait", json={"ids": ids, "wait": 300}).json()["results"]
    elapsed = time.perf_counter() - t
    states = {item["job"]["state"] for item in done}
    if states != {"succeeded"}:
        raise SystemExit(f"jobs ended {states}, not all succeeded")
    return n / elapsed, collections.Counter(item["job"]["executor"] for item in done)


def refusals(http: Any) -> int:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("p2psched_forward_refusals_total "):
            return int(float(line.split()[1]))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    args = ap.parse_args()
    spec = wasm_spec("noop.wasm")
    with tempfile.TemporaryDirectory() as tmp:
        agents = start_cluster(Path(tmp), ["a", "b"], "--cpus", "1")
        try:
            a, b = agents
            with a.client() as ha, b.client() as hb:
                burst(hb, 50, spec)  # warm: module compile, worker start
                burst(ha, 50, spec)
                before = refusals(hb)
                together, where = burst(hb, args.jobs, spec)
                together_refused = refusals(hb) - before

                busy = ha.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 600_000})).json()["id"]
                while ha.get(f"/v1/jobs/{busy}").json()["state"] != "running":
                    time.sleep(0.05)
                before = refusals(ha)
                forwarded, fwd_where = burst(ha, args.jobs, spec)
                forwarded_refused = refusals(ha) - before
                ha.delete(f"/v1/jobs/{busy}")

                a.stop()
                time.sleep(1.0)
                alone, _ = burst(hb, args.jobs, spec)
        finally:
            stop_all(agents)
    print(f"one agent alone (baseline):     {alone:8.0f} jobs/s")
    print(f"two agents, burst to one:       {together:8.0f} jobs/s  ({together / alone:.0%} of alone; ran on "
          f"{dict(sorted(where.items()))}; {together_refused} offers refused)")
    print(f"origin busy, all forwarded:     {forwarded:8.0f} jobs/s  ({forwarded / alone:.0%} of alone; ran on "
          f"{dict(sorted(fwd_where.items()))}; {forwarded_refused} offers refused)")


if __name__ == "__main__":
    main()
