"""The process sandbox's ordinary behaviour: exit codes, I/O, env, artifacts, masking, policies, fallbacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox import cgroups
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.sandbox.process import ProcessSandbox, ProcessSandboxConfig, doctor_checks, run_process

pytestmark = pytest.mark.root
PY = "/usr/bin/python3"


def request(command: list[str], **kw: object) -> SandboxRequest:
    limits = kw.pop("limits", {})
    assert isinstance(limits, dict)
    return SandboxRequest(
        job_id=str(kw.pop("job_id", "job-1")), runtime="process", limits=Limits(**{"wall_ms": 20_000, **limits}),
        resources=Resources(cpu=float(kw.pop("cpu", 1.0))), command=command, **kw,  # type: ignore[arg-type]
    )


async def run(sandbox: ProcessSandbox | None, req: SandboxRequest, tmp_path: Path,
              config: ProcessSandboxConfig | None = None) -> SandboxResult:
    work = tmp_path / f"w-{uuid.uuid4().hex[:6]}"
    if sandbox is None:
        return await run_process(req, work, config)
    return await sandbox.run(req, work)


@pytest.fixture(params=["cold", "warm"])
async def sandbox(request: pytest.FixtureRequest, nursery: trio.Nursery) -> ProcessSandbox:
    """Every ordinary test runs twice: in a sandbox built for the job, and in one
    taken from the warm pool (jobs it cannot serve still start cold)."""
    sb = ProcessSandbox(warm=2 if request.param == "warm" else 0)
    await nursery.start(sb.serve)
    return sb


async def test_exit_code_and_reason(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", "exit 3"]), tmp_path)
    assert (r.exit_code, r.reason, r.signal, r.limit_hit) == (3, "exit 3", None, None)
    assert r.sandbox["started"] == ("warm" if sandbox.warm else "cold")
    assert not r.succeeded
    r = await run(sandbox, request(["/bin/true"]), tmp_path)
    assert r.succeeded and r.reason == "exit 0"


async def test_death_by_signal_is_reported(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", "kill -SEGV $$"]), tmp_path)
    assert (r.exit_code, r.signal, r.reason) == (None, signal.SIGSEGV, "signal 11")


async def test_stdin_to_stdout_and_args(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    data = os.urandom(300_000)  # more than a pipe buffer, in both directions
    r = await run(sandbox, request(["/bin/cat"], stdin=data), tmp_path)
    assert r.stdout == data and r.reason == "exit 0"
    r = await run(sandbox, request(["/bin/echo", "a"], args=["b", "c d"]), tmp_path)
    assert r.stdout == b"a b c d\n"


async def test_command_is_looked_up_in_the_jobs_path(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["echo", "hi"], env={"PATH": "/usr/bin:/bin"}), tmp_path)
    assert r.stdout == b"hi\n"
    r = await run(sandbox, request(["no-such-program-xyz"]), tmp_path)
    assert r.exit_code == 127 and b"was not found" in r.stderr


async def test_environment_is_exactly_what_the_job_declares(sandbox: ProcessSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_ONLY", "leak")
    r = await run(sandbox, request(["/usr/bin/env"], env={"A": "1", "B": "two words"}, gpu_env={"CUDA_VISIBLE_DEVICES": "0"}),
                  tmp_path)
    lines = set(r.stdout.decode().splitlines())
    declared = {"A=1", "B=two words", "CUDA_VISIBLE_DEVICES=0"}
    if r.sandbox["started"] == "warm":
        assert lines == declared
    else:
        # PWD is the one variable bwrap always sets (to the working directory)
        assert lines == declared | {"PWD=/scratch"}


async def test_runs_as_an_unprivileged_user_with_no_capabilities(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", "id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status"]), tmp_path)
    out = r.stdout.decode().split()
    assert out[0] != "0"
    assert out[1:] == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1", "Seccomp:", "2"]
    assert r.sandbox["no_new_privs"] is True and r.sandbox["network"] == "loopback"
    assert {"pid", "mount", "net", "ipc", "uts"} <= set(r.sandbox["namespaces"])  # type: ignore[arg-type]


async def test_scratch_is_the_working_dir_and_is_size_capped(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    script = "pwd; dd if=/dev/zero of=big bs=1M count=8 2>&1; stat -c %s /tmp/big"
    r = await run(sandbox, request(["/bin/sh", "-c", script], limits={"scratch_mb": 2}), tmp_path)
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "/scratch"
    assert "No space left on device" in r.stdout.decode()
    assert int(lines[-1]) <= 2 * 1024 * 1024  # /tmp is the same 2 MiB tmpfs


async def test_file_size_limit(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/dd", "if=/dev/zero", "of=f", "bs=1k", "count=100"], limits={"fsize_bytes": 4096}),
                  tmp_path)
    assert r.reason == "output_limit"  # SIGXFSZ
    assert r.limit_hit == "output_limit"


async def test_an_exit_status_that_reads_as_a_limit_signal_is_no_limit(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """bwrap reports death by signal N as exit 128+N, so a job's own `exit 152` reads as
    SIGXCPU: with cgroups no RLIMIT_CPU is set, and no file reached fsize_bytes, so
    neither is a limit, and neither is signed into the attestation as one."""
    for code, sig in ((152, signal.SIGXCPU), (153, signal.SIGXFSZ)):
        r = await run(sandbox, request(["/bin/sh", "-c", f"exit {code}"]), tmp_path)
        assert (r.limit_hit, r.reason, r.signal) == (None, f"signal {int(sig)}", sig)


NOFILE_HELPER = """
import json, sys, trio
from pathlib import Path
from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox.base import SandboxRequest
from p2psched.sandbox.process import ProcessSandbox
req = SandboxRequest(job_id="nofile", runtime="process", limits=Limits(wall_ms=20_000, nofile=30_000),
                     resources=Resources(), command=["/bin/sh", "-c", "ulimit -n"])
