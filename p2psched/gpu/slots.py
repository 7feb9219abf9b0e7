"""Typed virtual GPU slots, and the allocator that grants them to jobs.

Calls the agent makes::

    alloc = SlotAllocator(inventory)                 # at start, after load_inventory()
    alloc.restore(grants_of_live_jobs)               # at start: grants stored with queued/running jobs
    vector.gpu_free, vector.gpu_total = alloc.free_by_type(), alloc.total_by_type()   # before each gossip
    alloc.can_fit(spec.resources.gpu, spec.resources.gpu_type)                          # admission
    grant = alloc.reserve(job_id, spec.resources.gpu, spec.resources.gpu_type)          # as the job starts
    store grant.to_wire() with the job; req.gpu_env, req.gpu_devices = grant.env, list(grant.devices)
    alloc.release(job_id)                            # when the job ends, crashes or is cancelled (idempotent)

Placement imports :func:`best_fit_score` to rank peers from their gossiped
``gpu_free``. All of it is a plain in-memory state machine: no clock, no I/O, one
thread (the agent's trio thread).

Slot types: ``whole``, ``share-1/N`` and MIG profile names such as ``1g.10gb``.
``free_by_type()`` says, per type, how many slots of *that type alone* could still
be granted. For MIG types these counts compete for the same slices, so they do not
add up: an empty H100 shows ``1g.10gb: 7`` and ``3g.40gb: 2`` at once. A request
is always ``count`` slots of one type, so the per-type count answers it exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from p2psched.gpu.devices import CONTROL_NODES, no_gpu_env
from p2psched.gpu.discovery import GpuInfo, GpuInventory
from p2psched.gpu.profiles import (
    WHOLE,
    MigGeometry,
    capacity,
    check_layout,
    choose_start,
    geometry_for,
    occupy,
    parse_profile,
    placements,
    share_type,
    slot_fraction,
)


class UnknownSlotType(ValueError):
    """The request names a slot type this agent (or peer) does not offer at all."""


class InsufficientSlots(Exception):
    """Not enough free slots of the type right now; nothing was reserved."""


@dataclass(frozen=True, slots=True)
class SlotRef:
    """One granted slot."""

    gpu_uuid: str  # the physical GPU
    slot_type: str
    key: str  # identity on that GPU: "whole", "share:2", "1g.10gb@6", or a MIG UUID
    device_uuid: str  # what the job sees: the GPU UUID, or the MIG device UUID
    memory_bytes: int  # the slot's share of memory (advisory for time-sliced shares)

    def to_wire(self) -> dict[str, Any]:
        return {"gpu": self.gpu_uuid, "type": self.slot_type, "key": self.key, "dev": self.device_uuid,
                "mem": self.memory_bytes}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> SlotRef:
        return cls(str(d["gpu"]), str(d["type"]), str(d["key"]), str(d["dev"]), int(d["mem"]))


@dataclass(frozen=True, slots=True)
class Grant:
    """What a job was given: its slots, the environment and the device nodes to allow."""

    job_id: str
    slots: tuple[SlotRef, ...]
    env: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()  # device nodes to let through: the ones that exist on this host
    absent_devices: tuple[str, ...] = ()  # nodes the slots map to that this host lacks (all, for declared GPUs)
    declared: bool = False  # slots on declared GPUs: the env names no real device

    @property
    def slot_type(self) -> str | None:
        return self.slots[0].slot_type if self.slots else None

    def to_wire(self) -> dict[str, Any]:
        """JSON- and msgpack-safe; store it with the job and hand it back to restore()."""
        return {"job": self.job_id, "slots": [s.to_wire() for s in self.slots], "env": dict(self.env),
                "devices": list(self.devices), "absent": list(self.absent_devices), "declared": self.declared}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Grant:
        return cls(job_id=str(d["job"]), slots=tuple(SlotRef.from_wire(s) for s in d.get("slots", [])),
                   env={str(k): str(v) for k, v in dict(d.get("env", {})).items()},
                   devices=tuple(str(x) for x in d.get("devices", [])),
                   absent_devices=tuple(str(x) for x in d.get("absent", [])), declared=bool(d.get("declared", False)))


# -- per-GPU pools ---------------------------------------------------------------
#
# Each pool answers for one physical GPU under its profile. ``plan`` never mutates:
# reserve() plans every GPU it will touch first and commits only when all of the
# request is placed, which is what makes a multi-slot reservation all-or-nothing.


class _Pool:
    gpu: GpuInfo
    taken: dict[str, SlotRef]  # key -> slot

    def __init__(self, gpu: GpuInfo) -> None:
        self.gpu = gpu
        self.taken = {}

    def total(self) -> dict[str, int]:
        raise NotImplementedError

    def free(self) -> dict[str, int]:
        raise NotImplementedError

    def headroom(self) -> float:
        """Fraction of this GPU still unallocated, to prefer filling GPUs already in use."""
        raise NotImplementedError

    def plan(self, slot_type: str, n: int) -> list[SlotRef] | None:
        raise NotImplementedError

    def admits(self, s: SlotRef) -> bool:
        """Whether ``s`` can be taken now (restore after restart)."""
        raise NotImplementedError

    def take(self, s: SlotRef) -> None:
        self.taken[s.key] = s

    def drop(self, s: SlotRef) -> None:
        self.taken.pop(s.key, None)

    def _ref(self, slot_type: str, key: str, device_uuid: str, mem: int) -> SlotRef:
        return SlotRef(self.gpu.uuid, slot_type, key, device_uuid, mem)


class _WholePool(_Pool):
    def total(self) -> dict[str, int]:
        return {WHOLE: 1}

    def free(self) -> dict[str, int]:
        return {WHOLE: 0 if self.taken else 1}

    def headroom(self) -> float:
        return 0.0 if self.taken else 1.0

    def plan(self, slot_type: str, n: int) -> list[SlotRef] | None:
        if slot_type != WHOLE or n != 1 or self.taken:
            return None
        return [self._ref(WHOLE, WHOLE, self.gpu.uuid, self.gpu.memory_bytes)]

    def admits(self, s: SlotRef) -> bool:
        return s.key == WHOLE and s.slot_type == WHOLE and not self.taken


class _SharedPool(_Pool):
    def __init__(self, gpu: GpuInfo, shares: int) -> None:
        super().__init__(gpu)
        self.shares = shares
        self.type = share_type(shares)

    def total(self) -> dict[str, int]:
        return {self.type: self.shares}

    def free(self) -> dict[str, int]:
        return {self.type: self.shares - len(self.taken)}

    def headroom(self) -> float:
        return (self.shares - len(self.taken)) / self.shares

    def plan(self, slot_type: str, n: int) -> list[SlotRef] | None:
        if slot_type != self.type:
            return None
        keys = [f"share:{i}" for i in range(self.shares) if f"share:{i}" not in self.taken][:n]
        if len(keys) < n:
            return None
        mem = self.gpu.memory_bytes // self.shares
        return [self._ref(self.type, k, self.gpu.uuid, mem) for k in keys]

    def admits(self, s: SlotRef) -> bool:
        if s.slot_type != self.type or s.key in self.taken or not s.key.startswith("share:"):
            return False
        idx = s.key.removeprefix("share:")
        return idx.isdigit() and int(idx) < self.shares


@dataclass(frozen=True, slots=True)
class _FixedSlot:
    key: str  # MIG device UUID
    slot_type: str
    memory_bytes: int
    cap_devices: tuple[str, ...]


class _FixedMigPool(_Pool):
    """MIG instances that exist (real MIG mode) or a declared fixed layout."""

    def __init__(self, gpu: GpuInfo, slots: list[_FixedSlot]) -> None:
        super().__init__(gpu)
        self.slots = {s.key: s for s in slots}

    def total(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.slots.values():
            out[s.slot_type] = out.get(s.slot_type, 0) + 1
        return out

    def free(self) -> dict[str, int]:
        out = {t: 0 for t in self.total()}
        for s in self.slots.values():
            if s.key not in self.taken:
                out[s.slot_type] += 1
        return out

    def headroom(self) -> float:
        if not self.slots:
            return 0.0
        def frac(keys: Iterable[str]) -> float:
            return sum(slot_fraction(self.slots[k].slot_type) for k in keys)
        return frac(k for k in self.slots if k not in self.taken) / max(frac(self.slots), 1e-9)

    def plan(self, slot_type: str, n: int) -> list[SlotRef] | None:
        free = [s for s in self.slots.values() if s.slot_type == slot_type and s.key not in self.taken][:n]
        if len(free) < n:
            return None
        return [self._ref(s.slot_type, s.key, s.key, s.memory_bytes) for s in free]

    def admits(self, s: SlotRef) -> bool:
        fs = self.slots.get(s.key)
        return fs is not None and fs.slot_type == s.slot_type and s.key not in self.taken


class _DynamicMigPool(_Pool):
    """MIG slices carved on demand under the model's placement rules (declared GPUs)."""

    def __init__(self, gpu: GpuInfo, geom: MigGeometry) -> None:
        super().__init__(gpu)
        self.geom = geom
        self.mask = 0
        self.compute = 0
        self._total = capacity(geom, 0, 0)

    def total(self) -> dict[str, int]:
        return dict(self._total)

    def free(self) -> dict[str, int]:
        return capacity(self.geom, self.mask, self.compute)

    def headroom(self) -> float:
        return 1.0 - bin(self.mask).count("1") / self.geom.memory_slices

    def _mem(self, size: int) -> int:
        return self.gpu.memory_bytes * size // self.geom.memory_slices

    def _uuid(self, name: str, start: int) -> str:
        return f"MIG-declared-{self.gpu.index}-{start}-{name}"

    def plan(self, slot_type: str, n: int) -> list[SlotRef] | None:
        prof = self.geom.profile(slot_type)
        if prof is None:
            return None
        mask, comp, out = self.mask, self.compute, []
        for _ in range(n):
            s = choose_start(self.geom, slot_type, mask, comp)
            if s is None:
                return None
            mask, comp = mask | occupy(prof, s), comp + prof.compute
            out.append(self._ref(slot_type, f"{slot_type}@{s}", self._uuid(slot_type, s), self._mem(prof.size)))
        return out

    def _parse(self, s: SlotRef) -> tuple[Any, int] | None:
        name, _, start = s.key.partition("@")
        prof = self.geom.profile(name)
        if prof is None or name != s.slot_type or not start.isdigit():
            return None
        return prof, int(start)

    def admits(self, s: SlotRef) -> bool:
        parsed = self._parse(s)
        if parsed is None:
            return False
        prof, start = parsed
        return start in placements(self.geom, prof, self.mask, self.compute)

    def take(self, s: SlotRef) -> None:
        parsed = self._parse(s)
        assert parsed is not None
        prof, start = parsed
        self.mask |= occupy(prof, start)
        self.compute += prof.compute
        super().take(s)

    def drop(self, s: SlotRef) -> None:
        if s.key not in self.taken:
            return
        parsed = self._parse(s)
        assert parsed is not None
        prof, start = parsed
        self.mask &= ~occupy(prof, start)
        self.compute -= prof.compute
        super().drop(s)


