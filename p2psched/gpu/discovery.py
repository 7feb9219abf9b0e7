"""What GPUs this host has: NVML discovery, or GPUs declared with ``--gpus``.

Calls the agent makes::

    inv = load_inventory(settings.gpus)          # at start; blocking: trio.to_thread.run_sync
    inv.reason                                   # why there are none, for logs and ``doctor``
    inv.labels()                                 # merge into NodeState.labels (peers show declared)
    usage = sample_usage(inv)                    # every metrics scrape; blocking, NVML only
    doctor_checks(settings.gpus)                 # list[(name, ok, detail, fix)] for ``doctor``

``load_inventory(None)`` asks NVML; ``load_inventory("2xH100-80GB/mig")`` or a path
to a TOML/YAML file declares GPUs instead (see :mod:`p2psched.gpu.declared`).
Declared GPUs carry ``declared=True`` in every view. No driver, no library or no
GPU is not an error: the inventory is empty and ``reason`` says why.

``pynvml`` (from ``nvidia-ml-py``) is imported only inside these functions, so the
agent pays nothing for it on hosts without GPUs.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

#: Where the driver publishes the device-file minors of MIG capabilities.
PROC_CAPS = Path("/proc/driver/nvidia/capabilities")


@dataclass(frozen=True, slots=True)
class MigInstance:
    """One MIG device (a GPU instance with its compute instance) that already exists."""

    uuid: str  # "MIG-4f6b..." : what CUDA_VISIBLE_DEVICES takes
    profile: str  # "1g.10gb"
    memory_bytes: int
    gi_id: int | None = None
    ci_id: int | None = None
    start: int | None = None  # first memory slice, where NVML tells us
    cap_devices: tuple[str, ...] = ()  # /dev/nvidia-caps/nvidia-capN for its gi and ci access


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    uuid: str  # "GPU-..." ; declared GPUs get "GPU-declared-<index>"
    model: str  # NVML name, or the declared model such as "H100-80GB"
    memory_bytes: int
    minor: int | None  # /dev/nvidia<minor>
    declared: bool
    mig_enabled: bool = False
    mig_instances: tuple[MigInstance, ...] = ()
    profile: str = "whole"  # slot profile (see p2psched.gpu.profiles); declared GPUs bring their own

    def device_node(self) -> str | None:
        return None if self.minor is None else f"/dev/nvidia{self.minor}"


@dataclass(frozen=True, slots=True)
class GpuInventory:
    gpus: tuple[GpuInfo, ...] = ()
    source: Literal["nvml", "declared", "none"] = "none"
    reason: str = ""  # why there are none; or where the declaration came from
    driver_version: str = ""
    errors: tuple[str, ...] = field(default=())  # per-GPU problems that did not stop discovery

    @property
    def declared(self) -> bool:
        return self.source == "declared"

    def labels(self) -> dict[str, str]:
        """Node labels for gossip, so ``p2psched peers`` can say where the slots came from."""
        if not self.gpus:
            return {"gpu.source": "none"}
        models = sorted({g.model for g in self.gpus})
        return {"gpu.source": self.source, "gpu.declared": "true" if self.declared else "false",
                "gpu.count": str(len(self.gpus)), "gpu.model": ",".join(models)[:64]}

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "declared": self.declared, "reason": self.reason,
                "driver_version": self.driver_version, "errors": list(self.errors),
                "gpus": [asdict(g) for g in self.gpus]}


@dataclass(frozen=True, slots=True)
class GpuUsage:
    utilization_ratio: float | None  # 0..1; None where NVML cannot say (MIG mode)
    memory_used_bytes: int
    memory_total_bytes: int


def load_inventory(gpus: str | Path | None = None, *, profile: str = "whole") -> GpuInventory:
    """Declared GPUs when ``gpus`` is given, else what NVML finds.

    ``profile`` (``--gpu-profile``) is the slot profile for discovered GPUs that are not
    in MIG mode (MIG-mode GPUs always offer the instances that exist), and for declared
    groups that name none. Raises ValueError only for a bad ``gpus`` declaration or
    profile; a host without GPUs is not an error.
    """
    from p2psched.gpu.profiles import parse_profile

    prof = parse_profile(profile, "--gpu-profile")
    if gpus is not None and str(gpus).strip():
        from p2psched.gpu.declared import parse_declared

        return parse_declared(gpus, default_profile=str(prof))
    if prof.kind in ("mig", "mig-fixed"):
        # Carving MIG instances needs root and an idle GPU; the operator does it once
        # with nvidia-smi, and the agent offers what exists.
        raise ValueError(f"the GPU profile {profile!r} applies to declared GPUs only; on real GPUs enable MIG "
                         "and create instances with 'nvidia-smi mig -cgi ... -C', and the agent offers them as slots")
    return discover(profile=str(prof))


class _NoNvmlLibrary(Exception):
    """The NVIDIA driver's libnvidia-ml.so.1 cannot be loaded: NVML could only fail."""


