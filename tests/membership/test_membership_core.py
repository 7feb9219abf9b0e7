"""The SWIM core driven directly and through the simulator, in virtual time."""

from __future__ import annotations

import math
import random

import pytest

from p2psched.membership import codec
from p2psched.membership.keyring import SEALED_OVERHEAD
from p2psched.membership.messages import (
    ALIVE, DEAD, LEFT, SUSPECT, Ack, Alive, Dead, Ping, PushPullReq, PushPullResp, State, Suspect,
)
from p2psched.membership.settings import MembershipSettings
from p2psched.membership.swim import Event, Membership, Send, SendTcp, TcpProbe
from p2psched.resources import NodeState, ResourceVector
from p2psched.sim.membership import SimCluster

S = MembershipSettings(insecure=True, mdns=False)
A, B, C = ("10.0.0.1", 7946), ("10.0.0.2", 7946), ("10.0.0.3", 7946)


def core(node_id: str = "a", addr=A, settings: MembershipSettings = S) -> Membership:
    return Membership(settings, node_id, addr, random.Random(1), 0.0, packet_budget=1200 - SEALED_OVERHEAD)


def pkt(*msgs, sender: str = "x") -> bytes:
    return codec.assemble(sender, [codec.pack_part(m) for m in msgs])


def events(actions, kind=None):
    return [a for a in actions if isinstance(a, Event) and (kind is None or a.kind == kind)]


def test_one_datagram_gets_one_answer_however_many_pings_it_asks():
    # 25 ping-reqs in one datagram made the agent send 25 pings to a host and port the
    # sender named: a reflector for anyone who can reach an --insecure agent.
    from p2psched.membership.messages import PingReq
    from p2psched.membership.swim import MAX_RELAYS

    m = core()
    out = m.handle_packet(1.0, B, pkt(*[PingReq(i, "victim", ("192.0.2.7", 80), False) for i in range(25)]))
    assert [a.addr for a in out if isinstance(a, Send)] == [("192.0.2.7", 80)]
    assert m.dropped["extra_request"] == 24
    out = m.handle_packet(1.0, B, pkt(*[Ping(i, "a") for i in range(25)]))
    assert len([a for a in out if isinstance(a, Send)]) == 1
    # Relays in flight are bounded too: a flood of single ping-reqs cannot grow them for good.
    for i in range(MAX_RELAYS + 10):
        m.handle_packet(1.0, B, pkt(PingReq(i, "victim", ("192.0.2.7", 80), False)))
    assert len(m._relays) == MAX_RELAYS and m.dropped["relay_busy"] == 10 + 1


def test_ping_is_acked_only_for_our_id():
    m = core()
    out = m.handle_packet(1.0, B, pkt(Ping(7, "a")))
    assert len(out) == 1 and isinstance(out[0], Send) and out[0].addr == B
    _, msgs = codec.decode_datagram(out[0].data)
    assert msgs[0] == Ack(7)
    assert m.handle_packet(1.0, B, pkt(Ping(8, "someone-else"))) == []
    assert m.dropped["wrong_target"] == 1


def test_unanswered_probe_goes_indirect_then_tcp_then_suspect_then_dead():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B), Alive(0, "c", C)))
    t, sent = 0.0, []
    while t < 3.0:
        sent += m.tick(t)
        t += 0.01
    kinds = {type(a).__name__ for a in sent}
    assert {"Send", "TcpProbe"} <= kinds
    assert any(isinstance(a, Send) and any(type(x).__name__ == "PingReq" for x in codec.decode_datagram(a.data)[1])
               for a in sent)
    assert m.get("b").status == SUSPECT or m.get("c").status == SUSPECT
    suspect = "b" if m.get("b").status == SUSPECT else "c"
    min_t, max_t = m.suspicion_bounds()
    # N=3 is below the confirmations Lifeguard expects (k = 0), so the minimum applies.
    out = []
    while t < 3.0 + max_t + 1:
        out += m.tick(t)
        t += 0.05
    assert m.get(suspect).status == DEAD
    assert events(out, "dead")[0].node_id == suspect


