"""Placement: where a job should run, decided from gossip alone. Sans-IO.

``place()`` reads no clock, opens no socket and draws randomness only from the
``random.Random`` it is given, so the agent, the tests and the simulator run the
same decisions. Its inputs are the job's request, this agent's fresh NodeState, the
peers' gossiped NodeStates (alive and not draining; membership filters them) and the
topology. It returns one Decision:

* ``RunHere``: the job fits on this agent now. A local run costs nothing on the
  network, so under ``p2p`` it always wins when it fits.
* ``Forward``: send it to ``node_id`` along ``route`` (switches included) at
  ``cost``. ``candidates`` (target first) is the late-binding fallback list: the
  target checks its real capacity with ``check_fit`` and may refuse; the sender then
  tries the next candidate, and queues the job when the list runs out.
* ``QueueHere``: nobody has room now; ``reason`` says why, in a sentence.
* ``Reject``: no known node could ever run it; ``reason`` names the constraint.

Scoring under ``p2p`` (the default): only peers whose gossiped vector fits the job
now are candidates (for GPU jobs: enough free slots of the required type). They rank
by network cost (same leaf beats across the spine), then load. Gossip is ~200 ms
stale, so always taking the single best node herds every origin onto it. Instead,
peers within ``cost_slack_us`` and ``load_slack`` of the best form a window of
near-ties, and two of them are drawn at random and the better one taken (the
power-of-two-choices rule of Mitzenmacher, as Sparrow uses it).

GPU jobs have two rules (``PlacementSettings.gpu_first``; the agent's
``gpu_placement``). The fit of a node is the free slots of the best-fitting type
that the job would leave over; the fewest is the tightest.

* fit-first (the default): the fit comes before cost and load, because it keeps
  the nodes with more free slots whole for the big jobs that need them (a 1-GPU job
  goes to a node with 1 free, not the one with 8). Taking the exactly tightest node
  of the cluster would send every origin, through the same stale gossip, to the same
  few nodes, and most offers would be refused on large clusters. So it is a sampled
  best fit: ``fit_sample`` of the fitting peers are drawn at random, this agent
  joins them when it fits now, and the tightest fit of those is taken, cost then
  load breaking ties (so this agent, at no network cost, wins a tie of fit, and a
  job leaves it only for a tighter fit). The fallback list ranks the other peers by
  fit, then cost, then load. With no more fitting peers than the sample, it is the
  tightest fit of all.
* fit-last: a GPU job that fits here runs here; peers rank by cost, then load, and
  within the window of near-ties the tightest fit wins outright. It forwards fewer
  GPU jobs, and leaves the big ones waiting longer for a whole node.

Other policies, for comparison: ``local-first`` (here if it fits, else the nearest
fitting peer, deterministically: the greedy rule whose herding ``p2p`` avoids),
``random`` (uniform over here and the fitting peers) and ``round-robin`` (the next
fitting member after the last one chosen, in node-id order; its cursor is the
``PlacementState`` passed in and returned).

A node that gossips the job's runtime as impaired (its jobs of that runtime kept
failing there for the host's fault, see agent/health.py) is no candidate. This agent,
impaired, runs the job itself only when no peer could ever run it; otherwise the job
goes to a peer, or waits for one.

A TTL (default 4 forwards) and the visited set stop loops: a request at its TTL
runs here or queues here, and visited agents are never candidates.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Literal

from p2psched.resources import NodeState, ResourceVector

if TYPE_CHECKING:
    from p2psched.jobs.spec import JobSpec
    from p2psched.topology import Topology

Policy = Literal["p2p", "local-first", "random", "round-robin"]
POLICIES: tuple[str, ...] = ("p2p", "local-first", "random", "round-robin")

#: Forwards a job may take before it queues where it is. With late binding a job
#: normally moves once; 4 leaves room for refusals and re-placement after a target
#: drains, while bounding a loop on inconsistent gossip. Same bound the issue sets.
DEFAULT_TTL = 4

#: Label keys of a JobSpec that constrain the executor carry this prefix:
#: ``{"node.zone": "a"}`` needs an agent started with ``--label zone=a`` (or whose GPU
#: inventory sets the label, for gpu.* keys). Other job labels are the tenant's own
#: metadata and do not affect placement.
NODE_LABEL_PREFIX = "node."

#: Why a job waits on a full agent that knows no peer (the agent decides this case
#: itself too, without building the states place() reads).
NO_PEERS_FULL = "no peers are known yet and this agent is full; waiting here for capacity"


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    # The TTL is not here: it travels with the job (JobRequest.ttl), so every agent on
    # its way applies the origin's bound.
    #: Peers within this many cost units (us of latency with the default weight) of
    #: the cheapest fitting peer are near-ties. 1 us is half a host link: it merges
    #: equal paths but keeps a same-leaf peer (2 us) ahead of a cross-spine one (6 us).
    cost_slack_us: float = 1.0
    #: Loads within this of the least-loaded near-tie are near-ties too. Load is a
    #: busy fraction, so 0.25 is a quarter of a node; finer distinctions are below
    #: what 200 ms-old gossip can tell apart.
    load_slack: float = 0.25
    #: Candidates returned for late-binding fallback. Each refusal costs a round trip;
    #: Sparrow probes 2 per task, and past ~8 refusals the gossip is too stale to trust.
    max_candidates: int = 8
    #: GPU jobs under ``p2p``: True (the default, the agent's ``gpu_placement =
    #: "fit-first"``): the tightest fit of this agent and a random sample of the
    #: fitting peers (module docstring). False (``"fit-last"``): a GPU job that fits here
    #: runs here, and peers rank by cost, then load, the tightest fit winning within
    #: the window of near-ties. The simulator (``sim placement --gpu-mix``) measures
    #: both: from 128 to 1,024 hosts, fit-first's 8-GPU jobs wait 0-154 ms on average
    #: where fit-last's wait 28 ms-1.9 s (docs/scheduling.md).
    gpu_first: bool = True
    #: fit-first's sample: the fitting peers drawn at random for each GPU job, of
    #: which (and of this agent, when it fits now) the tightest fit is taken. The
    #: smaller, the wider origins spread on 200 ms-old gossip; the larger, the tighter
    #: the fit. Taking every fitting node (0) is the exactly tightest fit, whose
    #: offers herd: on 512 simulated hosts most of them are refused.
    fit_sample: int = 4


DEFAULT_SETTINGS = PlacementSettings()


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What placement needs to know about a job."""

    job_id: str
    cpu: float = 1.0
    mem_mb: int = 256
    gpu: int = 0
    gpu_type: str | None = None  # None: any single slot type with enough free slots
    labels: Mapping[str, str] = field(default_factory=dict)  # the executor must carry each key=value
    hops: int = 0  # forwards so far
    ttl: int = DEFAULT_TTL
    visited: frozenset[str] = frozenset()  # agents that held it already; never candidates
    runtime: str = "wasm"  # a node that gossips this runtime as impaired is no candidate

    @classmethod
    def from_spec(cls, job_id: str, spec: JobSpec, *, hops: int = 0, ttl: int = DEFAULT_TTL,
                  visited: frozenset[str] = frozenset()) -> JobRequest:
        r = spec.resources
        labels = {k[len(NODE_LABEL_PREFIX):]: v for k, v in spec.labels.items() if k.startswith(NODE_LABEL_PREFIX)}
        return cls(job_id, r.cpu, r.mem_mb, r.gpu, r.gpu_type, labels, hops, ttl, visited, spec.runtime)

    def forwarded(self, via: str) -> JobRequest:
        """The request as the next agent sees it: one more hop, ``via`` visited."""
        return replace(self, hops=self.hops + 1, visited=self.visited | {via})


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    route: tuple[str, ...]
    cost: float


