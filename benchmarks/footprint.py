"""Memory and CPU of a group of processes, for the benchmarks that compare systems.

Only psutil: benchmarks/ray_side.py imports it from Ray's own virtualenv too.
"""

from __future__ import annotations

import psutil


def family(pid: int) -> list[psutil.Process]:
    """Process ``pid`` and every process it started."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss_mb(procs: list[psutil.Process]) -> float:
    """Their RSS together, MiB; a process that ended meanwhile counts nothing."""
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def cpu_s(procs: list[psutil.Process]) -> float:
    """Their CPU time together (user and system), seconds."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total
