"""Cgroup layout detection and per-job cgroups on both hierarchies.

This machine mounts cgroup v1 controllers beside an empty v2 hierarchy, so the
v1 path is exercised end to end by the other process-sandbox tests. Here the v2
code runs for real on that empty v2 hierarchy (placement, accounting,
``cgroup.kill``, removal, and device control by a BPF program: none needs a
controller), and the parsing and limit arithmetic of both run against recorded
text and temporary directories.

The device tests move a small probe process into a real v2 cgroup with a
device program attached and have it open device nodes: the kernel's answer
(EPERM from the program, or the driver's own answer once allowed) is the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox import cgroups, device_filter, namespaces, process
from p2psched.sandbox.base import SandboxRequest
from p2psched.sandbox.cgroups import CgroupLayout, JobCgroup, parse_layout
from p2psched.sandbox.device_filter import Rule

HYBRID_MOUNTINFO = """\
25 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
28 25 0:25 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
29 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
30 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
31 25 0:28 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
"""
HYBRID_SELF = """\
8:pids:/
5:devices:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
COMBINED_V1 = "27 25 0:24 /docker/x /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n" \
              "29 25 0:26 /docker/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n" \
              "30 25 0:27 /docker/x /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"


def test_hybrid_layout_uses_the_v1_controllers() -> None:
    layout = parse_layout(HYBRID_MOUNTINFO, HYBRID_SELF, {"/sys/fs/cgroup/unified": ""})
    assert layout.version == 1
    assert layout.v1_dirs["memory"] == Path("/sys/fs/cgroup/memory/process_api/abc")
    assert layout.v1_dirs["pids"] == Path("/sys/fs/cgroup/pids")
    assert {"cpu", "cpuacct", "devices"} <= set(layout.v1_dirs)
    assert "hybrid" in layout.note


def test_unified_layout_with_controllers_is_v2() -> None:
    layout = parse_layout(V2_MOUNTINFO, "0::/system.slice/p2psched.service\n",
                          {"/sys/fs/cgroup/system.slice/p2psched.service": "cpuset cpu io memory pids\n"})
    assert layout.version == 2
    assert layout.v2_dir == Path("/sys/fs/cgroup/system.slice/p2psched.service")
    assert layout.controllers == {"cpuset", "cpu", "io", "memory", "pids"}


def test_v2_without_memory_and_pids_means_the_rlimits_fallback() -> None:
    layout = parse_layout(V2_MOUNTINFO, "0::/user.slice\n", {"/sys/fs/cgroup/user.slice": "cpu\n"})
    assert layout.version is None
    assert "lacks the memory and pids controllers" in layout.note


def test_container_mount_roots_are_stripped() -> None:
    # In a container with a v1 cgroup mounted at its own subtree, /proc/self/cgroup
    # names the full path and mountinfo the mount's root: the dir is the remainder.
    self_cg = "3:cpu,cpuacct:/docker/x/inner\n4:memory:/docker/x\n5:pids:/docker/x\n"
    layout = parse_layout(COMBINED_V1, self_cg)
    assert layout.version == 1
    assert layout.v1_dirs["cpu"] == Path("/sys/fs/cgroup/cpu,cpuacct/inner")
    assert layout.v1_dirs["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct/inner")
    assert layout.v1_dirs["memory"] == Path("/sys/fs/cgroup/memory")


def test_no_cgroups_at_all() -> None:
    layout = parse_layout("22 1 0:5 / /proc rw - proc proc rw\n", "")
    assert layout.version is None and layout.controllers == frozenset()


def test_v2_stats_are_read_from_the_kernels_files(tmp_path: Path) -> None:
    layout = CgroupLayout(2, v2_dir=tmp_path, v2_controllers=frozenset({"memory", "pids", "cpu"}))
    cg = JobCgroup(layout, "job-x")
    d = tmp_path / cgroups.PARENT_NAME / "job-x"
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (d / "memory.peak").write_text("123456\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 1\n")
    (d / "pids.events").write_text("max 7\n")
    s = cg.stats()
    assert (s.cpu_ns, s.peak_mem_bytes, s.oom_kills, s.pids_max_hits) == (1_500_000, 123456, 1, 7)


