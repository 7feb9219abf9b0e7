"""Whether an agent that was killed left process-job cgroups, mounts, scratch or processes behind.

Cheap to ask (a few reads of /proc and two directory listings), so that an agent
starts without loading the process sandbox (~3 MB resident) unless there is
something to clean up; ``process.reap_stale`` does the cleaning.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from p2psched.sandbox import cgroups

#: ProcessSandboxConfig.runtime_dir's default: where a root agent mounts job scratch.
RUNTIME_DIR = Path("/run/p2psched")
#: The memfd a sandbox's seccomp filter reaches bwrap in (``seccomp_filter.bpf_fd``).
#: bwrap holds it only while it builds the sandbox.
SECCOMP_MEMFD = "p2psched-seccomp"


def _mounts() -> list[tuple[str, bool]]:
    """This namespace's mount points, newest first, each with whether a later mount
    covers it (one made on it, or on a directory above it): no path reaches a
    covered mount, so nothing can unmount it."""
    out: list[tuple[str, bool]] = []
    with contextlib.suppress(OSError):
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mountpoint = line.split()[4]
            covered = any(m == mountpoint or mountpoint.startswith(m.rstrip("/") + "/") for m, _ in out)
            out.append((mountpoint, covered))
    return out


def _owner_gone(path: str, runtime_dir: Path) -> bool:
    return cgroups.owner_gone(path[len(str(runtime_dir)) + 1:].split("/")[0])


def stale_mounts(runtime_dir: Path = RUNTIME_DIR) -> list[Path]:
    """Mounts under ``runtime_dir`` whose agent process is gone, innermost first.

    Covered mounts are left out (see ``_mounts``), and so are, in ``stale_dirs``,
    the directories that hold one: listing what cannot be removed would only make
    every agent start load the process sandbox for nothing."""
    prefix = str(runtime_dir) + "/"
    return [Path(m) for m, covered in _mounts()
            if m.startswith(prefix) and not covered and _owner_gone(m, runtime_dir)]


def stale_dirs(runtime_dir: Path = RUNTIME_DIR) -> list[Path]:
    prefix = str(runtime_dir) + "/"
    stuck = {m[len(prefix):].split("/")[0] for m, covered in _mounts() if covered and m.startswith(prefix)}
    with contextlib.suppress(OSError):
        return [d for d in runtime_dir.iterdir() if cgroups.owner_gone(d.name) and d.name not in stuck]
    return []


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _holds_memfd(pid: str, name: str) -> bool:
    target = f"/memfd:{name} (deleted)"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
    return False


def is_orphaned_sandbox(pid: int) -> bool:
    """Whether ``pid`` is the init of a sandbox a killed agent left half built.

    ``bwrap --die-with-parent`` takes a sandbox down with its agent, but not one
    still being built: the init (PID 1 of the sandbox's PID namespace) may not yet
    be set to die with its bwrap parent. Killed then, the agent leaves such inits
    running outside any job cgroup: one waiting on ``--block-fd`` goes on when the
    agent's end closes and ends with its program (within seconds here); one
    waiting on bwrap's own eventfd waits for good. Each is the first process of a
    PID namespace of its own, still holds the seccomp filter's memfd (a built
    sandbox's init has closed it) and no longer has bwrap as its parent. Killing it
    ends its namespace and everything in it. A live agent's sandboxes, built or
    not, all have their bwrap.
    """
    if pid == os.getpid():
        return False
    status = _read(f"/proc/{pid}/status")
    nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
    if len(nspid) < 2 or nspid[-1] != "1":
        return False
    ppid = next((line.split()[1] for line in status.splitlines() if line.startswith("PPid:")), "0")
    return _read(f"/proc/{ppid}/comm").strip() != "bwrap" and _holds_memfd(str(pid), SECCOMP_MEMFD)


def orphaned_sandboxes() -> list[int]:
    """The inits of every sandbox a killed agent left half built (see ``is_orphaned_sandbox``)."""
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and is_orphaned_sandbox(int(pid))]


def any_left(runtime_dir: Path = RUNTIME_DIR) -> bool:
    return bool(cgroups.stale_names(cgroups.detect()) or stale_mounts(runtime_dir) or stale_dirs(runtime_dir)
                or orphaned_sandboxes())
