"""Placement: the sans-IO decision of where a job runs (see ``core`` for the model).

Public interface::

    decision, state = place(req, local, peers, topology, rng=rng, policy="p2p", state=state)
    # decision: RunHere | Forward(node_id, route, cost, candidates) | QueueHere(reason) | Reject(reason)
    check_fit(req, my_state) -> str | None      # receiver side of a forward (late binding)
    JobRequest.from_spec(job_id, spec, hops=, ttl=, visited=); req.forwarded(via=my_id)
    PlacementMetrics(registry).observe(decision, seconds) / .refused() / .started(hops)
"""

from p2psched.placement.core import (
    DEFAULT_SETTINGS, DEFAULT_TTL, NODE_LABEL_PREFIX, POLICIES, Candidate, Decision, Forward, JobRequest,
    PlacementSettings, PlacementState, Policy, QueueHere, Reject, RunHere, check_fit, fits_ever, fits_now,
    node_load, place,
)
from p2psched.placement.metrics import PlacementMetrics

__all__ = [
    "DEFAULT_SETTINGS", "DEFAULT_TTL", "NODE_LABEL_PREFIX", "POLICIES", "Candidate", "Decision", "Forward",
    "JobRequest", "PlacementMetrics", "PlacementSettings", "PlacementState", "Policy", "QueueHere", "Reject",
    "RunHere", "check_fit", "fits_ever", "fits_now", "node_load", "place",
]