def test_tcp_fallback_prevents_suspicion():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    t, probe = 0.0, None
    while probe is None:
        for a in m.tick(t):
            if isinstance(a, TcpProbe):
                probe = a
        t += 0.01
    m.tcp_probe_result(t, probe.seq, codec.encode_frame("b", Ack(probe.seq)))
    end = t + S.probe_interval - S.probe_timeout + 0.02  # past the probe's deadline
    while t < end:
        m.tick(t)
        t += 0.01
    assert m.get("b").status == ALIVE
    assert m.stats["probes_tcp_rescued"] == 1


def test_suspicion_shrinks_with_confirmations():
    m = core()
    m.bootstrap(0.0, [(f"n{i}", ("10.1.0.%d" % i, 7946), None) for i in range(100)])
    m.handle_packet(1.0, B, pkt(Suspect(0, "n5", "n1")))
    s = m._suspicions["n5"]
    first = s.deadline
    m.handle_packet(1.1, B, pkt(Suspect(0, "n5", "n2")))
    m.handle_packet(1.2, B, pkt(Suspect(0, "n5", "n3")))
    min_t, max_t = m.suspicion_bounds()
    assert first == pytest.approx(1.0 + max_t)
    assert s.deadline == pytest.approx(1.0 + min_t)  # k = suspicion_mult - 2 = 2 confirmations reach the minimum
    assert min_t == pytest.approx(4 * math.log10(101) * 0.5)  # mult * log10(N) * probe_timeout, N = 101 with us
    assert max_t == pytest.approx(6 * min_t)


def test_refutes_suspicion_and_death_with_higher_incarnation():
    m = core()
    out = m.handle_packet(1.0, B, pkt(Suspect(0, "a", "b")))
    assert m.incarnation == 1
    out = m.handle_packet(2.0, B, pkt(Dead(5, "a", "b")))
    assert m.incarnation == 6
    # the refutation is queued: it leaves with the next packet
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    sent = [a for t in range(0, 30) for a in m.tick(t / 10) if isinstance(a, Send)]
    parts = [x for a in sent for x in codec.decode_datagram(a.data)[1]]
    assert Alive(6, "a", A) in parts


def test_stale_alive_does_not_resurrect_the_dead():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(3, "b", B)))
    m.handle_packet(1.0, C, pkt(Dead(3, "b", "c")))
    assert m.get("b").status == DEAD
    m.handle_packet(2.0, C, pkt(Alive(3, "b", B), Alive(2, "b", B)))
    assert m.get("b").status == DEAD
    out = m.handle_packet(3.0, B, pkt(Alive(4, "b", B)))
    assert m.get("b").status == ALIVE and events(out, "alive")


def test_leave_goes_to_every_peer_and_they_mark_left():
    a, b = core("a", A), core("b", B)
    a.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    b.handle_packet(0.0, A, pkt(Alive(0, "a", A)))
    out = a.leave(1.0)
    assert [s.addr for s in out if isinstance(s, Send)] == [B]
    got = b.handle_packet(1.0, A, out[0].data)
    assert b.get("a").status == LEFT and events(got, "left")


def test_second_agent_with_a_live_id_is_refused():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    out = m.handle_packet(1.0, C, pkt(Alive(9, "b", C)))
    assert m.get("b").addr == B and m.get("b").incarnation == 0
    (ev,) = events(out, "conflict")
    assert "10.0.0.3:7946" in ev.detail and "--node-id" in ev.detail
    # and the newcomer hears that its id is taken
    newcomer = core("b", C)
    out = newcomer.handle_packet(1.0, A, pkt(Alive(0, "b", B)))
    assert events(out, "conflict") and newcomer.incarnation == 0


def test_restarted_node_refutes_its_death_through_push_pull():
    old = core("b", B)
    a = core("a", A)
    a.handle_packet(0.0, B, pkt(Alive(4, "b", B)))
    a.handle_packet(1.0, C, pkt(Dead(4, "b", "c")))
    fresh = core("b", B)  # same id and address, incarnation 0
    (req,) = [x for x in fresh.join(2.0, [A]) if isinstance(x, SendTcp)]
    reply, _ = a.handle_stream(2.0, B, req.data)
    out = fresh.handle_stream_reply(2.0, A, reply)
    assert fresh.incarnation == 5
    (push,) = [x for x in out if isinstance(x, SendTcp)]
    _, evs = a.handle_stream(2.1, B, push.data)
    assert a.get("b").status == ALIVE and a.get("b").incarnation == 5
    assert old.incarnation == 0


