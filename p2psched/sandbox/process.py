"""The process sandbox: run one job's command under kernel-enforced isolation and limits.

Public interface (what the agent calls)::

    sandbox = ProcessSandbox(config: ProcessSandboxConfig | None = None, *, warm: int = 4)
    await nursery.start(sandbox.serve)       # once, in the agent's nursery (keeps the warm
                                             # pool filled, cleans up behind finished jobs)
    result = await sandbox.run(request: SandboxRequest, work_dir: Path) -> SandboxResult

    async def run_process(request, work_dir, config=None) -> SandboxResult
                                             # the same, cold, with no pool (tests, one-offs)
    def doctor_checks(config=None) -> list[tuple[str, bool, str, str]]  # (check, ok, detail, fix)
    def reap_stale(config=None) -> int       # once at agent start, before serving: removes
                                             # what a SIGKILLed agent left, probes the host

``run``/``run_process`` must be awaited from the trio thread. ``work_dir`` is a
directory the agent owns for the job (created if missing; a non-root agent keeps
the job's scratch there). The result's ``reason`` is ``exit N``, ``signal N``
(bwrap reports death by signal N as 128+N, like a shell, so a program that
exits 128+N reads as ``signal N``) or one of ``memory_limit``, ``pids_limit``,
``cpu_limit``, ``wall_timeout``, ``output_limit``; ``sandbox`` lists the
isolation actually applied (for attestation) and ``warnings`` every fallback.
When ``run`` returns, every process of the job is gone.

Cancellation: when the surrounding trio scope is cancelled, every process of the
job is SIGKILLed (its PID 1 is killed, which ends its PID namespace; the cgroup
is killed too), the cgroup and scratch are removed, and ``trio.Cancelled``
propagates. Nothing is returned for a cancelled job.

Errors: :class:`SandboxError` (a sentence with the fix) when the host cannot run
the job now (cgroup refused, bwrap failing to build the sandbox), and its
subclass :class:`SandboxUnfit` when no later try can help (bubblewrap or
util-linux missing, a job without a command). A job's own failures are results,
never exceptions; a program that does not exist is ``exit 127`` with the reason
on stderr.

How a job runs (see docs/sandbox.md)::

    agent --vfork/exec--> setpriv --exec--> prlimit --exec--> bwrap (monitor) --clone(new namespaces)-->
          bwrap init (PID 1) --> the job's program

``setpriv`` switches to the sandbox uid; ``prlimit`` sets RLIMIT_NOFILE/FSIZE/CORE
and, without cgroups, the fallback limits; ``bwrap`` builds the private root,
applies ``no_new_privs`` and the seccomp filter and executes the program. bwrap
reports its PID 1 over ``--info-fd`` and then waits on ``--block-fd``: in that
window the agent moves it into the job's cgroup, so the program starts inside
its limits. A warm sandbox is the same, built ahead of time around a shim
(``_shim.py``) that sets the rlimits and executes the program when handed a job.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import signal
import queue
import random
import resource
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox import cgroups, leftovers, namespaces, seccomp_filter
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.sandbox.masking import mask

__all__ = ["ProcessSandboxConfig", "SandboxError", "SandboxUnfit", "doctor_checks", "reap_stale", "run_process"]


@dataclass(frozen=True, slots=True)
class ProcessSandboxConfig:
    """Agent-wide settings of the process sandbox. Each default says why."""

    #: The host uid/gid a job runs as (in its own user namespace where one is
    #: allowed). 65534 is ``nobody`` on Debian and most distributions: it owns no
    #: files, so a job that escaped its mount namespace could still read and write
    #: only what is world-accessible.
    uid: int = 65534
    gid: int = 65534
    #: Where the agent runs as root with user namespaces, each sandbox runs as a host
    #: uid (and gid) of its own from this range, not as ``uid``: the kernel counts
    #: some limits per user (inotify instances, 128 by default; pipe buffer pages;
    #: user namespaces), and with one uid for every job, one job that took them all
    #: left none to the others, nor to host daemons running as nobody. The range is
    #: one systemd leaves unused (0x70000000, below 2^31), and owns no files. Inside
    #: its namespace a job is still ``uid`` (nobody). Drawn at random, so two agents
    #: on one host rarely hand out the same one at once.
    uid_base: int = 0x7000_0000
    uid_count: int = 65536
    #: "auto": use a user namespace where the kernel allows one (probed once);
    #: "off": never (bwrap runs as the agent's uid with every capability dropped).
    user_namespace: str = "auto"
    #: "auto": per-job cgroups where a hierarchy with memory and pids is writable;
    #: "off": rlimits only (the fallback, also used to test it).
    cgroups: str = "auto"
    #: How often a running job's cgroup counters (OOM kills, pids.max hits, CPU
    #: time) are read. The interval starts at the minimum and doubles to the
    #: maximum, so short jobs react fast and 1,000 sleeping jobs cost ~1,000 small
    #: reads a second. CPU-time checks are also scheduled at the earliest moment
    #: the quota could let the job cross its limit.
    poll_min_s: float = 0.05
    poll_max_s: float = 1.0
    #: How long a killed job's processes may take to exit before the sandbox gives
    #: up waiting (they are SIGKILLed; this only bounds the wait).
    kill_wait_s: float = 5.0
    #: Per-artifact and per-job caps on the files collected from scratch. Larger
    #: outputs belong in the data plane (transfer), not in a job record.
    artifact_max_bytes: int = 8 * 1024 * 1024
    artifacts_total_bytes: int = 32 * 1024 * 1024
    #: Sandboxes being built at once. Building one takes kernel locks every other
    #: build needs (the mount namespace lock, cgroup migration); past a few in
    #: parallel, 2-16 cores only queue in the kernel, in uninterruptible sleep.
    #: Running jobs are not limited by this, only their start.
    launch_concurrency: int = 4
    #: Where a root agent mounts each job's scratch tmpfs and binds its program's
    #: directory (mode 0711, so the sandbox uid can reach them by path, which bwrap
    #: needs, without listing other jobs). A non-root agent uses ``work_dir``.
    runtime_dir: Path = leftovers.RUNTIME_DIR
    #: The fewest open files bwrap needs while it sets the sandbox up (its own fds
    #: plus the job's three). A lower ``nofile`` limit is raised to this, with a warning.
    min_nofile: int = 16
    #: The niceness a sandbox is built and run at (``nice -n``) when it has a cgroup.
    #: Building one is tens of ms of kernel work in bwrap's monitor, which stays in
    #: the agent's cgroup: while 1,000 jobs started, bwraps at the agent's priority
    #: kept its event loop waiting for a CPU half of the time. The job itself, in
    #: its own cgroup, competes by the cgroup's CPU weight, which niceness does not
    #: change. Without cgroups it would starve the job under host load: not applied.
    nice: int = 10


class SandboxError(RuntimeError):
    """The host cannot run process jobs as configured; the message says how to fix it."""

    #: Whether the same job may run if tried again later (a host limit hit, a launch
    #: that failed): the agent queues it again a few times before failing it.
    transient = True


def in_container() -> bool:
    """Whether this agent runs in a Docker or Podman container (their marker files)."""
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def launch_error(said: str, *, in_container: bool) -> str:
    """Why bwrap failed before the job started (``said``: its stderr), and, in a container,
    what to change: Docker's defaults (seccomp, AppArmor, no SYS_ADMIN) refuse the
    namespaces and mounts a sandbox needs, and bwrap's own words do not say so."""
    out = f"the sandbox launcher (bwrap) failed before the job started: {said}"
    if in_container:
        out += ("; this agent runs in a container, whose defaults refuse a sandbox's namespaces and mounts: "
                "unless it already was, start it with deploy/compose.process-sandbox.yaml "
                "(P2PSCHED_PROCESS_SANDBOX=1 scripts/cluster.sh up N); see docs/operations.md, 'Running jobs "
                "inside containers'")
    return out


