"""SWIM with the Lifeguard refinements, as a pure state machine.

The core never reads a clock and never touches a socket (h11-style). Its driver, the
trio adapter (``service.py``) or the simulator (``p2psched/sim/membership.py``), feeds
it time and bytes and carries out the actions it returns:

    core = Membership(settings, "a1", ("10.0.0.1", 7946), random.Random(), now=0.0)
    actions = core.join(now, [("10.0.0.2", 7946)])
    actions = core.handle_packet(now, src_addr, datagram_plaintext)
    actions = core.tick(now)              # call at core.next_deadline() or sooner
    reply, actions = core.handle_stream(now, src_addr, frame)       # TCP server side
    actions = core.handle_stream_reply(now, addr, reply_or_None)     # after a SendTcp
    actions = core.tcp_probe_result(now, seq, reply_or_None)         # after a TcpProbe

Actions: ``Send`` (one datagram's plaintext), ``SendTcp`` (a push-pull frame, maybe
awaiting a reply), ``TcpProbe`` (the TCP fallback ping) and ``Event`` (a member
joined, became alive/suspect/dead/left, was updated, removed, or an id conflict).

What it implements, with memberlist's (Go) names where they help a reader:

* probing in shuffled round-robin order, ping -> ack, then ping-req through k peers
  (who nack when they have not heard back, Lifeguard) and a TCP ping in parallel;
* suspicion with incarnation numbers; the timeout starts at max and falls toward
  min = suspicion_mult * max(1, log10 N) * probe_timeout as independent peers confirm
  (memberlist's ``suspicion.go`` formula; see settings for the unit);
* the local health multiplier (memberlist's ``awareness``): failed probes, missing
  nacks, our own refutations and event-loop lag stretch our probe interval and
  timeout;
* dissemination: updates are piggybacked on probes and gossiped to a few peers per
  round, each at most retransmit_mult * ceil(log10(N + 1)) times, fewest-sent first;
  a newer update about a node replaces the queued older one;
* node state (``NodeState``) versioned as a whole: newer replaces older; when it does
  not fit a packet only the resource vector travels and push-pull fetches the rest;
* push-pull anti-entropy over TCP with digests (only differing entries travel);
* leave (peers mark us ``left`` at once), refutation after a restart, refusal of a
  second agent claiming a live member's id, dead-member retention and periodic
  re-join attempts to dead, forgotten and seed peers.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from p2psched.membership import codec
from p2psched.membership.messages import (
    ALIVE, DEAD, LEFT, STATUS_NAMES, SUSPECT, Ack, Addr, Alive, Dead, Digest, Entry, Message, Nack, Ping,
    PingReq, PushPullPush, PushPullReq, PushPullResp, State, Suspect, next_counter,
)
from p2psched.membership.settings import MembershipSettings
from p2psched.resources import NodeState, ResourceVector

# Addresses of forgotten dead members are kept this long for re-join attempts, so that
# a partition longer than dead_retention still heals by itself.
GRAVEYARD_SECONDS = 3600.0
GRAVEYARD_SIZE = 64
#: Indirect probes relayed for peers at once (each ends within a probe interval). A peer
#: asks one per probe that goes unanswered: thousands in flight is a flood, not a cluster.
MAX_RELAYS = 1024


# --- actions -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    addr: Addr
    data: bytes  # one datagram's plaintext, at most the packet budget


@dataclass(frozen=True, slots=True)
class SendTcp:
    addr: Addr
    data: bytes  # one frame's plaintext
    expect_reply: bool  # if so, pass the reply (or None on failure) to handle_stream_reply


@dataclass(frozen=True, slots=True)
class TcpProbe:
    addr: Addr
    seq: int
    data: bytes  # a Ping frame; pass the reply (or None) to tcp_probe_result(now, seq, ...)


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # joined | alive | suspect | dead | left | updated | removed | conflict
    node_id: str
    detail: str = ""


Action = Union[Send, SendTcp, TcpProbe, Event]


# --- state -----------------------------------------------------------------------------

@dataclass(slots=True)
class Member:
    node_id: str
    addr: Addr
    incarnation: int
    status: int
    status_since: float
    last_update: float
    state: NodeState | None = None
    version: int = 0
    partial: bool = False

    @property
    def status_name(self) -> str:
        return STATUS_NAMES[self.status]


@dataclass(slots=True)
class _Suspicion:
    """Lifeguard's dynamic suspicion timeout (memberlist suspicion.go)."""

    start: float
    k: int
    min_t: float
    max_t: float
    confirmers: set[str]
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self._update()

    def _update(self) -> None:
        c = len(self.confirmers) - 1  # the first accuser is not a confirmation
        if self.k < 1:
            timeout = self.min_t
        else:
            frac = math.log(c + 1) / math.log(self.k + 1)
            timeout = max(self.min_t, self.max_t - frac * (self.max_t - self.min_t))
        self.deadline = self.start + timeout

    def confirm(self, from_id: str) -> bool:
        if from_id in self.confirmers:
            return False
        self.confirmers.add(from_id)
        self._update()
        return True


