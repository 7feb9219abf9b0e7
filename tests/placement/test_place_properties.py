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


class Drawing(random.Random):
    """A seeded Random that remembers what its ``sample`` calls drew."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.drawn: list[list[object]] = []

    def sample(self, population, k, *, counts=None):  # type: ignore[no-untyped-def, override]
        out = super().sample(population, k, counts=counts)
        self.drawn.append(out)
        return out


def drawn_ids(rows: list[object]) -> list[str]:
    """The node ids of what place() drew: rows that carry each node's NodeState."""
    return [next(x.node_id for x in row if isinstance(x, NodeState)) for row in rows]  # type: ignore[attr-defined]


def assert_sampled_best_fit(req: JobRequest, local: NodeState, fitting: list[NodeState], d: object,
                            rng: Drawing, fit_sample: int) -> None:
    """fit-first: one sample of the fitting peers, and here when it fits; the decision
    is their tightest fit, the nearest of those, and nothing among them fits tighter.
    Every peer that does lies outside the sample, so there are at most as many as
    were left out. A job leaves here only for a strictly tighter fit."""
    assert len(rng.drawn) == 1
    pool = {p.node_id: p for p in fitting}
    ids = drawn_ids(rng.drawn[0])
    assert len(set(ids)) == len(ids) == min(fit_sample or len(pool), len(pool)) and set(ids) <= set(pool)
    peers_left_out = len(pool) - len(ids)
    if fits_now(req, local):
        pool[local.node_id] = local
        ids.append(local.node_id)
    assert isinstance(d, (RunHere, Forward))
    chosen = local.node_id if isinstance(d, RunHere) else d.node_id
    assert chosen in ids
    fit = leftover(req, pool[chosen])
    assert all(leftover(req, pool[n]) >= fit for n in ids)
    cost = TOPO.cost(local.node_id, chosen) if chosen != local.node_id else 0.0
    assert all(TOPO.cost(local.node_id, n) >= cost for n in ids if n != local.node_id and leftover(req, pool[n]) == fit)
    assert sum(leftover(req, p) < fit for p in pool.values()) <= peers_left_out
    if isinstance(d, Forward) and fits_now(req, local):
        assert fit < leftover(req, local)
    if fit_sample == 0 or fit_sample >= len(pool) - fits_now(req, local):
        assert fit == min(leftover(req, p) for p in pool.values())  # a sample of all: the tightest of all


@settings(max_examples=200, deadline=None)
@given(clusters(), st.sampled_from(POLICIES), st.integers(0, 2**32), st.booleans(), st.integers(0, 5))
def test_decisions_respect_fit_visited_and_ttl(c: tuple[NodeState, list[NodeState], JobRequest], policy: str,
                                               seed: int, fit_first: bool, fit_sample: int) -> None:
    local, peers, req = c
    rng = Drawing(seed)
    d, _ = place(req, local, peers, TOPO, rng=rng, policy=policy,  # type: ignore[arg-type]
                 settings=PlacementSettings(gpu_first=fit_first, fit_sample=fit_sample))
    fitting = [p for p in peers if p.node_id not in req.visited and fits_now(req, p)]
    if policy == "p2p" and fit_first and req.gpu > 0 and fitting and req.hops < req.ttl:
        assert_sampled_best_fit(req, local, fitting, d, rng, fit_sample)
    if isinstance(d, RunHere):
        assert fits_now(req, local)
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
        if policy == "p2p" and req.gpu > 0 and fit_first:
            # The fallback list ranks the rest by fit.
            fits = [leftover(req, by_id[c.node_id]) for c in d.candidates[1:]]
            assert fits == sorted(fits)
            left = {p.node_id for p in fitting} - {c.node_id for c in d.candidates}
            assert not fits or all(leftover(req, by_id[n]) >= fits[-1] for n in left)
        elif policy == "p2p":
            # Nothing that fits is nearer than the chosen target.
            nearest = min(TOPO.cost(local.node_id, p.node_id) for p in fitting)
            assert d.cost <= nearest + 1.0
    elif isinstance(d, Reject):
        ever = fits_ever(req, local) or any(fits_ever(req, p) for p in peers)
        assert not ever or (req.hops >= req.ttl and not fits_ever(req, local))
    else:
        assert isinstance(d, QueueHere) and d.reason
        if policy in ("p2p", "local-first"):
            assert not fits_now(req, local)


@st.composite
def gpu_clusters(draw: st.DrawFn) -> tuple[NodeState, list[NodeState], JobRequest]:
    """Every node has 8 whole GPUs and room for the CPU side: the fit alone decides who fits."""
    states = [NodeState(h, vector=ResourceVector(cpu_total=8, cpu_free=8, mem_total_mb=4096, mem_free_mb=4096,
                                                 gpu_total={"whole": 8},
                                                 gpu_free={"whole": draw(st.integers(0, 8))},
                                                 queue_len=draw(st.integers(0, 3))))
              for h in TOPO.hosts]
    me = draw(st.integers(0, len(states) - 1))
    visited = frozenset(draw(st.sets(st.sampled_from(TOPO.hosts), max_size=3)))
    req = JobRequest("j", gpu=draw(st.sampled_from([1, 1, 2, 4, 8])), gpu_type=draw(st.sampled_from([None, "whole"])),
                     visited=visited)
    return states[me], states[:me] + states[me + 1:], req


@settings(max_examples=300, deadline=None)
@given(gpu_clusters(), st.integers(0, 2**32), st.integers(0, 6))
def test_fit_first_takes_the_tightest_fit_of_its_sample(c: tuple[NodeState, list[NodeState], JobRequest],
                                                        seed: int, fit_sample: int) -> None:
    local, peers, req = c
    rng = Drawing(seed)
    d, _ = place(req, local, peers, TOPO, rng=rng, settings=PlacementSettings(gpu_first=True, fit_sample=fit_sample))
    fitting = [p for p in peers if p.node_id not in req.visited and fits_now(req, p)]
    if not fitting:
        assert d == RunHere() if fits_now(req, local) else isinstance(d, QueueHere)
        return
    assert_sampled_best_fit(req, local, fitting, d, rng, fit_sample)
    if isinstance(d, Forward):
        # The fallback list ranks the other peers by fit: none left off fits tighter.
        by_id = {p.node_id: p for p in fitting}
        fits = [leftover(req, by_id[c.node_id]) for c in d.candidates[1:]]
        assert fits == sorted(fits) and len(d.candidates) == min(8, len(fitting))
        left = set(by_id) - {c.node_id for c in d.candidates}
        assert not fits or all(leftover(req, by_id[n]) >= fits[-1] for n in left)
