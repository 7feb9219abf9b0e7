import pytest
from hypothesis import given, strategies as st

from p2psched.jobs.queue import DispatchQueue
from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec

_seq = iter(range(1, 10**9))


def job(tenant: str, priority: int = 0) -> JobRecord:
    n = next(_seq)
    return JobRecord(id=f"{tenant}-{n}", seq=n, origin="n1",
                     spec=JobSpec(runtime="process", command=["x"], tenant=tenant, priority=priority))


def drain(q: DispatchQueue) -> list[str]:
    out = []
    while (r := q.pop()) is not None:
        out.append(r.id)
    return out


def test_fair_share_round_robins_tenants_at_equal_priority():
    q = DispatchQueue("fair")
    a = [job("a") for _ in range(3)]
    b = [job("b") for _ in range(2)]
    for r in a + b:
        q.push(r)
    assert drain(q) == [a[0].id, b[0].id, a[1].id, b[1].id, a[2].id]


def test_priority_beats_fairness_and_arrival():
    q = DispatchQueue("fair")
    low = job("a", 0)
    high = job("b", 5)
    q.push(low)
    q.push(high)
    assert drain(q) == [high.id, low.id]


def test_fifo_policy_is_arrival_order_within_priority():
    q = DispatchQueue("fifo")
    jobs = [job("a"), job("a"), job("b"), job("a")]
    for r in jobs:
        q.push(r)
    assert drain(q) == [r.id for r in jobs]


def test_removed_job_is_skipped_and_can_be_pushed_again_once():
    q = DispatchQueue("fair")
    r1, r2 = job("a"), job("a")
    q.push(r1)
    q.push(r2)
    assert q.remove(r1.id)
    assert len(q) == 1
    q.push(r1)
    assert sorted(drain(q)) == sorted([r1.id, r2.id])


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=60),
       st.sampled_from(["fair", "fifo"]))
def test_every_pushed_job_pops_exactly_once_in_priority_order(items, policy):
    q = DispatchQueue(policy)
    jobs = [job(t, p) for t, p in items]
    for r in jobs:
        q.push(r)
    popped = drain(q)
    assert sorted(popped) == sorted(r.id for r in jobs)
    prios = {r.id: r.spec.priority for r in jobs}
    assert [prios[i] for i in popped] == sorted((prios[i] for i in popped), reverse=True)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=40),
       st.integers(0, 40), st.sampled_from(["fair", "fifo"]))
def test_pushing_back_popped_jobs_in_reverse_restores_the_order(items, taken, policy):
    """The agent takes back jobs it had placed in wasm workers: they must stand where they stood."""
    jobs = [job(t, p) for t, p in items]
    untouched, q = DispatchQueue(policy), DispatchQueue(policy)
    for r in jobs:
        untouched.push(r)
        q.push(r)
    popped = [r for r in (q.pop() for _ in range(min(taken, len(jobs)))) if r is not None]
    for r in reversed(popped):
        q.push_front(r)
    assert drain(q) == drain(untouched)


def test_a_job_pushed_back_goes_before_its_tenants_later_jobs_and_after_higher_priority():
    q = DispatchQueue("fair")
    a1, a2, b1, urgent = job("a"), job("a"), job("b"), job("c", 9)
    for r in (a1, a2, b1):
        q.push(r)
    assert q.pop() is a1
    q.push(urgent)
    q.push_front(a1)
    assert drain(q) == [urgent.id, a1.id, b1.id, a2.id]


def test_drain_rate_counts_endings_in_its_window():
    from p2psched.jobs.queue import DrainRate

    rate = DrainRate(window_s=10)
    assert rate.per_second(100.0) == 0.0
    for i in range(400):
        rate.add(100.0 + i / 100)  # 100 a second for 4 s
    assert rate.per_second(104.0) == 100.0  # 400 over 100.0-104.0: not the idle time before
    assert rate.per_second(109.9) == pytest.approx(400 / 9.9)  # all 400, over 100.0-109.9
    assert rate.per_second(110.0) == pytest.approx(300 / 9)  # second 100 has left the window
    assert rate.per_second(112.5) == pytest.approx(100 / 9.5)  # only second 103 is still inside: 100 over 103.0-112.5
    assert rate.per_second(120.0) == 0.0
    rate.add(200.0)  # old seconds are dropped as new ones come
    assert rate.per_second(201.0) == 1.0 and len(rate._seconds) == 1


def test_drain_rate_early_in_a_burst_is_not_stretched_to_a_whole_second():
    from p2psched.jobs.queue import DrainRate

    rate = DrainRate(window_s=10)
    for i in range(30):
        rate.add(100.0 + i / 100)  # 100 a second, 0.3 s into the burst
    assert rate.per_second(100.3) == pytest.approx(100.0)  # not 30 a second: the burst is 0.3 s old
    assert rate.measured_s(100.3) == pytest.approx(0.3)  # and the rate says so (Retry-After trusts 1 s)
    assert rate.measured_s(120.0) == 0.0
    one = DrainRate(window_s=10)
    one.add(50.0)
    assert one.per_second(50.0) == 1 / DrainRate.MIN_SPAN_S  # a lone ending is not an infinite rate
