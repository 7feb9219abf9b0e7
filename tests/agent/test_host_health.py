"""The per-runtime circuit breaker that takes a broken host out of a runtime's placement.

Sans-IO: time is whatever these tests pass as ``now``.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psched.agent.health import HostHealth


def test_three_host_failures_in_a_row_impair_the_runtime_and_only_it() -> None:
    h = HostHealth(cooldown_s=30)
    assert not h.failed("wasm", 0.0, "worker died")
    assert not h.failed("wasm", 1.0, "worker died")
    assert h.impaired == () and h.failing
    assert h.failed("wasm", 2.0, "[Errno 24] Too many open files")
    assert h.impaired == ("wasm",)
    assert h.next_deadline() == 32.0
    view = h.describe(12.0)["wasm"]
    assert view == {"state": "impaired", "failures_in_a_row": 3,
                    "last_error": "[Errno 24] Too many open files", "retry_in_s": 20.0}
    assert not h.failed("process", 3.0, "x")
    assert h.impaired == ("wasm",)


def test_a_run_in_between_resets_the_count() -> None:
    h = HostHealth()
    h.failed("wasm", 0.0, "e")
    h.failed("wasm", 1.0, "e")
    assert not h.ran("wasm")  # it never opened: nothing to announce
    assert not h.failing
    assert not h.failed("wasm", 2.0, "e") and not h.failed("wasm", 3.0, "e")
    assert h.impaired == ()


def test_a_failure_no_wait_can_mend_impairs_at_once() -> None:
    h = HostHealth(cooldown_s=5)
    assert h.failed("process", 0.0, "process jobs need bubblewrap", certain=True)
    assert h.impaired == ("process",)
    assert h.describe(0.0)["process"]["retry_in_s"] == 5.0


def test_after_the_cooldown_the_next_job_decides() -> None:
    h = HostHealth(cooldown_s=10, cooldown_max_s=35)
    for t in range(3):
        h.failed("wasm", float(t), "e")
    assert h.tick(11.9) == []
    assert h.tick(12.0) == ["wasm"]
    assert h.impaired == () and h.next_deadline() is None
    assert h.describe(12.0)["wasm"]["state"] == "trying again"
    # One more failure opens it again, for twice as long...
    assert h.failed("wasm", 13.0, "e")
    assert h.next_deadline() == 33.0
    assert h.tick(33.0) == ["wasm"]
    assert h.failed("wasm", 34.0, "e")
    assert h.next_deadline() == 34.0 + 35.0  # ...up to the cap
    # A job that runs closes it, and the next trouble starts from the first pause again.
    assert h.tick(69.0) == ["wasm"]
    assert h.ran("wasm")
    assert not h.failing and h.describe(70.0) == {}
    for t in range(3):
        h.failed("wasm", 100.0 + t, "e")
    assert h.next_deadline() == 112.0


def test_a_job_that_runs_while_impaired_closes_it_at_once() -> None:
    """With no peer to take them, an impaired host still runs its own jobs: one that works ends it."""
    h = HostHealth()
    for t in range(3):
        h.failed("wasm", float(t), "e")
    assert not h.failed("wasm", 4.0, "e")  # already open: no second announcement
    assert h.ran("wasm")
    assert h.impaired == () and h.next_deadline() is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="fail_after"):
        HostHealth(fail_after=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        HostHealth(cooldown_s=100, cooldown_max_s=10)


@given(st.lists(st.tuples(st.sampled_from(["fail", "unfit", "ran", "tick"]), st.sampled_from(["wasm", "process"]),
                          st.floats(0, 100)), max_size=60))
def test_invariants_hold_for_any_sequence(events: list[tuple[str, str, float]]) -> None:
    h = HostHealth(cooldown_s=1, cooldown_max_s=8)
    now = 0.0
    for kind, runtime, step in events:
        now += step
        if kind == "fail":
            h.failed(runtime, now, "e")
        elif kind == "unfit":
            h.failed(runtime, now, "e", certain=True)
        elif kind == "ran":
            h.ran(runtime)
            assert runtime not in h.impaired  # a run always ends it
        else:
            h.tick(now)
            assert h.next_deadline() is None or h.next_deadline() > now  # nothing overdue after a tick
        view = h.describe(now)
        assert set(h.impaired) == {rt for rt, v in view.items() if v["state"] == "impaired"}
        for v in view.values():
            assert v["retry_in_s"] is None or 0 <= v["retry_in_s"] <= 8