async def main():
    sb = ProcessSandbox(warm=int(sys.argv[2]))
    async with trio.open_nursery() as n:
        await n.start(sb.serve)
        r = await sb.run(req, Path(sys.argv[1]))
        print(json.dumps({"reason": r.reason, "stdout": r.stdout.decode(), "warnings": r.warnings}))
        n.cancel_scope.cancel()
trio.run(main)
"""


@pytest.mark.parametrize("warm", [0, 2], ids=["cold", "warm"])
def test_nofile_past_the_agents_own_hard_limit_is_lowered_to_it(tmp_path: Path, warm: int) -> None:
    """The launcher runs unprivileged and cannot raise a hard limit past the agent's
    (here an agent started under `prlimit --nofile=1000`): the job gets the agent's,
    and a warning, where it got a sandbox error (cold) or failed with `exit 1` (warm)."""
    out = subprocess.run(["prlimit", "--nofile=1000:1000", sys.executable, "-c", NOFILE_HELPER, str(tmp_path / "w"),
                          str(warm)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.splitlines()[-1])
    assert (r["reason"], r["stdout"]) == ("exit 0", "1000\n")
    assert any("nofile 30000 lowered to 1000" in w for w in r["warnings"]), r["warnings"]


async def test_nofile_limit(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    src = "import os\nn=0\ntry:\n    while True: os.open('/dev/null', 0); n+=1\nexcept OSError as e: print(n, e.strerror)"
    r = await run(sandbox, request([PY, "-c", src], limits={"nofile": 40}), tmp_path)
    count, *msg = r.stdout.decode().split(" ", 1)
    assert int(count) <= 40 - 3 and msg == ["Too many open files\n"]


async def test_artifacts_are_collected_capped_and_never_followed(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    script = "echo result > out.txt; mkdir d; echo nested > d/x; ln -s /etc/passwd leak; mkfifo pipe"
    r = await run(sandbox, request(["/bin/sh", "-c", script], artifacts=["out.txt", "d/x", "leak", "pipe", "../escape", "missing"]),
                  tmp_path)
    assert r.artifacts == {"out.txt": b"result\n", "d/x": b"nested\n"}
    warned = " ".join(r.warnings)
    for name in ("leak", "pipe", "../escape", "missing"):
        assert repr(name) in warned


async def test_output_is_masked(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", "echo token=abc123 ok; echo key-999 >&2"],
                          mask_patterns=[r"token=\w+", "key-[0-9]+"]), tmp_path)
    assert r.stdout == b"[masked] ok\n" and r.stderr == b"[masked]\n"


async def test_stderr_cap(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", "head -c 5000 /dev/zero >&2; echo done"], limits={"stderr_bytes": 100}),
                  tmp_path)
    assert len(r.stderr) == 100 and r.stderr_truncated and not r.stdout_truncated


TRAP = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"


async def test_graceful_policy_sends_sigterm_first(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", TRAP], limits={"wall_ms": 500, "violation": "graceful", "grace_ms": 5000}),
                  tmp_path)
    assert r.reason == "wall_timeout"
    assert b"got-term" in r.stdout
    assert r.exit_code == 7


async def test_graceful_policy_kills_after_the_grace_period(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    stubborn = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    # wall_ms leaves the shell time to set its trap, even on a loaded host
    r = await run(sandbox, request(["/bin/sh", "-c", stubborn], limits={"wall_ms": 1500, "violation": "graceful", "grace_ms": 300}),
                  tmp_path)
    assert r.reason == "wall_timeout" and r.signal == signal.SIGKILL, (r.exit_code, r.signal)


async def test_kill_policy_gives_no_grace(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, request(["/bin/sh", "-c", TRAP], limits={"wall_ms": 500, "violation": "kill"}), tmp_path)
    assert r.reason == "wall_timeout"
    assert b"got-term" not in r.stdout
    assert r.signal == signal.SIGKILL


async def test_accounting_reports_cpu_and_memory(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    src = "x = bytearray(48 * 1024 * 1024)\nn = 0\nfor i in range(3_000_000): n += i\nprint(n)"
    r = await run(sandbox, request([PY, "-c", src], limits={"mem_bytes": 256 * 1024 * 1024}), tmp_path)
    assert r.reason == "exit 0"
    assert r.cpu_ms > 50
    assert r.peak_mem_bytes > 48 * 1024 * 1024


async def test_cancelling_the_scope_kills_the_job_and_cleans_up(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    marker = f"{uuid.uuid4().int % 100000}.5"
    req = request(["/bin/sh", "-c", f"sleep {marker} & sleep {marker}"], job_id="cancel-me")
    with trio.move_on_after(1.0) as scope:
        await run(sandbox, req, tmp_path)
    assert scope.cancelled_caught
    alive = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, f"sleep\0{marker}")]
    assert alive == []
    layout = cgroups.detect()
    for d in layout.v1_dirs.values() if layout.version == 1 else [layout.v2_dir] if layout.v2_dir else []:
        assert not [p for p in (d / cgroups.PARENT_NAME).glob("job-cancel-me-*")]
    assert not list(ProcessSandboxConfig().runtime_dir.glob("job-cancel-me-*"))


def _cmdline_has(pid: str, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def test_many_jobs_at_once(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    results: list[SandboxResult] = []

    async def one(i: int) -> None:
        results.append(await run(sandbox, request(["/bin/sh", "-c", f"sleep 0.2; echo {i}"], job_id=f"m{i}"), tmp_path))

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(one, i)
    assert sorted(int(r.stdout) for r in results) == list(range(20))


async def test_the_pool_serves_an_agent_holding_more_than_1024_descriptors(tmp_path: Path) -> None:
    """An agent running hundreds of jobs holds descriptors past select()'s limit; the
    pool's sandboxes (their pidfds numbered beyond it) must still be handed out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        sb = ProcessSandbox(warm=1)
        async with trio.open_nursery() as n:
            await n.start(sb.serve)
            r = await run(sb, request(["/bin/true"]), tmp_path)
            n.cancel_scope.cancel()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (r.reason, r.sandbox["started"]) == ("exit 0", "warm")


