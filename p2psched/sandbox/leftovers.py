"""Whether an agent that was killed left process-job cgroups, mounts or scratch behind.

Cheap to ask (a few reads of /proc and two directory listings), so that an agent
starts without loading the process sandbox (~3 MB resident) unless there is
something to clean up; ``process.reap_stale`` does the cleaning.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from p2psched.sandbox import cgroups

#: ProcessSandboxConfig.runtime_dir's default: where a root agent mounts job scratch.
RUNTIME_DIR = Path("/run/p2psched")


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


def any_left(runtime_dir: Path = RUNTIME_DIR) -> bool:
    return bool(cgroups.stale_names(cgroups.detect()) or stale_mounts(runtime_dir) or stale_dirs(runtime_dir))
