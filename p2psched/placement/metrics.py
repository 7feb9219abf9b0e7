"""Prometheus metrics for placement, registered on the agent's own CollectorRegistry.

Names (issue 4, requirement 6):

* ``p2psched_placements_total{decision}``: decisions by kind: run_here, forward,
  queue, reject (a job placed again after queueing counts again).
* ``p2psched_forward_hops``: offers a forwarded job took until a peer accepted it,
  observed once by its origin then; jobs that run where they were submitted are
  not observed (``p2psched_placements_total{decision="run_here"}`` counts them).
* ``p2psched_forward_refusals_total``: forwards a target refused on late binding.
* ``p2psched_placement_seconds``: time spent in ``place()``.
* ``p2psched_placement_cost``: network cost (us, the topology's weight) of forwards
  and of local runs (0), so the mean shows how far jobs travel.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from p2psched.placement.core import Decision, Forward, RunHere

#: place() takes tens of microseconds on a few peers and about a millisecond at a
#: thousand; buckets span 10 us to 100 ms so both ends are resolved.
SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
#: Generated fabrics cost 2 us within a leaf and 6 us across the spine; the transfer
#: weight reaches hundreds of us.
COST_BUCKETS = (0.0, 1.0, 2.0, 4.0, 6.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0, 5000.0)
HOP_BUCKETS = (0, 1, 2, 3, 4, 6, 8)
DECISIONS = ("run_here", "forward", "queue", "reject")


class PlacementMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.placements = Counter("p2psched_placements", "Placement decisions by kind.", ["decision"],
                                  registry=registry)
        # Made up front so rate() works before the first of each kind, and kept: a
        # labels() lookup per decision is a noticeable share of a noop job.
        self._by_decision = {d: self.placements.labels(decision=d) for d in DECISIONS}
        self.forward_hops = Histogram("p2psched_forward_hops", "Forwards a job took before it started.",
                                      buckets=HOP_BUCKETS, registry=registry)
        self.forward_refusals = Counter("p2psched_forward_refusals", "Forwards refused by the target on late binding.",
                                        registry=registry)
        self.placement_seconds = Histogram("p2psched_placement_seconds", "Time spent deciding a placement.",
                                           buckets=SECONDS_BUCKETS, registry=registry)
        self.placement_cost = Histogram("p2psched_placement_cost", "Network cost of placements (us).",
                                        buckets=COST_BUCKETS, registry=registry)

    def observe(self, decision: Decision, seconds: float) -> None:
        """Record one ``place()`` result and the time it took."""
        self._by_decision[decision.kind].inc()
        self.placement_seconds.observe(seconds)
        if isinstance(decision, Forward):
            self.placement_cost.observe(decision.cost)
        elif isinstance(decision, RunHere):
            self.placement_cost.observe(0.0)

    def refused(self) -> None:
        """A forward target refused the job (stale gossip); the sender tries the next candidate."""
        self.forward_refusals.inc()

    def started(self, hops: int) -> None:
        """A peer accepted the job on its ``hops``-th offer."""
        self.forward_hops.observe(hops)
