"""Per-job cgroups on either hierarchy: v2 (unified) or v1 (one mount per controller).

Most hosts and containers run cgroup v2; some machine images still mount the v1
controllers with an empty ``unified`` hierarchy beside them (a "hybrid" layout).
:func:`detect` reads ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` and picks
the hierarchy that actually holds the memory, pids and cpu controllers; the parsing
is pure (:func:`parse_layout`) so both layouts are tested from text.

Job cgroups are created under the agent's own cgroup (``<agent cgroup>/p2psched/
job-...``), so that whoever confines the agent (systemd, a container runtime)
confines its jobs too: that is the delegation model systemd documents.

A :class:`JobCgroup` is what the process sandbox uses: ``create`` with limits,
``add`` the job's first process before it executes anything, read ``stats``,
``kill`` every member, ``remove``. Device nodes are restricted by the v1
``devices`` controller or, on v2, by a BPF program (:mod:`device_filter`).
Reads are plain synchronous file reads: each is a few microseconds on cgroupfs
and never blocks on I/O.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from p2psched.sandbox import device_filter


#: Controllers the sandbox uses. Without memory and pids it falls back to rlimits.
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "devices", "freezer")
V2_CONTROLLERS = ("memory", "pids", "cpu")
V1_JOB_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")

#: 100 ms: the kernel's default CFS period. Shorter periods tighten the quota's
#: granularity but cost scheduler work; Kubernetes and Docker keep 100 ms.
CFS_PERIOD_US = 100_000

#: Device nodes every job may use (major, minor): null, zero, full, random,
#: urandom, tty, ptmx and the pts range. The same list runc allows by default.
DEFAULT_DEVICES = (
    ("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
    ("c", 5, 0), ("c", 5, 2), ("c", 136, -1),
)

PARENT_NAME = "p2psched"

#: The kernel's default ``pid_max``: the host's task ceiling when /proc cannot say.
DEFAULT_PID_MAX = 32_768


@dataclass(frozen=True, slots=True)
class CgroupLayout:
    """Where this process's cgroups live, and which hierarchy the sandbox will use."""

    version: Literal[1, 2] | None
    #: v2: the directory of the agent's own cgroup
    v2_dir: Path | None = None
    #: v2: controllers enabled for the agent's cgroup (its ``cgroup.controllers``)
    v2_controllers: frozenset[str] = frozenset()
    #: v1: controller -> the directory of the agent's own cgroup in that hierarchy
    v1_dirs: dict[str, Path] = field(default_factory=dict)
    #: why the layout is what it is, for doctor and for the job's warnings
    note: str = ""

    @property
    def controllers(self) -> frozenset[str]:
        if self.version == 2:
            return self.v2_controllers
        if self.version == 1:
            return frozenset(self.v1_dirs)
        return frozenset()


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return path.encode().decode("unicode_escape") if "\\" in path else path


def _join(mountpoint: str, mount_root: str, own_path: str) -> Path:
    """The directory of ``own_path`` (from /proc/self/cgroup) under a mount of ``mount_root``."""
    if mount_root != "/" and (own_path == mount_root or own_path.startswith(mount_root + "/")):
        own_path = own_path[len(mount_root):]
    return Path(mountpoint) / own_path.lstrip("/")