class SandboxUnfit(SandboxError):
    """Trying again cannot help: a tool the sandbox needs is missing, or the job
    cannot run as given. The job fails at once, with the fix."""

    transient = False


# ---------------------------------------------------------------------------
# Host facts, probed once per agent process


@dataclass(slots=True)
class _Host:
    tools: namespaces.Tools
    user_namespace: bool
    userns_detail: str
    layout: cgroups.CgroupLayout
    cgroups_ok: bool
    cgroup_detail: str
    can_mount: bool
    system_layout: list[tuple[str, str]]
    seccomp_sha256: str
    warnings: list[str] = field(default_factory=list)


_HOSTS: dict[tuple[Any, ...], _Host] = {}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


MS_NOSUID, MS_NODEV, MS_BIND, MNT_DETACH = 2, 4, 4096, 2
SCRATCH_SOURCE = b"p2psched-scratch"


def _mount_tmpfs(path: Path, size: int, uid: int, gid: int) -> None:
    opts = f"size={size},mode=0700,uid={uid},gid={gid}".encode()
    if _libc().mount(SCRATCH_SOURCE, str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def _bind(src: str, dest: Path) -> None:
    if _libc().mount(src.encode(), str(dest).encode(), None, MS_BIND, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


_PRIVATE_DIRS: set[Path] = set()


def _private_runtime_dir(path: Path) -> None:
    """Make ``path`` a private mount (a bind onto itself), once per agent.

    The per-job mounts beneath it are detached from the agent's mount namespace
    as soon as the job's own namespace holds its copy (see ``detach_mounts``);
    private propagation keeps that detach from reaching into the job's copy on
    hosts where / is a shared mount (systemd's default).
    """
    if path in _PRIVATE_DIRS:
        return
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o711)
    # Agents (and tests) on one host share the dir: check and bind under a lock, or
    # two that start together both bind, and the second bind hides every mount the
    # first one's jobs left beneath it from the clean-up of a later agent.
    lock = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # os.path.ismount cannot see a bind of a directory onto itself (same device)
        mountpoints = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
        if str(path) not in mountpoints:
            if _libc().mount(str(path).encode(), str(path).encode(), None, MS_BIND, None) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), str(path))
    finally:
        os.close(lock)  # drops the lock
    MS_PRIVATE = 1 << 18
    if _libc().mount(None, str(path).encode(), None, MS_PRIVATE, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    _PRIVATE_DIRS.add(path)


def _remount_size(path: Path, size: int) -> None:
    MS_REMOUNT = 32
    opts = f"size={size}".encode()
    if _libc().mount(b"", str(path).encode(), None, MS_REMOUNT | MS_NOSUID | MS_NODEV, opts) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def _umount(path: Path) -> bool:
    """Detach the mount at ``path``; False if there is none to detach there."""
    return bool(_libc().umount2(str(path).encode(), MNT_DETACH) == 0)


def _host_key(cfg: ProcessSandboxConfig) -> tuple[Any, ...]:
    return (cfg.uid, cfg.gid, cfg.user_namespace, cfg.cgroups)


def _host(cfg: ProcessSandboxConfig) -> _Host:
    key = _host_key(cfg)
    if key in _HOSTS:
        return _HOSTS[key]
    tools = namespaces.find_tools()
    warnings: list[str] = []
    root = os.geteuid() == 0
    userns, userns_detail = False, "disabled by configuration"
    if tools.bwrap and cfg.user_namespace == "auto":
        userns, userns_detail = namespaces.probe_user_namespace(tools.bwrap, cfg.uid if root else None, cfg.gid)
        if not userns:
            warnings.append(f"no user namespace ({userns_detail}): the job runs without one, all capabilities dropped")
    layout = cgroups.detect() if cfg.cgroups == "auto" else cgroups.CgroupLayout(None, note="cgroups disabled by configuration")
    cg_ok, cg_detail = False, layout.note
    if layout.version is not None:
        try:
            cgroups.prepare_parent(layout)
            cg_ok = True
        except OSError as e:
            cg_detail = f"{layout.note}, but it is not writable: {e}"
    if not cg_ok:
        warnings.append(
            f"cgroups unavailable ({cg_detail}): rlimits only; memory is capped as address space, "
            "process counts per uid, and CPU time per process"
        )
    can_mount = False
    if root:
        probe = Path(f"/tmp/.p2psched-mount-probe-{os.getpid()}")
        with contextlib.suppress(OSError):
            probe.mkdir(exist_ok=True)
            try:
                _mount_tmpfs(probe, 4096, 0, 0)
                _umount(probe)
                can_mount = True
            except OSError:
                pass
            probe.rmdir()
    if not can_mount:
        warnings.append("cannot mount tmpfs: scratch is a plain directory, not size-capped (only RLIMIT_FSIZE per file)")
    bpf = seccomp_filter.filter_bpf()
    host = _Host(
        tools, userns, userns_detail, layout, cg_ok, cg_detail, can_mount,
        namespaces.system_layout(), hashlib.sha256(bpf).hexdigest(), warnings,
    )
    if tools.bwrap and tools.prlimit and tools.setpriv:
        _HOSTS[key] = host  # without them the next job looks again: an operator may install them meanwhile
    return host


# ---------------------------------------------------------------------------
# Blocking work, kept off the trio thread

T = TypeVar("T")


class _Launcher:
    """Long-lived threads that fork the sandboxes.

    Forking (``Popen`` waits until the child has executed ``prlimit``) and cgroup
    writes take milliseconds, tens under load, so they must not run on the trio
    thread. But ``bwrap --die-with-parent`` arms PR_SET_PDEATHSIG, which fires when
    the *thread* that forked it exits, so trio's worker threads (which retire when
    idle) would kill healthy jobs. These threads live as long as the agent.
    """

    #: Forks in flight at once; more only queue behind the same kernel locks.
    THREADS = 4

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.started = False
        self.lock = threading.Lock()

    def _loop(self) -> None:
        while True:
            self.queue.get()()

    async def call(self, fn: Callable[[], T]) -> T:
        with self.lock:
            if not self.started:
                for i in range(self.THREADS):
                    threading.Thread(target=self._loop, name=f"p2psched-launcher-{i}", daemon=True).start()
                self.started = True
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def task() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the awaiting task
                box.append((False, e))
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        self.queue.put(task)
        # Once queued the fork happens; waiting it out (briefly) is what lets
        # cleanup find and kill the process if we were cancelled meanwhile.
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]