def _pool_for(gpu: GpuInfo) -> _Pool:
    if gpu.profile == "mig-existing":
        return _FixedMigPool(gpu, [_FixedSlot(m.uuid, m.profile, m.memory_bytes, m.cap_devices)
                                   for m in gpu.mig_instances])
    prof = parse_profile(gpu.profile, f"GPU {gpu.index} profile")
    if prof.kind == WHOLE:
        return _WholePool(gpu)
    if prof.kind == "shared":
        return _SharedPool(gpu, prof.shares)
    geom = geometry_for(gpu.model)
    if geom is None:
        raise ValueError(f"GPU {gpu.index} ({gpu.model}): MIG rules for this model are not known; "
                         "use 'whole' or 'shared:N'")
    if prof.kind == "mig":
        return _DynamicMigPool(gpu, geom)
    layout = check_layout(geom, prof.layout)
    slots = [_FixedSlot(f"MIG-declared-{gpu.index}-{start}-{name}", name,
                        gpu.memory_bytes * _slices(geom, name) // geom.memory_slices, ())
             for name, start in layout]
    return _FixedMigPool(gpu, slots)


def _slices(geom: MigGeometry, name: str) -> int:
    p = geom.profile(name)
    assert p is not None
    return p.size


# -- the allocator ---------------------------------------------------------------


class SlotAllocator:
    """Grants typed GPU slots to jobs; one per agent."""

    def __init__(self, inventory: GpuInventory, *, device_exists: Callable[[str], bool] = os.path.exists) -> None:
        self.inventory = inventory
        self._device_exists = device_exists
        self._pools: list[_Pool] = [_pool_for(g) for g in inventory.gpus]
        self._by_uuid = {p.gpu.uuid: p for p in self._pools}
        self._grants: dict[str, Grant] = {}
        self._total = _sum(p.total() for p in self._pools)
        self._free: dict[str, int] | None = None  # cached until the next reserve/release/restore

    # views --------------------------------------------------------------------

    def total_by_type(self) -> dict[str, int]:
        """Slots per type on an idle agent (``ResourceVector.gpu_total``)."""
        return dict(self._total)

    def free_by_type(self) -> dict[str, int]:
        """Slots per type that could be granted now (``ResourceVector.gpu_free``); every offered type appears, even at 0."""
        if self._free is None:
            self._free = _sum(p.free() for p in self._pools)
        return dict(self._free)

    def in_use_by_type(self) -> dict[str, int]:
        out = {t: 0 for t in self.total_by_type()}
        for g in self._grants.values():
            for s in g.slots:
                out[s.slot_type] = out.get(s.slot_type, 0) + 1
        return out

    def in_use_by_job(self) -> dict[str, int]:
        """Slots each job holds (tenant GPU quotas count these)."""
        return {j: len(g.slots) for j, g in self._grants.items()}

    def grant(self, job_id: str) -> Grant | None:
        return self._grants.get(job_id)

    def grants(self) -> list[Grant]:
        return list(self._grants.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-GPU view for the API and ``doctor``."""
        return [{"index": p.gpu.index, "uuid": p.gpu.uuid, "model": p.gpu.model, "declared": p.gpu.declared,
                 "profile": p.gpu.profile, "free": p.free(), "total": p.total(),
                 "jobs": sorted({j for j, g in self._grants.items() for s in g.slots if s.gpu_uuid == p.gpu.uuid})}
                for p in self._pools]

    # decisions ----------------------------------------------------------------

    def resolve_type(self, count: int, gpu_type: str | None) -> str:
        """The slot type a request means here; UnknownSlotType if it is not offered."""
        offered = self.total_by_type()
        if gpu_type is not None:
            if gpu_type not in offered:
                have = ", ".join(sorted(offered)) or "none (no GPUs)"
                raise UnknownSlotType(f"this agent offers no GPU slots of type {gpu_type!r}; it offers: {have}")
            return gpu_type
        if not offered:
            raise UnknownSlotType("this agent has no GPUs; submit the job where GPU slots are offered "
                                  "(see 'p2psched peers')")
        return pick_type(self.free_by_type(), count) or pick_type(offered, count) or _largest(offered)

    def can_fit(self, count: int, gpu_type: str | None = None) -> bool:
        if count <= 0:
            return True
        try:
            t = self.resolve_type(count, gpu_type)
        except UnknownSlotType:
            return False
        return self.free_by_type().get(t, 0) >= count

    def reserve(self, job_id: str, count: int, gpu_type: str | None = None) -> Grant:
        """Reserve ``count`` slots of one type for ``job_id``, all or nothing.

        Best fit: the GPU where the request fits most tightly is chosen (fewest free
        slots of the type, then least unallocated), so idle GPUs stay idle for large
        requests. A request larger than any one GPU's free slots is spread over the
        fewest GPUs. Reserving again for a job that holds an equal grant returns it.
        Raises UnknownSlotType or InsufficientSlots, reserving nothing.
        """
        if count < 0:
            raise ValueError(f"job {job_id}: a GPU slot count cannot be negative ({count})")
        held = self._grants.get(job_id)
        if held is not None:
            if len(held.slots) == count and (gpu_type is None or held.slot_type == gpu_type):
                return held
            raise ValueError(f"job {job_id} already holds {len(held.slots)} GPU slot(s) of type {held.slot_type}; "
                             "release them before reserving others")
        if count == 0:
            return Grant(job_id, (), no_gpu_env())
        t = self.resolve_type(count, gpu_type)
        free = {id(p): p.free().get(t, 0) for p in self._pools}
        if sum(free.values()) < count:
            raise InsufficientSlots(f"job {job_id} asks for {count} GPU slot(s) of type {t}; "
                                    f"{sum(free.values())} are free on this agent")
        plan: list[SlotRef] = []
        remaining = count
        candidates = [p for p in self._pools if free[id(p)] > 0]
        while remaining:
            fitting = [p for p in candidates if free[id(p)] >= remaining]
            if fitting:
                pool = min(fitting, key=lambda p: (free[id(p)], p.headroom(), p.gpu.index))
                n = remaining
            else:
                pool = max(candidates, key=lambda p: (free[id(p)], -p.headroom(), -p.gpu.index))
                n = free[id(pool)]
            part = pool.plan(t, n)
            if part is None:  # cannot happen while free() and plan() agree; refuse rather than half-reserve
                raise InsufficientSlots(f"job {job_id}: GPU {pool.gpu.index} could not place {n} slot(s) of {t}")
            plan.extend(part)
            candidates.remove(pool)
            remaining -= n
        grant = self._make_grant(job_id, plan)
        for s in plan:
            self._by_uuid[s.gpu_uuid].take(s)
        self._grants[job_id] = grant
        self._free = None
        return grant

    def release(self, job_id: str) -> bool:
        """Free the job's slots. True if it held any; calling it again is harmless."""
        grant = self._grants.pop(job_id, None)
        if grant is None:
            return False
        self._free = None
        for s in grant.slots:
            pool = self._by_uuid.get(s.gpu_uuid)
            if pool is not None:
                pool.drop(s)
        return True

    def restore(self, grants: Iterable[Grant | Mapping[str, Any]]) -> list[str]:
        """Take back the slots of jobs still queued or running after an agent restart.

        Each grant comes back whole or not at all. Returns one sentence per grant that
        could not be restored (its GPU is gone, or the slot is no longer offered or is
        already taken), so the agent can log it and fail or requeue that job.
        """
        problems: list[str] = []
        for raw in grants:
            g = raw if isinstance(raw, Grant) else Grant.from_wire(raw)
            if not g.slots:  # a job that held no GPU has nothing to take back
                continue
            if g.job_id in self._grants:
                if self._grants[g.job_id].slots == g.slots:
                    continue
                problems.append(f"job {g.job_id}: already holds other GPU slots; its stored grant was not restored")
                continue
            why = self._why_not(g)
            if why:
                problems.append(f"job {g.job_id}: GPU slots not restored: {why}")
                continue
            for s in g.slots:
                self._by_uuid[s.gpu_uuid].take(s)
            self._free = None
            # Rebuild env and devices from today's inventory (device minors can change across reboots).
            self._grants[g.job_id] = self._make_grant(g.job_id, list(g.slots))
        return problems

    def _why_not(self, g: Grant) -> str:
        # Check every slot against a trial copy so a grant whose own slots overlap fails too.
        trial: dict[str, list[SlotRef]] = {}
        for s in g.slots:
            pool = self._by_uuid.get(s.gpu_uuid)
            if pool is None:
                return f"GPU {s.gpu_uuid} is not on this agent any more"
            if not pool.admits(s) or any(o.key == s.key for o in trial.get(s.gpu_uuid, [])):
                return f"slot {s.key} ({s.slot_type}) on GPU {s.gpu_uuid} is not free under the current profile"
            trial.setdefault(s.gpu_uuid, []).append(s)
        # Dynamic MIG slots of one grant must also fit together.
        for uuid, slots in trial.items():
            pool = self._by_uuid[uuid]
            if isinstance(pool, _DynamicMigPool) and len(slots) > 1:
                saved = (pool.mask, pool.compute, dict(pool.taken))
                try:
                    for s in slots:
                        if not pool.admits(s):
                            return f"MIG slots {', '.join(x.key for x in slots)} overlap on GPU {uuid}"
                        pool.take(s)
                finally:
                    pool.mask, pool.compute, pool.taken = saved
        return ""

    def _make_grant(self, job_id: str, slots: list[SlotRef]) -> Grant:
        devices: list[str] = list(CONTROL_NODES)
        uuids: list[str] = []
        mem_by_dev: dict[str, int] = {}
        shares: list[float] = []
        for s in slots:
            pool = self._by_uuid[s.gpu_uuid]
            node = pool.gpu.device_node()
            if node and node not in devices:
                devices.append(node)
            if isinstance(pool, _FixedMigPool):
                for cap in pool.slots[s.key].cap_devices:
                    if cap not in devices:
                        devices.append(cap)
            if s.device_uuid not in uuids:
                uuids.append(s.device_uuid)
            mem_by_dev[s.device_uuid] = mem_by_dev.get(s.device_uuid, 0) + s.memory_bytes
            if isinstance(pool, _SharedPool):
                shares.append(slot_fraction(s.slot_type))
        visible = ",".join(uuids)
        env = {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible,
               "P2PSCHED_GPU_SLOT_TYPE": slots[0].slot_type if slots else "",
               "P2PSCHED_GPU_SLOTS": str(len(slots))}
        if shares:
            env.update(_share_env(uuids, mem_by_dev, slots))
        declared = any(self._by_uuid[s.gpu_uuid].gpu.declared for s in slots)
        # Only nodes that exist can be bound into the sandbox or put in a device cgroup;
        # the rest are kept so the agent can say what a job lacks (doctor checks them too).
        present = tuple(d for d in devices if self._device_exists(d))
        absent = tuple(d for d in devices if d not in present)
        return Grant(job_id, tuple(slots), env, present, absent, declared)


def _share_env(uuids: list[str], mem_by_dev: dict[str, int], slots: list[SlotRef]) -> dict[str, str]:
    """Memory and compute caps for time-sliced shares.

    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` are
    enforced by CUDA only when the job is an MPS client (an MPS control daemon serves
    the GPU); without MPS, CUDA ignores them. ``XLA_PYTHON_CLIENT_MEM_FRACTION`` is
    honoured by JAX, and ``P2PSCHED_GPU_MEMORY_LIMIT_BYTES`` is for the job to apply
    itself (e.g. ``torch.cuda.set_per_process_memory_fraction``): both advisory.
    """
    frac = {u: 0.0 for u in uuids}
    for s in slots:
        frac[s.device_uuid] += slot_fraction(s.slot_type)
    # MPS reads device ordinals as the job numbers them, i.e. after CUDA_VISIBLE_DEVICES.
    limits = ",".join(f"{i}={mem_by_dev[u] // (1 << 20)}M" for i, u in enumerate(uuids))
    smallest = min(frac.values())
    return {
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": limits,
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(max(1, int(100 * smallest))),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{smallest:.3f}",
        "P2PSCHED_GPU_MEMORY_LIMIT_BYTES": str(min(mem_by_dev.values())),
        "P2PSCHED_GPU_MEMORY_ENFORCED": "mps-only",
    }


def _sum(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _size(slot_type: str) -> tuple[float, int]:
    """Bigger first: compute share, then memory (1g.20gb before 1g.10gb)."""
    m = _MEM_RE.search(slot_type)
    return (slot_fraction(slot_type), int(m.group(1)) if m else 0)


_MEM_RE = re.compile(r"\.(\d+)gb$")


def _largest(types: Mapping[str, int]) -> str:
    return max(types, key=lambda t: (_size(t), t))


def pick_type(slots: Mapping[str, int], count: int) -> str | None:
    """The type an untyped request takes: ``whole`` first, then the largest slice
    with ``count`` free. None if no type has ``count``."""
    for t in sorted(slots, key=lambda t: (t != WHOLE, tuple(-x for x in _size(t)), t)):
        if slots[t] >= count:
            return t
    return None


def best_fit_score(gpu_free: Mapping[str, int], count: int, gpu_type: str | None = None) -> float | None:
    """How tightly a peer's free GPU slots hold a request; for GPU placement by fit.

    - ``count <= 0``: 0.0 for every peer (the job needs no GPU; this says nothing).
    - None: the peer cannot hold it (type not offered, or fewer than ``count`` free).
    - Otherwise ``count / free`` of the type, in (0, 1]: 1.0 is a perfect fit (the
      request takes every free slot of its type), smaller leaves more behind.
      Prefer the highest score: that packs requests onto peers already partly used
      and keeps whole peers free for large requests.

    ``gpu_type=None`` means any type, resolved as :func:`pick_type` does (``whole``
    first, then the largest slice with enough free), the same rule reserve() uses.
    """
    if count <= 0:
        return 0.0
    t = gpu_type if gpu_type is not None else pick_type(gpu_free, count)
    if t is None:
        return None
    free = int(gpu_free.get(t, 0))
    if free < count:
        return None
    return count / free


def describe_slots(gpu_free: Mapping[str, int], gpu_total: Mapping[str, int],
                   labels: Mapping[str, str] | None = None) -> str:
    """One line for ``p2psched peers``: ``whole 1/2, share-1/4 3/4 (declared)``.

    ``labels`` are the peer's node labels; GPUs from ``--gpus`` carry
    ``gpu.declared=true`` there (see GpuInventory.labels), and the line says so.
    """
    if not gpu_total:
        return "-"
    order = sorted(gpu_total, key=lambda t: (t != WHOLE, tuple(-x for x in _size(t)), t))
    text = ", ".join(f"{t} {gpu_free.get(t, 0)}/{gpu_total[t]}" for t in order)
    if labels is not None and labels.get("gpu.declared") == "true":
        text += " (declared)"
    return text