def _nvml() -> Any:
    # pynvml is ~1.5 MB of bindings and constants, and forgetting it afterwards does not
    # give all of that back: look for the driver's library first, as pynvml would.
    import importlib.util

    if importlib.util.find_spec("pynvml") is None:
        raise ImportError("No module named 'pynvml'")
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            raise _NoNvmlLibrary from None
    return _import_pynvml()


def _import_pynvml() -> Any:
    import pynvml  # type: ignore[import-untyped,unused-ignore]

    return pynvml


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def discover(*, profile: str = "whole", proc_caps: Path = PROC_CAPS) -> GpuInventory:
    """Ask NVML. Never raises: problems come back as an empty inventory and a reason."""
    try:
        nv = _nvml()
    except ImportError:
        return GpuInventory(reason="nvidia-ml-py is not installed; install it with: pip install 'p2psched[gpu]'")
    except _NoNvmlLibrary:  # worded as NVML's own NVMLError_LibraryNotFound
        return GpuInventory(reason="NVML did not start (NVML Shared Library Not Found): no NVIDIA driver is loaded "
                            "on this host")
    try:
        nv.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return GpuInventory(reason=f"NVML did not start ({_s(e)}): no NVIDIA driver is loaded on this host")
    try:
        try:
            driver = _s(nv.nvmlSystemGetDriverVersion())
        except Exception:
            driver = ""
        n = nv.nvmlDeviceGetCount()
        if n == 0:
            return GpuInventory(source="none", reason="NVML started but found no GPU", driver_version=driver)
        gpus: list[GpuInfo] = []
        errors: list[str] = []
        for i in range(n):
            try:
                gpus.append(_describe(nv, i, profile, proc_caps))
            except Exception as e:
                errors.append(f"GPU {i}: {_s(e)}")
        if not gpus:
            return GpuInventory(reason="NVML found GPUs but could not read any: " + "; ".join(errors),
                                driver_version=driver, errors=tuple(errors))
        return GpuInventory(gpus=tuple(gpus), source="nvml", reason=f"{len(gpus)} GPU(s) found by NVML",
                            driver_version=driver, errors=tuple(errors))
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def _describe(nv: Any, i: int, profile: str, proc_caps: Path) -> GpuInfo:
    h = nv.nvmlDeviceGetHandleByIndex(i)
    uuid = _s(nv.nvmlDeviceGetUUID(h))
    name = _s(nv.nvmlDeviceGetName(h))
    mem = int(nv.nvmlDeviceGetMemoryInfo(h).total)
    try:
        minor: int | None = int(nv.nvmlDeviceGetMinorNumber(h))
    except Exception:
        minor = None
    mig_on = False
    instances: list[MigInstance] = []
    try:
        current, _pending = nv.nvmlDeviceGetMigMode(h)
        mig_on = current == nv.NVML_DEVICE_MIG_ENABLE
    except Exception:  # NotSupported on GPUs without MIG
        mig_on = False
    if mig_on:
        for j in range(int(nv.nvmlDeviceGetMaxMigDeviceCount(h))):
            try:
                m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except Exception:  # NotFound: an empty index
                continue
            instances.append(_describe_mig(nv, h, m, minor, proc_caps))
    return GpuInfo(index=i, uuid=uuid, model=name, memory_bytes=mem, minor=minor, declared=False,
                   mig_enabled=mig_on, mig_instances=tuple(instances),
                   profile="mig-existing" if mig_on else profile)


# "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "... MIG 1c.3g.40gb" (a compute instance sharing
# its GPU instance), "... MIG 1g.10gb+me" (with media extensions).
_MIG_NAME_IN_DEVICE = re.compile(r"MIG\s+((?:\d+c\.)?\d+g\.\d+gb(?:\+me)?)")


def mig_profile_from_name(name: str) -> str | None:
    """The MIG profile in an NVML device name, or None."""
    m = _MIG_NAME_IN_DEVICE.search(name)
    return m.group(1) if m else None


def _describe_mig(nv: Any, parent: Any, m: Any, minor: int | None, proc_caps: Path) -> MigInstance:
    uuid = _s(nv.nvmlDeviceGetUUID(m))
    name = _s(nv.nvmlDeviceGetName(m))  # "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
    found = mig_profile_from_name(name)
    mem = int(nv.nvmlDeviceGetMemoryInfo(m).total)
    gi = ci = start = None
    try:
        gi = int(nv.nvmlDeviceGetGpuInstanceId(m))
        ci = int(nv.nvmlDeviceGetComputeInstanceId(m))
    except Exception:
        pass
    if gi is not None:
        try:  # needs privileges on some drivers; placement is informative only
            info = nv.nvmlGpuInstanceGetInfo(nv.nvmlDeviceGetGpuInstanceById(parent, gi))
            start = int(info.placement.start)
        except Exception:
            start = None
    caps = mig_cap_devices(minor, gi, ci, proc_caps) if minor is not None and gi is not None and ci is not None else ()
    profile = found or f"mig-{mem // (1 << 30)}gb"
    return MigInstance(uuid=uuid, profile=profile, memory_bytes=mem, gi_id=gi, ci_id=ci, start=start,
                       cap_devices=caps)


