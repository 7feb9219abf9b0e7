"""Which device nodes and environment a GPU job gets, and what a job without GPUs gets.

For the process sandbox::

    req.gpu_env      = grant.env  (or no_gpu_env() for a job without the gpu capability)
    req.gpu_devices  = list(grant.devices)  (empty: no /dev/nvidia* at all)
    cgroup_rules(req.gpu_devices) -> [(path, "c", major, minor)] for a device-cgroup allow-list

CUDA needs ``/dev/nvidiactl`` and ``/dev/nvidia-uvm`` besides the GPU's own
``/dev/nvidia<minor>``; a MIG device also needs its GPU-instance and
compute-instance capability nodes under ``/dev/nvidia-caps``. ``nvidia-uvm-tools``
(profilers) and ``nvidia-modeset`` (display) are left out on purpose.
"""

from __future__ import annotations

import os
import stat

CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm")


def no_gpu_env() -> dict[str, str]:
    """Environment for a job that must see no GPU.

    An empty ``CUDA_VISIBLE_DEVICES`` makes the CUDA runtime report zero devices;
    ``void`` is the NVIDIA container toolkit's value for "no GPU, no driver files".
    This is advice to CUDA, not enforcement: the device cgroup (no /dev/nvidia*
    allowed) is what stops a job that ignores it.
    """
    return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}


def cgroup_rules(paths: list[str] | tuple[str, ...]) -> list[tuple[str, str, int, int]]:
    """``(path, "c", major, minor)`` for each path that exists and is a character device.

    Missing paths are skipped rather than failing: a declared GPU has no node, and a
    host may lack ``nvidia-uvm`` until the first CUDA call loads it.
    """
    out: list[tuple[str, str, int, int]] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            out.append((p, "c", os.major(st.st_rdev), os.minor(st.st_rdev)))
    return out
