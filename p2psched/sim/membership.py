"""The membership core on a simulated network, in virtual time.

``SimCluster`` runs N unmodified ``Membership`` cores over ``SimNetwork``; nothing in
the core knows it is simulated. ``run_experiment`` runs the scenario behind
``p2psched sim membership``: a settled cluster, a steady-state window (bytes per
node per second), one node-state update (how fast it spreads), crashes (how fast
every live node declares them dead, and false positives), and optionally a
partition that heals (how fast the cluster converges again).
"""

from __future__ import annotations

import functools
import gc
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Callable

from p2psched.membership.keyring import SEALED_OVERHEAD
from p2psched.membership.messages import Addr
from p2psched.membership.settings import MembershipSettings
from p2psched.membership.swim import Action, Event, Membership, Send, SendTcp, TcpProbe
from p2psched.resources import NodeState, ResourceVector
from p2psched.sim.network import Endpoint, SimNetwork
from p2psched.topology.model import Topology

# IPv4 + UDP headers, counted so that bytes per node per second is what a NIC sees.
UDP_IP_HEADERS = 28


@dataclass
class SimNode:
    node_id: str
    addr: Addr
    core: Membership
    scheduled: float = math.inf


EventListener = Callable[[float, SimNode, Event], None]


class SimCluster:
    def __init__(
        self,
        n: int,
        settings: MembershipSettings,
        seed: int,
        loss: float = 0.0,
        latency: Callable[[Addr, Addr], float] | None = None,
        duplicate: float = 0.0,
        group_of: Callable[[str], str | None] | None = None,
        ids: list[str] | None = None,
    ) -> None:
        """``ids``: node ids (default n0000, n0001, ...); a topology simulation passes
        its host ids so that ``latency`` and ``group_of`` can look them up."""
        # A thousand nodes each knowing a thousand members is a million long-lived
        # objects; the cyclic GC would rescan them all, again and again, for nothing.
        gc.disable()
        self.rng = random.Random(seed)
        self.settings = settings
        if latency is None:
            jitter = random.Random(seed + 1)
            latency = lambda a, b: 0.001 + 0.002 * jitter.random()  # noqa: E731  2 +- 1 ms
        self.net = SimNetwork(self.rng, latency=latency, loss=loss, duplicate=duplicate,
                              overhead=SEALED_OVERHEAD + UDP_IP_HEADERS)
        self.listeners: list[EventListener] = []
        self.nodes: dict[Addr, SimNode] = {}
        self.by_id: dict[str, SimNode] = {}
        budget = settings.max_datagram - SEALED_OVERHEAD
        names = ids if ids is not None else [f"n{i:04d}" for i in range(n)]
        pairs = [(names[i], (f"10.{i // 250}.{i % 250}.1", 7946)) for i in range(n)]
        states = {node_id: self._initial_state(node_id) for node_id, _ in pairs}
        for s in states.values():
            s.version = 1  # what each core publishes first
        peers: list[tuple[str, Addr, NodeState | None]] = [(node_id, addr, states[node_id]) for node_id, addr in pairs]
        self.addr_of = dict(pairs)
        for node_id, addr in pairs:
            core = Membership(settings, node_id, addr, random.Random(self.rng.random()), 0.0,
                              packet_budget=budget, local_state=self._initial_state(node_id), group_of=group_of)
            core.bootstrap(0.0, peers)
            node = SimNode(node_id, addr, core)
            self.nodes[addr] = node
            self.by_id[node_id] = node
            self.net.attach(addr, Endpoint(
                on_datagram=functools.partial(self._on_datagram, node),
                on_stream=functools.partial(self._on_stream, node),
                on_resume=functools.partial(self._schedule, node),
            ))
        for node in self.nodes.values():
            node.core.tick(0.0)  # publish the first state and settle timers quietly
            self._schedule(node)
        gc.freeze()
        gc.enable()

    @staticmethod
    def _initial_state(node_id: str) -> NodeState:
        return NodeState(node_id=node_id, vector=ResourceVector(cpu_total=64, cpu_free=64, mem_total_mb=262144,
                                                                mem_free_mb=262144, gpu_free={"a100": 8},
                                                                gpu_total={"a100": 8}),
                         agent_version="0.1.0", api="10.0.0.1:8080", transfer="10.0.0.1:8081", position=node_id)

    # --- driving the cores ------------------------------------------------------------

    def _schedule(self, node: SimNode) -> None:
        t = node.core.next_deadline()
        if t < node.scheduled:
            node.scheduled = t
            self.net.at(t, self._tick, node, t)

    def _tick(self, node: SimNode, t: float) -> None:
        if node.scheduled != t:
            return  # superseded by an earlier deadline
        node.scheduled = math.inf
        if not self.net.is_up(node.addr):
            return  # crashed, or paused: rescheduled on resume
        self._do(node, node.core.tick(self.net.now))
        self._schedule(node)

    def _on_datagram(self, node: SimNode, src: Addr, data: bytes) -> None:
        self._do(node, node.core.handle_packet(self.net.now, src, data))
        self._schedule(node)

    def _on_stream(self, node: SimNode, src: Addr, data: bytes) -> bytes | None:
        reply, actions = node.core.handle_stream(self.net.now, src, data)
        self._do(node, actions)
        self._schedule(node)
        return reply

    def _do(self, node: SimNode, actions: list[Action]) -> None:
        now = self.net.now
        for a in actions:
            if isinstance(a, Send):
                self.net.send(node.addr, a.addr, a.data)
            elif isinstance(a, Event):
                for listener in self.listeners:
                    listener(now, node, a)
            elif isinstance(a, SendTcp):
                on_reply = functools.partial(self._after_stream, node, a.addr) if a.expect_reply else None
                self.net.stream(node.addr, a.addr, a.data, on_reply)
            elif isinstance(a, TcpProbe):
                self.net.stream(node.addr, a.addr, a.data, functools.partial(self._after_probe, node, a.seq))

    def _after_stream(self, node: SimNode, addr: Addr, reply: bytes | None) -> None:
        if self.net.is_up(node.addr):
            self._do(node, node.core.handle_stream_reply(self.net.now, addr, reply))
            self._schedule(node)

    def _after_probe(self, node: SimNode, seq: int, reply: bytes | None) -> None:
        if self.net.is_up(node.addr):
            self._do(node, node.core.tcp_probe_result(self.net.now, seq, reply))
            self._schedule(node)

    # --- scenario helpers --------------------------------------------------------------

    def run_until(self, t: float) -> None:
        self.net.run_until(t)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if not self.net.endpoints[n.addr].crashed]

    def crash(self, node: SimNode) -> None:
        self.net.crash(node.addr)

    def converged(self) -> bool:
        """Every live node sees every live node alive, and no one else alive or suspect."""
        live = self.live()
        n = len(live)
        for node in live:
            c = node.core.counts()
            if c["alive"] != n or c["suspect"] != 0:
                return False
        return True

    def bytes_sent(self) -> tuple[int, int]:
        udp = sum(s.bytes_sent for s in self.net.stats.values())
        tcp = sum(s.stream_bytes_sent for s in self.net.stats.values())
        return udp, tcp


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


