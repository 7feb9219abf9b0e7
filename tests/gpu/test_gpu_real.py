"""On a host with an NVIDIA GPU: discover it through NVML, run the example job with
one slot's environment, and show a job without the gpu capability sees no GPU.

Skipped with the reason where NVML finds no GPU. These run the job as a plain
subprocess with the grant's environment; the process sandbox adds the device
cgroup on top (it reads SandboxRequest.gpu_env and gpu_devices).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from p2psched.gpu.devices import cgroup_rules, no_gpu_env
from p2psched.gpu.discovery import GpuInventory, discover, doctor_checks, sample_usage
from p2psched.gpu.slots import SlotAllocator


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def inventory() -> GpuInventory:
    inv = discover()
    if not inv.gpus:
        pytest.skip(f"needs an NVIDIA GPU; NVML found none on this host: {inv.reason}")
    return inv


def _bare(uuid: str) -> str:
    """CUDA's 16 UUID bytes print without the GPU-/MIG- prefix NVML adds."""
    return uuid.split("-", 1)[1].lower()


def test_nvml_discovers_the_gpus(inventory: GpuInventory, run_example: Any) -> None:
    print(inventory.as_dict())
    assert inventory.source == "nvml" and not inventory.declared and inventory.driver_version
    for g in inventory.gpus:
        assert g.uuid.startswith("GPU-") and g.memory_bytes > 0 and g.minor is not None
        assert os.path.exists(f"/dev/nvidia{g.minor}")
        for m in g.mig_instances:
            assert m.uuid.startswith("MIG-") and m.memory_bytes > 0
    rows = doctor_checks()
    assert all(ok for _, ok, _, _ in rows), rows
    usage = sample_usage(inventory)
    assert set(usage) == {g.uuid for g in inventory.gpus}
    assert all(u.memory_total_bytes > 0 for u in usage.values())


def test_a_job_with_one_slot_sees_exactly_that_device(inventory: GpuInventory, run_example: Any) -> None:
    alloc = SlotAllocator(inventory)
    free = alloc.free_by_type()
    if not any(free.values()):
        pytest.skip(f"the GPU offers no slots (MIG mode without instances?): {alloc.snapshot()}")
    slot_type = max(free, key=lambda t: free[t])
    g = alloc.reserve("gpu-job", 1, slot_type)
    assert cgroup_rules(list(g.devices)), "the granted device nodes must exist as character devices"
    rc, report, out = run_example(g.env, "--require-gpu")
    print(out)
    assert rc == 0, out
    seen = report["cuda"]["devices"]
    assert len(seen) == 1, out
    assert seen[0]["uuid"] == _bare(g.slots[0].device_uuid)
    assert report["checksum"] == report["expected"]


def test_each_gpu_grant_hides_the_others(inventory: GpuInventory, run_example: Any) -> None:
    if len(inventory.gpus) < 2 or any(g.mig_enabled for g in inventory.gpus):
        pytest.skip("needs two GPUs without MIG to show one grant hiding the other")
    alloc = SlotAllocator(inventory)
    a, b = alloc.reserve("a", 1, "whole"), alloc.reserve("b", 1, "whole")
    for g in (a, b):
        _, report, out = run_example(g.env)
        assert [d["uuid"] for d in report["cuda"]["devices"]] == [_bare(g.slots[0].device_uuid)], out


def test_a_job_without_the_capability_sees_no_gpu(inventory: GpuInventory, run_example: Any) -> None:
    rc, report, out = run_example(no_gpu_env(), "--require-gpu")
    print(out)
    assert report["cuda"]["available"], "libcuda must load on a GPU host"
    assert report["cuda"]["devices"] == [], out
    assert rc == 3


async def test_in_the_process_sandbox_one_slot_shows_one_device(inventory: GpuInventory, run_in_sandbox: Any,
                                                                tmp_path: Any) -> None:
    alloc = SlotAllocator(inventory)
    free = alloc.free_by_type()
    if not any(free.values()):
        pytest.skip(f"the GPU offers no slots (MIG mode without instances?): {alloc.snapshot()}")
    g = alloc.reserve("gpu-job", 1, max(free, key=lambda t: free[t]))
    rc, report, out = await run_in_sandbox(tmp_path / "granted", g.env, list(g.devices), "--require-gpu")
    print(out)
    assert rc == 0, out
    assert [d["uuid"] for d in report["cuda"]["devices"]] == [_bare(g.slots[0].device_uuid)], out
    rc, report, out = await run_in_sandbox(tmp_path / "none", no_gpu_env(), [], "--require-gpu")
    print(out)
    assert report["cuda"]["devices"] == [], out
    assert rc == 3, out