@dataclass(frozen=True, slots=True)
class RunHere:
    kind: ClassVar[str] = "run_here"


@dataclass(frozen=True, slots=True)
class Forward:
    kind: ClassVar[str] = "forward"
    node_id: str
    route: tuple[str, ...]
    cost: float
    candidates: tuple[Candidate, ...]  # candidates[0] is the target; try the rest on refusal


@dataclass(frozen=True, slots=True)
class QueueHere:
    kind: ClassVar[str] = "queue"
    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    kind: ClassVar[str] = "reject"
    reason: str


Decision = RunHere | Forward | QueueHere | Reject


@dataclass(frozen=True, slots=True)
class PlacementState:
    """What a policy remembers between decisions: round-robin's cursor, nothing else."""

    rr_last: str = ""


# -- fit ---------------------------------------------------------------------------


def _gpu_leftover(req: JobRequest, free: Mapping[str, int]) -> int | None:
    """Free slots left of the best-fitting type, or None when no type holds the request."""
    if req.gpu <= 0:
        return 0
    if req.gpu_type is not None:
        left = free.get(req.gpu_type, 0) - req.gpu
        return left if left >= 0 else None
    best: int | None = None
    for n in free.values():
        left = n - req.gpu
        if left >= 0 and (best is None or left < best):
            best = left
    return best


