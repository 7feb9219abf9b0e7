"""A job's memory reservation and memory limit: one given sets the other."""

from __future__ import annotations

import pytest

from p2psched.jobs.spec import JobSpec

SHA = "a" * 64
MIB = 1024 * 1024


def spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"module_sha256": SHA, **fields})


def test_a_reservation_alone_is_the_limit_too():
    s = spec(resources={"mem_mb": 1024})
    assert (s.resources.mem_mb, s.limits.mem_bytes) == (1024, 1024 * MIB)
    s = spec(resources={"mem_mb": 8, "cpu": 2})
    assert (s.resources.mem_mb, s.limits.mem_bytes) == (8, 8 * MIB)


@pytest.mark.parametrize(("mem_bytes", "mem_mb"), [(4 * MIB, 4), (3 << 30, 3072), (64 * 1024, 1), (MIB + 1, 2)])
def test_a_limit_alone_is_reserved_rounded_up_to_a_mib(mem_bytes, mem_mb):
    s = spec(limits={"mem_bytes": mem_bytes, "wall_ms": 5})
    assert (s.resources.mem_mb, s.limits.mem_bytes) == (mem_mb, mem_bytes)


def test_neither_keeps_the_defaults_and_both_stand_as_given():
    s = spec()
    assert (s.resources.mem_mb, s.limits.mem_bytes) == (256, 256 * MIB)
    s = spec(resources={"mem_mb": 64}, limits={"mem_bytes": 512 * MIB})  # may use more than it reserved
    assert (s.resources.mem_mb, s.limits.mem_bytes) == (64, 512 * MIB)


def test_a_stored_or_forwarded_spec_reads_back_the_same():
    # The store, the wasm workers and peers read the whole spec back from JSON.
    for fields in ({"resources": {"mem_mb": 8}}, {"limits": {"mem_bytes": 3 << 30}}, {}):
        s = spec(**fields)
        again = JobSpec.model_validate_json(s.model_dump_json())
        assert (again.resources.mem_mb, again.limits.mem_bytes) == (s.resources.mem_mb, s.limits.mem_bytes)