@dataclass(slots=True)
class _Probe:
    seq: int
    target_id: str
    addr: Addr
    started: float
    direct_deadline: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    acked: bool = False
    tcp_ok: bool = False


@dataclass(slots=True)
class _Relay:
    requester: Addr
    orig_seq: int
    nack_at: float | None
    expires: float


@dataclass(slots=True)
class _Broadcast:
    key: tuple[str, str]
    part: bytes
    order: int
    transmits: int = 0


class _BroadcastQueue:
    """memberlist's TransmitLimitedQueue: fewest transmits first, newest first among equals."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], _Broadcast] = {}
        self._buckets: dict[int, dict[tuple[str, str], _Broadcast]] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def push(self, key: tuple[str, str], part: bytes) -> None:
        old = self._by_key.pop(key, None)
        if old is not None:
            del self._buckets[old.transmits][key]
        self._order += 1
        b = _Broadcast(key, part, self._order)
        self._by_key[key] = b
        self._buckets.setdefault(0, {})[key] = b

    def take(self, room: int, limit: int) -> list[bytes]:
        """Parts that fit in ``room`` bytes; each taken part counts one transmit."""
        out: list[bytes] = []
        taken: list[_Broadcast] = []
        for t in sorted(self._buckets):
            bucket = self._buckets[t]
            for b in reversed(list(bucket.values())):
                if len(b.part) <= room:
                    out.append(b.part)
                    taken.append(b)
                    room -= len(b.part)
                    if room < 8:
                        break
            if room < 8:
                break
        for b in taken:
            del self._buckets[b.transmits][b.key]
            if not self._buckets[b.transmits]:
                del self._buckets[b.transmits]
            b.transmits += 1
            if b.transmits >= limit:
                del self._by_key[b.key]
            else:
                self._buckets.setdefault(b.transmits, {})[b.key] = b
        return out


class Membership:
    """One agent's view of the cluster. See the module docstring for the driving loop."""

    def __init__(
        self,
        settings: MembershipSettings,
        self_id: str,
        self_addr: Addr,
        rng: random.Random,
        now: float,
        *,
        packet_budget: int | None = None,
        local_state: NodeState | None = None,
        group_of: Callable[[str], str | None] | None = None,
    ) -> None:
        """``packet_budget``: plaintext bytes per datagram (max_datagram less the keyring's
        overhead). ``group_of`` maps a node id to its topology group (e.g. leaf switch);
        with settings.gossip_same_group_fraction > 0, gossip prefers peers of our group."""
        self.s = settings
        self.id = self_id
        self.addr = self_addr
        self.rng = rng
        self.budget = packet_budget if packet_budget is not None else settings.max_datagram
        self.group_of = group_of
        self._envelope = codec.datagram_overhead(self_id)

        self.incarnation = 0
        self.health = 0  # Lifeguard local health score, 0 .. awareness_max_multiplier - 1
        self.left = False
        self.members: dict[str, Member] = {}
        self._counts = {ALIVE: 0, SUSPECT: 0, DEAD: 0, LEFT: 0}
        self._peer_ids: list[str] = []  # every member but us, for O(1) random sampling
        self._peer_index: dict[str, int] = {}
        self._addr_index: dict[Addr, str] = {}
        self._gone: dict[str, float] = {}  # dead/left member -> since
        #: True once a full state exchange with a peer has been merged: until then
        #: this agent's member list may lack members the rest of the cluster knows.
        self.synced = False
        self._graveyard: deque[tuple[Addr, float]] = deque(maxlen=GRAVEYARD_SIZE)
        self._suspicions: dict[str, _Suspicion] = {}
        self._probe_order: list[str] = []
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = rng.randrange(1 << 20)
        self._queue = _BroadcastQueue()
        self._seeds: set[Addr] = set()
        self._group_cache: list[str] | None = None
        self._seed_ids: dict[Addr, str] = {}  # seed address -> node id that answered there

        self._state_version = 0
        self._pending_state: NodeState | None = None
        self._next_state_at = now
        self._last_lag_penalty = -math.inf

        self.stats: dict[str, int] = dict(
            probes_sent=0, probes_failed=0, probes_tcp_rescued=0, suspicions_raised=0, suspicions_refuted=0,
            self_refutations=0, conflicts=0, push_pulls=0,
        )
        self.dropped: dict[str, int] = {}  # reason -> packets the core could not use
        #: The reason and detail of the last packet dropped, for the adapter's log line.
        self.last_drop: tuple[str, str] = ("", "")
        self.drops = 0  # packets dropped in all; the adapter logs the last one when it grows
        self.rtt_samples: deque[float] = deque(maxlen=1024)  # drained by the adapter

        me = Member(self_id, self_addr, 0, ALIVE, now, now)
        self._insert(me)
        if local_state is not None:
            self._pending_state = local_state
        else:
            self._pending_state = NodeState(node_id=self_id)
        self._publish_state(now)

        # Spread the first probes of nodes started together across one interval.
        self._next_probe_at = now + rng.random() * settings.probe_interval
        self._next_gossip_at = now + rng.random() * settings.gossip_interval
        self._next_push_pull_at = now + settings.push_pull_interval * (0.5 + rng.random()) if settings.push_pull_interval else math.inf
        self._next_rejoin_at = now + settings.rejoin_interval * (0.5 + rng.random())
        self._next_join_at = math.inf

    # --- bookkeeping -----------------------------------------------------------------

    def _insert(self, m: Member) -> None:
        self._group_cache = None
        self.members[m.node_id] = m
        self._counts[m.status] += 1
        self._addr_index[m.addr] = m.node_id
        if m.node_id != self.id:
            self._peer_index[m.node_id] = len(self._peer_ids)
            self._peer_ids.append(m.node_id)
            # memberlist inserts new members at a random place in the probe order
            self._probe_order.insert(self.rng.randrange(len(self._probe_order) + 1), m.node_id)
        if m.status in (DEAD, LEFT):
            self._gone[m.node_id] = m.status_since

    def _remove(self, node_id: str) -> None:
        self._group_cache = None
        m = self.members.pop(node_id)
        self._counts[m.status] -= 1
        if self._addr_index.get(m.addr) == node_id:
            del self._addr_index[m.addr]
        i = self._peer_index.pop(node_id)
        last = self._peer_ids.pop()
        if last != node_id:
            self._peer_ids[i] = last
            self._peer_index[last] = i
        self._gone.pop(node_id, None)
        self._suspicions.pop(node_id, None)

    def _set_status(self, m: Member, status: int, now: float) -> None:
        if m.status == status:
            return
        self._counts[m.status] -= 1
        self._counts[status] += 1
        m.status = status
        m.status_since = now
        if status in (DEAD, LEFT):
            self._gone[m.node_id] = now
        else:
            self._gone.pop(m.node_id, None)
        if status != SUSPECT:
            self._suspicions.pop(m.node_id, None)

    def _set_addr(self, m: Member, addr: Addr) -> None:
        if self._addr_index.get(m.addr) == m.node_id:
            del self._addr_index[m.addr]
        m.addr = addr
        self._addr_index[addr] = m.node_id

    def num_live(self) -> int:
        """Alive and suspect members, us included: the N in every log(N)."""
        return self._counts[ALIVE] + self._counts[SUSPECT]

    def counts(self) -> dict[str, int]:
        return {STATUS_NAMES[k]: v for k, v in self._counts.items()}

    def retransmit_limit(self) -> int:
        return self.s.retransmit_mult * math.ceil(math.log10(self.num_live() + 1))

    def _scale(self) -> int:
        return self.health + 1

    def _health(self, delta: int) -> None:
        self.health = min(max(self.health + delta, 0), self.s.awareness_max_multiplier - 1)

    def suspicion_bounds(self) -> tuple[float, float]:
        n = max(1, self.num_live())
        min_t = self.s.suspicion_mult * max(1.0, math.log10(n)) * self.s.probe_timeout
        return min_t, min_t * self.s.suspicion_max_timeout_mult

    def push_pull_period(self) -> float:
        """memberlist's pushPullScale: x1 up to 32 members, then +1 per doubling."""
        n = self.num_live()
        if n <= 32:
            return self.s.push_pull_interval
        return self.s.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _broadcast(self, m: Message) -> None:
        node_id = m.node_id  # type: ignore[union-attr]
        kind = "s" if isinstance(m, State) else "m"
        self._queue.push((kind, node_id), codec.pack_part(m))

    def _packet(self, addr: Addr, first: list[Message], piggyback: bool = True) -> Send:
        parts = [codec.pack_part(m) for m in first]
        room = self.budget - self._envelope - sum(len(p) for p in parts)
        if piggyback and len(self._queue) and room > 16:
            parts += self._queue.take(room, self.retransmit_limit())
        return Send(addr, codec.assemble(self.id, parts))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.last_drop = (reason, detail)
        self.drops += 1

    # --- queries -------------------------------------------------------------------

    def member_list(self) -> list[Member]:
        return list(self.members.values())

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    @property
    def local_state(self) -> NodeState | None:
        """The last published version of our node state."""
        return self.members[self.id].state

    @property
    def latest_local_state(self) -> NodeState | None:
        """Our node state including a change not yet published (coalescing)."""
        return self._pending_state if self._pending_state is not None else self.local_state

    # --- local operations ------------------------------------------------------------

    def bootstrap(self, now: float, peers: Sequence[tuple[str, Addr, NodeState | None]]) -> None:
        """Start with ``peers`` known alive at incarnation 0 (with their node state), as if
        a join had completed and its gossip had died down: nothing stays queued. For
        simulators and tests of a settled cluster."""
        for node_id, addr, state in peers:
            if node_id != self.id and node_id not in self.members:
                m = Member(node_id, addr, 0, ALIVE, now, now)
                if state is not None:
                    m.state, m.version = state, state.version
                self._insert(m)
        self._queue = _BroadcastQueue()
        self._next_push_pull_at = now + self.push_pull_period() * self.rng.random() if self.s.push_pull_interval else math.inf

    def set_seeds(self, seeds: list[Addr]) -> None:
        """Seeds from discovery; used to join while alone and in re-join attempts."""
        self._seeds = {a for a in seeds if a != self.addr}
        if self._seeds:
            self._next_join_at = min(self._next_join_at, -math.inf)

    def join(self, now: float, seeds: list[Addr]) -> list[Action]:
        """Push-pull with each seed (TCP). Keeps retrying every join_retry_interval while
        we know no live peer."""
        self._seeds |= {a for a in seeds if a != self.addr}
        self._next_join_at = now + self.s.join_retry_interval
        return [self._push_pull_to(a, join=True) for a in seeds if a != self.addr]

    def leave(self, now: float) -> list[Action]:
        """Announce that we leave. The announcement goes straight to every live member,
        not only into gossip, so that peers mark us ``left`` at once."""
        self.left = True
        self.incarnation = next_counter(self.incarnation)
        me = self.members[self.id]
        me.incarnation = self.incarnation
        msg = Dead(self.incarnation, self.id, self.id)
        self._broadcast(msg)
        out: list[Action] = []
        for m in self.members.values():
            if m.node_id != self.id and m.status in (ALIVE, SUSPECT):
                out.append(self._packet(m.addr, [msg], piggyback=False))
        return out

    def set_local_state(self, now: float, state: NodeState) -> list[Action]:
        """Record our new node state. Versions are published at most every
        state_min_interval; changes in between are coalesced into the next one."""
        self._pending_state = state
        if now >= self._next_state_at:
            self._publish_state(now)
        return []

    def report_lag(self, now: float, lag: float) -> None:
        """The adapter measured ``lag`` seconds of event-loop scheduling delay. Above the
        threshold we count ourselves slow, at most once per probe interval."""
        if lag > self.s.lag_threshold and now - self._last_lag_penalty >= self.s.probe_interval:
            self._last_lag_penalty = now
            self._health(+1)

    def _publish_state(self, now: float) -> None:
        pending = self._pending_state
        if pending is None:
            return
        self._pending_state = None
        self._state_version = next_counter(self._state_version)
        state = dataclasses.replace(pending, node_id=self.id, version=self._state_version)
        me = self.members[self.id]
        me.state, me.version, me.last_update = state, state.version, now
        wire = state.to_wire()
        msg = State(self.id, state.version, False, wire)
        # Whole state when it fits beside a ping's envelope; otherwise the vector alone.
        if len(codec.pack_part(msg)) > self.budget - self._envelope - 64:
            msg = State(self.id, state.version, True, {"rv": wire["rv"]})
        self._broadcast(msg)
        self._next_state_at = now + self.s.state_min_interval

    def _refute(self, accused_incarnation: int) -> None:
        self.incarnation = next_counter(max(self.incarnation, accused_incarnation))
        me = self.members[self.id]
        me.incarnation = self.incarnation
        self.stats["self_refutations"] += 1
        self._health(+1)
        self._broadcast(Alive(self.incarnation, self.id, self.addr))

    # --- timers --------------------------------------------------------------------------

    def _has_probe_target(self) -> bool:
        return self.num_live() - (self.members[self.id].status in (ALIVE, SUSPECT)) > 0

    def _has_gossip_target(self) -> bool:
        """Gossip also goes to the dead (so a wrongly declared one refutes), never to the left."""
        c = self._counts
        return c[ALIVE] + c[SUSPECT] + c[DEAD] - (self.members[self.id].status != LEFT) > 0

    def next_deadline(self) -> float:
        """The earliest time ``tick`` has something to do.

        An agent without peers has no protocol period: no probe is due while no live
        peer exists and no gossip round while no peer can take it, so it ticks only
        for the rare push-pull, re-join and reaping timers. A due probe or gossip round
        that was skipped runs on the first tick after a peer appears, which every
        packet or stream that brings one is followed by.
        """
        t = math.inf
        if not self.left:
            t = min(self._next_push_pull_at, self._next_rejoin_at, self._next_join_at)
            if self._has_probe_target():
                t = min(t, self._next_probe_at)
            p = self._probe
            if p is not None and not p.acked:
                t = min(t, p.deadline if p.indirect_sent else p.direct_deadline)
            for s in self._suspicions.values():
                t = min(t, s.deadline)
            for r in self._relays.values():
                t = min(t, r.expires if r.nack_at is None else r.nack_at)
        if len(self._queue) and self._has_gossip_target():
            t = min(t, self._next_gossip_at)
        if self._pending_state is not None:
            t = min(t, self._next_state_at)
        for since in self._gone.values():
            t = min(t, since + self.s.dead_retention)
        return t

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self._pending_state is not None and now >= self._next_state_at:
            self._publish_state(now)
        if not self.left:
            self._tick_probe(now, out)
            self._tick_relays(now, out)
            self._tick_suspicions(now, out)
            self._tick_push_pull(now, out)
            self._tick_rejoin(now, out)
        self._tick_reap(now, out)
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + self.s.gossip_interval
            if len(self._queue):
                self._gossip(out)
        return out

    def _tick_probe(self, now: float, out: list[Action]) -> None:
        p = self._probe
        if p is not None and not p.acked:
            if not p.indirect_sent and now >= p.direct_deadline:
                self._indirect(now, p, out)
            if now >= p.deadline:
                self._probe_failed(now, p, out)
                p = self._probe = None
        if now >= self._next_probe_at:
            if p is not None and not p.acked:
                self._probe_failed(now, p, out)
            self._probe = None
            self._start_probe(now, out)

    def _start_probe(self, now: float, out: list[Action]) -> None:
        scale = self._scale()
        self._next_probe_at = now + self.s.probe_interval * scale
        target = self._next_target()
        if target is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, target.node_id, target.addr, now,
                             direct_deadline=now + self.s.probe_timeout * scale,
                             deadline=now + self.s.probe_interval * scale)
        first: list[Message] = [Ping(seq, target.node_id)]
        if target.status == SUSPECT:
            # Lifeguard's buddy system: tell the suspect directly, so it refutes at once.
            first.append(Suspect(target.incarnation, target.node_id, self.id))
        self.stats["probes_sent"] += 1
        out.append(self._packet(target.addr, first))

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_order:
                node_id = self._probe_order.pop()
                m = self.members.get(node_id)
                if m is not None and m.status in (ALIVE, SUSPECT):
                    return m
            live = [i for i in self._peer_ids if self.members[i].status in (ALIVE, SUSPECT)]
            self.rng.shuffle(live)
            self._probe_order = live
        return None

    def _indirect(self, now: float, p: _Probe, out: list[Action]) -> None:
        p.indirect_sent = True
        helpers = self._random_peers(self.s.indirect_checks, exclude={p.target_id}, live_only=True)
        for h in helpers:
            out.append(self._packet(h.addr, [PingReq(p.seq, p.target_id, p.addr, True)]))
        p.expected_nacks = len(helpers)
        if self.s.tcp_fallback:
            out.append(TcpProbe(p.addr, p.seq, codec.encode_frame(self.id, Ping(p.seq, p.target_id))))

    def _probe_failed(self, now: float, p: _Probe, out: list[Action]) -> None:
        # Lifeguard: a missing nack means our own links or loop may be the problem.
        if p.expected_nacks > 0:
            self._health(max(0, p.expected_nacks - p.nacks))
        else:
            self._health(+1)
        if p.tcp_ok:
            self.stats["probes_tcp_rescued"] += 1
            return
        self.stats["probes_failed"] += 1
        m = self.members.get(p.target_id)
        if m is None or m.status not in (ALIVE, SUSPECT):
            return
        if m.status == ALIVE:
            self.stats["suspicions_raised"] += 1
        self._on_suspect(now, Suspect(m.incarnation, m.node_id, self.id), out)

    def _tick_relays(self, now: float, out: list[Action]) -> None:
        for seq, r in list(self._relays.items()):
            if r.nack_at is not None and now >= r.nack_at:
                r.nack_at = None
                out.append(self._packet(r.requester, [Nack(r.orig_seq)]))
            if now >= r.expires:
                del self._relays[seq]

    def _tick_suspicions(self, now: float, out: list[Action]) -> None:
        for node_id, s in list(self._suspicions.items()):
            if now >= s.deadline:
                m = self.members.get(node_id)
                if m is not None and m.status == SUSPECT:
                    self._on_dead(now, Dead(m.incarnation, node_id, self.id), out)
                self._suspicions.pop(node_id, None)

    def _tick_push_pull(self, now: float, out: list[Action]) -> None:
        if now < self._next_push_pull_at:
            return
        self._next_push_pull_at = now + self.push_pull_period()
        peers = self._random_peers(1, exclude=set(), live_only=True)
        if peers:
            out.append(self._push_pull_to(peers[0].addr, join=False))

    def _tick_rejoin(self, now: float, out: list[Action]) -> None:
        alone = self.num_live() <= 1
        if now >= self._next_join_at:
            if self._seeds:
                self._next_join_at = now + self.s.join_retry_interval
                if alone:
                    for a in self.rng.sample(sorted(self._seeds), min(3, len(self._seeds))):
                        out.append(self._push_pull_to(a, join=True))
            else:
                self._next_join_at = math.inf
        if now < self._next_rejoin_at:
            return
        self._next_rejoin_at = now + self.s.rejoin_interval
        candidates = {self.members[i].addr for i, _ in self._gone.items() if self.members[i].status == DEAD}
        candidates |= {a for a, t in self._graveyard if now - t < GRAVEYARD_SECONDS}
        candidates |= self._seeds
        # Only peers we are not already connected to: a seed may be a live member known
        # under another address (a name that resolves to loopback, a NATed address).
        candidates = {a for a in candidates if not self._is_live(self._addr_index.get(a))
                      and not self._is_live(self._seed_ids.get(a))}
        candidates.discard(self.addr)
        if candidates:
            out.append(self._push_pull_to(self.rng.choice(sorted(candidates)), join=False))

    def _is_live(self, node_id: str | None) -> bool:
        m = self.members.get(node_id) if node_id is not None else None
        return m is not None and m.status in (ALIVE, SUSPECT)

    def _tick_reap(self, now: float, out: list[Action]) -> None:
        for node_id, since in list(self._gone.items()):
            if now >= since + self.s.dead_retention:  # the same sum next_deadline uses
                m = self.members[node_id]
                if m.status == DEAD:
                    self._graveyard.append((m.addr, now))
                self._remove(node_id)
                out.append(Event("removed", node_id, f"forgotten {self.s.dead_retention:g}s after it was {m.status_name}"))

    def _random_peers(self, k: int, exclude: set[str], live_only: bool) -> list[Member]:
        """Up to k distinct random peers; gossip also reaches the recently dead (not left)
        so that a node wrongly declared dead hears it and refutes."""
        n = len(self._peer_ids)
        if n == 0 or k <= 0:
            return []
        chosen: dict[str, Member] = {}
        frac = self.s.gossip_same_group_fraction
        same = self._same_group() if self.group_of is not None and frac > 0 else []
        tries = 0
        # Each pick comes from our own group with probability frac, otherwise from
        # everyone (the rule of p2psched.topology.gossip): the uniform picks keep the
        # long links that make dissemination take O(log N) rounds.
        while len(chosen) < k and tries < 8 * k + 8:
            tries += 1
            pool = same if same and self.rng.random() < frac else self._peer_ids
            m = self.members[pool[self.rng.randrange(len(pool))]]
            if m.node_id in chosen or m.node_id in exclude:
                continue
            if live_only and m.status not in (ALIVE, SUSPECT):
                continue
            if m.status == LEFT:
                continue
            chosen[m.node_id] = m
        return list(chosen.values())

    def _same_group(self) -> list[str]:
        """Peers in our topology group, recomputed after membership or state changes."""
        if self._group_cache is None:
            assert self.group_of is not None
            mine = self.group_of(self.id)
            self._group_cache = [] if mine is None else [i for i in self._peer_ids if self.group_of(i) == mine]
        return self._group_cache

    def _gossip(self, out: list[Action]) -> None:
        for m in self._random_peers(self.s.gossip_nodes, exclude=set(), live_only=False):
            if not len(self._queue):
                break
            out.append(self._packet(m.addr, []))

    # --- push-pull -------------------------------------------------------------------------

    def _digest(self) -> list[Digest]:
        return [Digest(m.node_id, m.incarnation, m.status, 0 if m.partial else m.version) for m in self.members.values()]

    def _entry(self, m: Member) -> Entry:
        state = None if m.state is None or m.partial else m.state.to_wire()
        return Entry(m.node_id, m.addr, m.incarnation, m.status, m.version, state)

    def _push_pull_to(self, addr: Addr, join: bool) -> SendTcp:
        self.stats["push_pulls"] += 1
        return SendTcp(addr, codec.encode_frame(self.id, PushPullReq(join, self._digest())), expect_reply=True)

    def _merge(self, now: float, entries: list[Entry], out: list[Action], *, learn_down: bool = False) -> None:
        for e in entries:
            if learn_down and e.status in (SUSPECT, DEAD) and e.node_id != self.id and e.node_id not in self.members:
                # A joiner learns of members that are down too, not only the live ones:
                # the cluster's set of members must look the same from every agent (ids
                # chosen by clients are homed by hashing over it). Only on the first
                # exchange, so peers do not keep handing a dead member back and forth
                # and it is still forgotten after dead_retention.
                self._insert(Member(e.node_id, e.addr, e.incarnation, ALIVE if e.status == SUSPECT else DEAD, now, now))
                out.append(Event("joined", e.node_id, f"{e.addr[0]}:{e.addr[1]}"))
                if e.status == DEAD:
                    out.append(Event("dead", e.node_id, "already dead when this agent joined"))
            if e.status == ALIVE:
                self._on_alive(now, Alive(e.incarnation, e.node_id, e.addr), out)
            elif e.status == LEFT:
                self._on_dead(now, Dead(e.incarnation, e.node_id, e.node_id), out)
            else:
                # memberlist prefers suspicion to a second-hand death: the member gets a
                # chance to refute, and our own timer decides.
                self._on_suspect(now, Suspect(e.incarnation, e.node_id, self.id), out)
            if e.state is not None:
                self._on_state(now, State(e.node_id, e.version, False, e.state), out)

    def handle_stream(self, now: float, src: Addr, data: bytes) -> tuple[bytes | None, list[Action]]:
        """A frame received over TCP: a TCP probe or a push-pull. Returns the reply frame."""
        try:
            sender, msg = codec.decode_frame(data, self.s.max_tcp_message)
        except codec.DecodeError as e:
            self._drop(e.reason, e.detail)
            return None, []
        out: list[Action] = []
        if isinstance(msg, Ping):
            if msg.target_id != self.id:
                self._drop("wrong_target", f"a TCP ping for {msg.target_id!r}, not {self.id!r}")
                return None, []
            return codec.encode_frame(self.id, Ack(msg.seq)), []
        if isinstance(msg, PushPullReq):
            theirs = {d.node_id: d for d in msg.digest}
            entries, wants = [], []
            for m in self.members.values():
                d = theirs.get(m.node_id)
                # The requester's own record always travels both ways: digests carry no
                # address, so only the full entries reveal a second agent using a live id.
                if d is None or m.node_id == sender or (d.incarnation, d.status, d.version) != (
                        m.incarnation, m.status, 0 if m.partial else m.version):
                    entries.append(self._entry(m))
                    if d is not None:
                        wants.append(m.node_id)
            wants += [i for i in theirs if i not in self.members]
            return codec.encode_frame(self.id, PushPullResp(entries, wants)), out
        if isinstance(msg, PushPullPush):
            self._merge(now, msg.entries, out)
            self.synced = True
            return None, out
        self._drop("unexpected_tcp")
        return None, []

    def handle_stream_reply(self, now: float, addr: Addr, data: bytes | None) -> list[Action]:
        """The reply to a SendTcp with expect_reply, or None if the exchange failed."""
        if data is None:
            return []
        try:
            sender, msg = codec.decode_frame(data, self.s.max_tcp_message)
        except codec.DecodeError as e:
            self._drop(e.reason, e.detail)
            return []
        if not isinstance(msg, PushPullResp):
            self._drop("unexpected_tcp")
            return []
        if addr in self._seeds:
            self._seed_ids[addr] = sender
        out: list[Action] = []
        self._merge(now, msg.entries, out, learn_down=not self.synced)
        self.synced = True
        pushed = [self._entry(self.members[i]) for i in msg.wants if i in self.members]
        if pushed:
            out.append(SendTcp(addr, codec.encode_frame(self.id, PushPullPush(pushed)), expect_reply=False))
        return out

    def tcp_probe_result(self, now: float, seq: int, data: bytes | None) -> list[Action]:
        p = self._probe
        if p is None or p.seq != seq or data is None:
            return []
        try:
            _, msg = codec.decode_frame(data, self.s.max_tcp_message)
        except codec.DecodeError as e:
            self._drop(e.reason, e.detail)
            return []
        if isinstance(msg, Ack) and msg.seq == seq:
            p.tcp_ok = True
        return []

    # --- datagrams -------------------------------------------------------------------------

    def handle_packet(self, now: float, src: Addr, data: bytes) -> list[Action]:
        """One datagram's plaintext from ``src``. Undecodable input is counted in
        ``dropped`` and ignored."""
        try:
            _, msgs = codec.decode_datagram(data)
        except codec.DecodeError as e:
            self._drop(e.reason, e.detail)
            return []
        out: list[Action] = []
        asked = False  # a Ping or PingReq answered from this datagram already
        for msg in msgs:
            if isinstance(msg, (Ping, PingReq)):
                # An agent puts one in a datagram; more would make each datagram we get
                # send many (to an address the sender names, or spoofs as its own).
                if asked:
                    self._drop("extra_request", "a datagram with more than one ping or ping-req: answered the first")
                    continue
                asked = True
            if isinstance(msg, Ping):
                if msg.target_id != self.id:
                    # e.g. a new agent took over this address
                    self._drop("wrong_target", f"a ping for {msg.target_id!r}, not {self.id!r}")
                    continue
                if not self.left:
                    out.append(self._packet(src, [Ack(msg.seq)]))
            elif isinstance(msg, Ack):
                self._on_ack(now, msg.seq, out)
            elif isinstance(msg, Nack):
                p = self._probe
                if p is not None and p.seq == msg.seq:
                    p.nacks += 1
            elif isinstance(msg, PingReq):
                if len(self._relays) >= MAX_RELAYS:
                    self._drop("relay_busy", f"{MAX_RELAYS} indirect probes in flight for peers already")
                elif not self.left:
                    seq = self._next_seq()
                    nack_at = now + self.s.probe_timeout * 0.8 if msg.want_nack else None
                    self._relays[seq] = _Relay(src, msg.seq, nack_at, now + self.s.probe_interval * self._scale())
                    out.append(self._packet(msg.target, [Ping(seq, msg.target_id)]))
            elif isinstance(msg, Alive):
                self._on_alive(now, msg, out)
            elif isinstance(msg, Suspect):
                self._on_suspect(now, msg, out)
            elif isinstance(msg, Dead):
                self._on_dead(now, msg, out)
            elif isinstance(msg, State):
                self._on_state(now, msg, out)
            else:
                self._drop("unexpected_udp")
        return out

    def _on_ack(self, now: float, seq: int, out: list[Action]) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                self._health(-1)
                if not p.indirect_sent:
                    self.rtt_samples.append(now - p.started)
            return
        r = self._relays.pop(seq, None)
        if r is not None:
            out.append(self._packet(r.requester, [Ack(r.orig_seq)]))

    def _on_alive(self, now: float, msg: Alive, out: list[Action]) -> None:
        if msg.node_id == self.id:
            if msg.addr != self.addr:
                self.stats["conflicts"] += 1
                out.append(Event("conflict", self.id,
                                 f"the agent at {msg.addr[0]}:{msg.addr[1]} uses our node id {self.id!r}; "
                                 "give one of the two agents another --node-id"))
            elif msg.incarnation > self.incarnation and not self.left:
                self._refute(msg.incarnation)
            return
        m = self.members.get(msg.node_id)
        if m is None:
            self._insert(Member(msg.node_id, msg.addr, msg.incarnation, ALIVE, now, now))
            self._broadcast(msg)
            out.append(Event("joined", msg.node_id, f"{msg.addr[0]}:{msg.addr[1]}"))
            return
        if msg.addr != m.addr and m.status in (ALIVE, SUSPECT):
            self.stats["conflicts"] += 1
            out.append(Event("conflict", msg.node_id,
                             f"refused {msg.addr[0]}:{msg.addr[1]} claiming node id {msg.node_id!r}, which is "
                             f"live at {m.addr[0]}:{m.addr[1]}; give the new agent another --node-id"))
            return
        if msg.incarnation <= m.incarnation:
            return  # stale or already known: this is what keeps the dead from resurrecting
        prev = m.status
        m.incarnation = msg.incarnation
        m.last_update = now
        if msg.addr != m.addr:
            self._set_addr(m, msg.addr)
        self._set_status(m, ALIVE, now)
        self._broadcast(msg)
        if prev == SUSPECT:
            self.stats["suspicions_refuted"] += 1
        if prev == DEAD and self._gone:
            # A member we held dead is back: likely a healed partition, so the other
            # members we hold dead may be alive too. Try one of them soon instead of
            # waiting out the re-join interval; each success triggers the next.
            self._next_rejoin_at = min(self._next_rejoin_at, now + self.s.gossip_interval)
        if prev != ALIVE:
            out.append(Event("alive", msg.node_id, f"was {STATUS_NAMES[prev]}, incarnation {msg.incarnation}"))

    def _on_suspect(self, now: float, msg: Suspect, out: list[Action]) -> None:
        if msg.node_id == self.id:
            if msg.incarnation >= self.incarnation and not self.left:
                self._refute(msg.incarnation)
            return
        m = self.members.get(msg.node_id)
        if m is None or msg.incarnation < m.incarnation or m.status in (DEAD, LEFT):
            return
        if m.status == SUSPECT:
            s = self._suspicions.get(m.node_id)
            if s is not None and s.confirm(msg.from_id):
                self._broadcast(msg)  # spread the confirmation: it shortens others' timers
            return
        m.incarnation = msg.incarnation
        m.last_update = now
        self._set_status(m, SUSPECT, now)
        min_t, max_t = self.suspicion_bounds()
        k = int(self.s.suspicion_mult) - 2
        if self.num_live() - 2 < k:
            k = 0
        self._suspicions[m.node_id] = _Suspicion(now, k, min_t, max_t, {msg.from_id})
        if msg.from_id != self.id:
            # Probe the suspect next: our own probe either confirms the suspicion (an
            # independent confirmation, which shortens everyone's timer) or, through
            # the buddy message it carries, prompts the suspect to refute at once.
            self._probe_order.append(m.node_id)
        self._broadcast(msg)
        out.append(Event("suspect", m.node_id, f"accused by {msg.from_id}"))

    def _on_dead(self, now: float, msg: Dead, out: list[Action]) -> None:
        if msg.node_id == self.id:
            if msg.incarnation >= self.incarnation and not self.left:
                self._refute(msg.incarnation)
            return
        m = self.members.get(msg.node_id)
        if m is None or msg.incarnation < m.incarnation or m.status in (DEAD, LEFT):
            return
        left = msg.from_id == msg.node_id
        m.incarnation = msg.incarnation
        m.last_update = now
        self._set_status(m, LEFT if left else DEAD, now)
        self._broadcast(msg)
        out.append(Event("left" if left else "dead", m.node_id, "" if left else f"declared by {msg.from_id}"))

    def _on_state(self, now: float, msg: State, out: list[Action]) -> None:
        if msg.node_id == self.id:
            me = self.members[self.id]
            stale_twin = msg.version == self._state_version and me.state is not None and msg.state != me.state.to_wire()
            if msg.version > self._state_version or stale_twin:
                # An older life of ours published higher versions: jump past them.
                self._state_version = msg.version
                if self._pending_state is None and me.state is not None:
                    self._pending_state = me.state
                self._next_state_at = now
            return
        m = self.members.get(msg.node_id)
        if m is None or m.status in (DEAD, LEFT):
            return
        if msg.version < m.version or (msg.version == m.version and (msg.partial or not m.partial)):
            return
        try:
            if msg.partial:
                vector = ResourceVector.from_wire(dict(msg.state.get("rv", {})))
                base = m.state or NodeState(node_id=m.node_id)
                state = dataclasses.replace(base, vector=vector, version=msg.version)
            else:
                state = NodeState.from_wire(msg.state)
                state.version = msg.version
        except Exception as e:  # a peer's malformed state must not take the agent down
            self._drop("bad_state", f"state of {m.node_id!r}: {type(e).__name__}: {e}"[:200])
            return
        if state.node_id != m.node_id:
            self._drop("bad_state", f"state of {m.node_id!r} names node {state.node_id!r}"[:200])
            return
        if m.state is None or m.state.position != state.position:
            self._group_cache = None  # group_of may read positions from member states
        m.state, m.version, m.partial, m.last_update = state, msg.version, msg.partial, now
        self._broadcast(msg)
        out.append(Event("updated", m.node_id, f"state version {msg.version}"))
