"""Discovery without a GPU (real, on this host), the NVML path against a stand-in for
the NVML library (the one part that needs hardware), doctor rows, device rules and metrics."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from p2psched.gpu import discovery
from p2psched.gpu.devices import cgroup_rules
from p2psched.gpu.discovery import GpuUsage, discover, doctor_checks, load_inventory, mig_cap_devices, sample_usage
from p2psched.gpu.metrics import GpuMetrics
from p2psched.gpu.slots import SlotAllocator

HAS_NVIDIA = os.path.exists("/dev/nvidiactl")


@pytest.mark.skipif(HAS_NVIDIA, reason="this host has an NVIDIA driver; the gpu-marked tests cover it")
def test_no_driver_gives_an_empty_inventory_and_the_reason() -> None:
    inv = discover()
    assert inv.gpus == () and inv.source == "none" and not inv.declared
    assert "NVML" in inv.reason or "nvidia-ml-py" in inv.reason
    assert inv.labels() == {"gpu.source": "none"}
    assert SlotAllocator(inv).free_by_type() == {}


def test_without_the_driver_library_pynvml_is_not_even_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import sys

    def no_library(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    inv = discover()
    assert inv.gpus == () and inv.source == "none"
    assert inv.reason == ("NVML did not start (NVML Shared Library Not Found): no NVIDIA driver is loaded on this "
                          "host")
    assert "pynvml" not in sys.modules


@pytest.mark.skipif(HAS_NVIDIA, reason="this host has an NVIDIA driver; the gpu-marked tests cover it")
def test_doctor_calls_no_gpu_fine_and_says_why() -> None:
    rows = doctor_checks()
    assert rows and all(ok for _, ok, _, _ in rows)
    name, ok, detail, fix = rows[-1]
    assert name.startswith("gpu:") and "no GPU slots offered" in detail and "--gpus" in fix


def test_doctor_reports_declared_gpus_as_declared_and_bad_ones_as_failures() -> None:
    [(name, ok, detail, _)] = doctor_checks("2xH100-80GB/shared:2")
    assert ok and "2 declared GPU(s), not discovered" in detail
    [(name, ok, detail, fix)] = doctor_checks("2xH100")
    assert not ok and "must name its memory" in detail and "docs/gpu.md" in fix


# -- the NVML path ---------------------------------------------------------------------------
# No GPU here, so NVML's answers for a MIG-mode H100 plus an L4 come from this stand-in;
# it mirrors the pynvml calls and return shapes (bytes names on old bindings, NotFound gaps).


class _NotFound(Exception):
    pass


def fake_nvml(proc: Path) -> Any:
    gpus: list[dict[str, Any]] = [
        {"uuid": b"GPU-11111111-2222-3333-4444-555555555555", "name": b"NVIDIA H100 80GB HBM3", "mem": 80 << 30,
         "minor": 0, "mig": 1, "migs": {0: ("MIG-aaaaaaaa-0000-0000-0000-000000000001", "3g.40gb", 1, 0),
                                         2: ("MIG-aaaaaaaa-0000-0000-0000-000000000002", "1g.10gb", 9, 0)}},
        {"uuid": "GPU-66666666-7777-8888-9999-000000000000", "name": "NVIDIA L4", "mem": 24 << 30,
         "minor": 1, "mig": None, "migs": {}},
    ]
    handles = {f"gpu{i}": g for i, g in enumerate(gpus)}
    mig_handles: dict[str, tuple[str, str, int, int]] = {}

    def handle(i: int) -> str:
        return f"gpu{i}"

    def get_mig(h: str, j: int) -> str:
        m = handles[h]["migs"].get(j)
        if m is None:
            raise _NotFound("Not Found")
        mig_handles[f"{h}/mig{j}"] = m
        return f"{h}/mig{j}"

    def mig_mode(h: str) -> tuple[int, int]:
        if handles[h]["mig"] is None:
            raise RuntimeError("Not Supported")
        return handles[h]["mig"], handles[h]["mig"]

    def name(h: str) -> Any:
        if h in mig_handles:
            return f"NVIDIA H100 80GB HBM3 MIG {mig_handles[h][1]}"
        return handles[h]["name"]

    def mem(h: str) -> Any:
        if h in mig_handles:
            return SimpleNamespace(total=(40 << 30) if "3g" in mig_handles[h][1] else (10 << 30), used=0)
        return SimpleNamespace(total=handles[h]["mem"], used=1 << 30)

    def gi_by_id(parent: str, gi: int) -> Any:
        raise RuntimeError("Insufficient Permissions")  # what an unprivileged agent gets

    (proc / "gpu0" / "mig" / "gi1" / "ci0").mkdir(parents=True)
    (proc / "gpu0" / "mig" / "gi1" / "access").write_text("DeviceFileMinor: 12\nDeviceFileMode: 292\n")
    (proc / "gpu0" / "mig" / "gi1" / "ci0" / "access").write_text("DeviceFileMinor: 13\nDeviceFileMode: 292\n")
    return SimpleNamespace(
        NVML_DEVICE_MIG_ENABLE=1,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetHandleByUUID=lambda u: next(k for k, g in handles.items()
                                                 if (g["uuid"].decode() if isinstance(g["uuid"], bytes) else g["uuid"]) == u),
        nvmlDeviceGetUUID=lambda h: mig_handles[h][0] if h in mig_handles else handles[h]["uuid"],
        nvmlDeviceGetName=name,
        nvmlDeviceGetMemoryInfo=mem,
        nvmlDeviceGetMinorNumber=lambda h: handles[h]["minor"],
        nvmlDeviceGetMigMode=mig_mode,
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 7,
        nvmlDeviceGetMigDeviceHandleByIndex=get_mig,
        nvmlDeviceGetGpuInstanceId=lambda h: mig_handles[h][2],
        nvmlDeviceGetComputeInstanceId=lambda h: mig_handles[h][3],
        nvmlDeviceGetGpuInstanceById=gi_by_id,
        nvmlDeviceGetUtilizationRates=lambda h: (_ for _ in ()).throw(RuntimeError("Not Supported"))
        if handles[h]["mig"] else SimpleNamespace(gpu=37),
    )


def test_nvml_inventory_reads_models_mig_instances_and_capabilities(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_nvml(tmp_path)
    monkeypatch.setattr(discovery, "_nvml", lambda: nv)
    inv = discover(profile="shared:2", proc_caps=tmp_path)
    assert inv.source == "nvml" and inv.driver_version == "550.54.15" and not inv.declared
    h100, l4 = inv.gpus
    assert h100.uuid == "GPU-11111111-2222-3333-4444-555555555555" and h100.model == "NVIDIA H100 80GB HBM3"
    assert h100.mig_enabled and h100.profile == "mig-existing"
    assert [(m.profile, m.gi_id, m.start) for m in h100.mig_instances] == [("3g.40gb", 1, None), ("1g.10gb", 9, None)]
    assert h100.mig_instances[0].cap_devices == ("/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap13")
    assert not l4.mig_enabled and l4.profile == "shared:2" and l4.minor == 1

    alloc = SlotAllocator(inv)
    assert alloc.total_by_type() == {"3g.40gb": 1, "1g.10gb": 1, "share-1/2": 2}
    g = alloc.reserve("j", 1, "3g.40gb")
    assert g.env["CUDA_VISIBLE_DEVICES"] == "MIG-aaaaaaaa-0000-0000-0000-000000000001"
    assert {"/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia0"} <= set(g.devices + g.absent_devices)

    usage = sample_usage(inv)
    assert usage[l4.uuid].utilization_ratio == 0.37
    assert usage[h100.uuid].utilization_ratio is None  # NVML has no utilisation for MIG-mode GPUs


def test_mig_capability_minors_are_read_from_the_driver_tree(tmp_path: Path) -> None:
    (tmp_path / "gpu2" / "mig" / "gi5" / "ci1").mkdir(parents=True)
    (tmp_path / "gpu2" / "mig" / "gi5" / "access").write_text("DeviceFileMinor: 57\n")
    (tmp_path / "gpu2" / "mig" / "gi5" / "ci1" / "access").write_text("DeviceFileMinor: 59\n")
    assert mig_cap_devices(2, 5, 1, tmp_path) == ("/dev/nvidia-caps/nvidia-cap57", "/dev/nvidia-caps/nvidia-cap59")
    assert mig_cap_devices(2, 6, 0, tmp_path) == ()


def test_cgroup_rules_name_real_character_devices_only(tmp_path: Path) -> None:
    rules = cgroup_rules(["/dev/null", "/dev/nvidia-does-not-exist", str(tmp_path)])
    assert rules == [("/dev/null", "c", 1, 3)]


def test_declared_gpus_have_no_usage_sample() -> None:
    assert sample_usage(load_inventory("1xH100-80GB")) == {}


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_follow_the_allocator_and_mark_declared_capacity() -> None:
    inv = load_inventory("1xH100-80GB/mig, 1xL4-24GB/shared:4")
    alloc = SlotAllocator(inv)
    reg, other = CollectorRegistry(), CollectorRegistry()
    gm = GpuMetrics(reg)
    GpuMetrics(other)  # a second agent in the same process has its own series
    alloc.reserve("a", 2, "share-1/4")
    alloc.reserve("b", 1, "3g.40gb")
    gm.update(alloc, inv)
    v = reg.get_sample_value
    assert v("p2psched_gpu_slots_total", {"type": "share-1/4", "declared": "true"}) == 4
    assert v("p2psched_gpu_slots_total", {"type": "1g.10gb", "declared": "true"}) == 7
    assert v("p2psched_gpu_slots_in_use", {"type": "share-1/4", "declared": "true"}) == 2
    assert v("p2psched_gpu_slots_in_use", {"type": "3g.40gb", "declared": "true"}) == 1
    assert v("p2psched_gpu_slots_in_use", {"type": "1g.10gb", "declared": "true"}) == 0
    assert v("p2psched_gpu_utilization_ratio", {"gpu": "0"}) is None  # declared: nothing measured
    alloc.release("a")
    gm.update(alloc, inv, usage={inv.gpus[1].uuid: GpuUsage(0.5, 3 << 30, 24 << 30)})
    assert v("p2psched_gpu_slots_in_use", {"type": "share-1/4", "declared": "true"}) == 0
    assert v("p2psched_gpu_utilization_ratio", {"gpu": "1"}) == 0.5
    assert v("p2psched_gpu_memory_used_bytes", {"gpu": "1"}) == 3 << 30
    assert other.get_sample_value("p2psched_gpu_slots_in_use", {"type": "share-1/4", "declared": "true"}) is None


@pytest.mark.parametrize("name,profile", [
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "1g.10gb"),
    ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", "1c.3g.20gb"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "1g.10gb+me"),
    ("NVIDIA H100 80GB HBM3", None),
])
def test_mig_profile_names_come_from_nvml_device_names(name: str, profile: str | None) -> None:
    from p2psched.gpu.discovery import mig_profile_from_name
    from p2psched.gpu.profiles import slot_fraction

    assert mig_profile_from_name(name) == profile
    if profile == "1c.3g.20gb":
        assert slot_fraction(profile) == 1 / 7  # one compute slice of the shared 3g instance


async def test_an_agent_reports_nvml_utilisation_and_memory_on_a_scrape(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML is the stand-in above (no GPU here); the agent, its /metrics and the sampling are real."""
    from agents import running_agent

    nv = fake_nvml(tmp_path)
    monkeypatch.setattr(discovery, "_nvml", lambda: nv)
    async with running_agent(tmp_path / "a", node_id="gpuhost") as (agent, http):
        assert agent.gpu_inventory.source == "nvml"
        text = (await http.get("/metrics")).text
        # The L4 (index 1) has utilisation; NVML has none for the MIG-mode H100, but its memory.
        assert 'p2psched_gpu_utilization_ratio{gpu="1"} 0.37' in text, text
        assert 'p2psched_gpu_utilization_ratio{gpu="0"}' not in text
        assert 'p2psched_gpu_memory_used_bytes{gpu="1"} 1.073741824e+09' in text  # 1 GiB
        assert 'p2psched_gpu_memory_used_bytes{gpu="0"}' in text
        # Discovered GPUs: both slot series say so, as declared ones say theirs.
        v = agent.registry.get_sample_value
        assert v("p2psched_gpu_slots_total", {"type": "whole", "declared": "false"}) == 1
        assert v("p2psched_gpu_slots_in_use", {"type": "whole", "declared": "false"}) == 0


async def test_the_cluster_view_counts_declared_slots_apart_from_discovered_ones(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``/v1/cluster`` sums every slot in ``gpu`` and those on declared GPUs again in
    ``gpu_declared``: discovered slots are never counted there."""
    from agents import running_agent

    nv = fake_nvml(tmp_path)
    monkeypatch.setattr(discovery, "_nvml", lambda: nv)
    async with running_agent(tmp_path / "a", node_id="gpuhost") as (_, http):
        totals = (await http.get("/v1/cluster")).json()
        assert totals["total"]["gpu"] == {"whole": 1, "3g.40gb": 1, "1g.10gb": 1}
        assert totals["total"]["gpu_declared"] == totals["free"]["gpu_declared"] == {}
    async with running_agent(tmp_path / "b", node_id="declared", gpus="2xH100-80GB") as (_, http):
        totals = (await http.get("/v1/cluster")).json()
        assert totals["total"]["gpu_declared"] == totals["total"]["gpu"] == {"whole": 2}
        assert totals["free"]["gpu_declared"] == totals["free"]["gpu"] == {"whole": 2}
