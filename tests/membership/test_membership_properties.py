"""Property tests: whatever the network does to packets, the core neither crashes nor
brings back a member on a stale incarnation."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from p2psched.membership import codec
from p2psched.membership.messages import ALIVE, DEAD, LEFT, SUSPECT, Alive, Dead, Suspect
from p2psched.membership.settings import MembershipSettings
from p2psched.membership.swim import Event, Membership
from p2psched.sim.membership import SimCluster

S = MembershipSettings(insecure=True, mdns=False)
ADDRS = {"b": ("10.0.0.2", 1), "c": ("10.0.0.3", 1), "d": ("10.0.0.4", 1)}

message = st.one_of(
    st.builds(Alive, st.integers(0, 6), st.sampled_from(sorted(ADDRS)),
              st.sampled_from([("10.0.0.2", 1), ("10.0.0.3", 1), ("10.0.0.4", 1), ("10.9.9.9", 2)])),
    st.builds(Suspect, st.integers(0, 6), st.sampled_from(sorted(ADDRS) + ["a"]), st.sampled_from(["b", "c", "x"])),
    st.builds(Dead, st.integers(0, 6), st.sampled_from(sorted(ADDRS) + ["a"]), st.sampled_from(["b", "c", "d", "x"])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(message, st.integers(1, 3), st.floats(0, 0.5)), max_size=60), st.randoms())
def test_reordered_duplicated_messages_never_resurrect_a_stale_incarnation(script, rnd):
    m = Membership(S, "a", ("10.0.0.1", 1), random.Random(0), 0.0)
    deliveries = [(msg, gap) for msg, copies, gap in script for _ in range(copies)]
    rnd.shuffle(deliveries)  # arbitrary reordering, with duplicates
    buried: dict[str, int] = {}  # node -> highest incarnation at which we saw it dead or left
    last_inc: dict[str, int] = {}
    now = 0.0
    for msg, gap in deliveries:
        now += gap
        m.handle_packet(now, ("10.0.0.9", 1), codec.assemble("x", [codec.pack_part(msg)]))
        m.tick(now)
        for node_id, mem in m.members.items():
            if node_id == "a":
                continue
            assert mem.incarnation >= last_inc.get(node_id, 0), "incarnations never go back"
            last_inc[node_id] = mem.incarnation
            if mem.status in (DEAD, LEFT):
                buried[node_id] = max(buried.get(node_id, -1), mem.incarnation)
            elif node_id in buried:
                assert mem.incarnation > buried[node_id], f"{node_id} came back on a stale incarnation"
        for gone in set(buried) - set(m.members):
            del buried[gone]  # forgotten after dead_retention: a later alive is a genuine re-join
            last_inc.pop(gone, None)
    assert m.incarnation >= 0 and m.members["a"].status == ALIVE


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), loss=st.floats(0, 0.3), dup=st.floats(0, 0.3), spread=st.floats(0.0005, 0.2))
def test_lossy_reordering_duplicating_network_never_crashes_or_resurrects(seed, loss, dup, spread):
    jitter = random.Random(seed)
    cluster = SimCluster(8, S, seed, loss=loss, duplicate=dup,
                         latency=lambda a, b: 0.0005 + spread * jitter.random())  # wide jitter reorders
    declared: dict[str, float] = {}
    resurrected: list[str] = []
    victim = cluster.by_id["n0003"]

    def listen(now: float, node, ev: Event) -> None:
        if ev.node_id != victim.node_id:
            return
        if ev.kind == "dead":
            declared[node.node_id] = now
        elif ev.kind == "alive" and node.node_id in declared:
            resurrected.append(node.node_id)

    cluster.listeners.append(listen)
    cluster.run_until(3.0)
    cluster.crash(victim)
    cluster.run_until(25.0)
    assert resurrected == []
    for node in cluster.live():
        mem = node.core.get(victim.node_id)
        assert mem is None or mem.status != ALIVE or node.node_id not in declared
