"""Placement metrics land in the registry they are given, under the documented names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from p2psched.placement import Candidate, Forward, PlacementMetrics, QueueHere, RunHere


def test_names_and_counts() -> None:
    reg = CollectorRegistry()
    m = PlacementMetrics(reg)
    other = PlacementMetrics(CollectorRegistry())  # a second agent in the same process
    m.observe(RunHere(), 0.0002)
    fwd = Forward("h0-1", ("h0-0", "leaf-0", "h0-1"), 2.0, (Candidate("h0-1", ("h0-0", "leaf-0", "h0-1"), 2.0),))
    m.observe(fwd, 0.001)
    m.observe(QueueHere("full"), 0.0005)
    m.refused()
    m.started(1)
    get = reg.get_sample_value
    assert get("p2psched_placements_total", {"decision": "run_here"}) == 1
    assert get("p2psched_placements_total", {"decision": "forward"}) == 1
    assert get("p2psched_placements_total", {"decision": "queue"}) == 1
    assert get("p2psched_placements_total", {"decision": "reject"}) == 0
    assert get("p2psched_forward_refusals_total") == 1
    assert get("p2psched_forward_hops_count") == 1 and get("p2psched_forward_hops_sum") == 1
    assert get("p2psched_placement_seconds_count") == 3
    assert get("p2psched_placement_cost_count") == 2 and get("p2psched_placement_cost_sum") == 2.0
    other.refused()
    assert get("p2psched_forward_refusals_total") == 1