#: How long the simulator watches one node's state update spread.
UPDATE_WINDOW_S = 10.0


@dataclass
class Report:
    nodes: int
    loss: float
    seed: int
    udp_bytes_per_node_s: float = math.nan
    tcp_bytes_per_node_s: float = math.nan
    all_know_dead: list[float] = field(default_factory=list)  # per crashed node: last observer
    observer_dead: list[float] = field(default_factory=list)  # per (observer, crashed node)
    undetected: int = 0  # crashed nodes some live node still had not declared dead at the end
    false_positives: int = 0
    update_9999_s: float = math.nan
    update_rounds: float = math.nan
    update_reached: int = 0  # nodes that learned the update within UPDATE_WINDOW_S
    push_pull_s: float = 0.0
    partition_heal_s: float | None = None
    partition_converged: bool | None = None
    cpu_note: str = ""

    def lines(self) -> list[str]:
        out = [f"membership simulation: {self.nodes} nodes, loss {self.loss:.2%}, seed {self.seed}"]
        out.append(f"steady state: {self.udp_bytes_per_node_s:.0f} B/node/s UDP (with 37 B sealing + 28 B UDP/IP "
                   f"per datagram), {self.tcp_bytes_per_node_s:.0f} B/node/s TCP push-pull")
        if self.all_know_dead:
            a = self.all_know_dead
            out.append(f"crash known to all live nodes: p50 {_pct(a, .5):.2f}s  p99 {_pct(a, .99):.2f}s  "
                       f"max {max(a):.2f}s  ({len(a)} crashed nodes)")
            o = self.observer_dead
            out.append(f"crash known per observer:      p50 {_pct(o, .5):.2f}s  p99 {_pct(o, .99):.2f}s  max {max(o):.2f}s")
        if self.undetected:
            out.append(f"crashed nodes not yet declared dead by every live node: {self.undetected}")
        out.append(f"false positives (healthy nodes declared dead): {self.false_positives}")
        if math.isnan(self.update_9999_s):  # gossip left some behind: push-pull brings them up later
            out.append(f"update reached {self.update_reached} of {self.nodes - 1} nodes within "
                       f"{UPDATE_WINDOW_S:g}s by gossip, not 99.99%; the rest learn it at their next push-pull "
                       f"(every {self.push_pull_s:g}s)")
        else:
            out.append(f"update reached 99.99% of nodes in {self.update_9999_s:.2f}s "
                       f"({self.update_rounds:.1f} gossip rounds)")
        if self.partition_heal_s is not None:
            state = "converged" if self.partition_converged else "NOT converged"
            out.append(f"after the partition healed: {state} in {self.partition_heal_s:.2f}s")
        return out


