"""Placement decision time at 1,000 members, p50 and p99.

    .venv/bin/python benchmarks/placement_decision.py [--members 1000] [--decisions 2000]

Members sit on the first N hosts of topologies/large.yaml (16 spines x 64 leaves x 16).
Each decision draws a fresh random origin and random peer vectors (a third of the
peers full), with the origin itself full, so ``place()`` takes its forward path:
it filters all N-1 peers, prices the fitting ones and builds 8 routed candidates.

Baselines, measured in the same run on the same inputs:
  scan:    a bare loop calling fits_now() on every peer, the least any placement
           that reads all members must do;
  random:  place(policy="random"), which filters but neither prices nor ranks.
Also shown: the local fast path (the origin fits, so the job runs here).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from p2psched.placement import JobRequest, fits_now, place
from p2psched.resources import NodeState, ResourceVector
from p2psched.topology import Topology

REPO = Path(__file__).resolve().parent.parent


def members(topo: Topology, n: int, rng: random.Random) -> list[NodeState]:
    out = []
    for h in topo.hosts[:n]:
        free = 0.0 if rng.random() < 1 / 3 else float(rng.randint(1, 8))
        out.append(NodeState(h, vector=ResourceVector(cpu_total=8, cpu_free=free, mem_total_mb=65536,
                                                      mem_free_mb=32768, queue_len=rng.randint(0, 2)),
                             position=h))
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--decisions", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    topo = Topology.load(REPO / "topologies" / "large.yaml")
    if args.members > len(topo.hosts):
        ap.error(f"--members is {args.members}; large.yaml has {len(topo.hosts)} hosts")
    rng = random.Random(args.seed)
    req = JobRequest("bench", cpu=1, mem_mb=1024)
    pools = [members(topo, args.members, rng) for _ in range(8)]
    timings: dict[str, list[float]] = {"scan": [], "random": [], "p2p (forward)": [], "p2p (runs here)": []}
    for i in range(args.decisions):
        pool = pools[i % len(pools)]
        k = rng.randrange(len(pool))
        local = pool[k]
        full = NodeState(local.node_id, vector=ResourceVector(cpu_total=8, cpu_free=0, mem_total_mb=65536,
                                                             mem_free_mb=0), position=local.position)
        idle = NodeState(local.node_id, vector=ResourceVector(cpu_total=8, cpu_free=8, mem_total_mb=65536,
                                                             mem_free_mb=65536), position=local.position)
        peers = pool[:k] + pool[k + 1:]
        r = random.Random(i)

        t = time.perf_counter_ns()
        sum(1 for p in peers if fits_now(req, p))
        timings["scan"].append(time.perf_counter_ns() - t)

        t = time.perf_counter_ns()
        place(req, full, peers, topo, rng=r, policy="random")
        timings["random"].append(time.perf_counter_ns() - t)

        t = time.perf_counter_ns()
        place(req, full, peers, topo, rng=r)
        timings["p2p (forward)"].append(time.perf_counter_ns() - t)

        t = time.perf_counter_ns()
        place(req, idle, peers, topo, rng=r)
        timings["p2p (runs here)"].append(time.perf_counter_ns() - t)

    print(f"placement decision time, {args.members} members, {args.decisions} decisions each "
          f"(first 100 left out as warm-up), topology {topo.name}")
    print(f"{'':<18}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'vs scan p50':>13}")
    scan50 = pct(timings["scan"][100:], 0.5)
    for name, xs in timings.items():
        xs = xs[100:]
        print(f"{name:<18}{pct(xs, 0.5) / 1e6:>10.3f}{pct(xs, 0.99) / 1e6:>10.3f}"
              f"{statistics.fmean(xs) / 1e6:>10.3f}{pct(xs, 0.5) / scan50:>12.1f}x")


if __name__ == "__main__":
    main()
