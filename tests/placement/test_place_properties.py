"""Invariants of place() over random clusters (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from p2psched.placement import (
    POLICIES, Forward, JobRequest, PlacementSettings, QueueHere, Reject, RunHere, fits_ever, fits_now, place,
)
from p2psched.resources import NodeState, ResourceVector
from p2psched.topology import FabricShape, Topology, generate

TOPO = Topology.from_text(generate(FabricShape(2, 4, 4)))


@st.composite
def clusters(draw: st.DrawFn) -> tuple[NodeState, list[NodeState], JobRequest]:
    states = []
    for h in TOPO.hosts:
        total = draw(st.sampled_from([1, 2, 4, 8]))
        gtotal = draw(st.sampled_from([{}, {"whole": 4}, {"1g.10gb": 7}]))
        v = ResourceVector(cpu_total=total, cpu_free=draw(st.integers(0, total)), mem_total_mb=4096,
                           mem_free_mb=draw(st.sampled_from([0, 1024, 4096])),
                           gpu_total=gtotal, gpu_free={k: draw(st.integers(0, n)) for k, n in gtotal.items()},
                           queue_len=draw(st.integers(0, 3)))
        states.append(NodeState(h, vector=v))
    me = draw(st.integers(0, len(states) - 1))
    visited = frozenset(draw(st.sets(st.sampled_from(TOPO.hosts), max_size=4)))
    req = JobRequest("j", cpu=draw(st.sampled_from([1, 2, 8, 16])), mem_mb=draw(st.sampled_from([1, 2048, 8192])),
                     gpu=draw(st.integers(0, 5)), gpu_type=draw(st.sampled_from([None, "whole", "1g.10gb"])),
                     hops=draw(st.integers(0, 5)), visited=visited)
    return states[me], states[:me] + states[me + 1:], req


def leftover(req: JobRequest, state: NodeState) -> int:
    """Free GPU slots the job would leave on ``state``, of the type it would take."""
    free = state.vector.gpu_free
    kinds = [req.gpu_type] if req.gpu_type else list(free)
    return min(free.get(k, 0) - req.gpu for k in kinds if free.get(k, 0) >= req.gpu)


@settings(max_examples=200, deadline=None)
@given(clusters(), st.sampled_from(POLICIES), st.integers(0, 2**32), st.booleans())
def test_decisions_respect_fit_visited_and_ttl(c: tuple[NodeState, list[NodeState], JobRequest], policy: str,
                                               seed: int, fit_first: bool) -> None:
    local, peers, req = c
    d, _ = place(req, local, peers, TOPO, rng=random.Random(seed), policy=policy,  # type: ignore[arg-type]
                 settings=PlacementSettings(gpu_first=fit_first))
    fitting = [p for p in peers if p.node_id not in req.visited and fits_now(req, p)]
    if isinstance(d, RunHere):
        assert fits_now(req, local)
        if policy == "p2p" and fit_first and req.gpu > 0 and fitting and req.hops < req.ttl:
            # fit-first: here only when no peer fits tighter.
            assert leftover(req, local) <= min(leftover(req, p) for p in fitting)
    elif isinstance(d, Forward):
        assert req.hops < req.ttl
        by_id = {p.node_id: p for p in peers}
        assert d.candidates[0].node_id == d.node_id and len(d.candidates) <= 8
        assert len({c.node_id for c in d.candidates}) == len(d.candidates)
        for cand in d.candidates:
            assert cand.node_id not in req.visited and cand.node_id != local.node_id
            assert fits_now(req, by_id[cand.node_id])
            assert cand.route[0] == local.node_id and cand.route[-1] == cand.node_id
            assert cand.cost == TOPO.cost(local.node_id, cand.node_id)
        if policy == "p2p":
            if req.gpu > 0 and fit_first:
                # fit-first: the tightest fit of all, here included; the nearest of those.
                tightest = min(leftover(req, p) for p in fitting)
                assert leftover(req, by_id[d.node_id]) == tightest
                assert not fits_now(req, local) or leftover(req, local) > tightest
                fitting = [p for p in fitting if leftover(req, p) == tightest]
            # Nothing that fits (as tightly) is nearer than the chosen target.
            nearest = min(TOPO.cost(local.node_id, p.node_id) for p in fitting)
            assert d.cost <= nearest + 1.0
    elif isinstance(d, Reject):
        ever = fits_ever(req, local) or any(fits_ever(req, p) for p in peers)
        assert not ever or (req.hops >= req.ttl and not fits_ever(req, local))
    else:
        assert isinstance(d, QueueHere) and d.reason
        if policy in ("p2p", "local-first"):
            assert not fits_now(req, local)
