"""What the process sandbox costs, measured against a bare subprocess in the same run.

    sudo .venv/bin/python benchmarks/sandbox_overhead.py [--samples 200] [--jobs 1000] [--sleep 15]

Prints:
  1. /bin/true as a bare subprocess (trio.run_process) vs in the sandbox:
     p50/p99 latency and the extra cost (target: <= 5 ms p50, <= 10 ms p99),
     plus bwrap alone with the same namespaces, to show where the time goes.
  2. N concurrent sleeping sandboxed jobs on one trio loop: failures, and the
     loop's lag p99 while they start, run and finish (target: 0 failures, < 10 ms).
  3. Memory per running sandbox: the host's MemAvailable drop divided by N
     (kernel objects included: namespaces, cgroups, page tables) and the
     processes' own PSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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


async def concurrent(n: int, sleep_s: float, work: Path, sandbox: ProcessSandbox) -> None:
    lags: list[float] = []
    failures: list[str] = []
    marker = f"{sleep_s:.3f}"
    done_any: list[int] = []
    max_seen = 0
    running = 0
    peak_running = 0
    all_started = trio.Event()
    avail_before = meminfo("MemAvailable")
    mem_at_peak: dict[str, float] = {}

    async def lag_probe() -> None:
        while True:
            t = trio.current_time()
            await trio.sleep(0.001)
            lags.append((trio.current_time() - t - 0.001) * 1000)

    async def one(i: int) -> None:
        nonlocal running, peak_running
        running += 1
        peak_running = max(peak_running, running)
        try:
            r = await sandbox.run(req(["/bin/sleep", marker], f"c{i}", wall_ms=int(sleep_s * 1000) + 120_000),
                                  work / f"c{i}")
            if r.reason != "exit 0":
                failures.append(f"{i}: {r.reason} {r.stderr[:200]!r}")
        except Exception as e:  # a failure is a figure to report, not a crash
            failures.append(f"{i}: {e!r}")
        finally:
            running -= 1
            done_any.append(i)

    def sample_memory() -> None:
        # off the trio thread: reading smaps of thousands of processes takes a while
        mem_at_peak["avail_drop"] = (avail_before - meminfo("MemAvailable")) / n
        layout = cgroups.detect()
        mdir = layout.v2_dir if layout.version == 2 else layout.v1_dirs.get("memory")
        name = "memory.current" if layout.version == 2 else "memory.usage_in_bytes"
        if mdir is not None:
            usages = [int((d / name).read_text()) for d in (mdir / cgroups.PARENT_NAME).glob("job-c*")
                      if (d / name).exists()]
            if usages:
                mem_at_peak["cgroup"] = statistics.mean(usages)
        try:
            import psutil

            kids = psutil.Process().children(recursive=True)
            pss, sampled = 0, 0
            for p in kids[:300]:
                try:
                    pss += p.memory_full_info().pss
                    sampled += 1
                except psutil.Error:
                    continue  # exited meanwhile
            mem_at_peak["pss"] = pss / max(sampled, 1) * len(kids) / n
            mem_at_peak["procs"] = len(kids) / n
        except Exception as e:
            print("  (PSS not measured:", e, ")")

    async def measure_memory() -> None:
        await all_started.wait()
        await trio.sleep(1.0)
        await trio.to_thread.run_sync(sample_memory)

    t0 = time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(lag_probe)
        outer.start_soon(measure_memory)
        async with trio.open_nursery() as jobs:
            for i in range(n):
                jobs.start_soon(one, i)
                if i % 50 == 49:
                    await trio.sleep(0)
            # wait until every job's program is running (count the sleeps by their
            # argument), or until the first ones are done
            t_started = None
            while not done_any:
                c = await trio.to_thread.run_sync(count_sleeps, marker)
                max_seen = max(max_seen, c)
                if c >= n:
                    t_started = time.perf_counter() - t0
                    break
                await trio.sleep(1.0)  # a /proc scan holds the GIL for a while
            all_started.set()
        outer.cancel_scope.cancel()
    total = time.perf_counter() - t0
    print(f"{n} concurrent sandboxed 'sleep {sleep_s}' jobs")
    print(f"  failures                 {len(failures)}")
    for f in failures[:5]:
        print("    ", f)
    if t_started is not None:
        print(f"  all {n} running after     {t_started:6.2f} s; all done after {total:6.2f} s")
    else:
        print(f"  NOT all running at once: at most {max_seen} were (raise --sleep); all done after {total:6.2f} s")
    print(f"  event-loop lag           p50 {pct(lags, 0.5):6.2f}  p99 {pct(lags, 0.99):6.2f}  max {max(lags):6.2f} ms"
          "   (target p99 < 10)")
    if "cgroup" in mem_at_peak:
        print(f"  memory per sandbox       {mem_at_peak['cgroup'] / 2**20:6.2f} MiB charged to its cgroup "
              "(the job's pages and kernel objects)")
    if "pss" in mem_at_peak:
        print(f"                           {mem_at_peak['pss'] / 2**20:6.2f} MiB PSS of its "
              f"{mem_at_peak['procs']:.1f} processes (bwrap monitor, bwrap init, the job)")
    if "avail_drop" in mem_at_peak:
        print(f"                           {mem_at_peak['avail_drop'] / 2**20:6.2f} MiB host MemAvailable drop per job "
              "(noisy on a shared host)")


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
        if args.jobs:
            await concurrent(args.jobs, args.sleep, work, sandbox)
        nursery.cancel_scope.cancel()
    print(f"load average at end:   {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    import resource

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
