"""The nemesis plan and the workload are functions of the seed."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2psched.chaos.nemesis import HOLD_S, KINDS, WARMUP_S, plan_faults
from p2psched.chaos.workload import Modules, make_job

pytestmark = pytest.mark.chaos

NODES = [f"n{i}" for i in range(1, 7)]


def test_the_same_seed_gives_the_same_plan_and_another_seed_another() -> None:
    a = plan_faults(7, NODES, 120, KINDS)
    assert a == plan_faults(7, NODES, 120, KINDS)
    assert a != plan_faults(8, NODES, 120, KINDS)
    assert len(a) > 10
    assert {f.kind for f in a} == set(KINDS)


@pytest.mark.parametrize("seed", range(20))
def test_a_plan_keeps_a_minority_faulty_and_ends_in_time(seed: int) -> None:
    plan = plan_faults(seed, NODES, 60, KINDS)
    for f in plan:
        assert WARMUP_S <= f.at and f.end < 60
        lo, hi = HOLD_S[f.kind]
        assert lo <= f.hold <= hi
        overlapping = [g for g in plan if g.at <= f.at < g.end + 0.5]
        assert len(overlapping) <= (len(NODES) - 1) // 2
        assert len({g.node for g in overlapping}) == len(overlapping), "one agent faulted twice at once"


def test_a_plan_uses_only_the_kinds_asked_for() -> None:
    plan = plan_faults(3, NODES[:4], 60, ("kill", "pause"))
    assert plan and {f.kind for f in plan} <= {"kill", "pause"}
    assert plan_faults(3, NODES, 60, ()) == []
    with pytest.raises(ValueError, match="choose from"):
        plan_faults(3, NODES, 60, ("meteor",))


def test_jobs_are_seeded_and_know_their_output() -> None:
    modules = Modules()
    jobs = [make_job(random.Random(5), f"j{i}", modules) for i in range(3)]
    again = [make_job(random.Random(5), f"j{i}", modules) for i in range(3)]
    assert jobs == again
    rng = random.Random(11)
    seen = set()
    for i in range(200):
        spec, expect = make_job(rng, f"j{i}", modules)
        seen.add(expect.kind)
        assert spec["id"] == f"j{i}"
        if expect.kind == "sha256":
            import base64

            data = base64.b64decode(spec["input"])
            assert expect.stdout == hashlib.sha256(data).hexdigest() + "\n"
            assert expect.output_sha256 == hashlib.sha256(expect.stdout.encode()).hexdigest()
        else:
            assert expect.state == "timed_out" and expect.output_sha256 is None
            assert 1000 <= spec["limits"]["wall_ms"] <= 4000
    assert seen == {"sha256", "sleep"}


def test_a_crash_is_named_by_its_innermost_exception() -> None:
    from p2psched.chaos.harness import crash_cause

    tail = """09:11:37.308 I p2psched.jobs: job j1 timed_out job=j1 state=timed_out detail=wall_timeout
  + Exception Group Traceback (most recent call last):
  | ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)
  +-+---------------- 1 ----------------
    | ExceptionGroup: Exceptions from Trio nursery (1 sub-exception)
    +-+---------------- 1 ----------------
      |   File "/work/main/p2psched/jobs/state.py", line 63, in check_transition
      |     raise IllegalTransition(job_id, current, target)
      | p2psched.jobs.state.IllegalTransition: job j1: illegal transition timed_out -> timed_out
      +------------------------------------
"""
    assert crash_cause(tail) == "p2psched.jobs.state.IllegalTransition: job j1: illegal transition timed_out -> timed_out"
    assert crash_cause("09:00:00.000 I p2psched.agent: bye\n") == "09:00:00.000 I p2psched.agent: bye"
    assert crash_cause("") == ""