def test_v1_stats_are_read_from_each_controller(tmp_path: Path) -> None:
    dirs = {c: tmp_path / c for c in ("memory", "pids", "cpuacct")}
    layout = CgroupLayout(1, v1_dirs=dirs)
    cg = JobCgroup(layout, "job-y")
    for c, d in dirs.items():
        (d / cgroups.PARENT_NAME / "job-y").mkdir(parents=True)
    base = {c: d / cgroups.PARENT_NAME / "job-y" for c, d in dirs.items()}
    (base["cpuacct"] / "cpuacct.usage").write_text("2500000\n")
    (base["memory"] / "memory.max_usage_in_bytes").write_text("999\n")
    (base["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (base["pids"] / "pids.events").write_text("max 0\n")
    s = cg.stats()
    assert (s.cpu_ns, s.peak_mem_bytes, s.oom_kills, s.pids_max_hits) == (2_500_000, 999, 2, 0)


@pytest.mark.parametrize("version", [1, 2])
def test_limits_written_for_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int) -> None:
    written: dict[str, str] = {}
    monkeypatch.setattr(cgroups, "_write", lambda p, v: written.__setitem__(f"{p.parent.parent.name}/{p.name}", v))
    if version == 2:
        layout = CgroupLayout(2, v2_dir=tmp_path, v2_controllers=frozenset({"memory", "pids", "cpu"}))
    else:
        layout = CgroupLayout(1, v1_dirs={c: tmp_path / c for c in ("memory", "pids", "cpu", "devices")})
    for d in ([tmp_path] if version == 2 else list(layout.v1_dirs.values())):
        (d / cgroups.PARENT_NAME).mkdir(parents=True)
    JobCgroup(layout, "job-z", devices=True).create(mem_bytes=1 << 28, pids=50, cpu=1.5, devices=[("c", 195, 0)])
    if version == 2:
        assert written == {"p2psched/memory.max": str(1 << 28), "p2psched/pids.max": "50",
                           "p2psched/cpu.max": "150000 100000", "p2psched/cpu.weight": "150"}
    else:
        assert written["p2psched/memory.limit_in_bytes"] == str(1 << 28)
        assert written["p2psched/pids.max"] == "50"
        assert written["p2psched/cpu.cfs_quota_us"] == "150000"
        assert written["p2psched/cpu.shares"] == "1536"
        assert written["p2psched/devices.deny"] == "a"
        assert written["p2psched/devices.allow"] == "c 195:0 rwm"  # the GPU, after the defaults


def test_the_agent_wide_pids_bound_is_half_the_hosts_task_ceiling() -> None:
    assert cgroups.parent_pids_bound(32_768) == 16_384  # this machine: pid_max 32,768, threads-max 193,107
    pid_max, threads_max = (int(Path(f"/proc/sys/kernel/{n}").read_text()) for n in ("pid_max", "threads-max"))
    assert cgroups.host_task_ceiling() == min(pid_max, threads_max)
    assert cgroups.parent_pids_bound() == min(pid_max, threads_max) // 2
    assert cgroups.parent_pids_bound() < 65_536  # the most a spec may ask for one job


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("existing", "kept"), [("max", False), ("1000000000", False), ("100", True)])
def test_prepare_parent_bounds_the_pids_of_all_jobs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int, existing: str, kept: bool) -> None:
    # the kernel's files stood in for by plain ones (each write replaces the whole
    # file, as a cgroupfs write does): pids.max as the parent had it
    def write(path: Path, value: str) -> None:
        path.write_text(value)

    monkeypatch.setattr(cgroups, "_write", write)
    if version == 2:
        layout = CgroupLayout(2, v2_dir=tmp_path, v2_controllers=frozenset({"memory", "pids", "cpu"}))
        pids_dir = tmp_path
        (tmp_path / "cgroup.subtree_control").write_text("")
    else:
        layout = CgroupLayout(1, v1_dirs={c: tmp_path / c for c in cgroups.V1_JOB_CONTROLLERS})
        for d in layout.v1_dirs.values():
            d.mkdir()
        pids_dir = tmp_path / "pids"
    parent = pids_dir / cgroups.PARENT_NAME
    parent.mkdir(parents=True)
    (parent / "cgroup.subtree_control").write_text("")
    (parent / "pids.max").write_text(existing + "\n")
    cgroups.prepare_parent(layout)
    want = existing if kept else str(cgroups.parent_pids_bound())
    assert (parent / "pids.max").read_text().strip() == want
    cgroups.prepare_parent(layout, pids_max=50)  # a lower bound asked for replaces any higher one
    assert (parent / "pids.max").read_text().strip() == "50"


