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


def stale_mounts(runtime_dir: Path = RUNTIME_DIR) -> list[Path]:
    """Mounts under ``runtime_dir`` whose agent process is gone, innermost first."""
    prefix = str(runtime_dir) + "/"
    out: list[Path] = []
    with contextlib.suppress(OSError):
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mountpoint = line.split()[4]
            if mountpoint.startswith(prefix) and cgroups.owner_gone(mountpoint[len(prefix):].split("/")[0]):
                out.append(Path(mountpoint))
    return out


def stale_dirs(runtime_dir: Path = RUNTIME_DIR) -> list[Path]:
    with contextlib.suppress(OSError):
        return [d for d in runtime_dir.iterdir() if cgroups.owner_gone(d.name)]
    return []


def any_left(runtime_dir: Path = RUNTIME_DIR) -> bool:
    return bool(cgroups.stale_names(cgroups.detect()) or stale_mounts(runtime_dir) or stale_dirs(runtime_dir))
