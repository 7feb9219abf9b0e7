"""Cancelling a sweep: one DELETE a job against one POST /v1/jobs:cancel, in one run.

    .venv/bin/python benchmarks/cancel_sweep.py [--jobs 5000]

One real agent subprocess with one CPU slot, held by a looping guest, so that every
job of the two sweeps stays queued. Each sweep has --jobs noop jobs with its own
label. The baseline cancels sweep "a" as `p2psched cancel --label` did before
jobs:cancel existed: it lists the sweep, then sends one DELETE per job. Sweep "b"
is cancelled by label, 1,000 jobs a request, as `p2psched cancel --label` does now.
Both are timed from the first request to the last answer, and every job of both
must end cancelled.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from agents import new_agent  # noqa: E402

WASM = Path(__file__).resolve().parent.parent / "examples" / "wasm"


def submit_sweep(http: httpx.Client, label: str, n: int, sha: str) -> list[str]:
    ids: list[str] = []
    spec = {"module_sha256": sha, "entry": "noop", "labels": {"sweep": label}}
    for start in range(0, n, 1000):
        results = http.post("/v1/jobs:batch", json={"jobs": [spec] * min(1000, n - start)}).json()["results"]
        if "error" in results[0]:
            raise SystemExit(f"batch refused: {results[0]}")
        ids += [r["job"]["id"] for r in results]
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        agent = new_agent(Path(tmp), "bench", "--cpus", "1", "--queue-limit", str(2 * args.jobs + 10),
                          "--log-level", "warning").start()
        try:
            with httpx.Client(base_url=agent.url, timeout=300) as http:
                loop = http.post("/v1/jobs", json={"module": base64.b64encode((WASM / "loop.wasm").read_bytes())
                                                   .decode(), "limits": {"wall_ms": 600_000}}).json()
                while http.get(f"/v1/jobs/{loop['id']}").json()["state"] != "running":
                    time.sleep(0.01)
                noop = (WASM / "noop.wasm").read_bytes()
                carrier = http.post("/v1/jobs", json={"module": base64.b64encode(noop).decode(), "entry": "noop"})
                assert carrier.status_code == 202, carrier.text  # it waits behind the loop and holds the module
                sha = hashlib.sha256(noop).hexdigest()
                a = submit_sweep(http, "a", args.jobs, sha)
                b = submit_sweep(http, "b", args.jobs, sha)

                t0 = time.perf_counter()
                listed: list[str] = []
                cursor = None
                while True:
                    page = http.get("/v1/jobs", params={"label": "sweep=a", "state": "queued", "limit": 1000,
                                                        **({"cursor": cursor} if cursor else {})}).json()
                    listed += [j["id"] for j in page["jobs"]]
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
                for job_id in listed:
                    assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
                one_by_one = time.perf_counter() - t0

                t0 = time.perf_counter()
                requests = 0
                while True:
                    answer = http.post("/v1/jobs:cancel", json={"labels": {"sweep": "b"}, "limit": 1000}).json()
                    requests += 1
                    if not answer["more"]:
                        break
                by_label = time.perf_counter() - t0

                states = http.post("/v1/jobs:wait", json={"ids": a + b}).json()["results"]
                assert sorted(listed) == sorted(a)
                assert all(s["job"]["state"] == "cancelled" for s in states), "a job of a sweep was not cancelled"
        finally:
            agent.stop()
    n = args.jobs
    print(f"baseline, list + one DELETE a job: {n} queued jobs in {one_by_one:6.2f} s  ({n / one_by_one:8.0f} jobs/s)")
    print(f"POST /v1/jobs:cancel by label:     {n} queued jobs in {by_label:6.2f} s  ({n / by_label:8.0f} jobs/s, "
          f"{requests} requests)")
    print(f"speed-up:                          {one_by_one / by_label:6.1f}x")


if __name__ == "__main__":
    main()
