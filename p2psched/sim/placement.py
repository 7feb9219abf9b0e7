"""Workload simulator for placement: the real ``place()`` in virtual time.

``p2psched sim placement --topology FILE --load 0.8 --jobs N --policy P`` replays one
Poisson job trace (random origins, exponential or fixed durations, sized to the
target load) through four schedulers and reports job completion time (JCT = finish
- submit, including network latency to the executor and back), hops per job and
messages per placement:

* ``p2p`` (or the ``--policy`` given): each host runs ``p2psched.placement.place``
  on its own stale view. Every host publishes its vector every ``gossip_interval``
  (random phase); a peer sees it after the topology's link latency. A forward costs
  a round trip: the target checks its real state with ``check_fit`` and accepts, or
  refuses and returns its fresh vector, and the origin tries the next candidate.
  A job no one takes waits in its origin's queue, retried when the origin frees a
  slot or refreshes its view (every ``gossip_interval``); new arrivals are placed at
  once and may overtake it, as they would on a real agent with room elsewhere.
* ``omniscient``: one central scheduler that sees every host exactly and instantly;
  a job starts on the host with the most free CPUs (a GPU job: the host whose free
  GPUs it would leave fewest, central best fit), or waits in one global FIFO. The
  ideal the others are measured against.
* ``random``: each job goes to a uniformly random host and waits in its FIFO.
* ``power-of-two``: probe two random hosts (Sparrow's per-task sampling), enqueue at
  the one with the shorter queue (running + waiting).

The first ``warmup`` fraction of jobs (by arrival) is left out of the figures, so
the empty cluster at t=0 does not flatter anyone.

GPU jobs (``--gpu-mix 1,1,1,2,4,8``): every job asks for a number of whole GPUs drawn
uniformly from the list, and each host offers ``--gpus-per-host`` whole GPU slots
(8), gossiped in its vector's ``gpu_free``/``gpu_total`` as an agent does. Each GPU
comes with one job slot of the host's cores, so the CPU vector follows the GPUs and
the load the agents rank by is the GPU busy fraction. The offered load counts GPU
slots. The ``p2p`` row ranks GPU jobs fit-first (the agent's default: the tightest
fit of the origin and a random sample of the fitting peers); ``--fit-sample N``
(repeatable) gives one such row per sample size instead, named ``p2p/d=N`` unless N
is the default; a ``p2p/fit-last`` row runs the same trace with
``PlacementSettings(gpu_first=False)``. So fragmentation and herding show in one
run: per request size, the JCT and the wait (start - arrival) of every scheduler.
Big jobs need a host whose GPUs are all free; a rule that scatters small jobs over
many hosts leaves few such hosts.

Broken hosts (``--broken K``): K hosts, drawn with the seed, are "black holes": up
and gossiping free slots, but every job that starts there fails for the host's
fault ``BROKEN_FAIL_S`` later and goes back to its origin to be placed again (a
*bounce*). ``random`` and ``power-of-two`` know nothing of it (an idle broken host
has the shortest queue, so power-of-two favours it); ``omniscient`` never uses
them; ``p2p`` runs each host's real ``HostHealth`` breaker (agent/health.py), which
gossips the runtime as impaired after 3 failures in a row, and a ``p2p/no-breaker``
row shows p2p without it.

Messages per placement are the scheduling messages one job needed until it started,
retries included: p2p 2 per forward attempt
(the job and the accept/refuse), omniscient 2 (submit, dispatch), random 1,
power-of-two 5 (2 probes, 2 replies, 1 job). Gossip runs regardless of load and is
reported by the gossip model instead.

The gossip model (``--gossip``) measures issue 4's topology-aware gossip: synchronous
push rounds, each node sending to ``fanout`` peers picked by
``p2psched.topology.pick_gossip_peers``; it reports the cross-spine messages a node
sends per round, and the rounds a rumour takes to reach every node, for a list of
same-leaf fractions (0.0 is plain uniform gossip).

Deterministic for a given ``--seed``: all randomness comes from seeded
``random.Random`` objects, and no set or dict order decides a choice.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import click

from p2psched.agent.health import HostHealth
from p2psched.cli.numbers import POSITIVE, FiniteFloat
from p2psched.placement import (
    DEFAULT_SETTINGS, POLICIES, Decision, Forward, JobRequest, PlacementSettings, PlacementState, QueueHere, Reject,
    RunHere, check_fit, place,
)
from p2psched.resources import NodeState, ResourceVector
from p2psched.topology import Topology, TopologyError, pick_gossip_peers

#: SWIM-style agents piggyback vectors on a protocol period of ~200 ms (memberlist's
#: LAN ProbeInterval is 1 s, its GossipInterval 200 ms); 200 ms is the staleness.
GOSSIP_INTERVAL_S = 0.2
#: 8 job slots per host: a GPU node with 8 devices, or a CPU node run at one job per
#: 4-core slot. Fewer slots make each host's queue burstier and forwarding busier.
CPUS_PER_HOST = 8
MEAN_DURATION_S = 5.0
MEM_PER_HOST_MB = 1 << 20
#: How long a job lasts on a broken host before it fails (its sandbox not building, its
#: worker dying): a host failure is quick, which is why a broken host looks idle.
BROKEN_FAIL_S = 0.05
#: GPU mode: whole GPUs per host, the size of a DGX/HGX-class node, so an 8-GPU job
#: needs a host with every GPU free.
GPUS_PER_HOST = 8
#: The slot type simulated hosts gossip: whole devices, as an agent names them.
GPU_SLOT = "whole"


@dataclass(slots=True)
class SimJob:
    idx: int
    origin: int
    arrival: float
    duration: float
    cpu: int  # job slots it takes (in GPU mode one per GPU)
    gpu: int = 0  # whole GPU slots it asks for; 0 for a CPU job
    start: float = -1.0
    finish: float = -1.0
    executor: int = -1
    hops: int = 0
    messages: int = 0
    tries: int = 0
    bounces: int = 0  # times it started on a broken host and came back
    failed_at: int = -1  # the host it last failed on


@dataclass(slots=True)
class Trace:
    jobs: list[SimJob]
    rate: float  # arrivals per second


def make_trace(n_hosts: int, slots_per_host: int, load: float, n_jobs: int, mean_duration: float,
               durations: str, seed: int, sizes: Sequence[int] = (1,), *, gpus: bool = False) -> Trace:
    """Poisson arrivals whose slot demand is ``load`` of the cluster's slots; each job
    takes a size drawn uniformly from ``sizes``: CPU slots, or with ``gpus`` whole GPUs."""
    rng = random.Random(seed)
    mean_size = statistics.fmean(sizes)
    rate = load * n_hosts * slots_per_host / (mean_size * mean_duration)
    t = 0.0
    jobs = []
    for i in range(n_jobs):
        t += rng.expovariate(rate)
        d = rng.expovariate(1.0 / mean_duration) if durations == "exp" else mean_duration
        origin = rng.randrange(n_hosts)  # drawn before the size, as traces before GPU mode were
        size = sizes[rng.randrange(len(sizes))]
        jobs.append(SimJob(i, origin, t, d, size, size if gpus else 0))
    return Trace(jobs, rate)


def pick_broken(n_hosts: int, k: int, seed: int) -> frozenset[int]:
    """The ``k`` broken hosts of a run, the same for every scheduler."""
    return frozenset(random.Random(seed * 7919 + 13).sample(range(n_hosts), k)) if k else frozenset()


def _fresh(trace: Trace) -> list[SimJob]:
    return [SimJob(j.idx, j.origin, j.arrival, j.duration, j.cpu, j.gpu) for j in trace.jobs]


class _EventLoop:
    """A virtual clock and a heap of callbacks; ``seq`` keeps equal times in FIFO order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self, until_done: Callable[[], bool]) -> None:
        while self._heap and not until_done():
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)