def parse_layout(mountinfo: str, self_cgroup: str, v2_controllers_of: dict[str, str] | None = None) -> CgroupLayout:
    """Pick the hierarchy from the text of ``/proc/self/mountinfo`` and ``/proc/self/cgroup``.

    ``v2_controllers_of`` maps a v2 cgroup directory to the text of its
    ``cgroup.controllers``; by default the file is read.
    """
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, ctrls, path = parts
        if hier == "0" and ctrls == "":
            own_v2 = path
        else:
            for c in ctrls.split(","):
                if c:
                    own_v1[c] = path

    v1_dirs: dict[str, Path] = {}
    v2_dir: Path | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        mount_root, mountpoint = _unescape(lf[3]), _unescape(lf[4])
        fstype, superopts = rf[0], rf[2].split(",")
        if fstype == "cgroup2" and own_v2 is not None:
            v2_dir = _join(mountpoint, mount_root, own_v2)
        elif fstype == "cgroup":
            for c in superopts:
                if c in V1_CONTROLLERS and c in own_v1:
                    v1_dirs[c] = _join(mountpoint, mount_root, own_v1[c])

    v2_ctrls: frozenset[str] = frozenset()
    if v2_dir is not None:
        if v2_controllers_of is not None:
            text = v2_controllers_of.get(str(v2_dir), "")
        else:
            try:
                text = (v2_dir / "cgroup.controllers").read_text()
            except OSError:
                text = ""
        v2_ctrls = frozenset(text.split())

    needed = {"memory", "pids"}
    if v2_dir is not None and needed <= v2_ctrls:
        return CgroupLayout(2, v2_dir=v2_dir, v2_controllers=v2_ctrls, note=f"cgroup v2 at {v2_dir}")
    if needed <= set(v1_dirs):
        extra = " (the v2 hierarchy holds no controllers: hybrid layout)" if v2_dir is not None else ""
        return CgroupLayout(1, v1_dirs=v1_dirs, note=f"cgroup v1 controllers {sorted(v1_dirs)}{extra}")
    if v2_dir is not None:
        return CgroupLayout(
            None, v2_dir=v2_dir, v2_controllers=v2_ctrls,
            note=f"cgroup v2 at {v2_dir} lacks the memory and pids controllers (has: {sorted(v2_ctrls) or 'none'})",
        )
    return CgroupLayout(None, v1_dirs=v1_dirs, note="no cgroup hierarchy with memory and pids controllers is mounted")


def detect() -> CgroupLayout:
    """The layout of the running host."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        self_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError as e:
        return CgroupLayout(None, note=f"cannot read /proc/self: {e}")
    return parse_layout(mountinfo, self_cgroup)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read().decode()
    except OSError:
        return ""


def _keyed(text: str) -> dict[str, int]:
    """Parse "key value" lines (memory.events, pids.events, cpu.stat, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v)
        except ValueError:
            continue
    return out


@dataclass(slots=True)
class CgroupStats:
    cpu_ns: int = 0
    peak_mem_bytes: int = 0
    oom_kills: int = 0
    #: forks refused in the job (``pids.events`` max). On v1, and on v2 before Linux
    #: 6.11, the kernel counts a refusal in the forking cgroup whichever limit
    #: refused it, the job's own or the agent-wide bound on the parent: either way
    #: the job ends as ``pids_limit``, truthfully (a sandbox pids limit refused its
    #: fork). From 6.11, v2 counts it in the cgroup whose limit was hit and that
    #: cgroup's ancestors, so a refusal by the parent's bound shows only in the
    #: parent's files, which do not say which job forked: the job then sees EAGAIN
    #: and its result is its own exit. Blaming every running job would be untrue.
    pids_max_hits: int = 0


class CgroupSetupError(RuntimeError):
    pass


def host_task_ceiling() -> int:
    """How many tasks (processes and threads) the host can hold: the lower of
    ``kernel.pid_max`` (each task takes a pid) and ``kernel.threads-max`` (and a
    task struct), the figure systemd's ``TasksMax=`` percentages are taken of."""
    figures = []
    for name in ("pid_max", "threads-max"):
        v = _read(Path("/proc/sys/kernel") / name).strip()
        if v.isdigit():
            figures.append(int(v))
    return min(figures) if figures else DEFAULT_PID_MAX