def test_push_pull_sends_only_differences():
    a, b = core("a", A), core("b", B)
    a.handle_packet(0.0, B, pkt(Alive(0, "b", B), Alive(0, "c", C)))
    b.handle_packet(0.0, A, pkt(Alive(0, "a", A), Alive(0, "c", C)))
    req = a._push_pull_to(B, join=False)
    reply, _ = b.handle_stream(1.0, A, req.data)
    _, resp = codec.decode_frame(reply, 1 << 20)
    assert isinstance(resp, PushPullResp)
    # only the two members' own states differ (each side knows its own, not the other's)
    assert {e.node_id for e in resp.entries} <= {"a", "b"}
    assert all(e.node_id != "c" for e in resp.entries)


def test_state_versions_newer_replaces_older_and_coalesces():
    a = core("a", A)
    a.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    v = ResourceVector(cpu_total=8, cpu_free=8)
    a.handle_packet(0.1, B, pkt(State("b", 3, False, NodeState("b", 3, v).to_wire())))
    assert a.get("b").state.vector.cpu_free == 8
    a.handle_packet(0.2, B, pkt(State("b", 2, False, NodeState("b", 2, ResourceVector(cpu_free=1)).to_wire())))
    assert a.get("b").state.version == 3 and a.get("b").state.vector.cpu_free == 8
    # our own state: two changes inside state_min_interval publish once
    v0 = a.local_state.version
    a.set_local_state(1.0, NodeState("a", vector=ResourceVector(cpu_free=1)))
    a.set_local_state(1.1, NodeState("a", vector=ResourceVector(cpu_free=2)))
    assert a.local_state.version == v0 + 1
    a.tick(1.0 + S.state_min_interval)
    assert a.local_state.version == v0 + 2 and a.local_state.vector.cpu_free == 2


def test_oversized_state_travels_as_vector_only_and_push_pull_repairs_it():
    a, b = core("a", A), core("b", B)
    b.set_local_state(0.0, NodeState("b", labels={f"k{i}": "x" * 40 for i in range(40)}))
    b.tick(1.0)
    a.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    b.handle_packet(0.0, A, pkt(Alive(0, "a", A)))
    sends = [x for t in range(10, 40) for x in b.tick(t / 10) if isinstance(x, Send)]
    assert all(len(s.data) <= 1200 - SEALED_OVERHEAD for s in sends)
    for s in sends:
        if s.addr == A:
            a.handle_packet(4.0, B, s.data)
    assert a.get("b").partial and a.get("b").state.labels == {}
    reply, _ = b.handle_stream(5.0, A, a._push_pull_to(B, join=False).data)
    a.handle_stream_reply(5.0, B, reply)
    assert not a.get("b").partial and len(a.get("b").state.labels) == 40


def test_every_datagram_fits_the_budget_under_heavy_gossip():
    c = SimCluster(40, S, seed=3)
    sizes = []
    orig = c.net.send
    c.net.send = lambda s, d, data: (sizes.append(len(data)), orig(s, d, data))[1]
    for node in list(c.nodes.values())[:20]:
        node.core.set_local_state(0.5, NodeState(node.node_id, labels={"rack": "r" * 60}))
    c.run_until(5.0)
    assert sizes and max(sizes) <= 1200 - SEALED_OVERHEAD


def test_group_preference_keeps_gossip_in_the_group():
    s = S.model_copy(update={"gossip_same_group_fraction": 1.0})
    group = lambda node_id: "left" if int(node_id[1:]) < 50 else "right"  # noqa: E731
    m = Membership(s, "n0", A, random.Random(2), 0.0, group_of=group)
    m.bootstrap(0.0, [(f"n{i}", ("10.2.0.%d" % i, 7946), None) for i in range(100)])
    picks = [p.node_id for _ in range(200) for p in m._random_peers(3, set(), live_only=False)]
    same = sum(group(p) == "left" for p in picks)
    assert same / len(picks) > 0.9
    plain = Membership(S, "n0", A, random.Random(2), 0.0, group_of=group)
    plain.bootstrap(0.0, [(f"n{i}", ("10.2.0.%d" % i, 7946), None) for i in range(100)])
    picks = [p.node_id for _ in range(200) for p in plain._random_peers(3, set(), live_only=False)]
    assert 0.3 < sum(group(p) == "left" for p in picks) / len(picks) < 0.7


