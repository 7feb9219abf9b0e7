"""Noop jobs per second: raw wasmtime against the agent's whole path, in one run.

    .venv/bin/python benchmarks/noop_throughput.py [--jobs 20000] [--batch 1000]

(a) raw: a plain in-process wasmtime loop that instantiates noop.wasm and calls
    its ``noop`` export (benchmarks/wasm_raw.py), nothing of p2psched.
(b) agent: noop jobs through one real agent subprocess via POST /v1/jobs:batch,
    end to end: validated, written to SQLite, dispatched, run in the wasm sandbox,
    result stored durably. Counted from the first submit until the last job's final
    state is stored.

Also printed: the agent's CPU time per job over (b), its main (trio) thread's, the
whole process's and its wasm worker processes' (less noisy than wall time on a
shared host), submit->result latency p50/p99 (from each job's timeline), and the
agent's idle RSS and idle CPU (measured before any job, over 10 s; the wasm workers
start with the first wasm job).
Targets on a 2-core machine: (b) >= 50% of (a), >= 5,000 jobs/s, RSS < 50 MB, CPU < 1%.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from agents import free_port, wasm_worker_pids  # noqa: E402
from wasm_raw import NOOP, raw_noop_loop  # noqa: E402

T = TypeVar("T")
FINAL = {"succeeded", "failed", "cancelled", "timed_out", "rejected"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU time of the process, or of one of its threads (the main thread's tid is the pid)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def switches(pid: int) -> int:
    """Context switches of a process so far, all its threads together."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def per_worker(pid: int, measure: Callable[[int], T]) -> dict[int, T]:
    """``measure(worker)`` for each wasm worker process of agent ``pid`` (those that
    end meanwhile are left out)."""
    out = {}
    for w in wasm_worker_pids(pid):
        try:
            out[w] = measure(w)
        except OSError:
            continue
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1_000)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--agent-arg", action="append", default=[], help="extra agent flag (repeatable)")
    args = ap.parse_args()

    raw_n = 5_000
    raw_n / raw_noop_loop(200)  # warm-up
    raw_rate = raw_n / raw_noop_loop(raw_n)
    print(f"(a) raw wasmtime loop:        {raw_rate:10.0f} noop calls/s")

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log = open(Path(tmp) / "agent.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2psched", "agent", "--node-id", "bench", "--api", f"127.0.0.1:{port}",
             "--gossip", f"127.0.0.1:{free_port()}", "--transfer", f"127.0.0.1:{free_port()}",
             "--data-dir", f"{tmp}/data", "--insecure", "--no-mdns", "--queue-limit", str(args.jobs + 10), *args.agent_arg],
            stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                for _ in range(200):
                    try:
                        if http.get("/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.05)
                time.sleep(1.0)
                c0 = cpu_seconds(proc.pid)
                time.sleep(args.idle_s)
                idle_cpu = (cpu_seconds(proc.pid) - c0) / args.idle_s * 100
                idle_rss = rss_mb(proc.pid)

                module = NOOP.read_bytes()
                sha = hashlib.sha256(module).hexdigest()
                first = http.post("/v1/jobs", json={"module": base64.b64encode(module).decode(), "entry": "noop"})
                http.get(f"/v1/jobs/{first.json()['id']}", params={"wait": 10})
                spec = {"module_sha256": sha, "entry": "noop"}
                ids: list[str] = []
                main0, proc0 = cpu_seconds(proc.pid, proc.pid), cpu_seconds(proc.pid)
                workers0 = per_worker(proc.pid, cpu_seconds)
                switches0, wswitches0 = switches(proc.pid), per_worker(proc.pid, switches)
                t0 = time.perf_counter()
                for start in range(0, args.jobs, args.batch):
                    n = min(args.batch, args.jobs - start)
                    r = http.post("/v1/jobs:batch", json={"jobs": [spec] * n})
                    results = r.json()["results"]
                    bad = [x for x in results if "error" in x]
                    if bad:
                        raise SystemExit(f"batch refused jobs: {bad[0]}")
                    ids.extend(x["job"]["id"] for x in results)
                submitted = time.perf_counter() - t0
                last = http.get(f"/v1/jobs/{ids[-1]}", params={"wait": 300}).json()
                while True:
                    listing = http.get("/v1/jobs", params={"state": "queued", "limit": 1}).json()["jobs"]
                    running = http.get("/v1/jobs", params={"state": "running", "limit": 1}).json()["jobs"]
                    placed = http.get("/v1/jobs", params={"state": "placed", "limit": 1}).json()["jobs"]
                    if not listing and not running and not placed:
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - t0
                main_cpu = cpu_seconds(proc.pid, proc.pid) - main0
                proc_cpu = cpu_seconds(proc.pid) - proc0
                workers1 = per_worker(proc.pid, cpu_seconds)
                agent_switches = switches(proc.pid) - switches0
                worker_switches = sum(c - wswitches0.get(w, 0) for w, c in per_worker(proc.pid, switches).items())
                workers_cpu_s = sum(c - workers0.get(w, 0.0) for w, c in workers1.items())
                workers_rss = sum(rss_mb(w) for w in workers1)
                # Latencies from the timelines of a sample spread over the run.
                sample = ids[:: max(1, len(ids) // 500)]
                lat = []
                states: dict[str, int] = {}
                for i in sample:
                    rec = http.get(f"/v1/jobs/{i}").json()
                    states[rec["state"]] = states.get(rec["state"], 0) + 1
                    tl = rec["timeline"]
                    lat.append((tl[-1]["at"] - tl[0]["at"]) * 1000)
                busy_rss = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    rate = args.jobs / elapsed
    print(f"(b) agent, batch API:         {rate:10.0f} noop jobs/s  ({args.jobs} jobs in {elapsed:.2f}s; "
          f"submission alone {args.jobs / submitted:.0f}/s; last job {last['state']})")
    print(f"    ratio (b)/(a):            {rate / raw_rate:10.1%}")
    print(f"    agent CPU per job:        main (trio) thread {main_cpu / args.jobs * 1e6:.0f} us, whole process "
          f"{proc_cpu / args.jobs * 1e6:.0f} us, its {len(workers1)} wasm worker processes "
          f"{workers_cpu_s / args.jobs * 1e6:.0f} us (raw loop: {1e6 / raw_rate:.0f} us wall per call)")
    print(f"    context switches per job: agent {agent_switches / args.jobs:.2f}, its wasm workers "
          f"{worker_switches / args.jobs:.2f}")
    print(f"    submit->result latency:   p50 {statistics.median(lat):.1f} ms, p99 {pct(lat, 0.99):.1f} ms "
          f"(sample of {len(sample)}; states {states})")
    print(f"    idle agent:               RSS {idle_rss:.1f} MB, CPU {idle_cpu:.2f}% over {args.idle_s:.0f}s; "
          f"RSS after the run {busy_rss:.1f} MB, its wasm workers {workers_rss:.1f} MB")


if __name__ == "__main__":
    main()