def parent_pids_bound(ceiling: int | None = None) -> int:
    """The most tasks all of the agent's jobs together may hold: half the host's ceiling.

    The pid space is one per host (per pid namespace): a job's threads draw on the
    same pool as systemd, sshd, the container runtime and the agent itself, and a
    spec may ask for 65,536 pids, above the default ``pid_max`` of 32,768. Half
    leaves the host the other half for its own daemons, the agent (its threads and
    bwrap's monitors, outside the job cgroups on v1) and an operator's shell, while
    the jobs still get far more than they use: 1,000 running jobs are about 2,000
    tasks (bwrap's init and the program), against 16,384 with the default pid_max.
    systemd caps a single service at 15% of the same figure (``DefaultTasksMax``);
    where such a cap sits above the agent, the kernel applies the lower one anyway.
    """
    return max(1, (host_task_ceiling() if ceiling is None else ceiling) // 2)


def _bound_pids(parent: Path, bound: int) -> None:
    """Write ``bound`` to ``parent``'s ``pids.max`` unless it already holds a number no higher.

    A lower figure set by an operator (or by an earlier agent on a host whose
    pid_max was lower then) is kept: this only ever tightens the bound.
    """
    current = _read(parent / "pids.max").strip()
    if current.isdigit() and int(current) <= bound:
        return
    _write(parent / "pids.max", str(bound))


def prepare_parent(layout: CgroupLayout, *, pids_max: int | None = None) -> list[Path]:
    """Create ``<agent cgroup>/p2psched`` in each hierarchy the sandbox will use,
    and bound the tasks all jobs together may hold there.

    The bound is ``pids.max`` on that parent, which every job cgroup is created
    under: ``pids_max``, by default :func:`parent_pids_bound` (half the host's
    tasks). pids limits are hierarchical, so a job whose own ``pids.max`` is
    higher (a spec may ask for 65,536) is still refused a fork (EAGAIN) once all
    jobs together hold the bound. An existing lower ``pids.max`` is kept.

    On v2, controllers must be enabled in each ancestor's ``cgroup.subtree_control``,
    and a cgroup with processes in it cannot hand controllers down (the "no
    internal processes" rule). When the agent's own cgroup refuses, the agent
    moves itself into a leaf ``p2psched/agent`` and tries again, as systemd's
    delegation guide advises; its own threads and bwrap's monitors then count
    toward the bound too.
    """
    bound = parent_pids_bound() if pids_max is None else pids_max
    if layout.version == 1:
        parents = []
        for c, d in layout.v1_dirs.items():
            p = d / PARENT_NAME
            p.mkdir(exist_ok=True)
            parents.append(p)
            if c == "pids":
                _bound_pids(p, bound)
        return parents
    if layout.version == 2:
        assert layout.v2_dir is not None
        base = layout.v2_dir
        parent = base / PARENT_NAME
        parent.mkdir(exist_ok=True)
        want = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in layout.v2_controllers)
        if not want:
            return [parent]
        try:
            _write(base / "cgroup.subtree_control", want)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            leaf = parent / "agent"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            # parent must be a non-leaf with no processes for jobs to be siblings of agent
            _write(base / "cgroup.subtree_control", want)
        _write(parent / "cgroup.subtree_control", want)
        if "pids" in layout.v2_controllers:
            _bound_pids(parent, bound)
        return [parent]
    raise CgroupSetupError(layout.note)


NO_DEVICE_CONTROL = "device access is not enforced by the cgroup, only by the mount namespace"


def device_control_fix(layout: CgroupLayout) -> str:
    """How to get device control on this layout, for warnings and doctor."""
    if layout.version == 2:
        return ("to enforce it, run the agent as root with CAP_SYS_ADMIN (or CAP_BPF and CAP_NET_ADMIN) on a kernel "
                "with CONFIG_CGROUP_BPF; in a container, allow the bpf system call (docker run --privileged)")
    return "to enforce it, mount the v1 devices controller: mount -t cgroup -o devices devices /sys/fs/cgroup/devices"


