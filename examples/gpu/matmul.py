#!/usr/bin/env python3
"""An example GPU job: a small matrix multiply that reports which GPU it was given.

    p2psched submit --process --gpu 1 --cap gpu -- python3 examples/gpu/matmul.py

It prints what the scheduler granted (``CUDA_VISIBLE_DEVICES``,
``NVIDIA_VISIBLE_DEVICES``), what the CUDA driver itself lets the process see
(``libcuda`` through ctypes: it honours ``CUDA_VISIBLE_DEVICES``, so a job
granted nothing sees zero devices), and what NVML lists (NVML ignores
``CUDA_VISIBLE_DEVICES``; only the device cgroup hides GPUs from it).

The multiply runs on the GPU with CuPy or torch when one is installed, and in
plain Python on the CPU otherwise. The last line is one JSON object for scripts.
Exit status: 0, or 3 with ``--require-gpu`` when no GPU is visible to CUDA.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any

N = 64  # small enough for plain Python in well under a second


def matrices() -> tuple[list[list[float]], list[list[float]]]:
    # Small integers keep every product exact in float32, so all backends agree bit for bit.
    a = [[float((i * 3 + j) % 7) for j in range(N)] for i in range(N)]
    b = [[float((i + j * 5) % 5) for j in range(N)] for i in range(N)]
    return a, b


def matmul_python(a: list[list[float]], b: list[list[float]]) -> float:
    bt = list(zip(*b))
    return sum(sum(x * y for x, y in zip(row, col)) for row in a for col in bt)


def matmul_gpu(a: list[list[float]], b: list[list[float]]) -> tuple[str, float, str] | None:
    """(backend, checksum, device name) on the GPU, or None where no library or device."""
    try:
        import cupy  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() > 0:
            c = cupy.asarray(a, dtype=cupy.float32) @ cupy.asarray(b, dtype=cupy.float32)
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            return "cupy", float(c.sum()), name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    try:
        import torch  # type: ignore[import-not-found]

        if torch.cuda.is_available():
            c = torch.tensor(a, device="cuda") @ torch.tensor(b, device="cuda")
            return "torch", float(c.sum().item()), torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def cuda_driver_view() -> dict[str, Any]:
    """Devices the CUDA driver exposes to this process, read straight from libcuda."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {"available": False, "why": "libcuda.so.1 not found (no NVIDIA driver)", "devices": []}
    rc = cuda.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE: what an empty CUDA_VISIBLE_DEVICES gives
        return {"available": True, "why": "CUDA reports no device (CUDA_ERROR_NO_DEVICE)", "devices": []}
    if rc != 0:
        return {"available": True, "why": f"cuInit failed with CUresult {rc}", "devices": []}
    count = ctypes.c_int(0)
    cuda.cuDeviceGetCount(ctypes.byref(count))
    devices = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        uuid = (ctypes.c_ubyte * 16)()
        get_uuid = getattr(cuda, "cuDeviceGetUuid_v2", None) or cuda.cuDeviceGetUuid  # _v2 gives MIG UUIDs
        get_uuid(ctypes.byref(uuid), dev)
        h = bytes(uuid).hex()
        mem = ctypes.c_size_t(0)
        cuda.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
        devices.append({"ordinal": i, "name": name.value.decode(errors="replace"),
                        "uuid": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", "memory_bytes": mem.value})
    return {"available": True, "why": f"{count.value} device(s)", "devices": devices}


def nvml_view() -> dict[str, Any]:
    """GPUs NVML lists. Through pynvml where installed, else libnvidia-ml via ctypes
    (a sandboxed job often runs the system Python without pynvml)."""
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return _nvml_ctypes()
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return {"available": False, "why": f"NVML did not start: {e}", "devices": []}
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                u, n = pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetName(h)
                out.append({"index": i, "uuid": u.decode() if isinstance(u, bytes) else u,
                            "name": n.decode() if isinstance(n, bytes) else n})
            except Exception as e:  # a GPU the device cgroup hides answers with an error here
                out.append({"index": i, "error": str(e)})
        return {"available": True, "why": f"{len(out)} device(s)", "devices": out}
    finally:
        pynvml.nvmlShutdown()


def _nvml_ctypes() -> dict[str, Any]:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return {"available": False, "why": "neither nvidia-ml-py nor libnvidia-ml.so.1 is present", "devices": []}
    rc = nvml.nvmlInit_v2()
    if rc != 0:
        return {"available": False, "why": f"NVML did not start (nvmlReturn {rc})", "devices": []}
    try:
        count = ctypes.c_uint(0)
        nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
        out: list[dict[str, Any]] = []
        for i in range(count.value):
            h = ctypes.c_void_p()
            rc = nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h))
            if rc != 0:  # e.g. 4 (NO_PERMISSION) for a GPU whose node the sandbox did not let through
                out.append({"index": i, "error": f"nvmlReturn {rc}"})
                continue
            uuid, name = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96)
            nvml.nvmlDeviceGetUUID(h, uuid, 96)
            nvml.nvmlDeviceGetName(h, name, 96)
            out.append({"index": i, "uuid": uuid.value.decode(), "name": name.value.decode()})
        return {"available": True, "why": f"{len(out)} device(s)", "devices": out}
    finally:
        nvml.nvmlShutdown()


def main() -> int:
    granted = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                                              "P2PSCHED_GPU_SLOT_TYPE", "P2PSCHED_GPU_MEMORY_LIMIT_BYTES")}
    for k, v in granted.items():
        print(f"{k}={'(unset)' if v is None else repr(v)}")
    cuda = cuda_driver_view()
    print(f"CUDA driver: {cuda['why']}")
    for d in cuda["devices"]:
        print(f"  cuda:{d['ordinal']} {d['name']} uuid {d['uuid']} {d['memory_bytes'] >> 20} MiB")
    nvml = nvml_view()
    print(f"NVML: {nvml['why']}")
    for d in nvml["devices"]:
        print(f"  nvml:{d['index']} {d.get('name', '')} {d.get('uuid', d.get('error', ''))}")

    a, b = matrices()
    expected = matmul_python(a, b)
    gpu = matmul_gpu(a, b) if cuda["devices"] else None
    if gpu is not None:
        backend, checksum, device = gpu
    else:
        backend, checksum = "python", expected
        device = "cpu (no CUDA library installed)" if cuda["devices"] else "cpu (no GPU visible)"
    print(f"matmul {N}x{N} on {device} via {backend}: checksum {checksum:.0f} "
          f"({'matches' if checksum == expected else 'DIFFERS FROM'} the CPU result)")
    report = {"granted": granted, "cuda": cuda, "nvml": nvml, "backend": backend, "device": device,
              "checksum": checksum, "expected": expected}
    print(json.dumps(report))
    if "--require-gpu" in sys.argv[1:] and not cuda["devices"]:
        return 3
    return 0 if checksum == expected else 1


if __name__ == "__main__":
    sys.exit(main())