def test_local_health_rises_with_missed_nacks_and_lag_and_stretches_probing():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B), Alive(0, "c", C)))
    m.report_lag(0.0, 0.5)
    assert m.health == 1
    m.report_lag(0.1, 0.5)  # at most once per probe interval
    assert m.health == 1
    t = 0.0
    while t < 4.0:
        m.tick(t)
        t += 0.01
    assert m.health >= 2
    start = m._next_probe_at
    m.tick(start)
    assert m._next_probe_at - start == S.probe_interval * (m.health + 1)


def test_mutations_inside_the_coalescing_window_build_on_each_other():
    a = core("a", A)
    a.tick(0.0)
    a.set_local_state(1.0, NodeState("a", vector=ResourceVector(queue_len=1)))  # published at once
    a.set_local_state(1.1, NodeState("a", vector=ResourceVector(queue_len=2)))  # pending until 1.5
    assert a.local_state.vector.queue_len == 1
    assert a.latest_local_state.vector.queue_len == 2


def test_rejoin_skips_seeds_that_are_live_members_under_another_address():
    a, b = core("a", A), core("b", B)
    b.handle_packet(0.0, A, pkt(Alive(0, "a", A)))
    loop_alias = ("127.0.0.1", 7946)  # the seed as written, b as it advertises itself
    a.set_seeds([loop_alias])
    (req,) = [x for x in a.tick(0.0) if isinstance(x, SendTcp)]  # alone: join through the seed
    reply, _ = b.handle_stream(0.0, A, req.data)
    a.handle_stream_reply(0.0, loop_alias, reply)
    assert a.get("b").status == ALIVE
    tcp = []
    for step in range(1, 400):  # 40 s, several rejoin intervals; b answers every packet
        now = step / 10
        for x in a.tick(now):
            if isinstance(x, SendTcp):
                tcp.append(x)
            elif isinstance(x, Send) and x.addr == B:
                for y in b.handle_packet(now, A, x.data):
                    if isinstance(y, Send) and y.addr == A:
                        a.handle_packet(now, B, y.data)
    assert a.get("b").status == ALIVE
    assert all(x.addr != loop_alias for x in tcp)


def test_a_joiner_learns_the_dead_and_suspect_members_too_but_only_on_its_first_exchange():
    a = core("a", A)
    a.handle_packet(0.0, B, pkt(Alive(2, "b", B), Alive(0, "c", C)))
    a.handle_packet(1.0, C, pkt(Dead(0, "c", "b")))
    a.handle_packet(1.0, B, pkt(Suspect(2, "b", "x")))
    joiner = core("j", ("10.0.0.9", 7946))
    assert not joiner.synced
    (req,) = [x for x in joiner.join(2.0, [A]) if isinstance(x, SendTcp)]
    reply, _ = a.handle_stream(2.0, joiner.addr, req.data)
    out = joiner.handle_stream_reply(2.0, A, reply)
    assert joiner.synced
    assert joiner.get("c").status == DEAD and joiner.get("c").addr == C
    assert joiner.get("b").status == SUSPECT
    assert ("dead", "c") in [(e.kind, e.node_id) for e in events(out)]
    # After the first exchange a down member it does not know is not taken from peers:
    # otherwise agents would hand a dead member back and forth and never forget it.
    a.handle_packet(3.0, ("10.0.0.4", 7946), pkt(Alive(0, "d", ("10.0.0.4", 7946))))
    a.handle_packet(3.0, C, pkt(Dead(0, "d", "a")))
    reply, _ = a.handle_stream(4.0, joiner.addr, joiner._push_pull_to(A, join=False).data)
    joiner.handle_stream_reply(4.0, A, reply)
    assert joiner.get("d") is None


def drive(m: Membership, until: float, now: float = 0.0) -> tuple[list[float], list]:
    """Tick ``m`` exactly at each deadline it asks for, as the trio adapter does."""
    ticks, out = [], []
    while (t := max(now, m.next_deadline())) <= until:
        now = t
        ticks.append(now)
        out += m.tick(now)
    return ticks, out


def test_an_agent_without_peers_has_no_protocol_period():
    m = core()
    ticks, out = drive(m, 120.0)
    # Only the re-join and push-pull timers remain: nothing at the probe or gossip rate.
    assert len(ticks) <= 120.0 / S.rejoin_interval + 2 * 120.0 / S.push_pull_interval + 2
    assert len(ticks) < 120.0 / S.probe_interval / 4
    assert not [a for a in out if isinstance(a, (Send, SendTcp, TcpProbe))]


