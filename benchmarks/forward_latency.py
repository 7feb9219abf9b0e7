"""Submit -> start latency through one forward, on loopback, against a local start.

    .venv/bin/python benchmarks/forward_latency.py [--jobs 200] [--tls]

Two real agents (1 CPU slot each). Baseline: jobs submitted to agent B start on B
itself. Measured: agent A is kept busy, so each job submitted to A is placed on B,
offered over the transfer service, accepted, and started there. Latency is the
time between the `submitted` and `running` entries of each job's timeline (one
clock: both agents run on this host). Target: p50 <= 5 ms through one forward.
``--tls`` runs the agents as production does, with mutual TLS between them and an
encrypted gossip key, instead of ``--insecure``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from agents import (  # noqa: E402
    FAST_MEMBERSHIP, AgentProcess, new_agent, start_cluster, stop_all, wait_converged, wasm_spec,
)


def latency_ms(rec: dict) -> float:
    at = {t["state"]: t["at"] for t in rec["timeline"] if t["state"] in ("submitted", "running")}
    return (at["running"] - at["submitted"]) * 1000


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(http, n: int, spec: dict) -> tuple[list[float], set[str]]:
    lat, executors = [], set()
    for _ in range(n):
        job = http.post("/v1/jobs", json=spec).json()["id"]
        rec = http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
        lat.append(latency_ms(rec))
        executors.add(rec["executor"])
    return lat, executors


def start_tls_cluster(tmp: Path, ids: list[str]) -> list[AgentProcess]:
    """The agents with a cluster CA, node certificates and a gossip key, as deployed."""
    def cli(*args: object) -> None:
        subprocess.run([sys.executable, "-m", "p2psched", *map(str, args)], check=True, capture_output=True)

    cli("ca", "init", "--out", tmp / "ca")
    cli("keygen", "--gossip", "-o", tmp / "gossip.key")
    agents: list[AgentProcess] = []
    for node in ids:
        cli("cert", "issue", node, "--ca", tmp / "ca", "--out", tmp / "tls" / node)
        a = new_agent(tmp, node, "--cpus", "1", "--tls-dir", str(tmp / "tls" / node),
                      "--gossip-key", str(tmp / "gossip.key"))
        a.extra.remove("--insecure")
        a.env["P2PSCHED_MEMBERSHIP"] = json.dumps(FAST_MEMBERSHIP)
        if agents:
            a.extra += ["--join", agents[0].gossip]
        agents.append(a.start())
    wait_converged(agents)
    return agents


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--tls", action="store_true", help="mutual TLS and a gossip key instead of --insecure")
    args = ap.parse_args()
    spec = wasm_spec("hello.wasm")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tls:
            agents = start_tls_cluster(Path(tmp), ["a", "b"])
        else:
            agents = start_cluster(Path(tmp), ["a", "b"], "--cpus", "1")
        try:
            a, b = agents
            with a.client() as ha, b.client() as hb:
                run(hb, 20, spec)  # warm both paths (module compile, connections)
                local, _ = run(hb, args.jobs, spec)
                busy = ha.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 600_000})).json()["id"]
                while ha.get(f"/v1/jobs/{busy}").json()["state"] != "running":
                    time.sleep(0.05)
                time.sleep(1.0)
                run(ha, 20, spec)
                fwd, executors = run(ha, args.jobs, spec)
                ha.delete(f"/v1/jobs/{busy}")
        finally:
            stop_all(agents)
    print(f"local start (baseline):   p50 {statistics.median(local):6.2f} ms  p99 {pct(local, 0.99):6.2f} ms")
    print(f"through one forward:      p50 {statistics.median(fwd):6.2f} ms  p99 {pct(fwd, 0.99):6.2f} ms  "
          f"(executors: {sorted(executors)})")
    print(f"forward adds:             p50 {statistics.median(fwd) - statistics.median(local):6.2f} ms")


if __name__ == "__main__":
    main()
