"""The slot allocator: accounting, best fit, all-or-nothing reserve, release, restore,
and the environment and device nodes a grant carries. Runs on declared GPUs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psched.gpu.devices import no_gpu_env
from p2psched.gpu.discovery import GpuInfo, GpuInventory, MigInstance, load_inventory
from p2psched.gpu.profiles import MIG_GEOMETRIES, capacity, occupy
from p2psched.gpu.slots import (
    Grant,
    InsufficientSlots,
    SlotAllocator,
    UnknownSlotType,
    best_fit_score,
)


def alloc(config: str) -> SlotAllocator:
    return SlotAllocator(load_inventory(config))


def gpus_of(g: Grant) -> list[str]:
    return sorted({s.gpu_uuid for s in g.slots})


# -- accounting ---------------------------------------------------------------------


def test_whole_gpus_are_counted_out_and_back() -> None:
    a = alloc("3xH100-80GB")
    assert a.total_by_type() == {"whole": 3} and a.free_by_type() == {"whole": 3}
    a.reserve("j1", 2, "whole")
    assert a.free_by_type() == {"whole": 1}
    assert a.in_use_by_type() == {"whole": 2}
    assert a.in_use_by_job() == {"j1": 2}
    assert a.release("j1") is True
    assert a.free_by_type() == {"whole": 3} and a.in_use_by_type() == {"whole": 0}


def test_shares_are_typed_by_their_fraction() -> None:
    a = alloc("1xL4-24GB/shared:4, 1xL4-24GB/shared:2")
    assert a.total_by_type() == {"share-1/4": 4, "share-1/2": 2}
    a.reserve("j", 3, "share-1/4")
    assert a.free_by_type() == {"share-1/4": 1, "share-1/2": 2}
    with pytest.raises(InsufficientSlots):
        a.reserve("k", 2, "share-1/4")  # shares of different sizes do not mix


def test_mig_types_compete_for_the_same_slices() -> None:
    a = alloc("1xH100-80GB/mig")
    a.reserve("big", 1, "4g.40gb")
    free = a.free_by_type()
    assert free["3g.40gb"] == 1 and free["4g.40gb"] == 0
    assert not a.can_fit(1, "4g.40gb") and a.can_fit(1, "3g.40gb")
    a.reserve("mid", 1, "3g.40gb")
    assert set(a.free_by_type().values()) == {0}
    a.release("big")
    assert a.free_by_type()["4g.40gb"] == 1 and a.free_by_type()["7g.80gb"] == 0


def test_every_offered_type_is_gossiped_even_at_zero() -> None:
    a = alloc("1xH100-80GB")
    a.reserve("j", 1, "whole")
    assert a.free_by_type() == {"whole": 0}


def test_unknown_type_is_a_clear_error() -> None:
    a = alloc("1xH100-80GB/mig")
    with pytest.raises(UnknownSlotType, match="no GPU slots of type 'whole'; it offers: 1g.10gb"):
        a.reserve("j", 1, "whole")
    assert not a.can_fit(1, "whole")
    with pytest.raises(UnknownSlotType, match="no GPUs"):
        alloc("1xH100-80GB").__class__(GpuInventory()).reserve("j", 1, None)


# -- best fit -----------------------------------------------------------------------


def test_best_fit_packs_shares_onto_the_gpu_already_in_use() -> None:
    a = alloc("2xL4-24GB/shared:4")
    assert gpus_of(a.reserve("a", 1, "share-1/4")) == ["GPU-declared-0"]
    assert gpus_of(a.reserve("b", 1, "share-1/4")) == ["GPU-declared-0"]  # 2 free there, 4 on GPU 1
    assert gpus_of(a.reserve("c", 4, "share-1/4")) == ["GPU-declared-1"]  # only GPU 1 holds 4
    assert gpus_of(a.reserve("d", 2, "share-1/4")) == ["GPU-declared-0"]


def test_best_fit_chooses_the_tightest_gpu_not_the_first() -> None:
    a = alloc("2xL4-24GB/shared:4")
    a.reserve("x", 3, "share-1/4")  # GPU 0: 1 free
    a.reserve("y", 2, "share-1/4")  # fits GPU 0? no (1 free) -> GPU 1: 2 free
    assert gpus_of(a.grant("y")) == ["GPU-declared-1"]  # type: ignore[arg-type]
    assert gpus_of(a.reserve("z", 1, "share-1/4")) == ["GPU-declared-0"]  # 1 free beats 2 free


def test_best_fit_keeps_an_idle_mig_gpu_for_large_slices() -> None:
    a = alloc("2xH100-80GB/mig")
    a.reserve("one", 1, "3g.40gb")
    assert gpus_of(a.reserve("two", 1, "3g.40gb")) == ["GPU-declared-0"]
    assert gpus_of(a.reserve("big", 1, "7g.80gb")) == ["GPU-declared-1"]


def test_a_request_larger_than_one_gpu_spreads_over_the_fewest() -> None:
    a = alloc("3xL4-24GB/shared:2")
    a.reserve("x", 1, "share-1/2")  # GPU 0 half used
    g = a.reserve("wide", 4, "share-1/2")
    assert gpus_of(g) == ["GPU-declared-1", "GPU-declared-2"]
    assert g.env["CUDA_VISIBLE_DEVICES"] == "GPU-declared-1,GPU-declared-2"


def test_untyped_requests_take_whole_gpus_first_then_the_largest_slice() -> None:
    a = alloc("1xH100-80GB, 1xH100-80GB/mig")
    assert a.reserve("a", 1, None).slot_type == "whole"
    assert a.reserve("b", 1, None).slot_type == "7g.80gb"
    assert not a.can_fit(1, None)


# -- all or nothing -------------------------------------------------------------------


def test_a_failing_multi_slot_reserve_leaves_nothing_reserved() -> None:
    a = alloc("2xH100-80GB/mig")
    a.reserve("held", 1, "4g.40gb")
    before = a.free_by_type()
    with pytest.raises(InsufficientSlots, match="asks for 4 GPU slot"):
        a.reserve("greedy", 4, "3g.40gb")  # 1 + 2 free across the two GPUs
    assert a.free_by_type() == before
    assert a.grant("greedy") is None and a.in_use_by_job() == {"held": 1}


def test_reserving_again_returns_the_same_grant_and_refuses_a_different_one() -> None:
    a = alloc("2xH100-80GB")
    g = a.reserve("j", 1, "whole")
    assert a.reserve("j", 1, "whole") is g
    with pytest.raises(ValueError, match="already holds 1 GPU slot"):
        a.reserve("j", 2, "whole")
    assert a.free_by_type() == {"whole": 1}


def test_release_is_idempotent() -> None:
    a = alloc("1xH100-80GB/mig")
    a.reserve("j", 2, "2g.20gb")
    assert a.release("j") is True
    assert a.release("j") is False
    assert a.release("never-was") is False
    assert a.free_by_type() == a.total_by_type()


# -- restart --------------------------------------------------------------------------


def test_restore_after_restart_takes_back_exactly_the_stored_slots() -> None:
    config = "1xH100-80GB/mig, 2xL4-24GB/shared:4, 1xA100-40GB"
    a = alloc(config)
    grants = [a.reserve("m", 1, "3g.40gb"), a.reserve("s", 3, "share-1/4"), a.reserve("w", 1, "whole"),
              a.reserve("m2", 2, "1g.10gb")]
    a.release("w")  # finished before the restart
    stored = [json.loads(json.dumps(g.to_wire())) for g in grants if g.job_id != "w"]  # as the job store keeps them

    b = alloc(config)
    assert b.restore(stored) == []
    assert b.free_by_type() == a.free_by_type()
    for g in stored:
        assert b.grant(g["job"]) == a.grant(g["job"])
    # A slot freed by the restart (job "w" ended) is grantable again, and restore is idempotent.
    assert b.can_fit(1, "whole")
    assert b.restore(stored) == []
    assert b.free_by_type() == a.free_by_type()


def test_restore_refuses_conflicts_and_vanished_gpus_whole_grant_at_a_time() -> None:
    a = alloc("2xH100-80GB")
    g1 = a.reserve("j1", 1, "whole").to_wire()
    clash = dict(g1, job="j2")
    b = alloc("1xH100-80GB")
    gone = {"job": "j3", "slots": [dict(g1["slots"][0], gpu="GPU-declared-1")]}
    problems = b.restore([g1, clash, gone])
    assert len(problems) == 2
    assert "job j2" in problems[0] and "not free" in problems[0]
    assert "job j3" in problems[1] and "not on this agent" in problems[1]
    assert b.in_use_by_job() == {"j1": 1}


def test_restore_under_a_changed_profile_reports_the_slot() -> None:
    a = alloc("1xH100-80GB/shared:4")
    g = a.reserve("j", 1, "share-1/4").to_wire()
    b = alloc("1xH100-80GB/mig")
    [problem] = b.restore([g])
    assert "share:0 (share-1/4)" in problem and "current profile" in problem
    assert b.free_by_type() == b.total_by_type()


def test_restore_refuses_overlapping_mig_slots_within_one_grant() -> None:
    a = alloc("1xH100-80GB/mig")
    g = a.reserve("j", 1, "4g.40gb").to_wire()
    g["slots"].append(dict(g["slots"][0], type="3g.40gb", key="3g.40gb@0", dev="MIG-declared-0-0-3g.40gb"))
    b = alloc("1xH100-80GB/mig")
    [problem] = b.restore([g])
    assert "overlap" in problem or "not free" in problem
    assert b.free_by_type() == b.total_by_type()


# -- what the job gets ------------------------------------------------------------------


def test_whole_grant_env_and_devices() -> None:
    a = alloc("2xH100-80GB")
    a.reserve("first", 1, "whole")
    g = a.reserve("j", 1, "whole")
    assert g.env["CUDA_VISIBLE_DEVICES"] == "GPU-declared-1"
    assert g.env["NVIDIA_VISIBLE_DEVICES"] == "GPU-declared-1"
    # Declared GPUs map to nodes like a real one would, but none exist, so none are let through.
    assert g.absent_devices == ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1")
    assert g.devices == ()
    assert g.declared
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in g.env  # a whole GPU has no cap to set


def test_share_grant_carries_memory_caps_and_lists_its_gpu_once() -> None:
    a = alloc("1xL4-24GB/shared:4")
    g = a.reserve("j", 2, "share-1/4")
    assert g.env["CUDA_VISIBLE_DEVICES"] == "GPU-declared-0"
    half = (24 << 30) // 2
    assert g.env["P2PSCHED_GPU_MEMORY_LIMIT_BYTES"] == str(half)
    assert g.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={half >> 20}M"
    assert g.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert g.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.500"
    assert g.env["P2PSCHED_GPU_MEMORY_ENFORCED"] == "mps-only"
    assert g.devices + g.absent_devices == ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0")


def test_carved_mig_grant_names_the_instance() -> None:
    a = alloc("1xH100-80GB/mig")
    g = a.reserve("j", 1, "3g.40gb")
    # Carved at slice 4, not 0: that leaves slice 0 for a 4g.40gb, which a 3g at 0 would block.
    assert g.env["CUDA_VISIBLE_DEVICES"] == "MIG-declared-0-4-3g.40gb"
    assert a.can_fit(1, "4g.40gb")
    assert g.slots[0].memory_bytes == (80 << 30) // 2
    assert g.devices + g.absent_devices == ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0")


def test_existing_mig_instances_grant_their_uuid_and_capability_nodes() -> None:
    # The inventory NVML reports for a MIG-mode H100 with two 3g.40gb instances.
    mig = tuple(MigInstance(uuid=f"MIG-aaaa000{i}-0000-0000-0000-000000000000", profile="3g.40gb",
                            memory_bytes=40 << 30, gi_id=1 + i, ci_id=0, start=4 * i,
                            cap_devices=(f"/dev/nvidia-caps/nvidia-cap{21 + 9 * i}",
                                         f"/dev/nvidia-caps/nvidia-cap{22 + 9 * i}"))
                for i in range(2))
    gpu = GpuInfo(index=0, uuid="GPU-5e1f0000-0000-0000-0000-000000000000", model="NVIDIA H100 80GB HBM3",
                  memory_bytes=80 << 30, minor=3, declared=False, mig_enabled=True, mig_instances=mig,
                  profile="mig-existing")
    # This host has no such nodes; say they exist so the mapping itself is what is checked.
    a = SlotAllocator(GpuInventory(gpus=(gpu,), source="nvml"), device_exists=lambda p: True)
    assert a.total_by_type() == {"3g.40gb": 2}
    g = a.reserve("j", 1, "3g.40gb")
    assert g.env["CUDA_VISIBLE_DEVICES"] == mig[0].uuid
    assert g.absent_devices == ()
    assert g.devices == ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia3",
                         "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap22")
    assert not g.declared


def test_a_job_without_gpus_sees_none() -> None:
    a = alloc("2xH100-80GB")
    g = a.reserve("cpu-job", 0, None)
    assert g.env == no_gpu_env() == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    assert g.devices == () and g.slots == ()
    assert a.free_by_type() == {"whole": 2} and a.grant("cpu-job") is None


def test_only_nodes_present_on_the_host_are_let_through() -> None:
    present = {"/dev/nvidiactl", "/dev/nvidia0"}
    a = SlotAllocator(load_inventory("1xH100-80GB"), device_exists=present.__contains__)
    g = a.reserve("j", 1, "whole")
    assert g.devices == ("/dev/nvidiactl", "/dev/nvidia0")
    assert g.absent_devices == ("/dev/nvidia-uvm",)


def test_grant_wire_round_trip() -> None:
    g = alloc("1xH100-80GB/mig").reserve("j", 2, "1g.10gb")
    assert Grant.from_wire(json.loads(json.dumps(g.to_wire()))) == g


# -- the score placement uses -------------------------------------------------------------


def test_best_fit_score_semantics() -> None:
    assert best_fit_score({"whole": 1}, 1, "whole") == 1.0
    assert best_fit_score({"whole": 4}, 1, "whole") == 0.25
    assert best_fit_score({"whole": 4}, 5, "whole") is None
    assert best_fit_score({"whole": 0}, 1, "whole") is None
    assert best_fit_score({}, 1, "whole") is None
    assert best_fit_score({"1g.10gb": 7}, 1, "3g.40gb") is None
    assert best_fit_score({}, 0, None) == 0.0
    # Untyped: whole first, then the largest slice with room (the rule reserve() applies).
    assert best_fit_score({"whole": 0, "3g.40gb": 2, "1g.10gb": 7}, 1, None) == 0.5
    assert best_fit_score({"whole": 2, "3g.40gb": 2}, 1, None) == 0.5
    # Tighter fit scores higher, so placement prefers the peer already partly used.
    assert best_fit_score({"share-1/4": 1}, 1, "share-1/4") > best_fit_score({"share-1/4": 8}, 1, "share-1/4")  # type: ignore[operator]


def test_best_fit_score_agrees_with_the_allocator() -> None:
    a = alloc("1xH100-80GB/mig, 1xL4-24GB/shared:4")
    a.reserve("x", 1, "4g.40gb")
    for t in list(a.total_by_type()) + [None]:
        for n in range(0, 5):
            assert (best_fit_score(a.free_by_type(), n, t) is not None) == a.can_fit(n, t), (t, n)


# -- invariants under any sequence ----------------------------------------------------------

H100 = MIG_GEOMETRIES["H100-80GB"]
ops = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 9), st.integers(1, 4), st.sampled_from(H100.names())),
    st.tuples(st.just("release"), st.integers(0, 9), st.just(0), st.just("")),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_mig_allocation_never_overlaps_and_free_counts_stay_exact(seq: list[tuple[str, int, int, str]]) -> None:
    a = alloc("2xH100-80GB/mig")
    for op, j, n, t in seq:
        job = f"j{j}"
        if op == "release":
            a.release(job)
            continue
        if a.grant(job) is not None:
            continue
        fits = a.can_fit(n, t)
        try:
            a.reserve(job, n, t)
            assert fits, "reserve succeeded where can_fit said no"
        except InsufficientSlots:
            assert not fits, "can_fit said yes but reserve failed"
        # Recompute each GPU's state from the grants alone: no overlaps, counts exact.
        for gpu in ("GPU-declared-0", "GPU-declared-1"):
            mask = comp = 0
            for g in a.grants():
                for s in g.slots:
                    if s.gpu_uuid != gpu:
                        continue
                    name, _, start = s.key.partition("@")
                    p = H100.profile(name)
                    assert p is not None and int(start) in p.starts
                    assert not mask & occupy(p, int(start)), "two slots share a memory slice"
                    mask, comp = mask | occupy(p, int(start)), comp + p.compute
            assert comp <= H100.compute_slices
        expected: dict[str, int] = {}
        for snap in a.snapshot():
            for k, v in snap["free"].items():
                expected[k] = expected.get(k, 0) + v
        assert a.free_by_type() == expected
    for g in a.grants():
        a.release(g.job_id)
    assert a.free_by_type() == a.total_by_type() == {k: 2 * v for k, v in capacity(H100, 0, 0).items()}


def test_peers_line_shows_slots_and_marks_declared_ones() -> None:
    from p2psched.gpu.slots import describe_slots

    inv = load_inventory("1xH100-80GB, 1xL4-24GB/shared:4")
    a = SlotAllocator(inv)
    a.reserve("j", 1, "share-1/4")
    line = describe_slots(a.free_by_type(), a.total_by_type(), inv.labels())
    assert line == "whole 1/1, share-1/4 3/4 (declared)"
    assert describe_slots({}, {}, {}) == "-"


def test_untyped_request_prefers_more_memory_among_equal_compute() -> None:
    c = alloc("1xH100-80GB/mig:1g.20gb+1g.10gb+1g.10gb")
    assert c.reserve("u", 1, None).slot_type == "1g.20gb"


def test_restore_skips_grants_without_slots() -> None:
    a = alloc("1xH100-80GB")
    assert a.restore([a.reserve("cpu", 0).to_wire()]) == []
    assert a.in_use_by_job() == {}