def mig_cap_devices(minor: int, gi: int, ci: int, proc_caps: Path = PROC_CAPS) -> tuple[str, ...]:
    """The ``/dev/nvidia-caps`` nodes a process needs to open one MIG device.

    The driver publishes them as ``gpu<minor>/mig/gi<gi>/access`` and
    ``.../ci<ci>/access`` files holding ``DeviceFileMinor: N``; the node is
    ``/dev/nvidia-caps/nvidia-capN`` (NVIDIA MIG user guide, "Device Nodes and Capabilities").
    """
    base = proc_caps / f"gpu{minor}" / "mig" / f"gi{gi}"
    out: list[str] = []
    for f in (base / "access", base / f"ci{ci}" / "access"):
        try:
            text = f.read_text()
        except OSError:
            continue
        m = re.search(r"DeviceFileMinor:\s*(\d+)", text)
        if m:
            out.append(f"/dev/nvidia-caps/nvidia-cap{m.group(1)}")
    return tuple(out)


def sample_usage(inv: GpuInventory) -> dict[str, GpuUsage]:
    """Utilisation and memory by GPU UUID, from NVML. Empty for declared GPUs or on error."""
    if inv.source != "nvml" or not inv.gpus:
        return {}
    try:
        nv = _nvml()
        nv.nvmlInit()
    except Exception:
        return {}
    out: dict[str, GpuUsage] = {}
    try:
        for g in inv.gpus:
            try:
                h = nv.nvmlDeviceGetHandleByUUID(g.uuid)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util: float | None = float(nv.nvmlDeviceGetUtilizationRates(h).gpu) / 100.0
                except Exception:  # NotSupported in MIG mode
                    util = None
                out[g.uuid] = GpuUsage(util, int(mem.used), int(mem.total))
            except Exception:
                continue
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass
    return out


Check = tuple[str, bool, str, str]


def doctor_checks(gpus: str | Path | None = None) -> list[Check]:
    """``(name, ok, detail, fix)`` rows for ``p2psched doctor``.

    Having no GPU is a fine state for an agent (it takes CPU and wasm jobs), so it is
    reported as ok with the reason; only a broken declaration or a GPU whose device
    nodes are missing is a failure.
    """
    checks: list[Check] = []
    if gpus is not None and str(gpus).strip():
        try:
            inv = load_inventory(gpus)
        except ValueError as e:
            return [("gpu: declared GPUs", False, str(e), "fix the --gpus value; see docs/gpu.md for the format")]
        checks.append(("gpu: declared GPUs", True,
                       f"{len(inv.gpus)} declared GPU(s), not discovered: {inv.reason}",
                       ""))
        return checks
    try:
        _import_pynvml()
        checks.append(("gpu: nvidia-ml-py", True, "pynvml imports", ""))
    except ImportError:
        checks.append(("gpu: nvidia-ml-py", True, "not installed: this agent offers no GPU slots",
                       "pip install 'p2psched[gpu]' on hosts with NVIDIA GPUs"))
        return checks
    inv = discover()
    if not inv.gpus:
        checks.append(("gpu: devices", True, f"no GPU slots offered: {inv.reason}",
                       "nothing to fix on a CPU host; on a GPU host install the NVIDIA driver"
                       " (nvidia-smi must work), or declare GPUs with --gpus"))
        return checks
    desc = ", ".join(f"{g.index}:{g.model}{' (MIG)' if g.mig_enabled else ''}" for g in inv.gpus)
    checks.append(("gpu: devices", True, f"{len(inv.gpus)} GPU(s), driver {inv.driver_version}: {desc}", ""))
    for err in inv.errors:
        checks.append(("gpu: device read", False, err, "check 'nvidia-smi -q' for this GPU"))
    missing = [p for p in ["/dev/nvidiactl", "/dev/nvidia-uvm", *(g.device_node() or "" for g in inv.gpus)]
               if p and not os.path.exists(p)]
    checks.append(("gpu: device nodes", not missing,
                   "all present" if not missing else "missing: " + ", ".join(missing),
                   "" if not missing else "load the driver modules: 'modprobe nvidia nvidia-uvm' "
                   "(or run nvidia-modprobe -u -c=0) so CUDA jobs can open the GPU"))
    for g in inv.gpus:
        if g.mig_enabled and not g.mig_instances:
            checks.append((f"gpu: MIG on GPU {g.index}", False, "MIG mode is on but no instances exist, so it offers no slots",
                           "create instances, e.g. 'nvidia-smi mig -i %d -cgi 3g.40gb,3g.40gb -C'" % g.index))
    return checks