_LAUNCHER = _Launcher()


@functools.cache
def _nice_tool() -> str | None:
    import shutil

    return shutil.which("nice")


# ---------------------------------------------------------------------------
# One job


def _safe_name(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:80] or "job"


class _HostUids:
    """Host uids for sandboxes, one per sandbox while it exists (see ``uid_base``)."""

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._random = random.SystemRandom()

    def take(self, cfg: ProcessSandboxConfig) -> int:
        if len(self._taken) >= cfg.uid_count:
            raise SandboxError(f"all {cfg.uid_count} sandbox uids are in use; this agent runs too many jobs at once")
        while True:
            uid = cfg.uid_base + self._random.randrange(cfg.uid_count)
            if uid not in self._taken:
                self._taken.add(uid)
                return uid

    def give_back(self, uid: int) -> None:
        self._taken.discard(uid)


_UIDS = _HostUids()

_counter = 0


def _next_name(job_id: str) -> str:
    global _counter
    _counter += 1
    return f"job-{_safe_name(job_id)}-{os.getpid()}-{_counter}"


class _Capture:
    """Keep the first ``limit`` bytes of a stream; past it, close the pipe.

    Closing rather than draining keeps a flood from costing the agent memory or
    CPU: the job's next write fails with EPIPE/SIGPIPE, exactly as with
    ``job | head -c LIMIT``.
    """

    def __init__(self, fd: int, limit: int, buf: bytearray | None = None,
                 changed: Callable[[], None] | None = None) -> None:
        self.stream = trio.lowlevel.FdStream(fd)
        self.limit = limit
        self.buf = buf if buf is not None else bytearray()  # a LiveOutput's, for readers while it runs
        self.changed = changed
        self.truncated = False

    async def run(self) -> None:
        try:
            while True:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return
                room = self.limit - len(self.buf)
                if len(chunk) > room:
                    self.buf += chunk[: max(room, 0)]
                    self.truncated = True
                    self._changed()
                    return
                self.buf += chunk
                self._changed()
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def _changed(self) -> None:
        if self.changed is not None:
            self.changed()