def _labels_ok(req: JobRequest, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in req.labels.items())


def check_fit(req: JobRequest, state: NodeState) -> str | None:
    """None if the job fits on ``state`` now, else why not (a clause, for refusals and logs).

    The receiving agent calls this on its *real* state before accepting a forward.
    """
    v = state.vector
    if v.draining:
        return "is draining and takes no new jobs"
    if req.runtime in v.impaired:
        return f"cannot run {req.runtime} jobs now: they kept failing there for the host's fault"
    if not _labels_ok(req, state.labels):
        want = ", ".join(f"{k}={val}" for k, val in req.labels.items())
        return f"lacks the labels {want}"
    if _gpu_leftover(req, v.gpu_free) is None:
        kind = f"'{req.gpu_type}' " if req.gpu_type else ""
        have = v.gpu_free.get(req.gpu_type, 0) if req.gpu_type else max(v.gpu_free.values(), default=0)
        return f"needs {req.gpu} free {kind}GPU slots and has {have}"
    if v.cpu_free < req.cpu:
        return f"needs {req.cpu:g} cpus and has {v.cpu_free:g} free"
    if v.mem_free_mb < req.mem_mb:
        return f"needs {req.mem_mb} MiB and has {v.mem_free_mb} MiB free"
    return None


def fits_now(req: JobRequest, state: NodeState) -> bool:
    v = state.vector
    return (
        v.cpu_free >= req.cpu and v.mem_free_mb >= req.mem_mb
        and (req.gpu <= 0 or _gpu_leftover(req, v.gpu_free) is not None)
        and (not req.labels or _labels_ok(req, state.labels))
    )


def fits_ever(req: JobRequest, state: NodeState) -> bool:
    v = state.vector
    return (
        v.cpu_total >= req.cpu and v.mem_total_mb >= req.mem_mb
        and (req.gpu <= 0 or _gpu_leftover(req, v.gpu_total) is not None)
        and (not req.labels or _labels_ok(req, state.labels))
    )


def node_load(v: ResourceVector) -> float:
    """Busy fraction of the CPUs plus queued jobs per CPU: 0 idle, 1 full, >1 backlogged."""
    if v.cpu_total <= 0:
        return 1.0 + v.queue_len
    return (v.cpu_total - v.cpu_free + v.queue_len) / v.cpu_total


def never_fits(req: JobRequest, states: Sequence[NodeState]) -> str | None:
    """Why none of ``states`` could run ``req`` even idle, or None when one could."""
    return None if any(fits_ever(req, s) for s in states) else _never_reason(req, states)