def test_a_peer_that_appears_is_probed_on_the_next_tick():
    m = core()
    drive(m, 30.0)
    now = 30.0
    m.handle_packet(now, B, pkt(Alive(0, "b", B)))
    assert m.next_deadline() <= now  # the probe skipped while alone is due at once
    out = m.tick(now)
    pings = [a for a in out if isinstance(a, Send) and any(isinstance(x, Ping) for x in codec.decode_datagram(a.data)[1])]
    assert [p.addr for p in pings] == [B]


def test_with_a_live_peer_probing_keeps_its_period():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    now, probes = 0.0, 0
    while (now := max(now, m.next_deadline())) <= 20.0:
        for a in m.tick(now):
            for msg in codec.decode_datagram(a.data)[1] if isinstance(a, Send) else []:
                if isinstance(msg, Ping):  # b answers every probe at once
                    probes += 1
                    m.handle_packet(now, B, pkt(Ack(msg.seq), sender="b"))
    assert probes >= 20.0 / S.probe_interval - 1
    assert m.get("b").status == ALIVE


def test_gossip_waits_for_a_peer_that_can_take_it():
    m = core()
    m.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    m.handle_packet(0.1, B, pkt(Dead(1, "b", "b")))  # b left: no gossip or probe goes to it
    assert m.get("b").status == LEFT
    m.set_local_state(1.0, NodeState(node_id="a", vector=ResourceVector(cpu_total=4, cpu_free=4)))
    assert len(m._queue)  # something to spread, nobody to spread it to
    ticks, out = drive(m, 1.0 + S.dead_retention - 1, now=1.0)
    assert len(ticks) < S.dead_retention / S.gossip_interval / 4
    assert not [a for a in out if isinstance(a, Send)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1, True, "8", 2**60])
def test_a_state_with_an_amount_no_host_has_is_dropped_and_the_last_good_one_kept(bad):
    """A NaN or infinite free CPU count would win or lose every comparison placement
    makes with it; a negative quota usage would hide a tenant's jobs. Such a state is
    dropped, as any malformed one, and the member keeps what it said before."""
    a = core("a", A)
    a.handle_packet(0.0, B, pkt(Alive(0, "b", B)))
    good = NodeState("b", 1, ResourceVector(cpu_total=8, cpu_free=8))
    a.handle_packet(0.1, B, pkt(State("b", 1, False, good.to_wire())))
    for version, (where, wire) in enumerate([
        ("full", {**NodeState("b", 2).to_wire(), "rv": {"ct": 8, "cf": bad}}),
        ("partial", {"rv": {"ct": 8, "cf": 8, "gf": {"a100": bad}}}),
        ("full", {**NodeState("b", 4).to_wire(), "tu": {"t1": [1, bad]}}),
    ], start=2):
        before = a.dropped.get("bad_state", 0)
        a.handle_packet(0.1 * version, B, pkt(State("b", version, where == "partial", wire)))
        assert a.dropped.get("bad_state", 0) == before + 1, (where, wire)
        state = a.get("b").state
        assert state.version == 1 and state.vector.cpu_free == 8 and state.tenants == {}


def test_the_amounts_a_vector_holds_travel_and_anything_else_is_refused_by_name():
    v = ResourceVector(cpu_total=8, cpu_free=2.5, mem_total_mb=4096, mem_free_mb=0, gpu_free={"a100": 3},
                       gpu_total={"a100": 8}, queue_len=7, running=1, load=0.25, draining=True)
    assert ResourceVector.from_wire(v.to_wire()) == v
    for key, bad in [("cf", math.nan), ("ct", -0.5), ("mt", math.inf), ("q", "3"), ("l", None), ("r", False)]:
        with pytest.raises(ValueError, match=f"^{key} must be a number from 0 to"):
            ResourceVector.from_wire({**v.to_wire(), key: bad})
    with pytest.raises(ValueError, match="^gf.a100 must be a number"):
        ResourceVector.from_wire({"gf": {"a100": -1}})
    with pytest.raises(ValueError, match="^gt must be a map"):
        ResourceVector.from_wire({"gt": [8]})
    with pytest.raises(ValueError, match="^tu.t1 must be a number"):
        NodeState.from_wire({"n": "b", "tu": {"t1": [math.inf]}})