async def test_the_sandbox_runs_below_the_agents_priority(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """With a cgroup, bwrap and the job run at niceness 10, so building sandboxes cannot
    starve the agent's event loop; the job cannot lower it again. Without one the
    job keeps the agent's niceness: host load would starve it."""
    r = await run(sandbox, request(["/bin/sh", "-c", "nice; nice -n -5 nice"]), tmp_path)
    assert r.stdout.split() == [b"10", b"10"]
    # pids: RLIMIT_NPROC counts every process of the sandbox uid on the host
    r = await run(None, request(["/bin/sh", "-c", "nice"], limits={"pids": 4096}), tmp_path,
                  ProcessSandboxConfig(cgroups="off"))
    assert r.stdout.split() == [str(os.getpriority(os.PRIO_PROCESS, 0)).encode()]


async def test_rlimits_fallback_warns_and_still_contains(tmp_path: Path) -> None:
    cfg = ProcessSandboxConfig(cgroups="off")
    src = "b = []\nwhile True: b.append(bytearray(16 << 20))"
    r = await run(None, request([PY, "-c", src], limits={"mem_bytes": 128 << 20}), tmp_path, cfg)
    assert r.sandbox["cgroup"] is None
    assert any("rlimits only" in w for w in r.warnings)
    assert r.reason == "exit 1" and b"MemoryError" in r.stderr  # RLIMIT_AS refuses the allocation
    r = await run(None, request(["/bin/sleep", "60"], limits={"wall_ms": 300}), tmp_path, cfg)
    assert r.reason == "wall_timeout"
    r = await run(None, request([PY, "-c", "while True: pass"], limits={"cpu_ms": 1000}), tmp_path, cfg)
    assert r.reason == "cpu_limit"  # SIGXCPU from RLIMIT_CPU


async def test_without_a_user_namespace_capabilities_are_still_dropped(tmp_path: Path) -> None:
    cfg = ProcessSandboxConfig(user_namespace="off")
    r = await run(None, request(["/bin/sh", "-c", "grep -E '^CapEff:' /proc/self/status; cat /etc/shadow"]), tmp_path, cfg)
    assert r.stdout.split() == [b"CapEff:", b"0000000000000000"]
    assert r.sandbox["user_namespace"] is False
    assert b"No such file" in r.stderr


async def test_devices_listed_for_the_job_are_the_only_extra_ones(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    # No GPU here: /dev/fuse (a character device no job gets by default) stands in
    # for /dev/nvidia0 to show the bind and the device-cgroup rule work together.
    dev = "/dev/fuse"
    if not Path(dev).exists():
        pytest.skip("needs /dev/fuse as a stand-in GPU device node")
    cmd = ["/bin/sh", "-c", f"ls /dev; test -c {dev} && echo present"]
    r = await run(sandbox, request(cmd), tmp_path)
    assert b"present" not in r.stdout and b"fuse" not in r.stdout
    assert r.sandbox["device_control"] == "mount-namespace"
    r = await run(sandbox, request(cmd, gpu_devices=[dev]), tmp_path)
    assert b"present" in r.stdout
    assert r.sandbox["devices"] == [dev]
    # this machine's hierarchy is v1; v2's BPF program is tested in test_process_cgroups.py
    assert r.sandbox["device_control"] == "devices-v1"
    assert not any("device" in w for w in r.warnings)


def test_doctor_reports_every_feature() -> None:
    checks = {name: (ok, detail, fix) for name, ok, detail, fix in doctor_checks()}
    for name in ("bubblewrap", "pid namespace", "mount namespace", "net namespace", "ipc namespace",
                 "uts namespace", "user namespace", "cgroup layout", "cgroup writable", "device control", "seccomp",
                 "limits fallback"):
        assert name in checks
        ok, detail, fix = checks[name]
        assert detail and fix
    # this machine has all of them
    assert all(ok for ok, _, _ in checks.values()), {k: v for k, v in checks.items() if not v[0]}


async def test_a_large_environment_arrives_whole(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    # ~200 KiB: more than a pipe buffer, so the warm hand-over must not block the loop on it
    env = {f"V{i}": "x" * 200 for i in range(1000)}
    r = await run(sandbox, request(["/usr/bin/env"], env=env), tmp_path)
    got = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    got.pop("PWD", None)
    assert got == env


async def test_stopping_serve_leaves_nothing_behind(tmp_path: Path) -> None:
    sb = ProcessSandbox(warm=2)
    async with trio.open_nursery() as n:
        await n.start(sb.serve)
        async with trio.open_nursery() as jobs:
            for i in range(6):
                jobs.start_soon(run, sb, request(["/bin/true"], job_id=f"leak-check-{i}"), tmp_path)
        n.cancel_scope.cancel()  # with finished jobs' cleanups and the pool still pending
    pid = os.getpid()
    runtime = ProcessSandboxConfig().runtime_dir
    assert not list(runtime.glob("job-leak-check-*")) and not list(runtime.glob(f"job-warm-{pid}-*"))
    layout = cgroups.detect()
    roots = list(layout.v1_dirs.values()) if layout.version == 1 else [layout.v2_dir] if layout.v2_dir else []
    for r in roots:
        assert not list((r / cgroups.PARENT_NAME).glob("job-leak-check-*"))
        assert not list((r / cgroups.PARENT_NAME).glob(f"job-warm-{pid}-*"))


def test_a_launch_refused_in_a_container_says_how_to_start_the_container():
    # In the default compose cluster a process job failed after its retries with bwrap's
    # own words only, "Creating new namespace failed", which do not say what to change.
    from p2psched.sandbox.process import launch_error

    said = "bwrap: Creating new namespace failed: Operation not permitted"
    assert launch_error(said, in_container=False) == (
        f"the sandbox launcher (bwrap) failed before the job started: {said}")
    hint = launch_error(said, in_container=True)
    assert hint.startswith(f"the sandbox launcher (bwrap) failed before the job started: {said}; ")
    assert "deploy/compose.process-sandbox.yaml" in hint and "P2PSCHED_PROCESS_SANDBOX=1" in hint


async def test_stopping_a_sandbox_whose_bwrap_already_exited_reaps_it_once():
    """A sandbox stopped before bwrap reported its PID 1, with bwrap gone meanwhile (a
    warm one cut short by Ctrl-C): killing it through Popen.kill() polled, and so
    reaped, bwrap, and the wait that followed failed with ECHILD."""
    from p2psched.sandbox.process import _Job

    job = _Job.__new__(_Job)  # the parts of a sandbox this stop looks at, around a real child
    job.popen = subprocess.Popen(["/bin/sh", "-c", "exit 3"], start_new_session=True)
    job.monitor_pidfd = os.pidfd_open(job.popen.pid)
    job.init_pidfd, job.reaped = None, None
    try:
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(job.monitor_pidfd)  # it has exited, not yet reaped
        job.kill_all()
        with trio.fail_after(10):
            status, _ = await job._wait_monitor()
        assert os.waitstatus_to_exitcode(status) == 3 and job.popen.returncode == 3
    finally:
        os.close(job.monitor_pidfd)