def probe_device_control(layout: CgroupLayout) -> tuple[bool, str]:
    """Create and remove a job cgroup restricted to the default devices: (applied, detail)."""
    probe = JobCgroup(layout, f"job-doctor-devices-{os.getpid()}", devices=True)
    try:
        probe.create(mem_bytes=64 << 20, pids=8, cpu=1.0, devices=[])
    except OSError as e:  # a refused cgroup, or a program the verifier rejects: jobs would fail too
        return False, f"could not restrict a job cgroup's devices: {e}"
    finally:
        probe.remove(0)
    if probe.device_control is None:
        return False, f"fallback: {probe.device_warning}"
    how = "a BPF device program attached" if probe.device_control == "devices-bpf" else "v1 devices.deny/allow written"
    return True, f"{probe.device_control}: {how} to a job cgroup"


class JobCgroup:
    """One job's cgroup(s). Create, add the first process, read, kill, remove."""

    def __init__(self, layout: CgroupLayout, name: str, *, devices: bool = False) -> None:
        """``devices``: also join the v1 devices controller (jobs granted device nodes).

        Each v1 hierarchy joined costs a migration that stalls every fork on the
        host for a moment (the kernel's cgroup_threadgroup_rwsem), so a job joins
        only what it uses: memory, pids, cpu and cpuacct, and devices for GPU jobs.
        Freezer is not needed: killing the job's PID 1 ends every process in it.
        """
        self.layout = layout
        self.name = name
        if layout.version == 2:
            assert layout.v2_dir is not None
            self.dirs = {"*": layout.v2_dir / PARENT_NAME / name}
        else:
            used = V1_JOB_CONTROLLERS + (("devices",) if devices else ())
            self.dirs = {c: d / PARENT_NAME / name for c, d in layout.v1_dirs.items() if c in used}
        self.created: list[Path] = []
        #: host pid of the job's first process, fixed after ``add``
        self.first_pid: int | None = None
        #: after ``create`` with devices: "devices-v1" or "devices-bpf"; None when
        #: no device control applies, and then ``device_warning`` says why and the fix
        self.device_control: str | None = None
        self.device_warning: str | None = None

    def _dir(self, controller: str) -> Path | None:
        if self.layout.version == 2:
            return self.dirs["*"] if controller in self.layout.v2_controllers or controller == "*" else None
        return self.dirs.get(controller)

    def unique_dirs(self) -> list[Path]:
        """Each directory once: v1 hierarchies are often co-mounted (``cpu,cpuacct``)."""
        return list(dict.fromkeys(self.dirs.values()))

    @property
    def procs_dir(self) -> Path:
        if self.layout.version == 2:
            return self.dirs["*"]
        return self.dirs.get("pids") or next(iter(self.dirs.values()))

    def create(self, *, mem_bytes: int, pids: int, cpu: float, devices: list[tuple[str, int, int]] | None) -> None:
        """Make the directories and write the limits. Raises OSError on a refusal.

        ``devices``: restrict device nodes to :data:`DEFAULT_DEVICES` and these
        (None: no restriction). Where the host offers no device control this is
        not an error: ``device_warning`` says so (see :meth:`_restrict_devices`).
        """
        for d in self.unique_dirs():
            d.mkdir()
            self.created.append(d)
        self.set_limits(mem_bytes=mem_bytes, pids=pids, cpu=cpu)
        if devices is not None:
            self._restrict_devices(list(DEFAULT_DEVICES) + devices)

    def _restrict_devices(self, allowed: list[tuple[str, int, int]]) -> None:
        """Allow only ``allowed`` (read, write, mknod): v1 devices.allow, or a v2 BPF program.

        Runs before the job's first process joins, so its program never sees more.
        A host that refuses BPF (no CAP_SYS_ADMIN, a container's seccomp filter) or
        lacks the v1 controller falls back to the mount namespace (only the granted
        nodes exist inside the sandbox, and a job cannot ``mknod``), with a warning.
        A program the kernel's verifier rejects is a bug, not a host limit: it raises.
        """
        if self.layout.version == 2:
            try:
                device_filter.attach(self.dirs["*"], [device_filter.Rule(k, ma, mi) for k, ma, mi in allowed])
            except device_filter.DeviceFilterError as e:
                if not e.not_permitted:
                    raise
                self.device_warning = f"{NO_DEVICE_CONTROL} ({e}); {device_control_fix(self.layout)}"
                return
            self.device_control = "devices-bpf"
            return
        dv = self.dirs.get("devices")
        if dv is None:
            self.device_warning = f"{NO_DEVICE_CONTROL} (no v1 devices controller); {device_control_fix(self.layout)}"
            return
        _write(dv / "devices.deny", "a")
        for kind, major, minor in allowed:
            mi = "*" if minor < 0 else str(minor)
            _write(dv / "devices.allow", f"{kind} {major}:{mi} rwm")
        self.device_control = "devices-v1"

    def set_limits(self, *, mem_bytes: int, pids: int, cpu: float) -> None:
        """Write the memory, pids and CPU limits (also to re-limit a warm sandbox)."""
        quota = max(1000, int(cpu * CFS_PERIOD_US))
        if self.layout.version == 2:
            d = self.dirs["*"]
            if "memory" in self.layout.v2_controllers:
                _write(d / "memory.max", str(mem_bytes))
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    if (d / name).exists():
                        # oom.group: one OOM kill ends the whole job, not a random member
                        _write(d / name, value)
            if "pids" in self.layout.v2_controllers:
                _write(d / "pids.max", str(pids))
            if "cpu" in self.layout.v2_controllers:
                _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
                # weight 100 is one core's fair share; the kernel's range is 1..10000
                _write(d / "cpu.weight", str(min(10000, max(1, round(100 * cpu)))))
            return
        if (m := self.dirs.get("memory")) is not None:
            if (m / "memory.memsw.limit_in_bytes").exists():
                # memsw must stay >= the memory limit: order the writes by direction
                old = int(_read(m / "memory.limit_in_bytes").strip() or 0)
                order = ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes") if mem_bytes > old else (
                    "memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
                for name in order:
                    _write(m / name, str(mem_bytes))
            else:
                _write(m / "memory.limit_in_bytes", str(mem_bytes))
        if (p := self.dirs.get("pids")) is not None:
            _write(p / "pids.max", str(pids))
        if (c := self.dirs.get("cpu")) is not None:
            _write(c / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(c / "cpu.cfs_quota_us", str(quota))
            # 1024 shares is one core's fair share in v1
            _write(c / "cpu.shares", str(max(2, round(1024 * cpu))))

    def reset_peak(self) -> None:
        """Restart peak-memory tracking (v1: max_usage_in_bytes; v2: memory.peak, kernel >= 6.12)."""
        with_file = self.dirs.get("memory") if self.layout.version == 1 else self.dirs["*"]
        if with_file is None:
            return
        name = "memory.max_usage_in_bytes" if self.layout.version == 1 else "memory.peak"
        try:
            _write(with_file / name, "0")
        except OSError:
            pass

    def add(self, pid: int) -> None:
        """Move ``pid`` (not yet executing the job) into every hierarchy."""
        for d in self.unique_dirs():
            _write(d / "cgroup.procs", str(pid))
        self.first_pid = pid

    def pids(self) -> list[int]:
        return [int(x) for x in _read(self.procs_dir / "cgroup.procs").split()]

    def stats(self) -> CgroupStats:
        s = CgroupStats()
        if self.layout.version == 2:
            d = self.dirs["*"]
            s.cpu_ns = _keyed(_read(d / "cpu.stat")).get("usage_usec", 0) * 1000
            peak = _read(d / "memory.peak").strip()
            s.peak_mem_bytes = int(peak) if peak.isdigit() else 0
            s.oom_kills = _keyed(_read(d / "memory.events")).get("oom_kill", 0)
            s.pids_max_hits = _keyed(_read(d / "pids.events")).get("max", 0)
            return s
        if (c := self.dirs.get("cpuacct")) is not None:
            v = _read(c / "cpuacct.usage").strip()
            s.cpu_ns = int(v) if v.isdigit() else 0
        if (m := self.dirs.get("memory")) is not None:
            v = _read(m / "memory.max_usage_in_bytes").strip()
            s.peak_mem_bytes = int(v) if v.isdigit() else 0
            s.oom_kills = _keyed(_read(m / "memory.oom_control")).get("oom_kill", 0)
        if (p := self.dirs.get("pids")) is not None:
            s.pids_max_hits = _keyed(_read(p / "pids.events")).get("max", 0)
        return s

    def kill(self) -> None:
        """SIGKILL every member: ``cgroup.kill`` on v2; on v1 one pass over ``cgroup.procs``
        (the sandbox kills the job's PID 1 first, which takes the rest of its PID
        namespace with it, so this pass is only a second line)."""
        if self.layout.version == 2:
            k = self.dirs["*"] / "cgroup.kill"
            if k.exists():
                try:
                    _write(k, "1")
                    return
                except OSError:
                    pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def poll(self, *, cpu: bool) -> CgroupStats:
        """The counters a running job is watched by: OOM kills, pids.max hits, CPU time if asked.
        Fewer reads than :meth:`stats`, since a thousand jobs are polled every second."""
        s = CgroupStats()
        if self.layout.version == 2:
            d = self.dirs["*"]
            s.oom_kills = _keyed(_read(d / "memory.events")).get("oom_kill", 0)
            s.pids_max_hits = _keyed(_read(d / "pids.events")).get("max", 0)
            if cpu:
                s.cpu_ns = _keyed(_read(d / "cpu.stat")).get("usage_usec", 0) * 1000
            return s
        if (m := self.dirs.get("memory")) is not None:
            s.oom_kills = _keyed(_read(m / "memory.oom_control")).get("oom_kill", 0)
        if (p := self.dirs.get("pids")) is not None:
            s.pids_max_hits = _keyed(_read(p / "pids.events")).get("max", 0)
        if cpu and (c := self.dirs.get("cpuacct")) is not None:
            v = _read(c / "cpuacct.usage").strip()
            s.cpu_ns = int(v) if v.isdigit() else 0
        return s

    def remove(self, timeout_s: float = 5.0) -> bool:
        """rmdir every directory; members still exiting get ``timeout_s``. Blocking: call from a thread."""
        deadline = time.monotonic() + timeout_s
        ok = True
        for d in reversed(self.created):
            delay = 0.001
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        ok = False
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
        return ok


def owner_gone(name: str) -> bool:
    """Whether ``job-<id>-<agent pid>-<n>`` belongs to an agent process that no longer runs.

    Several agents may share a host (``p2psched up``); one starting must not reap
    the live jobs of another.
    """
    parts = name.split("-")
    if len(parts) < 4 or parts[0] != "job" or not parts[-2].isdigit():
        return False
    pid = int(parts[-2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_names(layout: CgroupLayout) -> set[str]:
    """Job cgroups whose agent process no longer runs."""
    if layout.version is None:
        return set()
    roots = [layout.v2_dir / PARENT_NAME] if layout.version == 2 and layout.v2_dir else [
        d / PARENT_NAME for d in layout.v1_dirs.values()
    ]
    names: set[str] = set()
    for r in roots:
        try:
            names.update(p.name for p in r.iterdir() if p.is_dir() and owner_gone(p.name))
        except OSError:
            continue
    return names


def reap_stale(layout: CgroupLayout) -> int:
    """Kill and remove job cgroups a previous agent left behind (it was killed). Returns how many."""
    removed = 0
    for name in stale_names(layout):
        cg = JobCgroup(layout, name, devices=True)
        cg.created = [d for d in cg.unique_dirs() if d.exists()]
        cg.kill()
        cg.remove()
        removed += 1
    return removed