def _never_reason(req: JobRequest, states: Sequence[NodeState]) -> str:
    """Name the first constraint that no known node satisfies, even when idle."""
    n = len(states)
    nodes = f"{n} known node" + ("s" if n != 1 else "")
    if req.labels:
        matching = [s for s in states if _labels_ok(req, s.labels)]
        if not matching:
            want = ", ".join(f"{k}={v}" for k, v in req.labels.items())
            # An operator gives labels with --label; gpu.* ones come from an agent's GPUs.
            flags = [f"--label {k}={v}" for k, v in req.labels.items() if not k.startswith("gpu.")]
            gpu = [f"{k}={v}" for k, v in req.labels.items() if k.startswith("gpu.")]
            starts = ([f"start an agent with {' '.join(flags)}"] if flags else []) + (
                [f"add an agent whose GPUs give {', '.join(gpu)}"] if gpu else [])
            return (f"needs a node labelled {want}; none of the {nodes} carries that: {' and '.join(starts)}, "
                    "or submit the job without those node.* labels")
        states = matching
    if req.gpu > 0:
        if req.gpu_type is not None:
            typed = [s.vector.gpu_total.get(req.gpu_type, 0) for s in states]
            if not any(typed):
                kinds = sorted({t for s in states for t in s.vector.gpu_total})
                have = ("GPU slot types seen: " + ", ".join(kinds)) if kinds else "no node has GPUs"
                fix = (f"ask for one of those with --gpu-type, or add an agent that offers '{req.gpu_type}' slots"
                       if kinds else "add an agent with GPUs (discovered through NVML, or declared with --gpus)")
                return f"needs GPU slots of type '{req.gpu_type}'; {have}: {fix}"
            if max(typed) < req.gpu:
                return (f"needs {req.gpu} '{req.gpu_type}' GPU slots; the largest node has {max(typed)}: "
                        f"ask for at most {max(typed)}, or split the job")
        else:
            most = max((max(s.vector.gpu_total.values(), default=0) for s in states), default=0)
            if most < req.gpu:
                fix = (f"ask for at most {most}, or split the job" if most
                       else "add an agent with GPUs (discovered through NVML, or declared with --gpus)")
                return f"needs {req.gpu} GPU slots of one type; the largest node has {most}: {fix}"
    most_cpu = max(s.vector.cpu_total for s in states)
    if most_cpu < req.cpu:
        return f"needs {req.cpu:g} cpus; the largest node has {most_cpu:g}"
    most_mem = max(s.vector.mem_total_mb for s in states)
    if most_mem < req.mem_mb:
        return f"needs {req.mem_mb} MiB of memory; the largest node has {most_mem} MiB"
    return (f"needs {req.cpu:g} cpus, {req.mem_mb} MiB" + (f" and {req.gpu} GPU slots" if req.gpu else "")
            + f" on one node; each of the {nodes} has some of that but not all at once")


# -- ranking -----------------------------------------------------------------------


#: A fitting peer as ranked: (cost, load, gpu_fit, node_id, state). Plain tuples
#: compare in C, which keeps a 1,000-member decision near a millisecond; node_id is
#: unique, so the state itself is never compared.
_Row = tuple[float, float, int, str, NodeState]


def _where(state: NodeState) -> str:
    return state.position or state.node_id


def _flat(_: str) -> float:
    return 0.0


def _pricer(local: NodeState, topology: Topology | None) -> Callable[[str], float]:
    return topology.pricer(_where(local)) if topology is not None else _flat


def _score(req: JobRequest, price: Callable[[str], float], peer: NodeState) -> _Row:
    fit = 0
    if req.gpu > 0:
        fit = _gpu_leftover(req, peer.vector.gpu_free) or 0
    return (price(peer.position or peer.node_id), node_load(peer.vector), fit, peer.node_id, peer)


def _candidate(local: NodeState, row: _Row, topology: Topology | None) -> Candidate:
    peer = row[4]
    if topology is None:
        return Candidate(peer.node_id, (local.node_id, peer.node_id), 0.0)
    route, cost = topology.route(_where(local), _where(peer))
    return Candidate(peer.node_id, tuple(route), cost)