class _IndexedSet:
    """A set with O(1) add, remove and uniform random choice, iterated in a fixed order."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def add(self, x: int) -> None:
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: int) -> None:
        i = self.pos.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def choice(self, rng: random.Random) -> int:
        return self.items[rng.randrange(len(self.items))]


class _Scheduler:
    name = ""

    def __init__(self, topo: Topology, slots_per_host: int, jobs: list[SimJob], seed: int,
                 broken: frozenset[int] = frozenset(), *, gpus: bool = False) -> None:
        self.topo = topo
        self.broken = broken
        self.bounces = 0
        self.hosts = list(topo.hosts)
        self.n = len(self.hosts)
        self.slots = slots_per_host  # CPU job slots, or with ``gpus`` whole GPU slots
        self.gpus = gpus
        self.free = [slots_per_host] * self.n
        self.jobs = jobs
        self.rng = random.Random(seed)
        self.loop = _EventLoop()
        self.done = 0
        self.messages = 0
        self.placements = 0
        self._lat: dict[int, list[float]] = {}

    def lat(self, a: int, b: int) -> float:
        """One-way latency in seconds from host a to host b (topology cost is in us)."""
        row = self._lat.get(a)
        if row is None:
            price = self.topo.pricer(self.hosts[a])
            row = [price(h) * 1e-6 for h in self.hosts]
            self._lat[a] = row
        return row[b]

    def run(self) -> None:
        for j in self.jobs:
            self.loop.at(j.arrival, self.arrive, j)
        self.setup()
        self.loop.run(lambda: self.done == len(self.jobs))

    def setup(self) -> None:
        pass

    def arrive(self, job: SimJob) -> None:
        raise NotImplementedError

    def take(self, host: int, cpu: int) -> None:
        self.free[host] -= cpu
        assert self.free[host] >= 0, "a scheduler started more than a host holds"

    def give(self, host: int, cpu: int) -> None:
        self.free[host] += cpu

    def start(self, job: SimJob, host: int) -> None:
        """Start ``job`` on ``host`` now; the caller has taken its CPUs."""
        if host in self.broken:
            self.loop.at(self.loop.now + BROKEN_FAIL_S, self._bounce, job, host)
            return
        job.start = self.loop.now
        job.executor = host
        self.loop.at(self.loop.now + job.duration, self._end, job, host)

    def _bounce(self, job: SimJob, host: int) -> None:
        """The job failed for ``host``'s fault: its slot is free, and it goes back to
        its origin to be placed again."""
        self.give(host, job.cpu)
        job.bounces += 1
        job.failed_at = host
        self.bounces += 1
        self.host_failed(host)
        self.freed(host)
        self.loop.at(self.loop.now + self.lat(host, job.origin), self.arrive, job)

    def host_failed(self, host: int) -> None:
        pass

    def _end(self, job: SimJob, host: int) -> None:
        self.give(host, job.cpu)
        job.finish = self.loop.now + self.lat(host, job.origin)  # the result travels back to the origin
        self.done += 1
        self.freed(host)

    def freed(self, host: int) -> None:
        pass


class Omniscient(_Scheduler):
    name = "omniscient"

    def setup(self) -> None:
        self.queue: deque[SimJob] = deque()
        # Hosts bucketed by free slots: the scheduler takes the emptiest (or, for a GPU
        # job, the fullest that fits) in O(slots).
        self.by_free = [_IndexedSet() for _ in range(self.slots + 1)]
        for h in range(self.n):
            if h not in self.broken:  # it sees everything, broken hosts included
                self.by_free[self.free[h]].add(h)

    def take(self, host: int, cpu: int) -> None:
        self.by_free[self.free[host]].discard(host)
        super().take(host, cpu)
        self.by_free[self.free[host]].add(host)

    def give(self, host: int, cpu: int) -> None:
        self.by_free[self.free[host]].discard(host)
        super().give(host, cpu)
        self.by_free[self.free[host]].add(host)

    def _pick(self, cpu: int) -> int | None:
        # CPU jobs spread to the emptiest host; GPU jobs take the best fit (the host they
        # leave with the fewest free GPUs), which keeps whole hosts for the big requests.
        frees = range(cpu, self.slots + 1) if self.gpus else range(self.slots, cpu - 1, -1)
        for f in frees:
            if self.by_free[f].items:
                return self.by_free[f].choice(self.rng)
        return None

    def arrive(self, job: SimJob) -> None:
        self.placements += 1
        self.messages += 2
        h = None if self.queue else self._pick(job.cpu)  # FIFO: nobody overtakes the queue
        if h is None:
            self.queue.append(job)
        else:
            self._go(job, h)

    def _go(self, job: SimJob, h: int) -> None:
        self.take(h, job.cpu)  # reserved at dispatch; the job starts when its input lands
        job.hops = 0 if h == job.origin else 1
        self.loop.at(self.loop.now + self.lat(job.origin, h), self.start, job, h)

    def freed(self, host: int) -> None:
        while self.queue:
            h = self._pick(self.queue[0].cpu)
            if h is None:
                return
            self._go(self.queue.popleft(), h)


class _QueuedHosts(_Scheduler):
    """Hosts with their own FIFO queues: the random and power-of-two baselines."""

    def setup(self) -> None:
        self.queues: list[deque[SimJob]] = [deque() for _ in range(self.n)]
        self.running = [0] * self.n

    def enqueue(self, job: SimJob, h: int, delay: float) -> None:
        job.hops = 0 if h == job.origin else 1
        self.loop.at(self.loop.now + delay, self._land, job, h)

    def _land(self, job: SimJob, h: int) -> None:
        self.queues[h].append(job)
        self._drain(h)

    def _drain(self, h: int) -> None:
        q = self.queues[h]
        while q and self.free[h] >= q[0].cpu:
            job = q.popleft()
            self.running[h] += 1
            self.take(h, job.cpu)
            self.start(job, h)

    def freed(self, host: int) -> None:
        self.running[host] -= 1
        self._drain(host)


class RandomPlacement(_QueuedHosts):
    name = "random"

    def arrive(self, job: SimJob) -> None:
        self.placements += 1
        self.messages += 1
        h = self.rng.randrange(self.n)
        self.enqueue(job, h, self.lat(job.origin, h))


class PowerOfTwo(_QueuedHosts):
    name = "power-of-two"

    def arrive(self, job: SimJob) -> None:
        self.placements += 1
        self.messages += 5
        a, b = self.rng.sample(range(self.n), 2) if self.n > 1 else (0, 0)  # one host: both probes go to it
        # The probes' answers are current when they leave the hosts; the job follows.
        qa = len(self.queues[a]) + self.running[a]
        qb = len(self.queues[b]) + self.running[b]
        h = a if qa <= qb else b
        rtt = 2 * max(self.lat(job.origin, a), self.lat(job.origin, b))
        self.enqueue(job, h, rtt + self.lat(job.origin, h))


class PeerToPeer(_Scheduler):
    """Every host runs ``place()`` on its gossiped view; late binding on the target."""

    def __init__(self, topo: Topology, slots_per_host: int, jobs: list[SimJob], seed: int,
                 policy: str, gossip_interval: float, broken: frozenset[int] = frozenset(),
                 breaker: bool = True, *, gpus: bool = False, settings: PlacementSettings = DEFAULT_SETTINGS) -> None:
        super().__init__(topo, slots_per_host, jobs, seed, broken, gpus=gpus)
        self.policy = policy
        self.settings = settings
        # "p2p/random" (random over peers gossip says fit) is not the blind "random" baseline.
        self.name = "p2p" if policy == "p2p" else f"p2p/{policy}"
        if gpus and policy == "p2p":
            if not settings.gpu_first:
                self.name += "/fit-last"
            elif settings.fit_sample != DEFAULT_SETTINGS.fit_sample:
                self.name += f"/d={settings.fit_sample}"
        if not breaker:
            self.name += "/no-breaker"
        self.breaker = breaker
        self.interval = gossip_interval
        self.refusals = 0
        self.index = {h: i for i, h in enumerate(self.hosts)}

    def setup(self) -> None:
        self.queues: list[deque[SimJob]] = [deque() for _ in range(self.n)]
        self.running = [0] * self.n
        # Each agent's breaker per runtime (the simulated jobs are all of one runtime);
        # only broken hosts ever fail a job, so only they need one.
        self.health = {h: HostHealth() for h in self.broken} if self.breaker else {}
        self.states = [PlacementState() for _ in range(self.n)]
        self.rngs = [random.Random(self.rng.getrandbits(64)) for _ in range(self.n)]
        self.pub: list[NodeState] = [self._snapshot(h) for h in range(self.n)]
        self.prev: list[NodeState] = list(self.pub)
        self.pub_time = [0.0] * self.n
        # What an origin learnt from a refusal, newer than gossip: origin -> host -> (time, state).
        self.heard: list[dict[int, tuple[float, NodeState]]] = [{} for _ in range(self.n)]
        self.recent: deque[tuple[float, int]] = deque()
        self.max_lat = self.topo.max_host_cost() * 1e-6
        for h in range(self.n):
            self.loop.at(self.rng.uniform(0, self.interval), self._publish, h)

    def _snapshot(self, h: int) -> NodeState:
        health = self.health.get(h)
        v = ResourceVector(
            cpu_total=float(self.slots), cpu_free=float(self.free[h]), mem_total_mb=MEM_PER_HOST_MB,
            mem_free_mb=MEM_PER_HOST_MB, queue_len=len(self.queues[h]), running=self.running[h],
            impaired=health.impaired if health is not None else (),
            gpu_free={GPU_SLOT: self.free[h]} if self.gpus else {},
            gpu_total={GPU_SLOT: self.slots} if self.gpus else {},
        )
        return NodeState(self.hosts[h], vector=v, position=self.hosts[h])

    def _publish(self, h: int) -> None:
        health = self.health.get(h)
        if health is not None:
            health.tick(self.loop.now)  # half-open after the cooldown: the next job decides
        self.prev[h] = self.pub[h]
        self.pub[h] = self._snapshot(h)
        self.pub_time[h] = self.loop.now
        self.recent.append((self.loop.now, h))
        if self.done < len(self.jobs):
            self.loop.at(self.loop.now + self.interval, self._publish, h)
        # The host's view refreshes on the same period: a good moment to retry its queue.
        self._retry(h)

    def _view(self, o: int) -> list[NodeState]:
        """Origin ``o``'s gossiped view: every host's last vector that has reached it."""
        now = self.loop.now
        view = list(self.pub)
        # A vector published less than a link latency ago is still on the wire to o.
        recent = self.recent
        while recent and recent[0][0] < now - self.max_lat:
            recent.popleft()
        for t, j in recent:
            if now < t + self.lat(j, o):
                view[j] = self.prev[j]
        heard = self.heard[o]
        for j, (t, st) in list(heard.items()):
            if t > self.pub_time[j]:
                view[j] = st
            else:
                del heard[j]
        del view[o]
        return view

    def arrive(self, job: SimJob) -> None:
        self._place(job, queued=False)

    def _place(self, job: SimJob, queued: bool) -> bool:
        """Place ``job`` at its origin; False if it (still) has to wait there."""
        o = job.origin
        self.placements += 1
        req = JobRequest(str(job.idx), cpu=job.cpu, mem_mb=1, gpu=job.gpu)
        local, view = self._snapshot(o), self._view(o)
        decision: Decision | None = None
        if job.failed_at == o:
            # As the agent does: a job its own host could not run goes to a peer with
            # room, as if this host were draining; with none, it runs here again.
            away, self.states[o] = place(req, replace(local, vector=replace(local.vector, draining=True)), view,
                                         self.topo, rng=self.rngs[o], policy=self.policy,  # type: ignore[arg-type]
                                         state=self.states[o], settings=self.settings)
            decision = away if isinstance(away, Forward) else None
        if decision is None:
            decision, self.states[o] = place(req, local, view, self.topo,
                                             rng=self.rngs[o], policy=self.policy,  # type: ignore[arg-type]
                                             state=self.states[o], settings=self.settings)
        if isinstance(decision, RunHere):
            if queued:
                self.queues[o].popleft()
            self.running[o] += 1
            self.take(o, job.cpu)
            self.start(job, o)
            return True
        if isinstance(decision, Forward):
            if queued:
                self.queues[o].popleft()
            self._try(job, [self.index[c.node_id] for c in decision.candidates], 0)
            return True
        if isinstance(decision, Reject):
            raise RuntimeError(f"job {job.idx} rejected: {decision.reason}")
        assert isinstance(decision, QueueHere)
        if not queued:
            self.queues[o].append(job)
        return False

    def _try(self, job: SimJob, cands: list[int], i: int) -> None:
        target = cands[i]
        job.tries += 1
        self.messages += 2
        self.loop.at(self.loop.now + self.lat(job.origin, target), self._offer, job, cands, i)

    def _offer(self, job: SimJob, cands: list[int], i: int) -> None:
        t = cands[i]
        real = self._snapshot(t)
        if check_fit(JobRequest(str(job.idx), cpu=job.cpu, mem_mb=1, gpu=job.gpu), real) is None:
            job.hops += 1
            self.running[t] += 1
            self.take(t, job.cpu)
            self.start(job, t)
            return
        self.refusals += 1
        self.loop.at(self.loop.now + self.lat(t, job.origin), self._refused, job, cands, i, real)

    def _refused(self, job: SimJob, cands: list[int], i: int, fresh: NodeState) -> None:
        o = job.origin
        self.heard[o][cands[i]] = (self.loop.now, fresh)
        if i + 1 < len(cands):
            self._try(job, cands, i + 1)
            return
        # Every candidate refused: back to the head of the origin's queue, placed again
        # when the origin's view or capacity changes.
        self.queues[o].appendleft(job)

    def _retry(self, h: int) -> None:
        q = self.queues[h]
        while q:
            if not self._place(q[0], queued=True):
                return

    def freed(self, host: int) -> None:
        self.running[host] -= 1
        self._retry(host)

    def host_failed(self, host: int) -> None:
        health = self.health.get(host)  # only broken hosts fail, so only they need one
        if health is not None:
            health.failed("wasm", self.loop.now, "broken host")


@dataclass(slots=True)
class SizeFigures:
    """The figures of the jobs of one request size (GPU mode): fragmentation hits the big ones."""

    jobs: int
    mean_jct: float
    p50_jct: float
    p99_jct: float
    mean_wait: float  # start - arrival
    p99_wait: float


@dataclass(slots=True)
class Report:
    scheduler: str
    jobs: int
    mean_jct: float
    p50_jct: float
    p99_jct: float
    mean_wait: float
    hops_per_job: float
    messages_per_placement: float
    mean_cost_us: float  # network cost from origin to executor, the topology's weight
    extra: dict[str, float] = field(default_factory=dict)
    by_size: dict[int, SizeFigures] = field(default_factory=dict)  # GPU mode: GPUs asked -> figures


def _q(sorted_xs: Sequence[float], p: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(p * len(sorted_xs)) - 1))]


def _report(s: _Scheduler, warmup: float) -> Report:
    skip = int(len(s.jobs) * warmup)
    measured = s.jobs[skip:]
    jct = sorted(j.finish - j.arrival for j in measured)
    waits = [j.start - j.arrival for j in measured]

    def q(p: float) -> float:
        return _q(jct, p)

    by_size: dict[int, SizeFigures] = {}
    if s.gpus:
        for g in sorted({j.gpu for j in measured}):
            mine = [j for j in measured if j.gpu == g]
            js = sorted(j.finish - j.arrival for j in mine)
            ws = sorted(j.start - j.arrival for j in mine)
            by_size[g] = SizeFigures(len(mine), statistics.fmean(js), _q(js, 0.5), _q(js, 0.99),
                                     statistics.fmean(ws), _q(ws, 0.99))

    extra: dict[str, float] = {}
    if s.broken:
        extra["bounces_per_job"] = sum(j.bounces for j in measured) / len(measured)
        extra["jobs_bounced_pct"] = 100.0 * sum(1 for j in measured if j.bounces) / len(measured)
    if isinstance(s, PeerToPeer):
        extra["refusals_per_job"] = s.refusals / len(s.jobs)
        extra["tries_per_forwarded_job"] = (
            sum(j.tries for j in s.jobs) / max(1, sum(1 for j in s.jobs if j.tries))
        )
    return Report(
        s.name, len(measured), statistics.fmean(jct), q(0.5), q(0.99), statistics.fmean(waits),
        statistics.fmean(j.hops for j in measured), s.messages / max(1, len(s.jobs)),
        statistics.fmean(s.lat(j.origin, j.executor) * 1e6 for j in measured), extra, by_size,
    )


def simulate(topo: Topology, *, load: float, jobs: int, policy: str = "p2p", seed: int = 1,
             cpus_per_host: int = CPUS_PER_HOST, mean_duration: float = MEAN_DURATION_S,
             durations: str = "exp", gossip_interval: float = GOSSIP_INTERVAL_S, warmup: float = 0.1,
             baselines: bool = True, broken: int = 0, gpu_mix: Sequence[int] = (),
             gpus_per_host: int = GPUS_PER_HOST, fit_samples: Sequence[int] = ()) -> list[Report]:
    """Run the trace through ``policy`` and (if ``baselines``) the three comparison
    schedulers; with ``broken`` black-hole hosts, p2p also without its breaker. With
    ``gpu_mix`` the jobs are GPU jobs of those sizes, and p2p runs fit-first once per
    sample size in ``fit_samples`` (by default once, with the default sample), then
    fit-last."""
    if not 0 <= broken < len(topo.hosts):
        raise ValueError(f"broken hosts must number 0 to {len(topo.hosts) - 1}, not {broken}")
    if not (cpus_per_host >= 1 and 0 < mean_duration < math.inf and 0 < gossip_interval < math.inf):
        # 0 divides the arrival rate by zero; a 0 gossip interval republishes forever at one instant
        raise ValueError(f"cpus_per_host must be at least 1 and mean_duration and gossip_interval finite and "
                         f"above 0, not {cpus_per_host}, {mean_duration} and {gossip_interval}")
    gpus = bool(gpu_mix)
    if gpus and not all(0 < g <= gpus_per_host for g in gpu_mix):
        raise ValueError(f"every GPU request must be 1 to {gpus_per_host} (the GPUs of a host), not {list(gpu_mix)}")
    slots = gpus_per_host if gpus else cpus_per_host
    trace = make_trace(len(topo.hosts), slots, load, jobs, mean_duration, durations, seed, gpu_mix or (1,), gpus=gpus)
    bad = pick_broken(len(topo.hosts), broken, seed)

    def p2p(**kw: Any) -> PeerToPeer:
        return PeerToPeer(topo, slots, _fresh(trace), seed + 1, policy, gossip_interval, bad, gpus=gpus, **kw)

    runs: list[_Scheduler]
    if gpus and policy == "p2p":
        # fit-first (the default) once per sample size asked for, then fit-last.
        runs = [p2p(settings=replace(DEFAULT_SETTINGS, gpu_first=True, fit_sample=d))
                for d in fit_samples or (DEFAULT_SETTINGS.fit_sample,)]
        runs.append(p2p(settings=replace(DEFAULT_SETTINGS, gpu_first=False)))
    else:
        runs = [p2p()]
    if broken:
        runs.append(p2p(breaker=False))
    if baselines:
        runs += [
            Omniscient(topo, slots, _fresh(trace), seed + 2, bad, gpus=gpus),
            RandomPlacement(topo, slots, _fresh(trace), seed + 3, bad, gpus=gpus),
            PowerOfTwo(topo, slots, _fresh(trace), seed + 4, bad, gpus=gpus),
        ]
    out = []
    for s in runs:
        s.run()
        out.append(_report(s, warmup))
    return out


# -- topology-aware gossip -------------------------------------------------------------


@dataclass(slots=True)
class GossipReport:
    same_leaf_fraction: float
    cross_spine_per_node_round: float
    rounds_mean: float
    rounds_max: int


def gossip_model(topo: Topology, *, fractions: Sequence[float], fanout: int = 3, trials: int = 20,
                 seed: int = 1) -> list[GossipReport]:
    """Cross-spine messages per node per round, and push rounds until every node knows a rumour."""
    hosts = list(topo.hosts)
    leaf = {h: topo.leaf_of(h) for h in hosts}
    by_leaf: dict[str, list[str]] = {}
    for h in hosts:
        by_leaf.setdefault(leaf[h], []).append(h)
    same = {h: [o for o in by_leaf[leaf[h]] if o != h] for h in hosts}
    others = {h: [o for o in hosts if o != h] for h in hosts}
    out = []
    for f in fractions:
        rng = random.Random(seed)
        rounds = []
        cross = 0
        for _ in range(trials):
            informed = {hosts[rng.randrange(len(hosts))]}
            r = 0
            while len(informed) < len(hosts):
                r += 1
                new = set()
                for h in sorted(informed):
                    for peer in pick_gossip_peers(rng, same[h], others[h], fanout, f):
                        new.add(peer)
                informed |= new
            rounds.append(r)
            # Steady-state traffic: every node gossips every round, informed or not.
            for h in hosts:
                for peer in pick_gossip_peers(rng, same[h], others[h], fanout, f):
                    cross += leaf[peer] != leaf[h]
        out.append(GossipReport(f, cross / (trials * len(hosts)), statistics.fmean(rounds), max(rounds)))
    return out


# -- command line ----------------------------------------------------------------------


def _gpu_mix(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        mix = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of GPU counts, e.g. 1,1,1,2,4,8 "
                                 "(each job asks for one of them, drawn uniformly)") from None
    if not all(g > 0 for g in mix):
        raise click.BadParameter(f"{value!r} holds a count below 1; every job asks for at least one whole GPU")
    return mix


@click.command("placement")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False), required=True,
              help="Topology file; one simulated agent per host.")
@click.option("--load", type=float, default=0.8, show_default=True,
              help="Offered load: busy slot fraction (0-1); GPU slots with --gpu-mix.")
@click.option("--jobs", type=int, default=20000, show_default=True, help="Jobs in the trace.")
@click.option("--policy", type=click.Choice(POLICIES), default="p2p", show_default=True,
              help="Placement policy every simulated agent runs.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--cpus-per-host", type=click.IntRange(min=1), default=CPUS_PER_HOST, show_default=True,
              help="Job slots per host.")
@click.option("--mean-duration", type=POSITIVE, default=MEAN_DURATION_S, show_default=True,
              help="Mean job run time, s.")
@click.option("--durations", type=click.Choice(["exp", "fixed"]), default="exp", show_default=True)
@click.option("--gossip-interval", type=POSITIVE, default=GOSSIP_INTERVAL_S, show_default=True,
              help="How often each agent's vector is re-published (its staleness), s.")
@click.option("--warmup", type=float, default=0.1, show_default=True, help="Fraction of first jobs left out.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also run omniscient, random and power-of-two on the same trace.")
@click.option("--gossip/--no-gossip", "gossip", default=False, show_default=True,
              help="Also run the topology-aware gossip model.")
@click.option("--same-leaf-fraction", "fractions", type=FiniteFloat(0, 1), multiple=True,
              help="Same-leaf fractions for the gossip model (repeatable; default 0, 0.5, 0.8).")
@click.option("--fanout", type=click.IntRange(min=1), default=3, show_default=True,
              help="Gossip targets per node per round.")
@click.option("--broken", type=click.IntRange(min=0), default=0, show_default=True,
              help="Black-hole hosts: they gossip free slots, but every job started there fails at once.")
@click.option("--gpu-mix", "gpu_mix", callback=_gpu_mix, metavar="N,N,...",
              help="GPU jobs: each asks for whole GPUs, a count drawn uniformly from this list (e.g. 1,1,1,2,4,8); "
                   "the load counts GPU slots, and figures are given per request size.")
@click.option("--gpus-per-host", type=click.IntRange(min=1), default=GPUS_PER_HOST, show_default=True,
              help="With --gpu-mix: whole GPU slots per host (they replace --cpus-per-host).")
@click.option("--fit-sample", "fit_samples", type=click.IntRange(min=0), multiple=True, metavar="N",
              help="With --gpu-mix: a fit-first p2p row taking the tightest fit of N sampled nodes (0: of all); "
                   f"repeatable [{DEFAULT_SETTINGS.fit_sample}].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cli(topology_file: str, load: float, jobs: int, policy: str, seed: int, cpus_per_host: int,
        mean_duration: float, durations: str, gossip_interval: float, warmup: float, baselines: bool,
        gossip: bool, fractions: tuple[float, ...], fanout: int, broken: int, gpu_mix: tuple[int, ...],
        gpus_per_host: int, fit_samples: tuple[int, ...], as_json: bool) -> None:
    """Drive the placement core through virtual time and compare it with baselines."""
    if not 0 < load < 1:
        raise click.BadParameter(f"is {load}; it must lie strictly between 0 and 1 (above 1 queues grow forever)",
                                 param_hint="--load")
    if jobs < 10:
        raise click.BadParameter(f"is {jobs}; use at least 10 jobs (thousands for stable percentiles)",
                                 param_hint="--jobs")
    if not 0 <= warmup < 1:
        raise click.BadParameter(f"is {warmup}; it must lie in [0, 1)", param_hint="--warmup")
    ctx = click.get_current_context()
    given = {p: ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT
             for p in ("fit_samples", "gpus_per_host", "fractions", "fanout")}
    for flag, param, needed, needs in (
            ("--fit-sample", "fit_samples", bool(gpu_mix), "--gpu-mix"),
            ("--fit-sample", "fit_samples", policy == "p2p", "--policy p2p"),
            ("--gpus-per-host", "gpus_per_host", bool(gpu_mix), "--gpu-mix"),
            ("--same-leaf-fraction", "fractions", gossip, "--gossip"),
            ("--fanout", "fanout", gossip, "--gossip")):
        if given[param] and not needed:
            raise click.UsageError(f"{flag} needs {needs}; without it the flag would be ignored")
    try:
        topo = Topology.load(topology_file)
    except TopologyError as e:
        raise click.ClickException(str(e)) from None
    if broken >= len(topo.hosts):
        raise click.BadParameter(f"is {broken}; the topology has {len(topo.hosts)} hosts, and at least one must work",
                                 param_hint="--broken")
    if gpu_mix and max(gpu_mix) > gpus_per_host:
        raise click.BadParameter(f"asks for {max(gpu_mix)} GPUs but a host has {gpus_per_host}; "
                                 f"raise --gpus-per-host or drop the larger counts", param_hint="--gpu-mix")
    reports = simulate(topo, load=load, jobs=jobs, policy=policy, seed=seed, cpus_per_host=cpus_per_host,
                       mean_duration=mean_duration, durations=durations, gossip_interval=gossip_interval,
                       warmup=warmup, baselines=baselines, broken=broken, gpu_mix=gpu_mix,
                       gpus_per_host=gpus_per_host, fit_samples=fit_samples)
    slots = gpus_per_host if gpu_mix else cpus_per_host
    greports = gossip_model(topo, fractions=fractions or (0.0, 0.5, 0.8), fanout=fanout, seed=seed) if gossip else []
    omni = next((r for r in reports if r.scheduler == "omniscient"), None)
    ideal = omni.mean_jct if omni else None
    if as_json:
        click.echo(json.dumps({
            "topology": topo.name, "hosts": len(topo.hosts), "load": load, "jobs": jobs, "seed": seed,
            "cpus_per_host": cpus_per_host, "mean_duration": mean_duration, "durations": durations, "broken": broken,
            **({"gpu_mix": list(gpu_mix), "gpus_per_host": gpus_per_host} if gpu_mix else {}),
            "results": [{**asdict(r), **({"vs_omniscient": r.mean_jct / ideal} if ideal else {})} for r in reports],
            "gossip": [asdict(g) for g in greports],
        }, indent=2))
        return
    kind = f"whole GPU slots, GPU jobs of {','.join(map(str, gpu_mix))} GPUs" if gpu_mix else "slots"
    click.echo(f"topology {topo.name}: {len(topo.hosts)} hosts x {slots} {kind}, load {load:g}, "
               f"{jobs} jobs ({durations} durations, mean {mean_duration:g} s), seed {seed}, "
               f"first {warmup:.0%} left out")
    click.echo(f"{'scheduler':<16}{'mean JCT':>10}{'p50':>9}{'p99':>9}{'vs ideal':>10}{'mean wait':>11}"
               f"{'hops/job':>10}{'msgs/placement':>16}{'cost us':>9}")
    for r in reports:
        rel = f"{r.mean_jct / ideal:.3f}x" if ideal else "-"
        click.echo(f"{r.scheduler:<16}{r.mean_jct:>9.3f}s{r.p50_jct:>8.3f}s{r.p99_jct:>8.3f}s{rel:>10}"
                   f"{r.mean_wait * 1e3:>9.1f}ms{r.hops_per_job:>10.3f}{r.messages_per_placement:>16.2f}"
                   f"{r.mean_cost_us:>9.2f}")
        for size, f in r.by_size.items():
            ref = omni.by_size.get(size) if omni else None
            rel = f"{f.mean_jct / ref.mean_jct:.3f}x" if ref else "-"
            label = f"  {size} GPU" + ("s" if size != 1 else "")
            click.echo(f"{label:<16}{f.mean_jct:>9.3f}s{f.p50_jct:>8.3f}s{f.p99_jct:>8.3f}s{rel:>10}"
                       f"{f.mean_wait * 1e3:>9.1f}ms  p99 wait {f.p99_wait:.3f}s, {f.jobs} jobs")
        for k, v in r.extra.items():
            click.echo(f"{'':<16}{k}: {v:.3f}")
    if greports:
        click.echo(f"gossip model: fanout {fanout}, push rounds from one node until all {len(topo.hosts)} know")
        click.echo(f"{'same-leaf':>10}{'cross-spine msgs/node/round':>30}{'rounds mean':>13}{'max':>6}")
        for g in greports:
            click.echo(f"{g.same_leaf_fraction:>10.2f}{g.cross_spine_per_node_round:>30.3f}"
                       f"{g.rounds_mean:>13.2f}{g.rounds_max:>6}")