def run_experiment(
    n: int,
    loss: float,
    crashes: int,
    seed: int,
    settings: MembershipSettings | None = None,
    steady: float = 30.0,
    partition: tuple[float, float, float] | None = None,
    topology: Topology | None = None,
) -> Report:
    """``partition``: (fraction of nodes cut off, start after the crash phase, duration).
    ``topology``: nodes sit on its first n hosts; link latency is the fabric path's
    latency plus 0.5-1.5 ms of host network stack, and gossip prefers the same leaf
    with probability settings.gossip_same_group_fraction."""
    settings = settings or MembershipSettings(insecure=True, mdns=False)
    if topology is None:
        cluster = SimCluster(n, settings, seed, loss=loss)
        rng_names = [f"n{i:04d}" for i in range(n)]
    else:
        if n > len(topology.hosts):
            raise ValueError(f"the topology has {len(topology.hosts)} hosts; ask for at most that many --nodes")
        rng_names = list(topology.hosts[:n])
        host_at: dict[Addr, str] = {}
        jitter = random.Random(seed + 1)

        def latency(a: Addr, b: Addr) -> float:
            return topology.cost(host_at[a], host_at[b]) * 1e-6 + 0.0005 + 0.001 * jitter.random()

        cluster = SimCluster(n, settings, seed, loss=loss, latency=latency, ids=rng_names,
                             group_of=topology.leaf_of)
        host_at.update({addr: node_id for node_id, addr in cluster.addr_of.items()})
    rep = Report(n, loss, seed)
    rng = random.Random(seed + 7)
    crashed: dict[str, float] = {}
    dead_seen: dict[str, dict[str, float]] = {}
    # A partition makes deaths true, not false: each side really cannot reach the other,
    # and the news spreads to both sides when it heals. So false positives are not
    # counted from the partition's start until the cluster has converged again.
    counting_fp = [True]
    update: dict[str, float] = {}
    target_version = [math.inf]
    updater = [""]

    def listen(now: float, node: SimNode, ev: Event) -> None:
        if ev.kind == "dead":
            if ev.node_id in crashed:
                dead_seen.setdefault(ev.node_id, {}).setdefault(node.node_id, now)
            elif counting_fp[0]:
                rep.false_positives += 1
        elif ev.kind == "updated" and ev.node_id == updater[0]:
            st = node.core.get(ev.node_id)
            if st is not None and st.version >= target_version[0]:
                update.setdefault(node.node_id, now)

    cluster.listeners.append(listen)

    # 1. steady state: the cluster settles for a few seconds, then a window is measured.
    warm = 3.0
    cluster.run_until(warm)
    u0, t0 = cluster.bytes_sent()
    cluster.run_until(warm + steady)
    u1, t1 = cluster.bytes_sent()
    rep.udp_bytes_per_node_s = (u1 - u0) / n / steady
    rep.tcp_bytes_per_node_s = (t1 - t0) / n / steady

    # 2. one node's state changes; how fast does every node learn it?
    now = cluster.net.now
    who = cluster.by_id[rng_names[rng.randrange(n)]]
    updater[0] = who.node_id
    st = who.core.local_state
    assert st is not None
    vec = ResourceVector(**{**st.vector.as_dict(), "cpu_free": st.vector.cpu_free - 8, "running": st.vector.running + 1})
    target_version[0] = st.version + 1
    who.core.set_local_state(now, NodeState(**{**{f: getattr(st, f) for f in st.__slots__}, "vector": vec}))
    cluster._schedule(who)
    t_update = now
    cluster.run_until(now + UPDATE_WINDOW_S)
    need = math.ceil(0.9999 * (n - 1))
    times = sorted(t - t_update for t in update.values())
    rep.update_reached, rep.push_pull_s = len(times), settings.push_pull_interval
    if len(times) >= need and need > 0:
        rep.update_9999_s = times[need - 1]
        rep.update_rounds = rep.update_9999_s / settings.gossip_interval

    # 3. crashes
    t_crash = cluster.net.now
    victims = rng.sample(sorted(cluster.by_id), min(crashes, n - 1))
    for v in victims:
        crashed[v] = t_crash
        cluster.crash(cluster.by_id[v])
    deadline = t_crash + 120.0
    while cluster.net.now < deadline and victims:
        cluster.run_until(cluster.net.now + 0.5)
        live = [x.node_id for x in cluster.live()]
        if all(len(dead_seen.get(v, {})) >= len(live) for v in victims):
            break
    live_ids = {x.node_id for x in cluster.live()}
    for v in victims:
        seen = {k: t for k, t in dead_seen.get(v, {}).items() if k in live_ids}
        rep.observer_dead += [t - t_crash for t in seen.values()]
        if len(seen) >= len(live_ids):
            rep.all_know_dead.append(max(seen.values()) - t_crash)
        else:
            rep.undetected += 1

    # 4. partition, then heal
    if partition is not None:
        frac, start, dur = partition
        cluster.run_until(cluster.net.now + start)
        live_nodes = cluster.live()
        cut = set(rng.sample([x.node_id for x in live_nodes], max(1, int(frac * len(live_nodes)))))
        counting_fp[0] = False
        cluster.net.partition([{cluster.by_id[i].addr for i in cut}])
        cluster.run_until(cluster.net.now + dur)
        cluster.net.heal()
        t_heal = cluster.net.now
        rep.partition_converged = False
        while cluster.net.now < t_heal + 300.0:
            cluster.run_until(cluster.net.now + 0.1)
            if cluster.converged():
                rep.partition_converged = True
                counting_fp[0] = True
                break
        rep.partition_heal_s = cluster.net.now - t_heal
    return rep