@contextlib.contextmanager
def _v1_agent_cgroup() -> Iterator[CgroupLayout]:
    """A fresh agent cgroup under this process's own in each real v1 hierarchy the
    jobs use, as a layout; removed (with its children) after. The real
    ``p2psched`` parent is left alone: other tests' agents share it."""
    host = cgroups.detect()
    if host.version != 1 or not all(c in host.v1_dirs for c in cgroups.V1_JOB_CONTROLLERS):
        # On a v2 host the bound is written by the same prepare_parent, which
        # test_prepare_parent_bounds_the_pids_of_all_jobs checks for v2 on stand-in files.
        pytest.skip("real v1 cgroups only: this host has no v1 memory, pids, cpu and cpuacct hierarchies")
    name = f"p2psched-test-{uuid.uuid4().hex[:8]}"
    dirs = {c: host.v1_dirs[c] / name for c in cgroups.V1_JOB_CONTROLLERS}
    roots = list(dict.fromkeys(dirs.values()))  # co-mounted hierarchies share one
    for d in roots:
        d.mkdir()
    try:
        yield CgroupLayout(1, v1_dirs=dirs, note=f"cgroup v1 test layout {name}")
    finally:
        for root in roots:
            for d in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if d.is_dir():
                    d.rmdir()
            root.rmdir()


@pytest.mark.root
def test_real_v1_parent_gets_the_bound_and_keeps_an_operators_lower_one() -> None:
    with _v1_agent_cgroup() as layout:
        pids_max = layout.v1_dirs["pids"] / cgroups.PARENT_NAME / "pids.max"
        cgroups.prepare_parent(layout)
        assert pids_max.read_text().strip() != "max"  # what a new cgroup has: no bound at all
        assert pids_max.read_text().strip() == str(cgroups.parent_pids_bound())
        pids_max.write_text("100")  # the operator's
        cgroups.prepare_parent(layout)
        assert pids_max.read_text().strip() == "100"


