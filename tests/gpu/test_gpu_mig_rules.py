"""MIG placement rules: which profiles fit after which, on declared geometries."""

from __future__ import annotations

import pytest

from p2psched.gpu.profiles import (
    MIG_GEOMETRIES,
    capacity,
    check_layout,
    choose_start,
    geometry_for,
    occupy,
    parse_profile,
    slot_fraction,
)

H100 = MIG_GEOMETRIES["H100-80GB"]


def carve(names: list[str]) -> tuple[int, int]:
    """Carve profiles one by one where the allocator would, returning (mask, compute)."""
    mask = comp = 0
    for n in names:
        s = choose_start(H100, n, mask, comp)
        assert s is not None, f"{n} should fit after {names[:names.index(n)]}"
        p = H100.profile(n)
        assert p is not None
        mask, comp = mask | occupy(p, s), comp + p.compute
    return mask, comp


def test_empty_h100_offers_nvidias_instance_counts() -> None:
    assert capacity(H100, 0, 0) == {"1g.10gb": 7, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2,
                                    "4g.40gb": 1, "7g.80gb": 1}


def test_after_a_4g_a_3g_fits_but_not_another_4g() -> None:
    cap = capacity(H100, *carve(["4g.40gb"]))
    assert cap["3g.40gb"] == 1
    assert cap["4g.40gb"] == 0
    assert cap["7g.80gb"] == 0
    assert cap["1g.10gb"] == 3  # slices 4, 5, 6: slice 7 never takes a 1g.10gb


def test_after_a_4g_and_a_3g_the_gpu_is_full() -> None:
    assert set(capacity(H100, *carve(["4g.40gb", "3g.40gb"])).values()) == {0}


def test_two_3g_leave_no_room_for_a_1g() -> None:
    # 3g+3g uses 6 of 7 compute slices but all 8 memory slices: the 7th compute slice is stranded.
    mask, comp = carve(["3g.40gb", "3g.40gb"])
    assert comp == 6
    assert capacity(H100, mask, comp)["1g.10gb"] == 0


def test_a_small_slice_is_parked_where_it_strands_least() -> None:
    # A 1g.10gb at slice 0 would block the only 4g.40gb placement; the allocator avoids that.
    mask, comp = carve(["1g.10gb"])
    assert capacity(H100, mask, comp)["4g.40gb"] == 1
    assert capacity(H100, mask, comp)["2g.20gb"] == 3


def test_three_2g_then_one_1g_fill_seven_compute_slices() -> None:
    mask, comp = carve(["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"])
    assert comp == 7
    assert set(capacity(H100, mask, comp).values()) == {0}


def test_a_1g_parked_at_slice_0_blocks_the_4g() -> None:
    p = H100.profile("1g.10gb")
    assert p is not None
    cap = capacity(H100, occupy(p, 0), 1)
    assert cap["4g.40gb"] == 0
    assert cap["3g.40gb"] == 1  # still at slice 4


@pytest.mark.parametrize("layout", [
    ("4g.40gb", "3g.40gb"),
    ("3g.40gb", "3g.40gb"),
    ("2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"),
    ("1g.10gb",) * 7,
    ("1g.20gb",) * 4,
    ("3g.40gb", "2g.20gb", "1g.10gb"),
    ("7g.80gb",),
])
def test_valid_layouts_place(layout: tuple[str, ...]) -> None:
    placed = check_layout(H100, layout)
    assert sorted(n for n, _ in placed) == sorted(layout)
    mask = 0
    for n, s in placed:
        p = H100.profile(n)
        assert p is not None and s in p.starts
        assert not mask & occupy(p, s), "placed instances must not overlap"
        mask |= occupy(p, s)


@pytest.mark.parametrize("layout", [
    ("4g.40gb", "4g.40gb"),
    ("3g.40gb", "3g.40gb", "1g.10gb"),
    ("1g.10gb",) * 8,
    ("7g.80gb", "1g.10gb"),
    ("2g.20gb",) * 4,
])
def test_invalid_layouts_are_refused_with_the_reason(layout: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="does not fit one H100-80GB"):
        check_layout(H100, layout)


def test_unknown_profile_names_the_models_profiles() -> None:
    with pytest.raises(ValueError, match="its profiles are 1g.10gb, 1g.20gb"):
        check_layout(H100, ("2g.10gb",))


def test_a30_has_its_own_four_slice_geometry() -> None:
    a30 = MIG_GEOMETRIES["A30-24GB"]
    assert capacity(a30, 0, 0) == {"1g.6gb": 4, "2g.12gb": 2, "4g.24gb": 1}
    with pytest.raises(ValueError):
        check_layout(a30, ("2g.12gb", "2g.12gb", "1g.6gb"))


@pytest.mark.parametrize("name,model", [
    ("NVIDIA H100 80GB HBM3", "H100-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("h200-141gb", "H200-141GB"),
    ("NVIDIA A30", "A30-24GB"),
])
def test_nvml_and_declared_names_find_their_geometry(name: str, model: str) -> None:
    g = geometry_for(name)
    assert g is not None and g.model == model


def test_models_without_mig_have_no_geometry() -> None:
    assert geometry_for("NVIDIA L4") is None
    assert geometry_for("RTX4090-24GB") is None


@pytest.mark.parametrize("text,err", [
    ("shared:1", "from 2 to 64"),
    ("shared:65", "from 2 to 64"),
    ("shared:x", "from 2 to 64"),
    ("mig:3g", "joined by"),
    ("half", "is not a slot profile"),
])
def test_bad_profiles_teach_the_forms(text: str, err: str) -> None:
    with pytest.raises(ValueError, match=err):
        parse_profile(text)


def test_slot_fractions_order_types_by_size() -> None:
    assert slot_fraction("whole") > slot_fraction("7g.80gb") - 1e-9
    assert slot_fraction("3g.40gb") > slot_fraction("2g.20gb") > slot_fraction("1g.10gb")
    assert slot_fraction("share-1/4") == 0.25