class _Job:
    def __init__(self, request: SandboxRequest, work_dir: Path, cfg: ProcessSandboxConfig, host: _Host) -> None:
        self.req = request
        self.work_dir = work_dir
        self.cfg = cfg
        self.host = host
        self.limits = request.limits
        self.warnings = list(host.warnings)
        self.fds: list[int] = []
        self.name = _next_name(request.job_id)
        root_mounts = host.can_mount and os.geteuid() == 0
        self.rundir = cfg.runtime_dir / self.name if root_mounts else work_dir / "sandbox"
        self.scratch = self.rundir / "scratch"
        self.bindir = self.rundir / "bin"
        self.scratch_mounted = False
        self.mounts: list[Path] = []
        self.cg: cgroups.JobCgroup | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.monitor_pidfd: int | None = None
        self.init_pid: int | None = None
        self.init_pidfd: int | None = None
        self.reaped: tuple[int, Any] | None = None
        self.violation: str | None = None
        self.stopping = False
        self.userns = host.user_namespace
        #: the host uid and gid this sandbox runs as (``uid_base``), given back at clean-up
        self.host_uid: int | None = _UIDS.take(cfg) if self.userns and os.geteuid() == 0 else None
        self.rlimits: dict[str, int] = {}
        #: set when bwrap exits: it does as soon as the job's program has (its
        #: PID 1 reports that over an eventfd), before the namespaces are gone
        self.exited = trio.Event()
        self.started = False
        self.warm = False
        self.cpu_base_ns = 0
        self.out_r = self.err_r = self.stdin_w = self.ctl_w = -1
        #: the scratch tmpfs's root, held open: artifacts are read through it
        #: after the mount is detached from the agent's namespace
        self.scratch_fd: int | None = None

    # -- set-up ------------------------------------------------------------

    def _fd(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def _close(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.remove(fd)
            os.close(fd)

    def _prepare(self) -> None:
        self._prepare_scratch()
        self._prepare_cgroup()

    def _prepare_scratch(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.rundir.parent == self.cfg.runtime_dir:
            _private_runtime_dir(self.cfg.runtime_dir)
        if self.rundir.parent != self.cfg.runtime_dir and self.rundir.exists():
            _rmtree(self.rundir)  # a previous attempt's, in the agent's work_dir
        self.rundir.mkdir(mode=0o711)
        os.chmod(self.rundir, 0o711)
        self.scratch.mkdir()
        uid, gid = (self.host_uid, self.host_uid) if self.host_uid is not None else (os.geteuid(), os.getegid())
        if self.host.can_mount:
            _mount_tmpfs(self.scratch, self.limits.scratch_mb * 1024 * 1024, uid, gid)
            self.mounts.append(self.scratch)
            self.scratch_mounted = True
        elif os.geteuid() == 0:
            os.chown(self.scratch, uid, gid)
        self.scratch_fd = os.open(self.scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _prepare_cgroup(self) -> None:
        if not self.host.cgroups_ok:
            return
        cg = cgroups.JobCgroup(self.host.layout, self.name, devices=bool(self.req.gpu_devices))
        devices = None
        if self.req.gpu_devices:
            devices = []
            for dev in self.req.gpu_devices:
                st = os.stat(dev)
                devices.append(("c", os.major(st.st_rdev), os.minor(st.st_rdev)))
        try:
            cg.create(mem_bytes=self.limits.mem_bytes, pids=self.limits.pids, cpu=self.req.resources.cpu, devices=devices)
        except OSError as e:
            self.cg = cg  # so cleanup removes what was made
            raise SandboxError(f"could not set up the job's cgroup {cg.name}: {e}") from e
        self.cg = cg
        if cg.device_warning:
            self.warnings.append(cg.device_warning)

    def _rlimits(self) -> tuple[dict[str, int], dict[str, int]]:
        """(soft, hard) rlimits for the job."""
        lim = self.limits
        nofile = max(lim.nofile, self.cfg.min_nofile)
        if nofile != lim.nofile:
            self.warnings.append(f"nofile {lim.nofile} raised to {nofile}: the sandbox launcher needs that many to start")
        # The launcher runs as the sandbox uid, which cannot raise a hard limit past the
        # agent's own: asked for more, the job got a sandbox error, or failed itself.
        most = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if most != resource.RLIM_INFINITY and nofile > most:
            self.warnings.append(f"nofile {nofile} lowered to {most}, the most this agent may give (its own hard "
                                 "limit, `ulimit -Hn`)")
            nofile = most
        r = {"nofile": nofile, "fsize": lim.fsize_bytes, "core": 0}
        if not self.cg:
            # the rlimits fallback: weaker, and said so in the warnings
            r["as"] = lim.mem_bytes
            r["nproc"] = lim.pids
            if lim.cpu_ms is not None:
                r["cpu"] = max(1, math.ceil(lim.cpu_ms / 1000))
        self.rlimits = r
        # RLIMIT_CPU: the soft limit sends SIGXCPU (reported as cpu_limit); the hard
        # one, a second later, SIGKILL for a job that ignores it
        hard = {**r, "cpu": r["cpu"] + 1} if "cpu" in r else r
        return r, hard

    def _prlimit_args(self) -> list[str]:
        soft, hard = self._rlimits()
        assert self.host.tools.prlimit
        return [self.host.tools.prlimit] + [f"--{k}={v}:{hard[k]}" for k, v in soft.items()] + ["--"]

    def _plan(self, command: list[str], seccomp_fd: int, info_w: int, block_r: int) -> tuple[list[str], list[str], list[int]]:
        binds: list[namespaces.Bind] = []
        pass_fds: list[int] = [seccomp_fd, info_w, block_r]
        binds.append(namespaces.Bind(namespaces.SCRATCH, src=str(self.scratch), writable=True))
        exe = command[0]
        if not namespaces.in_system_dirs(exe):
            # The program file alone, never its directory: a program at /x bound the
            # host's whole / into the job (and with it the agent's data dir, where
            # other tenants' specs are). realpath: what the job is shown is the file
            # the agent checked, not whatever a path through /proc/self names.
            src = os.path.realpath(exe)
            name = os.path.basename(exe) or "program"
            if self.scratch_mounted:
                # bwrap, running as the sandbox uid, resolves sources by path and may
                # not traverse the agent's 0700 directories; the agent (root) binds
                # the program under the 0711 runtime dir first
                self.bindir.mkdir()
                target = self.bindir / name
                target.touch(mode=0o500)
                _bind(src, target)
                self.mounts.append(target)
                src = str(target)
            binds.append(namespaces.Bind(f"{namespaces.JOB_BIN}/{name}", src=src))
            command = [f"{namespaces.JOB_BIN}/{name}"] + command[1:]
        for dev in self.req.gpu_devices:
            binds.append(namespaces.Bind(dev, src=dev, writable=True, device=True))
        env = dict(self.req.env)
        env.update(self.req.gpu_env)
        etc = namespaces.ETC_FILES + (namespaces.ETC_NETWORK_FILES if self.req.network else ())
        plan = namespaces.BwrapPlan(
            command=command, env=env, binds=binds, user_namespace=self.userns, uid=self.cfg.uid, gid=self.cfg.gid,
            network=self.req.network, seccomp_fd=seccomp_fd, info_fd=info_w, block_fd=block_r, etc_files=etc,
        )
        return namespaces.bwrap_args(plan, self.host.system_layout), command, pass_fds

    # -- the run -------------------------------------------------------------

    def resolve(self) -> str | SandboxResult:
        """The program's host path, or the result of a job whose program does not exist."""
        req = self.req
        if not req.command:
            raise SandboxUnfit("a process job needs a command, e.g. ['/usr/bin/python3', '-c', 'print(1)']")
        exe = namespaces.resolve_command(req.command[0], req.env)
        if exe is None:
            return SandboxResult(
                exit_code=127, reason="exit 127",
                stderr=(f"p2psched: command {req.command[0]!r} was not found on the executor "
                        f"(looked in PATH={req.env.get('PATH', namespaces.DEFAULT_PATH)}); "
                        "give an absolute path or install it on every executor\n").encode(),
                warnings=self.warnings, sandbox=self._sandbox_info(),
            )
        return exe

    async def run(self, limiter: trio.CapacityLimiter | None = None) -> SandboxResult:
        exe = await trio.to_thread.run_sync(self.resolve)  # a lookup in the job's PATH touches the disk
        if isinstance(exe, SandboxResult):
            return exe
        async with limiter if limiter is not None else contextlib.nullcontext():
            started = await self.launch([exe] + self.req.command[1:] + self.req.args)
        if not started:
            await self.launch_failed()
        return await self.supervise()

    async def launch(self, command: list[str], *, warm: bool = False) -> bool:
        """Build the sandbox and start ``command`` in it, inside the job's cgroup.

        ``warm``: ``command`` is the warm-pool shim; no rlimits yet (the shim sets
        the job's own once it is handed one) and a control pipe for that hand-over.
        Returns False if bwrap failed before the command started.
        """
        await trio.to_thread.run_sync(self._prepare)
        seccomp_fd = self._fd(seccomp_filter.bpf_fd())
        info_r, info_w = (self._fd(x) for x in os.pipe())
        block_r, block_w = (self._fd(x) for x in os.pipe())
        self.out_r, out_w = (self._fd(x) for x in os.pipe())
        self.err_r, err_w = (self._fd(x) for x in os.pipe())
        stdin_r, self.stdin_w = (self._fd(x) for x in os.pipe())
        args, command, pass_fds = await trio.to_thread.run_sync(self._plan, command, seccomp_fd, info_w, block_r)
        if warm:
            ctl_r, self.ctl_w = (self._fd(x) for x in os.pipe())
            pass_fds.append(ctl_r)
            command = command + [str(ctl_r)]
        # The arguments travel on a memfd, not argv: env values (tokens, keys) must
        # not show in the host's `ps`.
        args_fd = self._fd(os.memfd_create("p2psched-bwrap-args", 0))
        os.write(args_fd, b"\0".join(x.encode() for x in args) + b"\0")
        os.lseek(args_fd, 0, os.SEEK_SET)
        pass_fds.append(args_fd)
        assert self.host.tools.bwrap
        argv = [self.host.tools.bwrap, "--args", str(args_fd), "--", *command]
        if not warm:
            argv = self._prlimit_args() + argv
        if self.cfg.nice and self.cg is not None and (nice := _nice_tool()):
            argv = [nice, "-n", str(self.cfg.nice), *argv]
        if self.userns and os.geteuid() == 0:
            # Switch to the sandbox uid with setpriv rather than Popen(user=...): a
            # uid change makes CPython fork() the whole agent with the GIL held,
            # while without one it uses vfork() and releases the GIL meanwhile.
            assert self.host.tools.setpriv
            argv = [self.host.tools.setpriv, f"--reuid={self.host_uid}", f"--regid={self.host_uid}",
                    "--clear-groups", "--", *argv]
        # A session of its own: Ctrl-C in the agent's terminal (SIGINT to its process
        # group) stops the agent, which lets the job finish within grace; it must not
        # kill the job. --die-with-parent still ends the job if the agent dies.
        self.popen = popen = await _LAUNCHER.call(lambda: subprocess.Popen(
            argv, stdin=stdin_r, stdout=out_w, stderr=err_w, pass_fds=pass_fds, close_fds=True,
            env={}, cwd="/", start_new_session=True,
        ))
        self.monitor_pidfd = os.pidfd_open(popen.pid)
        for fd in (stdin_r, out_w, err_w, info_w, block_r, args_fd, seccomp_fd, *pass_fds):
            self._close(fd)
        started = await self._await_start(info_r)
        self._close(info_r)
        if started:
            os.write(block_w, b"1")
        self._close(block_w)
        self.started = started
        return started

    async def launch_failed(self) -> None:
        """Reap bwrap and raise with what it said."""
        status, _ = await self._wait_monitor()
        msg = b""
        with contextlib.suppress(OSError):
            os.set_blocking(self.err_r, False)
            msg = os.read(self.err_r, 65536)
        raise SandboxError(launch_error(msg.decode(errors="replace").strip() or f"wait status {status}",
                                        in_container=in_container()))

    def detach_mounts(self) -> None:
        """Detach the job's scratch and program mounts from the agent's namespace.

        Each new sandbox copies the agent's whole mount table, and bwrap reads it
        back for every bind: with a mount per running job, building a sandbox
        grew from 60 to 240 ms at 700 running jobs. The job's namespace took its
        copy at clone time, and the agent keeps ``scratch_fd``; so once bwrap has
        reported its PID 1 the agent's mounts can go.
        """
        for m in reversed(self.mounts):
            _umount(m)
        self.mounts.clear()

    async def supervise(self) -> SandboxResult:
        """Capture output, feed stdin, enforce limits, and wait for the job to end."""
        live = self.req.live
        out = _Capture(self.out_r, self.limits.stdout_bytes, live.stdout if live else None, live.changed if live else None)
        err = _Capture(self.err_r, self.limits.stderr_bytes, live.stderr if live else None, live.changed if live else None)
        self.fds.remove(self.out_r)
        self.fds.remove(self.err_r)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.run)
            nursery.start_soon(err.run)
            nursery.start_soon(self._reaper)
            if self.mounts:
                # the job's namespace exists (bwrap reported its PID 1); off the
                # loop and beside the job, since an unmount may wait for an RCU
                # grace period
                nursery.start_soon(trio.to_thread.run_sync, self.detach_mounts)
            if self.req.stdin:
                nursery.start_soon(self._feed_stdin, self.stdin_w)
            else:
                self._close(self.stdin_w)
            watchdog = trio.CancelScope()
            nursery.start_soon(self._watchdog, watchdog)
            await self.exited.wait()
            watchdog.cancel()
            # The program is done. Whatever it left running (a daemon that closed
            # its stdio) dies with its PID 1, which bwrap's exit is killing already;
            # make sure, and wait until they are gone (not for the namespace teardown).
            self.kill_all()
            with trio.move_on_after(self.cfg.kill_wait_s):
                while self._members():
                    await trio.sleep(0.002)
            # Every job process is gone (its PID namespace died with bwrap's init), so
            # the pipes reach EOF at once; the deadline only covers a stray holder.
            nursery.cancel_scope.deadline = trio.current_time() + self.cfg.kill_wait_s
        assert self.reaped is not None
        status, rusage = self.reaped
        if not self.req.artifacts and not self.req.mask_patterns:
            return self._result(status, rusage, out, err)  # a few small reads
        # artifacts (up to tens of MiB) and regexes over the output: off the loop
        return await trio.to_thread.run_sync(self._result, status, rusage, out, err)

    # -- the warm pool's hand-over -------------------------------------------

    def adopt(self, request: SandboxRequest, work_dir: Path) -> None:
        """Make this pre-started sandbox ``request``'s: its limits, its name in warnings."""
        self.req = request
        self.limits = request.limits
        self.work_dir = work_dir
        self.warm = True
        if self.scratch_mounted:
            _remount_size(self.scratch, self.limits.scratch_mb * 1024 * 1024)
        if self.cg is not None:
            self.cg.set_limits(mem_bytes=self.limits.mem_bytes, pids=self.limits.pids, cpu=request.resources.cpu)
            # what the shim used before the job existed is not the job's
            self.cg.reset_peak()
            self.cpu_base_ns = self.cg.poll(cpu=True).cpu_ns

    async def hand_over(self, exe: str) -> None:
        """Tell the shim what to execute: argv, env and rlimits, on its control pipe."""
        r = self._rlimits()
        env = dict(self.req.env)
        env.update(self.req.gpu_env)
        spec = {"argv": [exe] + self.req.command[1:] + self.req.args, "env": env,
                "rlimits": {k: [v, r[1][k]] for k, v in r[0].items()}}
        data = json.dumps(spec).encode()
        fd = self.ctl_w
        self.fds.remove(fd)
        stream = trio.lowlevel.FdStream(fd)  # a large env may exceed the pipe buffer
        try:
            await stream.send_all(data)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _await_start(self, info_r: int) -> bool:
        """Read bwrap's info JSON; move its PID 1 into the cgroup. False if bwrap died first."""
        stream = trio.lowlevel.FdStream(os.dup(info_r))
        data = b""
        try:
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return False
                data += chunk
                try:
                    info = json.loads(data)
                    break
                except ValueError:
                    continue
        finally:
            await stream.aclose()
        pid = int(info["child-pid"])
        self.init_pid = pid
        try:
            self.init_pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False  # bwrap failed while building the sandbox; its stderr says why
        if self.cg is not None:
            await trio.to_thread.run_sync(self.cg.add, pid)
        return True

    async def _feed_stdin(self, fd: int) -> None:
        self.fds.remove(fd)
        stream = trio.lowlevel.FdStream(fd)
        try:
            await stream.send_all(self.req.stdin)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the job stopped reading; that is its business
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _reaper(self) -> None:
        await self._wait_monitor()
        self.exited.set()

    async def _wait_monitor(self) -> tuple[int, Any]:
        """Reap bwrap. Called by the reaper task, or by cleanup once that task is gone."""
        assert self.popen is not None and self.monitor_pidfd is not None
        if self.reaped is None:
            await trio.lowlevel.wait_readable(self.monitor_pidfd)
            _, status, rusage = os.wait4(self.popen.pid, 0)
            self.popen.returncode = os.waitstatus_to_exitcode(status)
            self.reaped = (status, rusage)
        return self.reaped

    def _signal_init(self, sig: int) -> None:
        if self.init_pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.init_pidfd, sig)

    def kill_all(self) -> None:
        """SIGKILL the job's PID 1: the kernel then kills every process in its namespace.
        (Teardown also kills the cgroup's members, from a worker thread.)"""
        self._signal_init(signal.SIGKILL)
        if self.init_pidfd is None and self.popen is not None and self.reaped is None:
            # bwrap has not reported its PID 1 yet: killing bwrap itself makes its
            # child die too (--die-with-parent). Through its pidfd, not Popen.kill():
            # that polls first, and reaping an exited bwrap there left _wait_monitor
            # an ECHILD (a warm sandbox cut short by Ctrl-C failed its job's run).
            if self.monitor_pidfd is not None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pidfd_send_signal(self.monitor_pidfd, signal.SIGKILL)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)  # not reaped, so still ours

    def _members(self) -> list[int]:
        """Host pids of the job's processes other than bwrap's init."""
        if self.cg is not None:
            pids = self.cg.pids()
        else:
            pids = _pids_in_namespace_of(self.init_pid) if self.init_pid else []
        return [p for p in pids if p != self.init_pid]

    async def _violate(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.violation = reason
        if self.limits.violation == "graceful" and self.limits.grace_ms > 0:
            for pid in self._members():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            with trio.move_on_after(self.limits.grace_ms / 1000):
                await self.exited.wait()
                return
        self.kill_all()

    async def _watchdog(self, scope: trio.CancelScope) -> None:
        with scope:
            start = trio.current_time()
            deadline = start + self.limits.wall_ms / 1000
            interval = self.cfg.poll_min_s
            cpu = max(self.req.resources.cpu, 0.01)
            while True:
                now = trio.current_time()
                if now >= deadline:
                    await self._violate("wall_timeout")
                    return
                wake = min(deadline, now + interval)
                if self.cg is not None:
                    s = self.cg.poll(cpu=self.limits.cpu_ms is not None)
                    if s.oom_kills:
                        await self._violate("memory_limit")
                        return
                    if s.pids_max_hits:
                        await self._violate("pids_limit")
                        return
                    if self.limits.cpu_ms is not None:
                        left_ms = self.limits.cpu_ms - (s.cpu_ns - self.cpu_base_ns) / 1e6  # as the result counts it
                        if left_ms <= 0:
                            await self._violate("cpu_limit")
                            return
                        # the quota lets CPU time grow at most `cpu` seconds per second
                        wake = min(wake, now + max(left_ms / 1000 / cpu, 0.005))
                else:
                    wake = deadline
                await trio.sleep_until(wake)
                interval = min(interval * 2, self.cfg.poll_max_s)

    # -- the result --------------------------------------------------------

    def _result(self, status: int, rusage: Any, out: _Capture, err: _Capture) -> SandboxResult:
        stats = self.cg.stats() if self.cg is not None else None
        if stats is not None:
            cpu_ms = max(0, stats.cpu_ns - self.cpu_base_ns) / 1e6
            peak = stats.peak_mem_bytes
        elif rusage is not None:
            cpu_ms = (rusage.ru_utime + rusage.ru_stime) * 1000
            peak = rusage.ru_maxrss * 1024
        else:
            cpu_ms, peak = 0.0, 0
        code = os.waitstatus_to_exitcode(status)
        exit_code: int | None
        sig: int | None = None
        if code < 0:
            exit_code, sig = None, -code
        elif 128 < code <= 128 + 64:
            # bwrap exits with the command's status, or 128+N when it died of
            # signal N (the shell convention)
            exit_code, sig = None, code - 128
        else:
            exit_code = code
        limit: str | None = self.violation
        if limit is None and stats is not None:
            if stats.oom_kills:
                limit = "memory_limit"
            elif stats.pids_max_hits and exit_code != 0:
                limit = "pids_limit"
        # A limit only where the limit could have sent the signal: bwrap reports a job's
        # own `exit 152` as 128+24 too, and that is no cpu_limit.
        if limit is None and sig is not None:
            if sig == signal.SIGXCPU and "cpu" in self.rlimits:
                limit = "cpu_limit"
            elif sig == signal.SIGXFSZ and self._file_at_fsize():
                limit = "output_limit"
            elif sig == signal.SIGPIPE and (out.truncated or err.truncated):
                limit = "output_limit"
        if limit is not None:
            reason = limit
        elif sig is not None:
            reason = f"signal {sig}"
        else:
            reason = f"exit {exit_code}"
        stdout, stderr = bytes(out.buf), bytes(err.buf)
        if self.req.mask_patterns:
            stdout, stderr = mask(stdout, self.req.mask_patterns), mask(stderr, self.req.mask_patterns)
        return SandboxResult(
            exit_code=exit_code, reason=reason, stdout=stdout, stderr=stderr,
            stdout_truncated=out.truncated, stderr_truncated=err.truncated,
            cpu_ms=cpu_ms, peak_mem_bytes=peak, limit_hit=limit, signal=sig,
            artifacts=self._collect_artifacts(), warnings=self.warnings, sandbox=self._sandbox_info(),
        )

    def _file_at_fsize(self, most: int = 10_000) -> bool:
        """Whether a file in scratch (of its first ``most`` entries) reached the
        fsize limit: what a SIGXFSZ from that limit leaves behind."""
        if self.scratch_fd is None:
            return False
        seen = 0
        for _, _, files, dir_fd in os.fwalk(".", dir_fd=self.scratch_fd):
            for name in files:
                seen += 1
                with contextlib.suppress(OSError):
                    if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size >= self.limits.fsize_bytes:
                        return True
                if seen >= most:
                    return False
        return False

    def _collect_artifacts(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        total = 0
        for name in self.req.artifacts:
            try:
                assert self.scratch_fd is not None
                data, cut = _read_beneath(self.scratch_fd, name, self.cfg.artifact_max_bytes + 1)
            except (OSError, ValueError) as e:
                self.warnings.append(f"artifact {name!r} not collected: {e}")
                continue
            if len(data) > self.cfg.artifact_max_bytes or cut:
                data = data[: self.cfg.artifact_max_bytes]
                self.warnings.append(f"artifact {name!r} truncated to {self.cfg.artifact_max_bytes} bytes")
            if total + len(data) > self.cfg.artifacts_total_bytes:
                self.warnings.append(f"artifact {name!r} dropped: artifacts exceed {self.cfg.artifacts_total_bytes} bytes")
                continue
            total += len(data)
            found[name] = data
        return found

    def _sandbox_info(self) -> dict[str, object]:
        ns = ["pid", "mount", "ipc", "uts", "cgroup"] + ([] if self.req.network else ["net"])
        if self.userns:
            ns.append("user")
        layout = self.host.layout
        return {
            "runtime": "process",
            "launcher": self.host.tools.bwrap_version,
            # warm: built ahead of the job by the pool, used for this job only
            "started": "warm" if self.warm else "cold",
            "namespaces": sorted(ns),
            "user_namespace": self.userns,
            # the job's uid on the host (inside its user namespace it is cfg.uid, nobody)
            "uid": self.host_uid if self.host_uid is not None else os.geteuid(),
            "capabilities": [],
            "no_new_privs": True,
            "seccomp": {"action": "EPERM", "denied": len(seccomp_filter.DENIED_SYSCALLS) + 2,
                        "bpf_sha256": self.host.seccomp_sha256},
            "network": "host" if self.req.network else "loopback",
            "root": "read-only binds of system dirs and a curated /etc",
            "scratch": {"tmpfs": self.scratch_mounted, "bytes": self.limits.scratch_mb * 1024 * 1024},
            "cgroup": f"v{layout.version}" if self.cg is not None else None,
            "controllers": sorted(self.cg.dirs if layout.version == 1 else layout.controllers) if self.cg else [],
            "rlimits": dict(self.rlimits),
            "devices": list(self.req.gpu_devices),
            # devices-v1 or devices-bpf: the cgroup allows only the default nodes and
            # those above; mount-namespace: only they exist inside, nothing else stops an open
            "device_control": (self.cg.device_control if self.cg else None) or "mount-namespace",
        }

    # -- tear-down ---------------------------------------------------------

    def close_fds(self) -> None:
        for fd in (self.monitor_pidfd, self.init_pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.monitor_pidfd = self.init_pidfd = None
        for fd in list(self.fds):
            self._close(fd)

    async def cleanup(self) -> None:
        """Kill whatever is left, reap bwrap, remove cgroup and scratch. Runs shielded."""
        with trio.CancelScope(shield=True):
            if self.popen is not None and self.reaped is None:
                self.kill_all()
                with trio.move_on_after(self.cfg.kill_wait_s):
                    await self._wait_monitor()
            self.close_fds()
            await trio.to_thread.run_sync(self._teardown)

    def _teardown(self) -> None:
        if self.scratch_fd is not None:
            os.close(self.scratch_fd)
            self.scratch_fd = None
        gone = True
        if self.cg is not None:
            with contextlib.suppress(OSError):
                self.cg.kill()
            if not self.cg.remove(self.cfg.kill_wait_s):
                self.warnings.append(f"cgroup {self.cg.name} could not be removed")
                gone = False
        for m in reversed(self.mounts):
            _umount(m)
        self.mounts.clear()
        with contextlib.suppress(OSError):
            _rmtree(self.rundir)
        if self.host_uid is not None and gone:
            # no process of the job is left to share its uid with the next one
            _UIDS.give_back(self.host_uid)
            self.host_uid = None


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _read_beneath(root_fd: int, name: str, limit: int) -> tuple[bytes, bool]:
    """Read ``root/name`` without following any symlink: the job wrote scratch, and a
    symlink to /etc/shadow must not make the (root) agent read the host's file."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError("the name must be a relative path inside scratch, without '..'")
    fd = os.dup(root_fd)
    try:
        for p in parts[:-1]:
            nfd = os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        st = os.fstat(ffd)
        import stat as stat_mod

        if not stat_mod.S_ISREG(st.st_mode):
            raise ValueError("it is not a regular file")
        chunks = []
        got = 0
        while got < limit:
            b = os.read(ffd, min(1 << 20, limit - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks), got >= limit
    finally:
        os.close(ffd)


def _pids_in_namespace_of(init_pid: int) -> list[int]:
    """Host pids sharing ``init_pid``'s PID namespace (the no-cgroup fallback's member list)."""
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return []
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/ns/pid") == target:
                    out.append(int(entry.name))
    return out


# ---------------------------------------------------------------------------
# Public entry points


def _shim_python() -> str | None:
    """A python3 under the system directories (bound into every sandbox) to run the shim."""
    import shutil

    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and namespaces.in_system_dirs(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class ProcessSandbox:
    """Runs process jobs; optionally keeps a few sandboxes pre-started (the warm pool).

    Building a sandbox (namespaces, mounts, cgroup migration) costs several
    milliseconds of kernel work, tens on a loaded host. The pool does that work
    ahead of time: each entry is a complete, unused sandbox whose first program
    (``_shim.py``) waits to be told which program to become. Taking one costs a
    few cgroup writes and one ``execve``. An entry is used for one job only, so
    warm jobs are as isolated as cold ones. Jobs the pool cannot serve (network
    jobs, GPU jobs, programs outside the system directories, memory limits under
    ``warm_min_mem_bytes``) and jobs arriving when it is empty start cold.

    The agent runs :meth:`serve` in its nursery to keep the pool filled; without
    it every job starts cold.
    """

    #: The shim's interpreter uses ~10 MiB before it executes the job; a smaller
    #: memory limit could not be applied to a warm sandbox, so such jobs start cold.
    warm_min_mem_bytes = 48 * 1024 * 1024
    #: How long the pool's refills and clean-ups wait for running warm jobs to end.
    #: A refill is tens of ms of kernel and interpreter work; started beside a
    #: hand-over on a small host it took the CPUs the job was handed over to (warm
    #: /bin/true p50 9.1 ms instead of 4.6). Short jobs end inside the wait; long
    #: ones delay the refill by this much only.
    settle_s = 0.05

    def __init__(self, config: ProcessSandboxConfig | None = None, *, warm: int = 0) -> None:
        self.cfg = config or ProcessSandboxConfig()
        #: How many pre-started sandboxes to keep. Each holds a python process
        #: (~3 MiB PSS, shared pages aside), a cgroup and a tmpfs.
        self.warm = warm
        self._pool: list[_Job] = []
        self._taken = trio.Event()
        self._python = _shim_python()
        self._shim = (Path(__file__).parent / "_shim.py").read_text()
        self._discard: list[_Job] = []
        self._serving = False
        #: warm jobs between hand-over and result (see settle_s)
        self._warm_running = 0
        self._settled = trio.Event()
        self._launching = trio.CapacityLimiter(self.cfg.launch_concurrency)

    async def _host(self) -> _Host:
        host = _HOSTS.get(_host_key(self.cfg))
        if host is None:
            host = await trio.to_thread.run_sync(_host, self.cfg)
        if host.tools.bwrap is None:
            raise SandboxUnfit("process jobs need bubblewrap: install it with 'apt-get install bubblewrap'")
        if host.tools.prlimit is None or host.tools.setpriv is None:
            raise SandboxUnfit(
                "process jobs need util-linux's prlimit and setpriv: install them with 'apt-get install util-linux'"
            )
        return host

    async def run(self, request: SandboxRequest, work_dir: Path) -> SandboxResult:
        """Run one job; see the module docstring for the contract."""
        host = await self._host()
        taken = self._take(request)
        if taken is not None:
            job, exe = taken
            self._warm_running += 1
            try:
                # a handful of small cgroupfs writes: cheaper inline than a thread hop
                job.adopt(request, work_dir)
                await job.hand_over(exe)
                return await job.supervise()
            finally:
                self._warm_running -= 1
                if not self._warm_running:
                    self._settled.set()
                await self._finish(job)
        job = _Job(request, work_dir, self.cfg, host)
        try:
            return await job.run(self._launching)
        finally:
            await self._finish(job)

    async def _finish(self, job: _Job) -> None:
        """Clean up after a job. While :meth:`serve` runs, removing a finished job's
        cgroup and mounts (milliseconds of kernel work) is left to it, off the job's
        critical path; its processes are already gone, bwrap having been reaped."""
        if self._serving and job.reaped is not None:
            for fd in list(job.fds):  # the pipes; the pidfds stay for the reaping
                job._close(fd)
            self._discard.append(job)
            self._taken.set()
        else:
            await job.cleanup()

    async def _cleanup_one(self, job: _Job, limiter: trio.CapacityLimiter) -> None:
        # shielded, limiter included: a job leaves the list only once cleaned, so
        # serve's own exit cleans whatever a cancellation interrupted
        with trio.CancelScope(shield=True):
            async with limiter:
                await job.cleanup()
            self._discard.remove(job)

    def _take(self, request: SandboxRequest) -> tuple[_Job, str] | None:
        if not self._pool or request.network or request.gpu_devices:
            return None
        if request.limits.mem_bytes < self.warm_min_mem_bytes or not request.command:
            return None
        exe = namespaces.resolve_command(request.command[0], request.env)
        if exe is None or not namespaces.in_system_dirs(exe):
            return None
        while self._pool:
            job = self._pool.pop()
            if job.reaped is None and not _exited(job.monitor_pidfd):
                self._taken.set()
                return job, exe
            self._discard.append(job)
        self._taken.set()
        return None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``warm`` sandboxes pre-started until cancelled; then tear them down."""
        host = await self._host()
        self._serving = True
        if self.warm <= 0 or self._python is None or not (host.can_mount and os.geteuid() == 0):
            # nothing to keep warm: every job starts cold; still clean up behind them
            self.warm = 0
        python = self._python or "/usr/bin/python3"
        template = SandboxRequest(job_id="warm", runtime="process", limits=_warm_limits(), resources=_warm_resources(),
                                  command=[python])
        started = False
        try:
            while True:
                # a fresh event before the work, so a wake-up during it is not lost
                self._taken = trio.Event()
                if self._discard:
                    async with trio.open_nursery() as n:
                        limiter = trio.CapacityLimiter(8)
                        for job in list(self._discard):
                            n.start_soon(self._cleanup_one, job, limiter)
                while len(self._pool) < self.warm:
                    job = _Job(template, self.cfg.runtime_dir, self.cfg, host)
                    try:
                        async with self._launching:
                            ok = await job.launch([python, "-I", "-S", "-c", self._shim], warm=True)
                    except BaseException:
                        await job.cleanup()
                        raise
                    if not ok:
                        await job.cleanup()
                        raise SandboxError("the warm pool could not start a sandbox; run 'p2psched doctor'")
                    self._pool.append(job)
                if not started:
                    task_status.started()
                    started = True
                await self._taken.wait()
                with trio.move_on_after(self.settle_s):
                    while self._warm_running:
                        self._settled = trio.Event()
                        await self._settled.wait()
        finally:
            self._serving = False
            with trio.CancelScope(shield=True):
                pool, self._pool = self._pool, []
                for job in pool + self._discard:
                    await job.cleanup()


def _exited(pidfd: int | None) -> bool:
    if pidfd is None:
        return True
    import select

    # poll, not select: an agent running hundreds of jobs holds descriptors past
    # select's limit of 1024
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _warm_limits() -> Limits:
    # generous until the job's own limits are written at hand-over
    return Limits.model_validate({"mem_bytes": 1 << 30, "pids": 64, "wall_ms": 7 * 24 * 3600 * 1000})


def _warm_resources() -> Resources:
    return Resources.model_validate({"cpu": 1.0})


async def run_process(
    request: SandboxRequest, work_dir: Path, config: ProcessSandboxConfig | None = None
) -> SandboxResult:
    """Run ``request`` in a freshly built (cold) sandbox; see the module docstring."""
    return await ProcessSandbox(config).run(request, work_dir)


def reap_stale(config: ProcessSandboxConfig | None = None) -> int:
    """Remove job cgroups and scratch mounts left by a previous agent process. Returns how many.

    Blocking (tens of ms: it also probes the host once, which the first job
    would otherwise pay for); call it before the agent starts serving.
    """
    cfg = config or ProcessSandboxConfig()
    _host(cfg)
    n = 0
    if cfg.cgroups == "auto":
        n += cgroups.reap_stale(cgroups.detect())
    for mountpoint in leftovers.stale_mounts(cfg.runtime_dir):
        n += _umount(mountpoint)
    for d in leftovers.stale_dirs(cfg.runtime_dir):
        with contextlib.suppress(OSError):
            _rmtree(d)
    for pid in leftovers.orphaned_sandboxes():
        n += _kill_orphan(pid)
    return n


def _kill_orphan(pid: int) -> bool:
    """SIGKILL a half-built sandbox's init (which ends its PID namespace), through a
    pidfd taken before checking again that it is one: never a reused pid."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # gone already
    try:
        if not leftovers.is_orphaned_sandbox(pid):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def doctor_checks(config: ProcessSandboxConfig | None = None) -> list[tuple[str, bool, str, str]]:
    """(check, ok, detail, fix) for every isolation feature the process sandbox uses."""
    cfg = config or ProcessSandboxConfig()
    checks: list[tuple[str, bool, str, str]] = []
    tools = namespaces.find_tools()
    checks.append(("bubblewrap", tools.bwrap is not None, tools.bwrap_version or "not found on PATH",
                   "install it: apt-get install bubblewrap"))
    checks.append(("prlimit and setpriv", tools.prlimit is not None and tools.setpriv is not None,
                   f"{tools.prlimit or 'prlimit not found'}, {tools.setpriv or 'setpriv not found'}",
                   "install util-linux: apt-get install util-linux"))
    for kind in ("pid", "mount", "net", "ipc", "uts", "cgroup"):
        ok, detail = namespaces.probe_namespace(kind)
        checks.append((f"{kind} namespace", ok, detail,
                       "run the agent as root (or with CAP_SYS_ADMIN); in a container, run it --privileged"))
    if tools.bwrap:
        ok, detail = namespaces.probe_user_namespace(tools.bwrap, cfg.uid if os.geteuid() == 0 else None, cfg.gid)
    else:
        ok, detail = False, "bubblewrap is missing"
    checks.append(("user namespace", ok, detail,
                   "allow them: sysctl -w user.max_user_namespaces=15000 kernel.unprivileged_userns_clone=1 "
                   "(without them jobs run as the agent's uid with all capabilities dropped)"))
    layout = cgroups.detect()
    checks.append(("cgroup layout", layout.version is not None, layout.note,
                   "mount cgroup v2 at /sys/fs/cgroup with the memory, pids and cpu controllers enabled"))
    writable, wdetail = False, "no usable hierarchy"
    if layout.version is not None:
        try:
            cgroups.prepare_parent(layout)
            probe = cgroups.JobCgroup(layout, f"job-doctor-{os.getpid()}")
            probe.create(mem_bytes=64 << 20, pids=8, cpu=1.0, devices=None)
            probe.kill()
            for d in reversed(probe.created):
                d.rmdir()
            writable, wdetail = True, f"created and removed a job cgroup with {sorted(layout.controllers)}"
        except OSError as e:
            wdetail = str(e)
    checks.append(("cgroup writable", writable, wdetail,
                   "run the agent as root, or delegate a cgroup to it (systemd: Delegate=yes)"))
    if writable:
        ok, detail = cgroups.probe_device_control(layout)
        checks.append(("device control", ok, detail, cgroups.device_control_fix(layout)))
    missing = sorted(set(cgroups.V2_CONTROLLERS) - layout.controllers)
    checks.append(("cgroup controllers", layout.version is not None and not missing,
                   f"have {sorted(layout.controllers)}" + (f", missing {missing}" if missing else ""),
                   "enable them in the parent's cgroup.subtree_control (v2) or mount them (v1)"))
    try:
        bpf = seccomp_filter.filter_bpf()
        has_seccomp = "Seccomp:" in Path("/proc/self/status").read_text()
        checks.append(("seccomp", has_seccomp, f"libseccomp filter built ({len(bpf)} bytes of BPF)",
                       "use a kernel built with CONFIG_SECCOMP_FILTER"))
    except Exception as e:  # libseccomp missing or broken: the check must report it, not crash doctor
        checks.append(("seccomp", False, str(e), "install libseccomp2: apt-get install libseccomp2"))
    fallback = not writable
    checks.append(("limits fallback", not fallback,
                   "cgroups enforce memory, pids and CPU" if not fallback else
                   "RLIMITS ONLY: memory is capped as address space, processes per uid, CPU per process",
                   "make a cgroup hierarchy writable (see 'cgroup writable')"))
    return checks
