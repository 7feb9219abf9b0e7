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


class RecordingBackend:
    """The I/O edge of the nemesis: records what it was asked to do, at what time.

    The real backends are exercised by tests/chaos/test_run.py and test_hosts.py;
    this one lets the runner's ordering be checked in virtual time.
    """

    kinds = ("kill", "pause", "restart", "partition")

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[float, str, str]] = []
        self.fail = fail or set()

    async def _call(self, what: str, node: str) -> None:
        import trio

        self.calls.append((trio.current_time(), what, node))
        if what in self.fail:
            raise RuntimeError(f"{what} refused")

    async def kill(self, node: str) -> None: await self._call("kill", node)
    async def revive(self, node: str) -> None: await self._call("revive", node)
    async def pause(self, node: str) -> None: await self._call("pause", node)
    async def resume(self, node: str) -> None: await self._call("resume", node)
    async def restart(self, node: str) -> None: await self._call("restart", node)
    async def partition(self, node: str) -> None: await self._call("partition", node)
    async def heal(self, node: str) -> None: await self._call("heal", node)


async def test_the_nemesis_applies_and_heals_each_fault_on_time(autojump_clock: object) -> None:
    import trio

    from p2psched.chaos.history import History
    from p2psched.chaos.nemesis import Fault, Nemesis

    backend = RecordingBackend()
    history = History(None)
    healed: list[float] = []

    async def on_heal() -> None:
        healed.append(trio.current_time())

    plan = [Fault(1.0, "kill", "n1", 2.0), Fault(1.5, "pause", "n2", 1.0), Fault(5.0, "restart", "n3", 0.0),
            Fault(6.0, "partition", "n1", 3.0)]
    nemesis = Nemesis(backend, history, plan, on_heal=on_heal)
    start = trio.current_time()
    await nemesis.run(start)
    calls = [(round(t - start, 3), what, node) for t, what, node in backend.calls]
    assert calls == [(1.0, "kill", "n1"), (1.5, "pause", "n2"), (2.5, "resume", "n2"), (3.0, "revive", "n1"),
                     (5.0, "restart", "n3"), (6.0, "partition", "n1"), (9.0, "heal", "n1")]
    assert nemesis.active == {}
    assert len(healed) == 4
    oks = [(o["f"], o["agent"]) for o in history.ops if o["type"] == "ok"]
    assert oks.count(("fault", "n1")) == 2 and oks.count(("heal", "n1")) == 2


async def test_a_cancelled_run_still_heals_what_is_in_force(autojump_clock: object) -> None:
    import trio

    from p2psched.chaos.history import History
    from p2psched.chaos.nemesis import Fault, Nemesis

    backend = RecordingBackend()
    nemesis = Nemesis(backend, History(None), [Fault(1.0, "partition", "n1", 60.0), Fault(2.0, "kill", "n2", 60.0)])
    with trio.move_on_after(5):
        await nemesis.run(trio.current_time())
    assert nemesis.active == {"n1": "partition", "n2": "kill"}
    await nemesis.heal_all()
    assert [c[1:] for c in backend.calls[-2:]] == [("heal", "n1"), ("revive", "n2")]
    assert nemesis.active == {}


async def test_a_heal_that_fails_does_not_stop_the_others(autojump_clock: object) -> None:
    import trio

    from p2psched.chaos.history import History
    from p2psched.chaos.nemesis import Fault, Nemesis

    backend = RecordingBackend(fail={"resume"})
    history = History(None)
    nemesis = Nemesis(backend, history, [Fault(1.0, "pause", "n1", 60.0), Fault(2.0, "kill", "n2", 60.0)])
    with trio.move_on_after(5):
        await nemesis.run(trio.current_time())
    await nemesis.heal_all()
    assert ("revive", "n2") in [c[1:] for c in backend.calls]
    assert nemesis.active == {"n1": "pause"}  # still broken, and the history says so
    assert any(o["f"] == "heal" and o["type"] == "fail" and o["agent"] == "n1" for o in history.ops)


async def test_a_broken_sandbox_kills_the_agents_workers_for_the_whole_hold(autojump_clock: object) -> None:
    import trio

    from p2psched.chaos.history import History
    from p2psched.chaos.nemesis import Fault, Nemesis

    class SandboxBackend(RecordingBackend):
        kinds = ("sandbox",)

        async def break_sandbox(self, node: str) -> int:
            await self._call("break_sandbox", node)
            return 1

    backend = SandboxBackend()
    nemesis = Nemesis(backend, History(None), [Fault(1.0, "sandbox", "n1", 2.0)])
    start = trio.current_time()
    await nemesis.run(start)
    times = [round(t - start, 3) for t, what, node in backend.calls if what == "break_sandbox" and node == "n1"]
    assert times[0] == 1.0 and times[-1] <= 3.0 and len(times) > 30  # every 50 ms while it holds
    assert [c[1] for c in backend.calls] == ["break_sandbox"] * len(times)  # nothing to undo after
    assert nemesis.active == {}


def test_the_sandbox_fault_is_asked_for_not_planned_by_default() -> None:
    from p2psched.chaos.nemesis import plan_faults

    assert all(f.kind != "sandbox" for f in plan_faults(3, ["a", "b", "c"], 300))
    plan = plan_faults(3, ["a", "b", "c"], 60, ("sandbox",))
    assert plan and {f.kind for f in plan} == {"sandbox"} and all(3.0 <= f.hold <= 8.0 for f in plan)
