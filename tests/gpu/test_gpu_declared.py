"""``--gpus CONFIG``: declared GPUs, inline and from files, and the errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2psched.gpu.discovery import load_inventory
from p2psched.gpu.slots import SlotAllocator


def test_inline_count_model_and_default_whole_profile() -> None:
    inv = load_inventory("2xH100-80GB")
    assert inv.source == "declared" and inv.declared
    assert [g.uuid for g in inv.gpus] == ["GPU-declared-0", "GPU-declared-1"]
    assert all(g.declared and g.profile == "whole" and g.model == "H100-80GB" for g in inv.gpus)
    assert inv.gpus[0].memory_bytes == 80 << 30
    assert inv.labels() == {"gpu.source": "declared", "gpu.declared": "true", "gpu.count": "2",
                            "gpu.model": "H100-80GB"}
    assert inv.as_dict()["declared"] is True


def test_inline_groups_with_profiles() -> None:
    inv = load_inventory("1xH100-80GB/mig, 2xL4-24GB/shared:4, a100-40gb/mig:4g.20gb+3g.20gb")
    assert [(g.index, g.model, g.profile) for g in inv.gpus] == [
        (0, "H100-80GB", "mig"), (1, "L4-24GB", "shared:4"), (2, "L4-24GB", "shared:4"),
        (3, "A100-40GB", "mig:4g.20gb+3g.20gb"),
    ]
    total = SlotAllocator(inv).total_by_type()
    assert total["share-1/4"] == 8
    assert total["1g.10gb"] == 7  # the H100 carves on demand
    assert total["4g.20gb"] == 1 and total["3g.20gb"] == 1  # the A100's fixed layout
    assert "1g.5gb" not in total  # a fixed layout offers only what it lists


def test_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "gpus.toml"
    f.write_text('[[gpus]]\nmodel = "H100-80GB"\ncount = 2\nprofile = "shared:2"\n\n'
                 '[[gpus]]\nmodel = "A30-24GB"\nprofile = "mig"\n')
    inv = load_inventory(str(f))
    assert [(g.model, g.profile) for g in inv.gpus] == [("H100-80GB", "shared:2")] * 2 + [("A30-24GB", "mig")]
    assert str(f) in inv.reason


def test_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "gpus.yaml"
    f.write_text("gpus:\n  - model: H200-141GB\n    profile: mig\n")
    inv = load_inventory(f)
    assert SlotAllocator(inv).total_by_type()["1g.18gb"] == 7


@pytest.mark.parametrize("config,err", [
    ("", "--gpus is empty"),  # load_inventory treats blank as "discover"; parse_declared is stricter
    ("2xH100", "must name its memory"),
    ("0xH100-80GB", "from 1 to 64"),
    ("65xH100-80GB", "from 1 to 64"),
    ("2xH100-80GB/quarters", "is not a slot profile"),
    ("1xL4-24GB/mig", "MIG rules for L4-24GB are not known"),
    ("1xH100-80GB/mig:4g.40gb+4g.40gb", "does not fit one H100-80GB"),
    ("1xH100-80GB/mig:5g.50gb", "does not exist on H100-80GB"),
    ("2xH100-80GB,,", "cannot read ''"),
    ("40xH100-80GB,40xH100-80GB", "at most 64"),
])
def test_bad_inline_declarations_say_what_and_how(config: str, err: str) -> None:
    from p2psched.gpu.declared import parse_declared

    with pytest.raises(ValueError, match=err):
        parse_declared(config)


def test_file_errors_name_the_file_and_field(tmp_path: Path) -> None:
    from p2psched.gpu.declared import parse_declared

    f = tmp_path / "gpus.toml"
    f.write_text('[[gpus]]\nmodel = "H100-80GB"\ncuont = 2\n')
    with pytest.raises(ValueError, match=r"gpus.toml: gpus.0.cuont: Extra inputs are not permitted"):
        parse_declared(str(f))
    f.write_text("[[gpus]\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        parse_declared(str(f))
    y = tmp_path / "gpus.yml"
    y.write_text("- just a list\n")
    with pytest.raises(ValueError, match="expected a table with a 'gpus' list"):
        parse_declared(str(y))
    with pytest.raises(ValueError, match="cannot read the file"):
        parse_declared(str(tmp_path / "missing.yaml"))


def test_blank_config_means_discover() -> None:
    inv = load_inventory("  ")
    assert inv.source in ("nvml", "none") and not inv.declared


def test_real_gpus_refuse_mig_profiles_with_the_way_forward() -> None:
    with pytest.raises(ValueError, match="nvidia-smi mig"):
        load_inventory(None, profile="mig")


@pytest.mark.parametrize("profile", ["bogus", "shared:0", "shared:65", "mig:nope"])
def test_bad_gpu_profile_is_refused_with_declared_gpus_too(profile: str) -> None:
    # Before the fix a bad --gpu-profile next to --gpus started the agent as if unset.
    with pytest.raises(ValueError, match="--gpu-profile"):
        load_inventory("2xH100-80GB", profile=profile)


def test_gpu_profile_applies_to_declared_groups_that_name_none(tmp_path: Path) -> None:
    # Before the fix '--gpus 2xH100-80GB --gpu-profile mig' offered whole GPUs.
    inv = load_inventory("2xH100-80GB, 1xL4-24GB/shared:2", profile="mig")
    assert [g.profile for g in inv.gpus] == ["mig", "mig", "shared:2"]
    f = tmp_path / "gpus.toml"
    f.write_text('[[gpus]]\nmodel = "L4-24GB"\ncount = 1\n')
    assert [g.profile for g in load_inventory(str(f), profile="shared:4").gpus] == ["shared:4"]
    with pytest.raises(ValueError, match="MIG rules for L4-24GB are not known"):
        load_inventory("1xL4-24GB", profile="mig")


def test_declared_gpu_needs_some_memory() -> None:
    with pytest.raises(ValueError, match="memory"):
        load_inventory("H100-0GB")
