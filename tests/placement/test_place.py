"""The placement core over generated leaf-spine topologies."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from p2psched.jobs.spec import JobSpec
from p2psched.placement import (
    Forward, JobRequest, PlacementSettings, PlacementState, QueueHere, Reject, RunHere, check_fit, place,
)
from p2psched.resources import NodeState, ResourceVector
from p2psched.topology import FabricShape, Topology, generate

SMALL = Topology.from_text(generate(FabricShape(2, 4, 2)))  # h0-0 h0-1 | h1-0 h1-1 | h2-* | h3-*
MEDIUM = Topology.from_text(generate(FabricShape(4, 16, 8)))


def node(node_id: str, cpu_free: float = 4, cpu_total: float = 4, *, mem_free: int = 8192, queue: int = 0,
         gpu_free: dict[str, int] | None = None, gpu_total: dict[str, int] | None = None,
         labels: dict[str, str] | None = None, position: str = "") -> NodeState:
    v = ResourceVector(cpu_total=cpu_total, cpu_free=cpu_free, mem_total_mb=8192, mem_free_mb=mem_free,
                       gpu_free=dict(gpu_free or {}), gpu_total=dict(gpu_total or gpu_free or {}), queue_len=queue)
    return NodeState(node_id, vector=v, labels=dict(labels or {}), position=position)


def cluster(topo: Topology, **kw: float) -> dict[str, NodeState]:
    return {h: node(h, **kw) for h in topo.hosts}  # type: ignore[arg-type]


def decide(req: JobRequest, local: NodeState, peers: list[NodeState], topo: Topology | None = SMALL,
           seed: int = 0, **kw: object) -> object:
    d, _ = place(req, local, peers, topo, rng=random.Random(seed), **kw)  # type: ignore[arg-type]
    return d


def others(nodes: dict[str, NodeState], me: str) -> list[NodeState]:
    return [s for n, s in nodes.items() if n != me]


def test_runs_here_when_it_fits() -> None:
    nodes = cluster(SMALL)
    assert decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0")) == RunHere()


def test_nearest_fitting_peer_beats_an_idler_one_across_the_spine() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-1"] = node("h0-1", cpu_free=1)  # same leaf, 3 of 4 busy
    for h in ("h2-0", "h2-1", "h3-0"):
        nodes[h] = node(h, cpu_free=4)  # idle, but across the spine
    for seed in range(50):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), seed=seed)
        assert isinstance(d, Forward)
        assert d.node_id == "h0-1" and d.route == ("h0-0", "leaf-0", "h0-1") and d.cost == 2.0
        # The fallback list goes on to the cross-spine peers, least loaded first.
        assert [c.node_id for c in d.candidates] == ["h0-1", "h2-0", "h2-1", "h3-0"]
        assert all(c.cost == 6.0 and len(c.route) == 5 for c in d.candidates[1:])


def test_nearest_fitting_peer_on_medium_fabric() -> None:
    nodes = cluster(MEDIUM, cpu_free=0)
    nodes["h9-3"] = node("h9-3", cpu_free=2)
    nodes["h5-7"] = node("h5-7", cpu_free=2)  # same leaf as the origin h5-0
    d = decide(JobRequest("j", cpu=2), nodes["h5-0"], others(nodes, "h5-0"), topo=MEDIUM)
    assert isinstance(d, Forward) and d.node_id == "h5-7" and d.cost == 2.0
    assert [c.node_id for c in d.candidates] == ["h5-7", "h9-3"]


def test_only_peers_that_fit_are_candidates() -> None:
    nodes = cluster(SMALL, cpu_free=1)
    nodes["h0-0"] = node("h0-0", cpu_free=0)
    nodes["h3-1"] = node("h3-1", cpu_free=3)
    d = decide(JobRequest("j", cpu=3), nodes["h0-0"], others(nodes, "h0-0"))
    assert isinstance(d, Forward) and [c.node_id for c in d.candidates] == ["h3-1"]


def test_load_decides_between_peers_at_the_same_cost() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h1-0"] = node("h1-0", cpu_free=4)
    nodes["h1-1"] = node("h1-1", cpu_free=1, queue=3)  # fits, but 1.5 load
    for seed in range(30):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), seed=seed)
        assert isinstance(d, Forward) and d.node_id == "h1-0"


def test_best_gpu_fit_is_chosen() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-0"] = node("h0-0", gpu_free={"whole": 0}, gpu_total={"whole": 8})
    nodes["h1-0"] = node("h1-0", gpu_free={"whole": 8})
    nodes["h1-1"] = node("h1-1", gpu_free={"whole": 2}, gpu_total={"whole": 8})  # tightest fit for 2
    nodes["h2-0"] = node("h2-0", gpu_free={"whole": 3}, gpu_total={"whole": 8})
    nodes["h2-1"] = node("h2-1", gpu_free={"1g.10gb": 7})  # wrong type: not a candidate
    req = JobRequest("j", gpu=2, gpu_type="whole")
    for seed in range(30):
        d = decide(req, nodes["h0-0"], others(nodes, "h0-0"), seed=seed)
        assert isinstance(d, Forward) and d.node_id == "h1-1", seed
        assert [c.node_id for c in d.candidates] == ["h1-1", "h2-0", "h1-0"]


#: The agent's gpu_placement = "fit-first", the default (fit-last is below).
FIT_FIRST = PlacementSettings(gpu_first=True)


def test_fit_first_with_a_sample_of_four_is_the_default() -> None:
    assert PlacementSettings() == FIT_FIRST and FIT_FIRST.fit_sample == 4


def test_a_gpu_job_leaves_a_looser_fit_here_for_a_tighter_peer() -> None:
    # fit-first: this agent's 4 free GPUs stay whole for a 4-GPU job; the 1-GPU job
    # goes to the peer it fills, even across the spine.
    here = node("h0-0", gpu_free={"whole": 4})
    tight = node("h2-0", gpu_free={"whole": 1}, gpu_total={"whole": 4})
    near = node("h0-1", gpu_free={"whole": 3}, gpu_total={"whole": 4})
    for seed in range(20):
        d = decide(JobRequest("j", gpu=1), here, [near, tight], seed=seed, settings=FIT_FIRST)
        assert isinstance(d, Forward) and d.node_id == "h2-0" and d.cost == 6.0, seed
        assert [c.node_id for c in d.candidates] == ["h2-0", "h0-1"]  # the fallback ranks by fit too
    # As tight here as anywhere: it runs here, where it costs nothing on the network.
    assert decide(JobRequest("j", gpu=1), node("h0-0", gpu_free={"whole": 1}, gpu_total={"whole": 4}),
                  [near, tight], settings=FIT_FIRST) == RunHere()
    # Only here has room for it: here.
    assert decide(JobRequest("j", gpu=4), here, [near, tight], settings=FIT_FIRST) == RunHere()
    # local-first keeps its greedy rule, and a CPU job still runs here.
    assert decide(JobRequest("j", gpu=1), here, [near, tight], policy="local-first", settings=FIT_FIRST) == RunHere()
    assert decide(JobRequest("j"), here, [near, tight], settings=FIT_FIRST) == RunHere()


def test_among_equal_gpu_fits_network_cost_decides() -> None:
    here = node("h0-0", cpu_free=0, gpu_free={"whole": 0}, gpu_total={"whole": 4})
    same_leaf = node("h0-1", gpu_free={"whole": 2}, gpu_total={"whole": 4})
    across = node("h2-0", gpu_free={"whole": 2}, gpu_total={"whole": 4})
    looser = node("h0-1", gpu_free={"whole": 3}, gpu_total={"whole": 4})
    for seed in range(20):
        d = decide(JobRequest("j", gpu=2), here, [across, same_leaf], seed=seed, settings=FIT_FIRST)
        assert isinstance(d, Forward) and d.node_id == "h0-1" and d.cost == 2.0, seed
        d = decide(JobRequest("j", gpu=2), here, [across, looser], seed=seed, settings=FIT_FIRST)
        assert isinstance(d, Forward) and d.node_id == "h2-0", seed


def test_fit_first_takes_the_tightest_of_a_random_sample_so_origins_spread() -> None:
    """Gossip shows every origin the same two exact fits among 32 fitting peers. Taking
    the tightest of all sends every 1-GPU job to those two, where all offers but the
    first are refused; the tightest of a sample of 4 sends them a quarter of the jobs
    (1 - C(30,4)/C(32,4) = 0.24) and the loosest peers only when a sample holds no
    other (C(16,4)/C(32,4) = 0.05)."""
    here = node("h0-0", cpu_free=0, gpu_free={"whole": 0}, gpu_total={"whole": 8})
    peers = [node(h, gpu_free={"whole": 1 if i < 2 else 2 if i < 16 else 8}, gpu_total={"whole": 8})
             for i, h in enumerate(MEDIUM.hosts[1:33])]
    exact, loose = {p.node_id for p in peers[:2]}, {p.node_id for p in peers[16:]}
    fit = {p.node_id: p.vector.gpu_free["whole"] - 1 for p in peers}
    sample4 = replace(FIT_FIRST, fit_sample=4)
    targets: Counter[str] = Counter()
    for seed in range(400):
        d = decide(JobRequest("j", gpu=1), here, peers, topo=MEDIUM, seed=seed, settings=sample4)
        assert isinstance(d, Forward), seed
        targets[d.node_id] += 1
        # The fallback list still ranks by fit: the exact fits first, unless chosen.
        rest = [c.node_id for c in d.candidates[1:]]
        assert [fit[n] for n in rest] == sorted(fit[n] for n in rest) and exact - {d.node_id} <= set(rest), seed
    assert len(targets) > 20
    assert 50 < sum(targets[n] for n in exact) < 150
    assert sum(targets[n] for n in loose) < 50
    # A sample of every fitting node (0) is the exactly tightest fit: herding.
    for seed in range(50):
        d = decide(JobRequest("j", gpu=1), here, peers, topo=MEDIUM, seed=seed,
                   settings=replace(FIT_FIRST, fit_sample=0))
        assert isinstance(d, Forward) and d.node_id in exact, seed


def test_fit_first_keeps_a_job_here_unless_a_drawn_peer_fits_tighter() -> None:
    # This agent joins every sample: an exact fit here never leaves for a looser peer,
    # nor for an equally tight one (here costs no network).
    here = node("h0-0", gpu_free={"whole": 1}, gpu_total={"whole": 8})
    peers = [node(h, gpu_free={"whole": 2 + i % 6}, gpu_total={"whole": 8}) for i, h in enumerate(MEDIUM.hosts[1:33])]
    sample4 = replace(FIT_FIRST, fit_sample=4)
    tight = [replace(p, vector=replace(p.vector, gpu_free={"whole": 1})) for p in peers[:3]]
    for seed in range(100):
        assert decide(JobRequest("j", gpu=1), here, peers, topo=MEDIUM, seed=seed, settings=sample4) == RunHere()
        assert decide(JobRequest("j", gpu=1), here, tight, topo=MEDIUM, seed=seed, settings=sample4) == RunHere()
    # Here leaves 1 GPU free; 2 of the 32 peers would leave none. The job goes to one of
    # those when the sample draws it (1 - C(30,4)/C(32,4) = 24%), and stays here otherwise.
    here = node("h0-0", gpu_free={"whole": 2}, gpu_total={"whole": 8})
    exact = [replace(p, vector=replace(p.vector, gpu_free={"whole": 1})) for p in peers[:2]]
    runs = 0
    for seed in range(400):
        d = decide(JobRequest("j", gpu=1), here, [*exact, *peers[2:]], topo=MEDIUM, seed=seed, settings=sample4)
        if d == RunHere():
            runs += 1
        else:
            assert isinstance(d, Forward) and d.node_id in {p.node_id for p in exact}, seed
    assert 250 < runs < 350


FIT_LAST = PlacementSettings(gpu_first=False)


def test_fit_last_is_the_earlier_rule() -> None:
    """gpu_first=False places GPU jobs as place() did before fit-first existed: here
    whenever it fits, then cost, then load, fit last."""
    here = node("h0-0", gpu_free={"whole": 4})
    tight = node("h2-0", gpu_free={"whole": 1}, gpu_total={"whole": 4})
    near = node("h0-1", gpu_free={"whole": 3}, gpu_total={"whole": 4})
    # It fits here: here, though a peer would be a tighter fit.
    assert decide(JobRequest("j", gpu=1), here, [near, tight], settings=FIT_LAST) == RunHere()
    full = node("h0-0", cpu_free=0, gpu_free={"whole": 0}, gpu_total={"whole": 4})
    for seed in range(20):
        # Cost before fit: the same-leaf peer with 3 free beats the exact fit across the spine.
        d = decide(JobRequest("j", gpu=1), full, [tight, near], seed=seed, settings=FIT_LAST)
        assert isinstance(d, Forward) and d.node_id == "h0-1" and d.cost == 2.0, seed
        assert [c.node_id for c in d.candidates] == ["h0-1", "h2-0"]  # the fallback by cost too
        # Load before fit: an idle peer with 7 free beats a half-busy exact fit at the same cost.
        idle = node("h2-0", gpu_free={"whole": 8})
        busy_tight = node("h2-1", cpu_free=2, gpu_free={"whole": 1}, gpu_total={"whole": 8})  # load 0.5
        d = decide(JobRequest("j", gpu=1), full, [busy_tight, idle], seed=seed, settings=FIT_LAST)
        assert isinstance(d, Forward) and d.node_id == "h2-0", seed
        d = decide(JobRequest("j", gpu=1), full, [busy_tight, idle], seed=seed, settings=FIT_FIRST)
        assert isinstance(d, Forward) and d.node_id == "h2-1", seed  # fit-first: the fit wins
        # Within the window of near-ties (same cost, load within 0.25) the tightest fit wins.
        loose = node("h2-0", gpu_free={"whole": 3}, gpu_total={"whole": 8})
        snug = node("h2-1", cpu_free=3.5, gpu_free={"whole": 1}, gpu_total={"whole": 8})  # load 0.125
        d = decide(JobRequest("j", gpu=1), full, [loose, snug], seed=seed, settings=FIT_LAST)
        assert isinstance(d, Forward) and d.node_id == "h2-1", seed
    # CPU jobs are placed the same either way.
    assert decide(JobRequest("j"), here, [near, tight], settings=FIT_LAST) == RunHere()


def test_untyped_gpu_request_fits_the_tightest_type() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-1"] = node("h0-1", gpu_free={"whole": 4, "1g.10gb": 1})
    assert check_fit(JobRequest("j", gpu=1), nodes["h0-1"]) is None
    nodes["h1-0"] = node("h1-0", gpu_free={"1g.10gb": 1})
    nodes["h1-1"] = node("h1-1", gpu_free={"whole": 4})
    d = decide(JobRequest("j", gpu=1), nodes["h0-0"], [nodes["h1-0"], nodes["h1-1"]], seed=3)
    assert isinstance(d, Forward) and d.node_id == "h1-0"


def test_exact_ties_are_broken_randomly_and_both_get_chosen() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h1-0"] = node("h1-0", cpu_free=2)
    nodes["h1-1"] = node("h1-1", cpu_free=2)
    seen = Counter()
    for seed in range(200):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), seed=seed)
        assert isinstance(d, Forward)
        seen[d.node_id] += 1
    assert set(seen) == {"h1-0", "h1-1"}
    assert min(seen.values()) > 60  # roughly even, not a rare accident


def test_near_ties_spread_over_many_origins() -> None:
    # Stale gossip shows eight idle peers across the spine: taking "the best" every time
    # would send every origin's job to the same node.
    nodes = cluster(MEDIUM, cpu_free=0)
    for i in range(8):
        nodes[f"h7-{i}"] = node(f"h7-{i}", cpu_free=4 - (i % 2) * 0.5)
    targets = Counter()
    for seed in range(400):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), topo=MEDIUM, seed=seed)
        assert isinstance(d, Forward)
        targets[d.node_id] += 1
    assert len(targets) == 8
    strict = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), topo=MEDIUM,
                    settings=PlacementSettings(load_slack=0.0))
    assert isinstance(strict, Forward) and strict.node_id in {"h7-0", "h7-2", "h7-4", "h7-6"}


def test_nothing_could_ever_fit_is_rejected_naming_the_constraint() -> None:
    nodes = cluster(SMALL, cpu_free=8, cpu_total=8)
    local, peers = nodes["h0-0"], others(nodes, "h0-0")
    d = decide(JobRequest("j", cpu=64), local, peers)
    assert d == Reject("needs 64 cpus; the largest node has 8")
    d = decide(JobRequest("j", mem_mb=100_000), local, peers)
    assert d == Reject("needs 100000 MiB of memory; the largest node has 8192 MiB")
    d = decide(JobRequest("j", gpu=1, gpu_type="whole"), local, peers)
    assert d == Reject("needs GPU slots of type 'whole'; no node has GPUs: add an agent with GPUs "
                       "(discovered through NVML, or declared with --gpus)")
    peers[3] = node("h2-0", gpu_free={"whole": 4})
    d = decide(JobRequest("j", gpu=6, gpu_type="whole"), local, peers)
    assert d == Reject("needs 6 'whole' GPU slots; the largest node has 4: ask for at most 4, or split the job")
    d = decide(JobRequest("j", gpu=1, gpu_type="3g.40gb"), local, peers)
    assert d == Reject("needs GPU slots of type '3g.40gb'; GPU slot types seen: whole: ask for one of those "
                       "with --gpu-type, or add an agent that offers '3g.40gb' slots")
    d = decide(JobRequest("j", labels={"zone": "b"}), local, peers)
    assert isinstance(d, Reject) and d.reason == (
        "needs a node labelled zone=b; none of the 8 known nodes carries that: start an agent with --label zone=b, "
        "or submit the job without those node.* labels")
    d = decide(JobRequest("j", cpu=8, gpu=1, gpu_type="whole"), local, peers)
    assert isinstance(d, Reject) and "on one node" in d.reason  # the GPU node has only 4 cpus


def test_full_cluster_queues_here_and_says_why() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"))
    assert d == QueueHere("all 7 peers that could run it are full and so is this agent; waiting here for capacity")
    d = decide(JobRequest("j"), nodes["h0-0"], [])
    assert isinstance(d, QueueHere) and d.reason.startswith("no peers are known yet")
    # Only a peer can ever hold it, and that peer is busy: wait for it.
    big = node("h3-0", cpu_free=0, cpu_total=16)
    d = decide(JobRequest("j", cpu=16), nodes["h0-0"], [big, nodes["h1-0"]])
    assert d == QueueHere("the one peer that could run it is full; waiting here for capacity")


def test_ttl_holds() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-1"] = node("h0-1", cpu_free=4)
    req = JobRequest("j", hops=4, ttl=4)
    d = decide(req, nodes["h0-0"], others(nodes, "h0-0"))
    assert d == QueueHere("reached its hop limit (4 of 4 forwards), so it waits here until this agent has room")
    assert isinstance(decide(JobRequest("j", hops=3, ttl=4), nodes["h0-0"], others(nodes, "h0-0")), Forward)
    # At the TTL a job that fits runs where it is.
    assert decide(req, node("h0-0", cpu_free=1), others(nodes, "h0-0")) == RunHere()
    # A chain of forwards stops after ttl hops, whatever the gossip says.
    r = JobRequest("chain")
    for hop in range(10):
        here = f"h{hop % 4}-{hop % 2}"
        d = decide(r, node(here, cpu_free=0), [node(h, cpu_free=4) for h in SMALL.hosts if h != here], seed=hop)
        if not isinstance(d, Forward):
            break
        r = r.forwarded(via=here)
    assert hop == 4 and r.hops == 4 and isinstance(d, QueueHere)


def test_ttl_on_an_agent_that_can_never_run_it_rejects() -> None:
    d = decide(JobRequest("j", cpu=8, hops=4), node("h0-0", cpu_free=0), [node("h0-1", 8, 8)])
    assert isinstance(d, Reject) and d.reason.startswith("reached its hop limit (4 of 4 forwards)")
    assert "needs 8 cpus and has 4 free" in d.reason


def test_visited_agents_are_never_candidates() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-1"] = node("h0-1", cpu_free=4)
    nodes["h3-1"] = node("h3-1", cpu_free=4)
    req = JobRequest("j").forwarded(via="h0-1")
    assert req.hops == 1 and req.visited == {"h0-1"}
    d = decide(req, nodes["h0-0"], others(nodes, "h0-0"))
    assert isinstance(d, Forward) and [c.node_id for c in d.candidates] == ["h3-1"]
    d = decide(req.forwarded(via="h3-1"), nodes["h0-0"], others(nodes, "h0-0"))
    assert isinstance(d, QueueHere) and "2 more already held it (visited)" in d.reason


def test_labels_constrain_the_executor() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-1"] = node("h0-1", cpu_free=4)
    nodes["h2-0"] = node("h2-0", cpu_free=4, labels={"zone": "b"})
    spec = JobSpec(runtime="process", command=["/bin/true"], labels={"node.zone": "b", "team": "vision"})
    req = JobRequest.from_spec("j", spec)
    assert dict(req.labels) == {"zone": "b"}
    d = decide(req, nodes["h0-0"], others(nodes, "h0-0"))
    assert isinstance(d, Forward) and d.node_id == "h2-0"
    assert check_fit(req, nodes["h0-1"]) == "lacks the labels zone=b"


def test_check_fit_explains_a_refusal() -> None:
    me = node("h0-1", cpu_free=1, mem_free=100, gpu_free={"whole": 1})
    assert check_fit(JobRequest("j", cpu=2), me) == "needs 2 cpus and has 1 free"
    assert check_fit(JobRequest("j", mem_mb=512), me) == "needs 512 MiB and has 100 MiB free"
    assert check_fit(JobRequest("j", gpu=2, gpu_type="whole", mem_mb=1), me) == "needs 2 free 'whole' GPU slots and has 1"
    assert check_fit(JobRequest("j", mem_mb=1), me) is None
    me.vector.draining = True
    assert check_fit(JobRequest("j", mem_mb=1), me) == "is draining and takes no new jobs"


def test_without_a_topology_load_decides() -> None:
    a, b = node("a", cpu_free=4), node("b", cpu_free=1)
    d = decide(JobRequest("j"), node("me", cpu_free=0), [b, a], topo=None)
    assert isinstance(d, Forward) and d.node_id == "a" and d.route == ("me", "a") and d.cost == 0.0


def test_peer_outside_the_file_is_priced_by_the_default_rule() -> None:
    stranger = node("gpu-box", cpu_free=4)
    d = decide(JobRequest("j"), node("h0-0", cpu_free=0), [stranger])
    loc = SMALL.locate("gpu-box")
    assert isinstance(d, Forward) and d.route[-2:] == (loc.leaf, "gpu-box")
    assert d.cost == SMALL.cost("h0-0", "gpu-box")
    # A gossiped position puts it where it says.
    d = decide(JobRequest("j"), node("h0-0", cpu_free=0), [node("gpu-box", cpu_free=4, position="h0-1")])
    assert isinstance(d, Forward) and d.route == ("h0-0", "leaf-0", "h0-1") and d.cost == 2.0


def test_fallback_list_is_bounded() -> None:
    nodes = cluster(MEDIUM, cpu_free=4)
    nodes["h0-0"] = node("h0-0", cpu_free=0)
    d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), topo=MEDIUM)
    assert isinstance(d, Forward) and len(d.candidates) == 8
    assert len({c.node_id for c in d.candidates}) == 8
    assert all(c.cost == 2.0 for c in d.candidates[:7])  # the seven same-leaf peers come first


# -- other policies --------------------------------------------------------------------


def test_local_first_takes_the_single_nearest_peer() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h1-1"] = node("h1-1", cpu_free=1)
    nodes["h1-0"] = node("h1-0", cpu_free=4)
    for seed in range(20):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), seed=seed, policy="local-first")
        assert isinstance(d, Forward) and d.node_id == "h1-0"  # by cost then id; load ignored
    assert decide(JobRequest("j"), node("h0-0"), [], policy="local-first") == RunHere()


def test_random_spreads_over_here_and_fitting_peers() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-0"] = node("h0-0", cpu_free=4)
    nodes["h3-1"] = node("h3-1", cpu_free=4)
    seen = Counter()
    for seed in range(100):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), seed=seed, policy="random")
        seen["here" if isinstance(d, RunHere) else d.node_id] += 1  # type: ignore[attr-defined]
    assert set(seen) == {"here", "h3-1"}


def test_round_robin_cycles_through_fitting_members() -> None:
    nodes = cluster(SMALL, cpu_free=4)
    state = PlacementState()
    order = []
    for _ in range(10):
        d, state = place(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), SMALL,
                         rng=random.Random(0), policy="round-robin", state=state)
        order.append("h0-0" if isinstance(d, RunHere) else d.node_id)  # type: ignore[union-attr]
    assert order == ["h0-0", "h0-1", "h1-0", "h1-1", "h2-0", "h2-1", "h3-0", "h3-1", "h0-0", "h0-1"]
    assert state == PlacementState(rr_last="h0-1")


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown placement policy 'best'; use one of p2p, local-first"):
        decide(JobRequest("j"), node("h0-0"), [], policy="best")


def impaired(state: NodeState, *runtimes: str) -> NodeState:
    return NodeState(state.node_id, vector=replace(state.vector, impaired=runtimes), labels=state.labels)


def test_a_peer_whose_runtime_is_impaired_gets_none_of_its_jobs() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    nodes["h0-1"] = impaired(node("h0-1", cpu_free=4), "wasm")  # nearest, idle, but its wasm jobs kept failing
    nodes["h3-1"] = node("h3-1", cpu_free=4)
    for seed in range(20):
        d = decide(JobRequest("j"), nodes["h0-0"], others(nodes, "h0-0"), seed=seed)
        assert isinstance(d, Forward) and [c.node_id for c in d.candidates] == ["h3-1"]
    # Its other runtimes still count.
    d = decide(JobRequest("j", runtime="process"), nodes["h0-0"], others(nodes, "h0-0"))
    assert isinstance(d, Forward) and d.node_id == "h0-1"
    assert check_fit(JobRequest("j"), nodes["h0-1"]) == \
        "cannot run wasm jobs now: they kept failing there for the host's fault"
    assert check_fit(JobRequest("j", runtime="process"), nodes["h0-1"]) is None


def test_an_impaired_agent_sends_its_own_jobs_to_a_peer_that_can_run_them() -> None:
    nodes = cluster(SMALL, cpu_free=0)
    me = impaired(node("h0-0", cpu_free=4), "wasm")
    nodes["h2-0"] = node("h2-0", cpu_free=4)
    d = decide(JobRequest("j"), me, others(nodes, "h0-0"))
    assert isinstance(d, Forward) and d.node_id == "h2-0"
    assert decide(JobRequest("j", runtime="process"), me, others(nodes, "h0-0")) == RunHere()
    # Peers that could run it are all busy: it waits for them rather than fail here again.
    nodes["h2-0"] = node("h2-0", cpu_free=0)
    d = decide(JobRequest("j"), me, others(nodes, "h0-0"))
    assert d == QueueHere("all 7 peers that could run it are full; this agent cannot run wasm jobs now either; "
                          "waiting here for capacity")
    # At the hop limit it can go nowhere else, so it runs here.
    assert decide(JobRequest("j", hops=4), me, others(nodes, "h0-0")) == RunHere()


def test_an_impaired_agent_runs_the_job_itself_when_no_peer_could() -> None:
    me = impaired(node("h0-0", cpu_free=4), "wasm")
    assert decide(JobRequest("j"), me, []) == RunHere()  # a lone agent keeps trying
    broken = [impaired(node(h, cpu_free=4), "wasm") for h in ("h1-0", "h2-0")]
    assert decide(JobRequest("j"), me, broken) == RunHere()  # every other one is impaired too
    small = node("h3-0", cpu_free=1, cpu_total=1)
    assert decide(JobRequest("j", cpu=2), me, [small]) == RunHere()  # the one healthy peer is too small


def test_queue_reason_names_impaired_peers() -> None:
    me = node("h0-0", cpu_free=0)
    full, broken = node("h1-0", cpu_free=0), impaired(node("h2-0", cpu_free=4), "wasm")
    d = decide(JobRequest("j"), me, [broken])
    assert d == QueueHere("the one peer that could run it cannot run wasm jobs now (they kept failing there for "
                          "the host's fault); this agent is full; waiting here for capacity")
    d = decide(JobRequest("j"), me, [full, broken])
    assert d == QueueHere("of the 2 peers that could run it, 1 is full and 1 cannot run wasm jobs now (they kept "
                          "failing there for the host's fault); this agent is full; waiting here for capacity")


def test_job_request_carries_the_runtime() -> None:
    spec = JobSpec.model_validate({"runtime": "process", "command": ["/bin/true"]})
    assert JobRequest.from_spec("j", spec).runtime == "process"


def test_impaired_runtimes_travel_in_the_vector_and_bad_ones_are_refused() -> None:
    v = ResourceVector(cpu_total=2, cpu_free=2, impaired=("process", "wasm"))
    assert ResourceVector.from_wire(v.to_wire()) == v
    assert "i" not in ResourceVector(cpu_total=2).to_wire()  # healthy nodes gossip no key for it
    assert ResourceVector.from_wire(ResourceVector(cpu_total=2).to_wire()).impaired == ()
    for bad in ("wasm", [1], [""], ["x" * 33], ["w"] * 9):
        with pytest.raises(ValueError, match="impaired runtimes"):
            ResourceVector.from_wire({"i": bad})