def _forward(local: NodeState, first: _Row, rest: Sequence[_Row], topology: Topology | None) -> Forward:
    cands = tuple(_candidate(local, s, topology) for s in (first, *rest))
    head = cands[0]
    return Forward(head.node_id, head.route, head.cost, cands)


def _queue_reason(req: JobRequest, local: NodeState, peers: Sequence[NodeState], visited_could: int) -> str:
    able = [p for p in peers if p.node_id not in req.visited and fits_ever(req, p)]
    could = len(able)
    broken = sum(req.runtime in p.vector.impaired for p in able)
    here = fits_ever(req, local)
    if not peers:
        return NO_PEERS_FULL
    parts = []
    if could:
        noun = "peer" if could == 1 else "peers"
        verb = "is" if could == 1 else "are"
        cannot = f"cannot run {req.runtime} jobs now (they kept failing there for the host's fault)"
        if not broken:
            lead = f"all {could} {noun} that could run it {verb} full" if could > 1 else "the one peer that could run it is full"
        elif broken == could:
            lead = f"all {could} {noun} that could run it {cannot}" if could > 1 else f"the one peer that could run it {cannot}"
        else:
            lead = f"of the {could} peers that could run it, {could - broken} {'is' if could - broken == 1 else 'are'} full and {broken} {cannot}"
        if here and req.runtime in local.vector.impaired:
            lead += f"; this agent cannot run {req.runtime} jobs now either"
        elif here:
            lead += " and so is this agent" if not broken else "; this agent is full"
        parts.append(lead)
    elif here:
        parts.append(f"this agent is full ({check_fit(req, local)}) and none of the {len(peers)} peers could ever run it")
    if visited_could:
        parts.append(f"{visited_could} more already held it (visited) and are not tried again")
    if not parts:
        parts.append("every agent that could run it already held it")
    return "; ".join(parts) + "; waiting here for capacity"