@pytest.mark.root
async def test_a_job_cannot_hold_more_pids_than_the_agent_wide_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job allowed 65,536 pids of its own, under a parent bounded to 8: the kernel
    refuses its forks at 8 (bwrap's init, the shell and six sleeps of the twenty it
    asks for), and the result says pids_limit (v1 counts the refusal in the job)."""
    bound = 8
    with _v1_agent_cgroup() as layout:
        cfg = process.ProcessSandboxConfig()
        cgroups.prepare_parent(layout, pids_max=bound)
        parent = layout.v1_dirs["pids"] / cgroups.PARENT_NAME
        host = dataclasses.replace(process._host(cfg), layout=layout, cgroups_ok=True)
        monkeypatch.setitem(process._HOSTS, process._host_key(cfg), host)
        req = SandboxRequest(
            job_id="pids-bound", runtime="process",
            limits=Limits.model_validate({"wall_ms": 30_000, "pids": 65_536}),
            resources=Resources.model_validate({"cpu": 1.0}),
            command=["/bin/sh", "-c", "i=0; while [ $i -lt 20 ]; do sleep 60 & i=$((i+1)); done; wait"],
        )
        r = await process.run_process(req, tmp_path / "work", cfg)
        assert r.limit_hit == "pids_limit" and r.reason == "pids_limit", (r.reason, r.stderr)
        if (parent / "pids.peak").exists():  # Linux 6.12 and later
            assert 0 < int((parent / "pids.peak").read_text()) <= bound
        # every process gone and its cgroup removed (pids.current may still count bwrap's init
        # for a moment: a zombie once its monitor exits, until the host's pid 1 reaps it)
        assert not list(parent.glob("job-*"))


V2_ROOT = Path("/sys/fs/cgroup/unified")


def _real_v2_hierarchy() -> Path:
    if not (V2_ROOT / "cgroup.procs").exists() or not os.access(V2_ROOT, os.W_OK):
        pytest.skip("no writable cgroup v2 hierarchy mounted at /sys/fs/cgroup/unified")
    return V2_ROOT


@pytest.mark.root
async def test_real_v2_cgroup_places_accounts_kills_and_removes() -> None:
    root = _real_v2_hierarchy() / f"p2psched-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        layout = CgroupLayout(2, v2_dir=root, v2_controllers=frozenset())
        cgroups.prepare_parent(layout)
        cg = JobCgroup(layout, "job-real")
        cg.create(mem_bytes=1 << 26, pids=16, cpu=1.0, devices=None)
        sh = subprocess.Popen(["/bin/sh", "-c", "while read l; do sleep 60 & done"], stdin=subprocess.PIPE)
        cg.add(sh.pid)
        assert sh.stdin is not None
        sh.stdin.write(b"1\n2\n3\n")
        sh.stdin.flush()
        with trio.fail_after(5):
            while len(cg.pids()) < 4:
                await trio.sleep(0.01)
        members = cg.pids()
        assert sh.pid in members
        assert cg.stats().cpu_ns > 0  # cpu.stat exists on every v2 cgroup
        cg.kill()  # cgroup.kill: the shell and every sleep it forked
        sh.wait()
        with trio.fail_after(5):
            while cg.pids():
                await trio.sleep(0.01)
        for pid in members:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert cg.remove()
        assert not (root / cgroups.PARENT_NAME / "job-real").exists()
    finally:
        for d in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                d.rmdir()
        root.rmdir()


@contextlib.contextmanager
def _v2_cgroup() -> Iterator[Path]:
    """A fresh directory under the real v2 hierarchy, removed (with any children) after."""
    root = _real_v2_hierarchy() / f"p2psched-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        yield root
    finally:
        for d in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                d.rmdir()
        root.rmdir()


#: Runs in the cgroup under test: waits to be moved there, then tries each action.
PROBE = """
import json, os, sys
sys.stdin.readline()
out = {}
for action in json.loads(sys.argv[1]):
    kind, path = action[0], action[1]
    try:
        if kind == "mknod":
            os.mknod(path, 0o600 | 0o020000, os.makedev(action[2], action[3]))
        else:
            os.close(os.open(path, {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[kind]))
        out[kind + " " + path] = "ok"
    except OSError as e:
        out[kind + " " + path] = e.errno
print(json.dumps(out))
"""


def _probe_in(cgroup_dir: Path, actions: list[list[object]]) -> dict[str, object]:
    """Start a probe, move it into ``cgroup_dir``, then let it act: {"r /dev/null": "ok" or errno}."""
    child = subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(actions)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        (cgroup_dir / "cgroup.procs").write_text(str(child.pid))
        out, _ = child.communicate("go\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.mark.root
def test_bpf_filter_allows_listed_nodes_and_refuses_the_rest() -> None:
    with _v2_cgroup() as cg:
        device_filter.attach(cg, [Rule("c", 1, 3)])  # /dev/null only
        got = _probe_in(cg, [["rw", "/dev/null"], ["r", "/dev/zero"], ["r", "/dev/urandom"]])
    assert got == {"rw /dev/null": "ok", "r /dev/zero": errno.EPERM, "r /dev/urandom": errno.EPERM}


@pytest.mark.root
def test_bpf_filter_wildcard_minor_and_access_bits() -> None:
    with _v2_cgroup() as cg:
        # every minor of major 1 for reading; /dev/null (1:3) for writing as well
        device_filter.attach(cg, [Rule("c", 1, -1, "r"), Rule("c", 1, 3, "rw")])
        got = _probe_in(cg, [["r", "/dev/zero"], ["r", "/dev/urandom"], ["w", "/dev/urandom"],
                             ["w", "/dev/null"], ["r", "/dev/fuse"]])
    assert got == {"r /dev/zero": "ok", "r /dev/urandom": "ok", "w /dev/urandom": errno.EPERM,
                   "w /dev/null": "ok", "r /dev/fuse": errno.EPERM}  # fuse is 10:229


@pytest.mark.root
def test_bpf_filter_allows_only_the_granted_gpu_minor(tmp_path: Path) -> None:
    # NVIDIA's major is 195; no driver is loaded here, so an allowed open reaches
    # the kernel's lookup of a driver and fails there (ENXIO), a refused one stops
    # at the program (EPERM)
    granted, other = tmp_path / "nvidia0", tmp_path / "nvidia1"
    os.mknod(granted, 0o666 | 0o020000, os.makedev(195, 0))
    os.mknod(other, 0o666 | 0o020000, os.makedev(195, 1))
    allowed = [Rule(k, ma, mi) for k, ma, mi in cgroups.DEFAULT_DEVICES] + [Rule("c", 195, 0)]
    with _v2_cgroup() as cg:
        device_filter.attach(cg, allowed)
        got = _probe_in(cg, [["rw", str(granted)], ["rw", str(other)], ["r", "/dev/null"],
                             ["mknod", str(tmp_path / "again0"), 195, 0],
                             ["mknod", str(tmp_path / "again1"), 195, 1]])
    assert got == {f"rw {granted}": errno.ENXIO, f"rw {other}": errno.EPERM, "r /dev/null": "ok",
                   f"mknod {tmp_path / 'again0'}": "ok", f"mknod {tmp_path / 'again1'}": errno.EPERM}
    # outside the cgroup both nodes reach the (missing) driver
    for node in (granted, other):
        with pytest.raises(OSError) as e:
            os.open(node, os.O_RDWR)
        assert e.value.errno == errno.ENXIO


@pytest.mark.root
def test_a_program_below_cannot_widen_one_above() -> None:
    # BPF_F_ALLOW_MULTI: every program from the root down must allow the access
    with _v2_cgroup() as parent:
        (parent / "cgroup.subtree_control").write_text("")
        child = parent / "job"
        child.mkdir()
        device_filter.attach(parent, [Rule("c", 1, 3)])
        device_filter.attach(child, [Rule("c", 1, 3), Rule("c", 1, 5)])
        got = _probe_in(child, [["r", "/dev/null"], ["r", "/dev/zero"]])
    assert got == {"r /dev/null": "ok", "r /dev/zero": errno.EPERM}


@pytest.mark.root
def test_the_verifiers_log_is_in_the_error() -> None:
    # a program that does not end in an exit
    with pytest.raises(device_filter.DeviceFilterError) as e:
        device_filter.load(device_filter.assemble([Rule("c", 1, 3)])[:-8])
    assert not e.value.not_permitted
    assert "verifier rejected" in str(e.value) and "last insn is not an exit or jmp" in str(e.value)


def test_rules_are_checked_before_assembly() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        device_filter.assemble([Rule("x", 1, 3)])
    with pytest.raises(ValueError, match="subset of 'rwm'"):
        device_filter.assemble([Rule("c", 1, 3, "rx")])


@pytest.mark.root
def test_without_bpf_rights_the_job_cgroup_falls_back_and_says_how_to_fix_it() -> None:
    # root without CAP_SYS_ADMIN and CAP_BPF (as in a container whose runtime drops
    # them): the cgroup is still made, the device program is refused
    script = """
import json, sys
from pathlib import Path
from p2psched.sandbox import cgroups
layout = cgroups.CgroupLayout(2, v2_dir=Path(sys.argv[1]), v2_controllers=frozenset())
cgroups.prepare_parent(layout)
cg = cgroups.JobCgroup(layout, "job-nobpf", devices=True)
cg.create(mem_bytes=1 << 26, pids=16, cpu=1.0, devices=[("c", 195, 0)])
print(json.dumps([cg.device_control, cg.device_warning, cgroups.probe_device_control(layout)]))
cg.remove()
"""
    with _v2_cgroup() as root:
        drop = "-sys_admin,-bpf"
        out = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--",
                              sys.executable, "-c", script, str(root)],
                             capture_output=True, text=True, check=True).stdout
    control, warning, (probe_ok, probe_detail) = json.loads(out)
    assert control is None
    assert "not enforced by the cgroup, only by the mount namespace" in warning
    assert "BPF_PROG_LOAD" in warning and "Operation not permitted" in warning
    assert "CAP_SYS_ADMIN" in warning  # the fix
    assert not probe_ok and probe_detail.startswith("fallback:")  # doctor: a warning, not a failure


@pytest.mark.root
async def test_gpu_job_in_the_process_sandbox_on_v2_gets_a_device_program(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process sandbox pointed at the v2 hierarchy: a job granted a device node
    runs in a cgroup whose program allows that node and the defaults, nothing else."""
    granted = "/dev/fuse"  # a stand-in for /dev/nvidia0: no GPU here
    if not Path(granted).exists():
        pytest.skip("needs /dev/fuse as a stand-in GPU device node")
    gpu = tmp_path / "nvidia0"
    os.mknod(gpu, 0o666 | 0o020000, os.makedev(195, 0))
    with _v2_cgroup() as root:
        cfg = process.ProcessSandboxConfig()
        layout = CgroupLayout(2, v2_dir=root, v2_controllers=frozenset(), note=f"cgroup v2 at {root}")
        cgroups.prepare_parent(layout)
        host = dataclasses.replace(process._host(cfg), layout=layout, cgroups_ok=True)
        monkeypatch.setitem(process._HOSTS, process._host_key(cfg), host)
        req = SandboxRequest(
            job_id="gpu-v2", runtime="process", limits=Limits.model_validate({"wall_ms": 60_000}),
            resources=Resources.model_validate({"cpu": 1.0}),
            command=["/bin/sh", "-c", f"test -c {granted} && echo present; cat /dev/null && echo null; exec sleep 60"],
            gpu_devices=[granted],
        )
        results = []

        async def job() -> None:
            results.append(await process.run_process(req, tmp_path / "work", cfg))

        async with trio.open_nursery() as n:
            n.start_soon(job)
            jobs = root / cgroups.PARENT_NAME
            with trio.fail_after(30):
                while True:
                    sleeps = [(d, int(pid)) for d in jobs.glob("job-gpu-v2-*")
                              for pid in (d / "cgroup.procs").read_text().split()
                              if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"]
                    if sleeps:
                        break
                    await trio.sleep(0.02)
            job_dir, sleep_pid = sleeps[0]
            actions: list[list[object]] = [
                ["r", granted], ["r", "/dev/null"], ["r", "/dev/urandom"], ["r", "/dev/kmsg"], ["rw", str(gpu)]]
            got = await trio.to_thread.run_sync(_probe_in, job_dir, actions)
            os.kill(sleep_pid, 9)
        assert not list(jobs.glob("job-*"))  # the job's cgroup is gone with it
    assert got == {f"r {granted}": "ok", "r /dev/null": "ok", "r /dev/urandom": "ok",
                   "r /dev/kmsg": errno.EPERM, f"rw {gpu}": errno.EPERM}
    r = results[0]
    assert r.stdout.split() == [b"present", b"null"]
    assert r.sandbox["cgroup"] == "v2" and r.sandbox["device_control"] == "devices-bpf"
    assert r.sandbox["devices"] == [granted]
    assert not any("device" in w for w in r.warnings)


def test_bwrap_arguments_isolate_by_default() -> None:
    plan = namespaces.BwrapPlan(
        command=["/bin/true"], env={"A": "1"}, binds=[namespaces.Bind("/scratch", "/run/x/scratch", writable=True)],
        user_namespace=True, uid=65534, gid=65534, network=False, seccomp_fd=5, info_fd=6, block_fd=7,
        etc_files=("passwd",),
    )
    a = namespaces.bwrap_args(plan, [("bind", "/usr"), ("symlink:usr/bin", "/bin")])
    joined = " ".join(a)
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-user",
                 "--disable-userns", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in a
    assert "--ro-bind /usr /usr" in joined and "--symlink usr/bin /bin" in joined
    assert "--bind /run/x/scratch /scratch" in joined and "--chdir /scratch" in joined
    assert "--ro-bind-try /etc/passwd /etc/passwd" in joined and "shadow" not in joined
    assert "--setenv A 1" in joined and "--seccomp 5" in joined
    assert a.index("--remount-ro") > a.index("--bind")  # the root is frozen after every mount
    shared = namespaces.bwrap_args(dataclasses.replace(plan, network=True, user_namespace=False), [])
    assert "--unshare-net" not in shared and "--cap-drop" in shared
