"""Cgroup layout detection and per-job cgroups on both hierarchies.

This machine mounts cgroup v1 controllers beside an empty v2 hierarchy, so the
v1 path is exercised end to end by the other process-sandbox tests. Here the v2
code runs for real on that empty v2 hierarchy (placement, accounting,
``cgroup.kill``, removal: none needs a controller), and the parsing and limit
arithmetic of both run against recorded text and temporary directories.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import trio

from p2psched.sandbox import cgroups, namespaces
from p2psched.sandbox.cgroups import CgroupLayout, JobCgroup, parse_layout

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