def place(
    req: JobRequest,
    local: NodeState,
    peers: Sequence[NodeState],
    topology: Topology | None,
    *,
    rng: random.Random,
    policy: Policy = "p2p",
    state: PlacementState = PlacementState(),
    settings: PlacementSettings = DEFAULT_SETTINGS,
) -> tuple[Decision, PlacementState]:
    """Decide where ``req`` runs; returns the decision and the policy's next state.

    ``peers`` holds the alive, non-draining members other than this agent, with their
    gossiped states. ``topology`` None prices every peer the same, so load decides.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; use one of {', '.join(POLICIES)}")
    # A runtime impaired here (its jobs kept failing for the host's fault) runs here
    # only when no peer could ever run the job: then this agent keeps trying.
    impaired_here = req.runtime in local.vector.impaired and any(
        p.node_id != local.node_id and p.node_id not in req.visited and req.runtime not in p.vector.impaired
        and fits_ever(req, p) for p in peers)
    here_now = fits_now(req, local) and not local.vector.draining and not impaired_here
    gpu_first = req.gpu > 0 and policy == "p2p" and settings.gpu_first  # here competes with the peers on fit
    if here_now and (policy == "local-first" or (policy == "p2p" and not gpu_first)):
        return RunHere(), state

    never = never_fits(req, [local, *peers])
    if never is not None:
        return Reject(never), state

    if req.hops >= req.ttl:
        if here_now or (impaired_here and fits_now(req, local) and not local.vector.draining):
            return RunHere(), state  # it can go nowhere else
        if not fits_ever(req, local):
            return Reject(
                f"reached its hop limit ({req.hops} of {req.ttl} forwards) on an agent that can never run it "
                f"({check_fit(req, replace(local, vector=_idle(local.vector)))}); resubmit it to an agent that can"
            ), state
        return QueueHere(
            f"reached its hop limit ({req.hops} of {req.ttl} forwards), so it waits here until this agent has room"
        ), state

    me = local.node_id
    fitting: list[NodeState] = []
    visited_could = 0
    for p in peers:
        if p.node_id == me:
            continue
        if p.node_id in req.visited:
            if fits_ever(req, p):
                visited_could += 1
            continue
        if fits_now(req, p) and req.runtime not in p.vector.impaired:
            fitting.append(p)

    if policy == "random":
        pool: list[NodeState | None] = [*fitting, None] if here_now else list(fitting)
        if not pool:
            return QueueHere(_queue_reason(req, local, peers, visited_could)), state
        pick = pool[rng.randrange(len(pool))]
        if pick is None:
            return RunHere(), state
        rest = [p for p in fitting if p is not pick]
        rest = rng.sample(rest, min(len(rest), settings.max_candidates - 1))
        price = _pricer(local, topology)
        return _forward(local, _score(req, price, pick), [_score(req, price, p) for p in rest], topology), state

    if policy == "round-robin":
        ring = sorted([*(p.node_id for p in fitting), *([me] if here_now else [])])
        if not ring:
            return QueueHere(_queue_reason(req, local, peers, visited_could)), state
        nxt = next((n for n in ring if n > state.rr_last), ring[0])
        new_state = PlacementState(rr_last=nxt)
        if nxt == me:
            return RunHere(), new_state
        by_id = {p.node_id: p for p in fitting}
        after = [n for n in ring if n > nxt and n != me] + [n for n in ring if n < nxt and n != me]
        price = _pricer(local, topology)
        return _forward(local, _score(req, price, by_id[nxt]),
                        [_score(req, price, by_id[n]) for n in after[: settings.max_candidates - 1]],
                        topology), new_state

    if not fitting:
        if here_now:
            return RunHere(), state  # a GPU job that only this agent has room for
        return QueueHere(_queue_reason(req, local, peers, visited_could)), state

    price = _pricer(local, topology)
    scored = [_score(req, price, p) for p in fitting]
    if policy == "local-first":
        ranked = heapq.nsmallest(settings.max_candidates, scored, key=lambda r: (r[0], r[3]))
        return _forward(local, ranked[0], ranked[1:], topology), state

    if gpu_first:
        # Sampled best fit: the tightest fit of ``fit_sample`` fitting peers drawn at
        # random and of this agent, cost then load breaking ties. Origins whose stale
        # views agree on the tightest nodes draw different samples, so they do not all
        # offer their jobs to those few.
        drawn = rng.sample(scored, min(settings.fit_sample or len(scored), len(scored)))
        if here_now:  # this agent is always in the running, at no network cost: a job
            drawn = [*drawn, _score(req, lambda _: 0.0, local)]  # leaves it only for a tighter fit
        won = min(drawn, key=lambda r: (r[2], r[0], r[1]))  # an exact tie keeps the first drawn: random
        if won[3] == me:
            return RunHere(), state
        # The fallback list ranks the rest by fit, then cost, then load.
        passed = [r for r in scored if r is not won]
        others = heapq.nsmallest(settings.max_candidates - 1, passed, key=lambda r: (r[2], r[0], r[1], r[3]))
        return _forward(local, won, others, topology), state

    best = min(scored)
    cost_cap, load_cap = best[0] + settings.cost_slack_us, best[1] + settings.load_slack
    window = [r for r in scored if r[0] <= cost_cap and r[1] <= load_cap]
    # Within the window cost and load count as tied, so the tightest fit wins; what
    # stays tied is sampled.
    tightest = min(r[2] for r in window)
    near = [r for r in window if r[2] == tightest]
    if len(near) >= 2:
        a, b = rng.sample(near, 2)
        chosen = b if b[:3] < a[:3] else a  # an exact tie keeps the first draw: random
    else:
        chosen = near[0]
    passed = [r for r in scored if r is not chosen]
    others = heapq.nsmallest(settings.max_candidates - 1, passed)
    return _forward(local, chosen, others, topology), state


def _idle(v: ResourceVector) -> ResourceVector:
    """The vector as if nothing ran: used to explain what a node could never hold."""
    return replace(v, cpu_free=v.cpu_total, mem_free_mb=v.mem_total_mb, gpu_free=dict(v.gpu_total))
