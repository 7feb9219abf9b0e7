"""The Ray half of benchmarks/vs_ray.py; it runs in an interpreter that has Ray.

    .venv-ray/bin/python benchmarks/ray_side.py --cpus 2 --tasks 20000 --latency 300 --idle-s 10

A local Ray instance (``ray.init``, no dashboard) and a task that does nothing,
measured the way vs_ray.py measures an agent: start-up time, the idle footprint of
every process Ray started (RSS and CPU over ``--idle-s``), tasks per second for a
burst of ``--tasks`` submitted at once, and the latency of ``--latency`` tasks one
after another. Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psutil
import ray
from footprint import cpu_s, rss_mb  # beside this file


def cluster_processes(driver: psutil.Process) -> list[psutil.Process]:
    """What Ray started for this driver: the GCS, the raylet, its agents and workers."""
    return driver.children(recursive=True)


@ray.remote
def noop() -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--latency", type=int, default=300)
    ap.add_argument("--idle-s", type=float, default=10.0)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no host here reaches the internet

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.get(noop.remote())  # the first task starts a worker: part of being ready
    start_s = time.perf_counter() - t0
    driver = psutil.Process()
    ray.get([noop.remote() for _ in range(200)])  # warm-up, as the agent gets one job first

    time.sleep(1.0)
    procs = cluster_processes(driver)
    c0 = cpu_s(procs)
    time.sleep(args.idle_s)
    idle_cpu = (cpu_s(procs) - c0) / args.idle_s * 100
    idle_rss = rss_mb(procs)
    idle_driver_rss = driver.memory_info().rss / 2**20

    t = time.perf_counter()
    ray.get([noop.remote() for _ in range(args.tasks)])
    burst_s = time.perf_counter() - t

    lat = []
    for _ in range(args.latency):
        t = time.perf_counter()
        ray.get(noop.remote())
        lat.append((time.perf_counter() - t) * 1000)
    procs = cluster_processes(driver)
    busy_rss = rss_mb(procs)
    ray.shutdown()
    print(json.dumps({
        "version": ray.__version__, "start_s": start_s, "processes": len(procs), "idle_rss_mb": idle_rss,
        "idle_driver_rss_mb": idle_driver_rss, "idle_cpu_pct": idle_cpu, "per_s": args.tasks / burst_s,
        "latency_ms": lat, "busy_rss_mb": busy_rss,
    }))


if __name__ == "__main__":
    main()
