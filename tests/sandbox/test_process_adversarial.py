"""Every breakout attempt from the issue, run as a real guest in a real sandbox.

Each guest lives in ``adversarial/`` and reports what each of its attempts met;
the test asserts containment, and that the host (this test process, its files,
its other processes) is untouched. Needs root, bubblewrap and cgroups, as the
agent does.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.sandbox import cgroups
from p2psched.sandbox.process import ProcessSandbox, ProcessSandboxConfig, reap_stale

pytestmark = pytest.mark.root
GUESTS = Path(__file__).parent / "adversarial"
PY = "/usr/bin/python3"


def guest(name: str, *args: str) -> list[str]:
    return [PY, "-c", (GUESTS / f"{name}.py").read_text(), *args]


@pytest.fixture(params=["cold", "warm"])
async def sandbox(request: pytest.FixtureRequest, nursery: trio.Nursery) -> ProcessSandbox:
    """Each attempt runs in a sandbox built for it and in one from the warm pool."""
    sb = ProcessSandbox(warm=2 if request.param == "warm" else 0)
    await nursery.start(sb.serve)
    return sb


async def run(sandbox: ProcessSandbox, command: list[str], tmp_path: Path, *, cpu: float = 1.0, network: bool = False,
              stdin: bytes = b"", **limits: object) -> SandboxResult:
    lim = {"wall_ms": 20_000, **limits}
    req = SandboxRequest(
        job_id="adv", runtime="process", limits=Limits(**lim), resources=Resources(cpu=cpu),
        command=command, env={"PATH": "/usr/bin:/bin"}, network=network, stdin=stdin,
    )
    return await sandbox.run(req, tmp_path / f"work-{uuid.uuid4().hex[:6]}")


def host_procs_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def report(r: SandboxResult) -> dict:
    assert r.stdout, f"guest printed nothing; reason={r.reason} stderr={r.stderr.decode(errors='replace')}"
    return json.loads(r.stdout.decode().splitlines()[0])


async def test_1_writes_outside_scratch_fail(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    target = tmp_path / "host-file.txt"
    target.write_text("original")
    r = await run(sandbox, guest("escape_fs", str(target)), tmp_path)
    out = report(r)
    assert out.pop("scratch") == "wrote"
    assert all(v != "wrote" for v in out.values()), out
    assert target.read_text() == "original"
    assert not Path("/etc/pwned").exists() and not Path("/usr/pwned").exists() and not Path("/pwned").exists()
    assert r.reason == "exit 0"


async def test_2_host_secrets_are_unreadable(sandbox: ProcessSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"agent-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("P2PSCHED_TEST_SECRET", secret)
    r = await run(sandbox, guest("read_secrets", str(os.getpid())), tmp_path)
    out = report(r)
    assert out["/etc/shadow"] == "No such file or directory"
    assert out["/etc/gshadow"] == "No such file or directory"
    assert out[f"/proc/{os.getpid()}/environ"] == "No such file or directory"
    assert secret not in out["environ"]
    # Only the job's own namespace is visible: bwrap's init, python, nothing of the host's.
    assert out["pids"] == [1, 2]


async def test_3_other_processes_cannot_be_signalled_or_traced(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        r = await run(sandbox, guest("signal_ptrace", str(bystander.pid)), tmp_path)
        out = report(r)
        assert out["kill_host_pid"] == "No such process"
        assert out["ptrace_init"] == "Operation not permitted"
        assert out["ptrace_traceme"] == "Operation not permitted"
        assert out["kill_minus_1"] == "No such process"  # nobody else in its namespace
        assert r.reason == "exit 0"
        assert bystander.poll() is None, "a host process died of the job's kill -1"
        os.kill(os.getpid(), 0)
    finally:
        bystander.kill()
        bystander.wait()


async def test_4_no_network_but_its_own_loopback(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        r = await run(sandbox, guest("network", str(port)), tmp_path)
        out = report(r)
        assert out["agent_port"] == "Connection refused"  # the job's own, empty loopback
        assert out["outside"] == "Network is unreachable"
        assert out["outside6"] in ("Network is unreachable", "Cannot assign requested address")
        assert out["interfaces"] == ["lo"]
        # The network capability keeps the host network: the same connect succeeds.
        r = await run(sandbox, guest("network", str(port)), tmp_path, network=True)
        assert report(r)["agent_port"] == "connected"
    finally:
        listener.close()


async def test_5_fork_bomb_is_contained(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, guest("fork_bomb"), tmp_path, pids=32, wall_ms=15_000)
    assert r.reason == "pids_limit"
    assert r.limit_hit == "pids_limit"


async def test_6_memory_bomb_is_contained(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, guest("memory_bomb"), tmp_path, mem_bytes=64 * 1024 * 1024)
    assert r.reason == "memory_limit"
    assert r.peak_mem_bytes <= 64 * 1024 * 1024 + 4096
    assert r.peak_mem_bytes > 16 * 1024 * 1024


async def test_7_cpu_spin_hits_the_cpu_limit(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, guest("cpu_spin"), tmp_path, cpu_ms=300, wall_ms=20_000, cpu=0.5)
    assert r.reason == "cpu_limit"
    assert r.cpu_ms >= 300


async def test_8_sleeping_forever_hits_the_wall_clock(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, ["/bin/sleep", "infinity"], tmp_path, wall_ms=300)
    assert r.reason == "wall_timeout"
    assert r.limit_hit == "wall_timeout"


@pytest.mark.parametrize("lingers", [False, True], ids=["job-exits", "job-killed"])
async def test_9_double_forked_daemon_dies_with_its_job(sandbox: ProcessSandbox, tmp_path: Path, lingers: bool) -> None:
    marker = f"{uuid.uuid4().int % 100000}.{uuid.uuid4().int % 1000}"
    args = [marker, "60"] if lingers else [marker]
    r = await run(sandbox, guest("daemon", *args), tmp_path, wall_ms=1000 if lingers else 20_000)
    assert b"daemon started" in r.stdout
    assert r.reason == ("wall_timeout" if lingers else "exit 0")
    assert host_procs_with(f"sleep\0{marker}") == []


async def test_10_stdout_flood_is_cut_and_flagged(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    r = await run(sandbox, ["/usr/bin/yes", "flood"], tmp_path, stdout_bytes=10_000)
    assert r.stdout_truncated
    assert len(r.stdout) == 10_000
    assert r.reason == "output_limit"  # yes died of SIGPIPE once the pipe was closed


async def test_11_only_stdio_is_inherited(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_r, True)
    os.set_inheritable(leaked_w, True)
    try:
        r = await run(sandbox, guest("fd_leak"), tmp_path)
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    assert report(r)["fds"] == [0, 1, 2]


async def test_12_setuid_binary_grants_nothing(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    suid = bindir / "id"
    suid.write_bytes(Path("/usr/bin/id").read_bytes())
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    assert suid.stat().st_mode & stat.S_ISUID
    r = await run(sandbox, [str(suid), "-u"], tmp_path)
    assert r.reason == "exit 0", r.stderr
    assert r.stdout.strip() != b"0"


async def test_12_a_program_outside_the_system_dirs_brings_only_itself(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    # Its directory used to be bound at /job/bin: a program at /x showed the job the
    # host's whole /, the agent's data dir (other tenants' specs) with it.
    bindir = tmp_path / "tools"
    bindir.mkdir()
    (bindir / "secret.txt").write_text("another tenant's token\n")
    prog = bindir / "list"
    prog.write_text("#!/bin/sh\nls -a /job/bin; cat /job/bin/secret.txt\n")
    prog.chmod(0o755)
    r = await run(sandbox, [str(prog)], tmp_path)
    assert r.stdout.split() == [b".", b"..", b"list"], (r.stdout, r.stderr)
    assert b"token" not in r.stdout and b"No such file" in r.stderr
    # a path through /proc/self names the file the agent checked, in the system dirs
    r = await run(sandbox, ["/proc/self/root/../usr/bin/id", "-u"], tmp_path)
    assert r.reason == "exit 0", r.stderr


async def test_12_mount_unshare_keyctl_are_refused(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    out = report(await run(sandbox, guest("privileged_calls"), tmp_path))
    assert out == {k: "Operation not permitted" for k in out}, out
    assert len(out) == 14


async def test_13_sysv_shared_memory_is_private_to_a_job(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    results: dict[str, SandboxResult] = {}

    async def one(role: str, *args: str) -> None:
        results[role] = await run(sandbox, guest("sysv_shm", role, *args), tmp_path)

    async with trio.open_nursery() as n:
        n.start_soon(one, "create", "1.5")
        await trio.sleep(0.7)
        n.start_soon(one, "find")
    assert report(results["create"])["created"] >= 0
    found = report(results["find"])
    assert found["found"] == -1 and found["error"] == 2  # ENOENT
    host = subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    assert "0x50325053" not in host


async def test_15_a_job_can_take_no_pseudo_terminal(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """Every devpts instance draws on the host's one kernel.pty.max: a job that could
    open ptys could leave none to other jobs and containers."""
    r = await run(sandbox, guest("pty_hog"), tmp_path)
    out = report(r)
    assert out["openpty"] == out["ptmx"] == "No such file or directory"
    assert out["write_pts"] == "Read-only file system"
    assert out["null"] is True  # the rest of /dev is there
    assert r.reason == "exit 0"


async def test_16_jobs_do_not_share_per_user_kernel_limits(sandbox: ProcessSandbox, tmp_path: Path) -> None:
    """The kernel counts inotify instances (and pipe pages, user namespaces) per host
    uid: with every job as nobody, one job that took them all left none to the rest.
    Each sandbox runs as a host uid of its own."""
    most = min(int(Path("/proc/sys/fs/inotify/max_user_instances").read_text()), 4096)
    results: dict[str, SandboxResult] = {}

    async def one(role: str, *args: str, **limits: object) -> None:
        results[role] = await run(sandbox, guest("inotify_hog", role, *args), tmp_path, **limits)

    async with trio.open_nursery() as n:
        n.start_soon(functools.partial(one, "hog", str(most + 10), "2.5", nofile=most + 64))
        await trio.sleep(1.2)
        n.start_soon(one, "one")
    hog, other = report(results["hog"]), report(results["one"])
    assert hog["held"] == most and hog["error"] == "Too many open files"  # the hog had them all
    assert other["held"] == 1 and other["error"] is None
    assert hog["uid"] == other["uid"] == 65534  # inside, each is nobody
    uids = {results[r].sandbox["uid"] for r in ("hog", "one")}
    assert len(uids) == 2 and all(0x7000_0000 <= u < 0x7001_0000 for u in uids), uids


HELPER = """
import sys, trio
from pathlib import Path
from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox.base import SandboxRequest
from p2psched.sandbox.process import ProcessSandbox
req = SandboxRequest(job_id="orphan", runtime="process", limits=Limits(wall_ms=600_000), resources=Resources(),
                     command=["/bin/sh", "-c", "sleep " + sys.argv[1] + " & exec sleep " + sys.argv[1]])
