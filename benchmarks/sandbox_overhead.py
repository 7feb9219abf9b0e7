"""What the process sandbox costs, measured against a bare subprocess in the same run.

    sudo .venv/bin/python benchmarks/sandbox_overhead.py [--samples 200] [--jobs 1000] [--sleep 90]

Prints:
  1. /bin/true as a bare subprocess (trio.run_process) vs in the sandbox, cold
     and from the warm pool: p50/p99 latency and the extra cost over bare (target:
     <= 5 ms p50, <= 10 ms p99), plus bwrap alone with the same namespaces, to show
     where the time goes. Samples are interleaved, 50 ms apart so the pool refills.
  2. ``--jobs N`` sleeping process jobs submitted in one batch to one real agent
     (in this process, with --cpus N: every job fits at once): failures, how long
     until all N run, and the agent's event-loop lag (a task sleeping 1 ms records
     its overshoot) from submission to the last result (target: 0 failures, p99 < 10 ms).
  3. Memory per running sandbox: the PSS of its three processes (bwrap's monitor
     and init, the job), what its cgroup is charged, and the host's MemAvailable
     drop divided by N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2psched.jobs.spec import Limits, Resources  # noqa: E402
from p2psched.sandbox import cgroups  # noqa: E402
from p2psched.sandbox.base import SandboxRequest  # noqa: E402
from p2psched.sandbox.process import ProcessSandbox, reap_stale, run_process  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def count_sleeps(arg: str) -> int:
    want = f"/bin/sleep\0{arg}\0".encode()
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += Path(f"/proc/{pid}/cmdline").read_bytes() == want
            except OSError:
                pass
    return n


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def req(command: list[str], job_id: str, wall_ms: int = 60_000) -> SandboxRequest:
    return SandboxRequest(job_id=job_id, runtime="process", limits=Limits(wall_ms=wall_ms), resources=Resources(cpu=1),
                          command=command, env={"PATH": "/usr/bin:/bin"})


BWRAP_ONLY = [
    "bwrap", "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
    "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
    "--", "/bin/true",
]


async def latency(samples: int, work: Path, sandbox: ProcessSandbox) -> None:
    bare: list[float] = []
    boxed: list[float] = []
    bwrap: list[float] = []
    warm: list[float] = []
    await run_process(req(["/bin/true"], "warmup"), work / "warm")
    for i in range(samples):
        t = time.perf_counter()
        await trio.run_process(["/bin/true"])
        bare.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        r = await run_process(req(["/bin/true"], f"lat{i}"), work / f"lat{i}")
        boxed.append((time.perf_counter() - t) * 1000)
        assert r.reason == "exit 0", r
        t = time.perf_counter()
        await trio.run_process(BWRAP_ONLY, user=65534, group=65534, extra_groups=[])
        bwrap.append((time.perf_counter() - t) * 1000)
        # the pool refills between samples (outside the timing), as it does between
        # jobs that do not arrive all at once
        await trio.sleep(0.05)
        t = time.perf_counter()
        r = await sandbox.run(req(["/bin/true"], f"warm{i}"), work / f"warm{i}")
        warm.append((time.perf_counter() - t) * 1000)
        assert r.reason == "exit 0" and r.sandbox["started"] == "warm", r
    b50, b99 = pct(bare, 0.5), pct(bare, 0.99)
    s50, s99 = pct(boxed, 0.5), pct(boxed, 0.99)
    w50, w99 = pct(bwrap, 0.5), pct(bwrap, 0.99)
    h50, h99 = pct(warm, 0.5), pct(warm, 0.99)
    print(f"/bin/true, {samples} samples each, interleaved (ms)")
    print(f"  bare subprocess          p50 {b50:6.2f}  p99 {b99:6.2f}")
    print(f"  bwrap alone (same ns)    p50 {w50:6.2f}  p99 {w99:6.2f}")
    print(f"  sandboxed, cold          p50 {s50:6.2f}  p99 {s99:6.2f}   overhead p50 {s50 - b50:6.2f}  p99 {s99 - b99:6.2f}")
    print(f"  sandboxed, warm pool     p50 {h50:6.2f}  p99 {h99:6.2f}   overhead p50 {h50 - b50:6.2f}  p99 {h99 - b99:6.2f}")
    print("  (target: overhead <= 5 ms p50, <= 10 ms p99)")


def cgroup_memory(pid: int) -> int:
    """What the memory cgroup of ``pid`` is charged (v1 usage_in_bytes or v2 memory.current)."""
    v1 = cgroups.detect().version == 1
    own = next(x.split(":", 2)[2] for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
               if (x.split(":")[1].split(",").count("memory") if v1 else x.startswith("0::")))
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, superopts = right.split()[0], right.split()[2].split(",")
        if (v1 and fstype == "cgroup" and "memory" in superopts) or (not v1 and fstype == "cgroup2"):
            d = Path(left.split()[4]) / own.lstrip("/")
            return int((d / ("memory.usage_in_bytes" if v1 else "memory.current")).read_text())
    raise OSError("no memory cgroup mounted")


def memory_of(marker: str) -> dict[str, float]:
    """Memory of the running sandboxes whose job is ``sleep MARKER`` (run in a child process).

    Per sandbox: the PSS of its three processes (bwrap's monitor and init, the job),
    for a sample of 200, and what its cgroup is charged (the job's pages and the
    kernel objects made for it).
    """
    import psutil

    jobs = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["/bin/sleep", marker]]
    sample = jobs[:: max(1, len(jobs) // 200)]
    pss, sampled = 0, 0
    for job in sample:
        try:
            init = job.parent()
            monitor = init.parent() if init is not None else None
            procs = [x for x in (job, init, monitor) if x is not None]
            pss += sum(x.memory_full_info().pss for x in procs)
            sampled += 1
        except psutil.Error:
            continue  # exited meanwhile
    usages = []
    for job in sample:
        with contextlib.suppress(OSError, StopIteration):
            usages.append(cgroup_memory(job.pid))
    return {"jobs": len(jobs), "pss": pss / max(sampled, 1), "cgroup": statistics.mean(usages) if usages else 0.0}


async def concurrent(n: int, sleep_s: float, work: Path) -> None:
    """``n`` sleeping process jobs submitted in one batch to one real agent (in this
    process, so the probe below measures the agent's own event loop)."""
    import httpx

    from p2psched.agent.agent import Agent
    from p2psched.config import load_settings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from agents import free_port

    marker = f"{sleep_s:.3f}"
    port = free_port()
    # every job fits at once: one CPU slot and 64 MiB each, advertised n times over
    settings = load_settings(
        node_id="bench", api=f"127.0.0.1:{port}", gossip=f"127.0.0.1:{free_port()}",
        transfer=f"127.0.0.1:{free_port()}", data_dir=work / f"agent-{os.getpid()}", insecure=True, no_mdns=True,
        cpus=n, mem_mb=64 * n + 1024, queue_limit=n + 10,
    )
    spec = {"runtime": "process", "command": ["/bin/sleep", marker], "env": {"PATH": "/usr/bin:/bin"},
            "resources": {"cpu": 1, "mem_mb": 64},
            "limits": {"mem_bytes": 64 << 20, "wall_ms": int(sleep_s * 1000) + 600_000}}
    lags: list[float] = []
    recording = [False]
    agent = Agent(settings)

    async def lag_probe() -> None:
        while True:
            t = trio.current_time()
            await trio.sleep(0.001)
            if recording[0]:
                lags.append((trio.current_time() - t - 0.001) * 1000)

    def submit() -> list[str]:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            r = http.post("/v1/jobs:batch", json={"jobs": [spec] * n})
            r.raise_for_status()
            results = r.json()["results"]
        bad = [x for x in results if "error" in x]
        if bad:
            raise SystemExit(f"the agent refused jobs: {bad[0]}")
        return [x["job"]["id"] for x in results]

    async def count_running() -> int:
        p = await trio.run_process(["pgrep", "-c", "-x", "-f", f"/bin/sleep {marker}"], capture_stdout=True,
                                   check=False)
        return int(p.stdout.strip() or 0)

    avail_before = meminfo("MemAvailable")
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        nursery.start_soon(lag_probe)
        recording[0] = True
        t0 = time.perf_counter()
        ids = await trio.to_thread.run_sync(submit)
        t_submitted = time.perf_counter() - t0
        t_started = None
        max_seen = 0
        mem: dict[str, float] = {}
        while True:
            recs = [agent.get(i) for i in ids]
            if all(r.state.final for r in recs):
                break
            if t_started is None:
                c = await count_running()
                max_seen = max(max_seen, c)
                if c >= n:
                    t_started = time.perf_counter() - t0
                    recording[0] = False  # the memory probe's own CPU is not the agent's lag
                    mem = {"avail_drop": (avail_before - meminfo("MemAvailable")) / n,
                           "agent_fds": len(os.listdir("/proc/self/fd")), "agent_threads": threading.active_count()}
                    p = await trio.run_process([sys.executable, __file__, "--memory-of", marker], capture_stdout=True)
                    mem.update(json.loads(p.stdout))
                    recording[0] = True
            await trio.sleep(1.0)
        total = time.perf_counter() - t0
        recording[0] = False
        agent.request_stop()
        await agent.stopped.wait()
        nursery.cancel_scope.cancel()
    reasons: dict[str, int] = {}
    for r in recs:
        key = f"{r.state.value}: {r.result.reason if r.result else '-'}"
        reasons[key] = reasons.get(key, 0) + 1
    failures = n - reasons.get("succeeded: exit 0", 0)
    print(f"{n} concurrent 'sleep {sleep_s}' process jobs through one agent (batch submit took {t_submitted:.2f} s)")
    print(f"  failures                 {failures}   {reasons}")
    if t_started is not None:
        print(f"  all {n} running after     {t_started:6.2f} s; all done after {total:6.2f} s")
    else:
        print(f"  NOT all running at once: at most {max_seen} were (raise --sleep); all done after {total:6.2f} s")
    print(f"  agent event-loop lag     p50 {pct(lags, 0.5):6.2f}  p99 {pct(lags, 0.99):6.2f}  max {max(lags):6.2f} ms"
          f"   ({len(lags)} samples of a 1 ms sleep; target p99 < 10)")
    if mem:
        print(f"  memory per sandbox       {mem['pss'] / 2**20:6.2f} MiB PSS of bwrap's monitor and init and the job")
        print(f"                           {mem['cgroup'] / 2**20:6.2f} MiB charged to its cgroup (the job's pages "
              "and kernel objects)")
        print(f"                           {mem['avail_drop'] / 2**20:6.2f} MiB host MemAvailable drop per job "
              "(noisy on a shared host)")
        print(f"  agent with all running   {mem['agent_fds']:.0f} open fds, {mem['agent_threads']:.0f} threads")


async def main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    reap_stale()  # as the agent does at start: also probes the host once
    print(f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]} on {os.cpu_count()} CPUs")
    sandbox = ProcessSandbox(warm=args.warm)
    async with trio.open_nursery() as nursery:
        await nursery.start(sandbox.serve)
        if args.samples:
            await latency(args.samples, work, sandbox)
        nursery.cancel_scope.cancel()
    if args.jobs:
        await concurrent(args.jobs, args.sleep, work)
    print(f"load average at end:   {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    import resource

    if sys.argv[1:2] == ["--memory-of"]:
        print(json.dumps(memory_of(sys.argv[2])))
        raise SystemExit(0)
    # each running job holds ~5 descriptors in the agent (pipes, pidfds)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--sleep", type=float, default=15.0)
    ap.add_argument("--warm", type=int, default=4, help="warm pool size (0: every job cold)")
    ap.add_argument("--work", default="/tmp/p2psched-bench-sandbox")
    trio.run(main, ap.parse_args())
