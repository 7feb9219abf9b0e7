"""GPU metrics on the agent's own CollectorRegistry.

Calls the agent makes::

    gm = GpuMetrics(registry)                      # once, with the agent's registry
    gm.update(alloc, inventory, usage)             # before each scrape; usage = sample_usage(inventory)

Series::

    p2psched_gpu_slots_total{type,declared}        slots per type on an idle agent
    p2psched_gpu_slots_in_use{type,declared}       slots granted to jobs
    p2psched_gpu_utilization_ratio{gpu}            0..1 from NVML (absent for declared and MIG-mode GPUs)
    p2psched_gpu_memory_used_bytes{gpu}            from NVML (absent for declared GPUs)

``gpu`` is the GPU's index on the host; ``declared`` is "true" for GPUs from
``--gpus`` and "false" for those NVML found, on both slot series, so a dashboard
never mistakes declared capacity or its use for hardware (and in-use divides by
total with no ``ignoring``). Label sets are rebuilt on every update so a type that
disappears (profile change) does not linger at its last value.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge

from p2psched.gpu.discovery import GpuInventory, GpuUsage, sample_usage
from p2psched.gpu.slots import SlotAllocator


class GpuMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.slots_total = Gauge("p2psched_gpu_slots_total", "GPU slots per type on an idle agent.",
                                 ["type", "declared"], registry=registry)
        self.slots_in_use = Gauge("p2psched_gpu_slots_in_use", "GPU slots granted to jobs, per type.",
                                  ["type", "declared"], registry=registry)
        self.utilization = Gauge("p2psched_gpu_utilization_ratio", "GPU utilisation from NVML, 0 to 1.",
                                 ["gpu"], registry=registry)
        self.memory_used = Gauge("p2psched_gpu_memory_used_bytes", "GPU memory in use, from NVML.",
                                 ["gpu"], registry=registry)

    def update(self, allocator: SlotAllocator, inventory: GpuInventory,
               usage: Mapping[str, GpuUsage] | None = None) -> None:
        """Refresh every series. ``usage`` defaults to a fresh NVML sample (blocking)."""
        if usage is None:
            usage = sample_usage(inventory)
        declared = "true" if inventory.declared else "false"
        self.slots_total.clear()
        for t, n in allocator.total_by_type().items():
            self.slots_total.labels(type=t, declared=declared).set(n)
        self.slots_in_use.clear()
        for t, n in allocator.in_use_by_type().items():
            self.slots_in_use.labels(type=t, declared=declared).set(n)
        self.utilization.clear()
        self.memory_used.clear()
        for g in inventory.gpus:
            u = usage.get(g.uuid)
            if u is None:
                continue
            if u.utilization_ratio is not None:
                self.utilization.labels(gpu=str(g.index)).set(u.utilization_ratio)
            self.memory_used.labels(gpu=str(g.index)).set(u.memory_used_bytes)