async def main():
    sb = ProcessSandbox(warm=int(sys.argv[3]))
    async with trio.open_nursery() as n:
        await n.start(sb.serve)
        await sb.run(req, Path(sys.argv[2]))
trio.run(main)
"""


@pytest.mark.parametrize("warm", [0, 2], ids=["cold", "warm"])
async def test_14_killing_the_agent_kills_its_jobs(tmp_path: Path, warm: int) -> None:
    marker = f"{uuid.uuid4().int % 100000}.{uuid.uuid4().int % 1000}"
    agent = subprocess.Popen([sys.executable, "-c", HELPER, marker, str(tmp_path / "w"), str(warm)])
    try:
        with trio.fail_after(15):
            while len(host_procs_with(f"sleep\0{marker}")) < 2:
                assert agent.poll() is None, "the helper agent exited early"
                await trio.sleep(0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        with trio.fail_after(10):
            while host_procs_with(f"sleep\0{marker}"):
                await trio.sleep(0.05)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    # What the dead agent left (its job's cgroups and scratch mount) is reaped by
    # the next agent on the host, and only that: this process's jobs are not touched.
    layout = cgroups.detect()
    roots = list(layout.v1_dirs.values()) if layout.version == 1 else [layout.v2_dir] if layout.v2_dir else []
    leftovers = [p for r in roots for p in (r / cgroups.PARENT_NAME).glob(f"job-*-{agent.pid}-*")]
    leftovers += list(ProcessSandboxConfig().runtime_dir.glob(f"job-*-{agent.pid}-*"))
    assert leftovers, "expected the killed agent to leave its job's cgroup and scratch behind"
    assert reap_stale() >= 1
    assert not [p for p in leftovers if p.exists()]
