"""The trio adapter around the membership core: sockets, timers, keyring, metrics.

Public interface (what the agent uses)::

    svc = MembershipService(settings, node_id, ("0.0.0.0", 7946), local_state, registry, log)
    addr = await nursery.start(svc.run)     # bound and joining; returns the advertised addr
    svc.update_local_state(new_state)       # or a function NodeState -> NodeState
    svc.members() -> list[MemberView]       # everyone we know, us included
    rx = svc.subscribe()                    # trio.MemoryReceiveChannel[swim.Event]
    await svc.leave()                       # peers mark us `left`; run() then returns

One UDP socket and one TCP listener share host:port; TCP carries push-pull and the
TCP probe fallback, one sealed length-prefixed frame per connection. The adapter
holds no protocol logic: it only feeds the core (``swim.Membership``) with time and
bytes and carries out the actions it returns.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from p2psched.logs import RateLimitedLog
from p2psched.membership import discovery
from p2psched.membership.keyring import OpenError, Sealer, sealer_for
from p2psched.membership.messages import Addr
from p2psched.membership.settings import MembershipSettings
from p2psched.membership.swim import Action, Event, Membership, Send, SendTcp, TcpProbe
from p2psched.resources import NodeState

_FRAME_HEADER = struct.Struct(">I")
#: The event-loop lag probe's period while there are live peers: a stall longer than
#: lag_threshold then makes our acks late, and Lifeguard counts it against our health.
_LAG_PERIOD = 0.1
#: Without a live peer there is no ack to make late; the probe only keeps the
#: loop_lag_seconds gauge fresh, so an agent alone wakes for it once a second.
_LAG_PERIOD_ALONE = 1.0
#: Inbound TCP connections (push-pull, TCP pings) read at once. Each may hold a frame of
#: up to max_tcp_message before its seal is checked, so this bounds what unauthenticated
#: peers can make us hold (16 x 8 MiB); legitimate ones are a few per push-pull period.
_TCP_SERVE_AT_ONCE = 16
#: Inbound TCP connections open at once, waiting ones included; more are closed on
#: accept, so that a flood of connections cannot take every file descriptor.
_TCP_OPEN_MAX = 128
#: What each reason a packet is dropped for means, for the log line.
_DROP_HINTS = {
    "auth": "not sealed with a key of our keyring, or sealed for another cluster name",
    "stale": "timestamp outside the replay window; are the clocks in sync?",
    "replay": "a nonce seen before: a replayed packet",
    "unencrypted": "an --insecure peer, and we have a gossip key",
    "encrypted": "a peer with a gossip key, and we run --insecure",
    "cluster": "an --insecure peer of another cluster name",
    "version": "not a p2psched gossip packet",
    "short": "too short to be a packet",
    "too_large": "over the size limit",
}
#: Drops that are our own doing, not a peer's input: counted, not logged per packet.
_LOCAL_DROPS = frozenset({"send_queue_full", "send_error", "slow_subscriber", "tcp_busy"})


@dataclass(frozen=True)
class MemberView:
    node_id: str
    addr: Addr
    state: str  # alive | suspect | dead | left
    incarnation: int
    age_s: float  # seconds since we last learned something about it
    node_state: NodeState | None

    def as_dict(self) -> dict[str, Any]:
        ns = self.node_state
        return {
            "id": self.node_id, "addr": f"{self.addr[0]}:{self.addr[1]}", "state": self.state,
            "incarnation": self.incarnation, "age_s": round(self.age_s, 3),
            "version": ns.version if ns else 0,
            "resources": ns.vector.as_dict() if ns else None,
            "position": ns.position if ns else "",
            "api": ns.api if ns else "", "transfer": ns.transfer if ns else "",
            "agent_version": ns.agent_version if ns else "", "labels": dict(ns.labels) if ns else {},
        }


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "p2psched_membership_"
        r = registry
        self.members = Gauge(p + "members", "Members by state, as this agent sees them", ["state"], registry=r)
        self.probes_sent = Counter(p + "probes_sent", "Probes sent", registry=r)
        self.probes_failed = Counter(p + "probes_failed", "Probes with no ack, direct, indirect or TCP", registry=r)
        self.suspicions_raised = Counter(p + "suspicions_raised", "Peers this agent started suspecting", registry=r)
        self.suspicions_refuted = Counter(p + "suspicions_refuted", "Suspected peers that proved alive", registry=r)
        self.self_refutations = Counter(p + "self_refutations", "Times this agent refuted its own suspicion or death", registry=r)
        self.packets_in = Counter(p + "packets_in", "Datagrams received", registry=r)
        self.packets_out = Counter(p + "packets_out", "Datagrams sent", registry=r)
        self.dropped = Counter(p + "packets_dropped", "Packets dropped, by reason", ["reason"], registry=r)
        self.bytes_in = Counter(p + "bytes_in", "Bytes received (UDP and TCP)", registry=r)
        self.bytes_out = Counter(p + "bytes_out", "Bytes sent (UDP and TCP)", registry=r)
        self.rtt = Histogram(p + "probe_rtt_seconds", "Direct probe round trip", registry=r,
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
        self.health = Gauge(p + "health_score", "Lifeguard local health: 0 is healthy; timeouts scale by score+1", registry=r)
        self.lag = Gauge(p + "loop_lag_seconds", "Last measured trio scheduling lag", registry=r)


class MembershipService:
    def __init__(
        self,
        settings: MembershipSettings,
        node_id: str,
        bind: tuple[str, int],
        local_state: NodeState,
        registry: CollectorRegistry | None,
        log: logging.Logger | None = None,
        *,
        group_of: Callable[[str], str | None] | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        """Raises ``keyring.KeyringError`` at once if the key file is missing or bad."""
        self.settings = settings
        self.node_id = node_id
        self.bind = bind
        self.log = log or logging.getLogger("p2psched.membership")
        self.sealer = sealer or sealer_for(settings.key_file, settings.insecure, settings.cluster_name,
                                           settings.replay_window)
        self.metrics = _Metrics(registry if registry is not None else CollectorRegistry())
        self._initial_state = local_state
        self._group_of = group_of
        self.core: Membership | None = None
        self.addr: Addr | None = None
        self._subscribers: list[trio.MemorySendChannel[Event]] = []
        self._wake = trio.Event()
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[Addr, bytes]](1024)
        self._tcp_limit = trio.CapacityLimiter(32)
        self._serve_limit = trio.CapacityLimiter(_TCP_SERVE_AT_ONCE)
        self._tcp_open = 0
        self._peer_log = RateLimitedLog(self.log)
        self._nursery: trio.Nursery | None = None
        self._synced: dict[str, int] = {}
        self._done = trio.Event()
        self._cancel: trio.CancelScope | None = None

    # --- public -----------------------------------------------------------------------

    @staticmethod
    async def _bind_udp_and_tcp(host: str, port: int) -> tuple[Any, list[trio.SocketListener]]:
        """The gossip port, bound for UDP and TCP. With port 0 the kernel picks a free UDP
        port, which another process may hold for TCP: then pick again (a few times)."""
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        attempts = 0
        while True:
            attempts += 1
            udp = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
            try:
                await udp.bind((host, port))
                return udp, await trio.open_tcp_listeners(udp.getsockname()[1], host=host)
            except OSError as e:
                udp.close()
                if port != 0 or e.errno != errno.EADDRINUSE or attempts == 20:
                    raise

    async def run(self, *, task_status: trio.TaskStatus[Addr] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        host, port = self.bind
        udp, listeners = await self._bind_udp_and_tcp(host, port)
        port = udp.getsockname()[1]
        self.addr = discovery.advertise_address(s.advertise, host, port)
        if s.insecure:
            self.log.warning("membership: --insecure: gossip is NOT encrypted or authenticated; anyone on this "
                             "network can read it and forge members. Use a key file outside tests.")
        now = trio.current_time()
        self.core = Membership(s, self.node_id, self.addr, random.Random(), now,
                               packet_budget=s.max_datagram - self.sealer.overhead,
                               local_state=self._initial_state, group_of=self._group_of)
        self.log.info("membership: %s listening on %s:%d (UDP and TCP), advertising %s:%d",
                      self.node_id, host, port, *self.addr)
        try:
            with trio.CancelScope() as self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._recv_loop, udp)
                    nursery.start_soon(self._send_loop, udp)
                    nursery.start_soon(trio.serve_listeners, self._serve_tcp, listeners)
                    nursery.start_soon(self._tick_loop)
                    nursery.start_soon(self._lag_loop)
                    await nursery.start(discovery.run, s, self.node_id, self.addr, self._on_seeds, self.log)
                    task_status.started(self.addr)
        finally:
            udp.close()
            for ch in self._subscribers:
                ch.close()
            self._done.set()

    def update_local_state(self, state: NodeState | Callable[[NodeState], NodeState]) -> None:
        """Publish a new node state (coalesced and rate limited by the core)."""
        core = self._need_core()
        if callable(state):
            current = core.latest_local_state or self._initial_state
            state = state(current)
        self._execute(core.set_local_state(trio.current_time(), state))
        self._wake.set()

    def member_count(self) -> int:
        """How many members this agent knows, itself included, whatever their state."""
        return len(self._need_core().members)

    def members(self) -> list[MemberView]:
        core = self._need_core()
        now = trio.current_time()
        return [MemberView(m.node_id, m.addr, m.status_name, m.incarnation, now - m.last_update, m.state)
                for m in core.member_list()]

    @property
    def synced(self) -> bool:
        """Whether a full state exchange with a peer has completed (see Membership.synced)."""
        return self.core is not None and self.core.synced

    def subscribe(self, max_buffer: int = 1024) -> trio.MemoryReceiveChannel[Event]:
        """Membership events from now on. A subscriber that falls max_buffer behind
        loses events (counted as dropped{reason="slow_subscriber"}), never stalls gossip."""
        send, recv = trio.open_memory_channel[Event](max_buffer)
        self._subscribers.append(send)
        return recv

    async def leave(self, linger: float | None = None) -> None:
        """Tell every peer we leave, give the news ``linger`` seconds to spread (default:
        two gossip intervals), then stop ``run``."""
        core = self._need_core()
        self._execute(core.leave(trio.current_time()))
        self._wake.set()
        await trio.sleep(linger if linger is not None else 2 * self.settings.gossip_interval + 0.05)
        if self._cancel is not None:
            self._cancel.cancel()
        await self._done.wait()

    @property
    def health_score(self) -> int:
        return self._need_core().health

    # --- internals -------------------------------------------------------------------

    def _need_core(self) -> Membership:
        if self.core is None:
            raise RuntimeError("MembershipService is not running yet: start it with `await nursery.start(svc.run)` first")
        return self.core

    def _on_seeds(self, seeds: list[Addr]) -> None:
        core = self._need_core()
        core.set_seeds(seeds)
        self._wake.set()

    def _drop(self, reason: str, src: Addr | None = None, detail: str = "") -> None:
        self.metrics.dropped.labels(reason).inc()
        if src is not None:
            self._log_drop(reason, src, detail)

    def _log_drop(self, reason: str, src: Any, detail: str) -> None:
        """One warning per reason per interval, naming the sender and what was wrong."""
        if reason in _LOCAL_DROPS:
            return
        detail = detail or _DROP_HINTS.get(reason, "")
        self._peer_log.warning("drop:" + reason, "membership: dropped a packet from %s:%s: %s%s", src[0], src[1],
                               reason, f": {detail}" if detail else "")

    def _handled(self, core: Membership, drops_before: int, src: Any) -> None:
        """Log the packet the core just dropped, if it dropped one (it counts them itself)."""
        if core.drops != drops_before:
            reason, detail = core.last_drop
            self._log_drop(reason, src, detail)

    def _execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                try:
                    self._out_send.send_nowait((a.addr, a.data))
                except trio.WouldBlock:
                    self._drop("send_queue_full")
            elif isinstance(a, Event):
                self._on_event(a)
            elif isinstance(a, (SendTcp, TcpProbe)):
                if self._nursery is not None:
                    self._nursery.start_soon(self._tcp_exchange, a)
        self._wake.set()

    def _on_event(self, ev: Event) -> None:
        if ev.kind == "conflict":  # each forged packet makes one: rate limited
            self._peer_log.error("conflict", "membership: %s", ev.detail)
        elif ev.kind in ("dead", "suspect", "left", "joined", "alive"):
            self.log.info("membership: %s is %s %s", ev.node_id, ev.kind, ev.detail)
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(ev)
            except trio.WouldBlock:
                self._drop("slow_subscriber")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(ch)

    def _sync_metrics(self) -> None:
        core = self._need_core()
        m = self.metrics
        for state, n in core.counts().items():
            m.members.labels(state).set(n)
        pairs = [("probes_sent", m.probes_sent), ("probes_failed", m.probes_failed),
                 ("suspicions_raised", m.suspicions_raised), ("suspicions_refuted", m.suspicions_refuted),
                 ("self_refutations", m.self_refutations)]
        for key, counter in pairs:
            d = core.stats[key] - self._synced.get(key, 0)
            if d:
                counter.inc(d)
                self._synced[key] = core.stats[key]
        for reason, n in core.dropped.items():
            d = n - self._synced.get("drop:" + reason, 0)
            if d:
                m.dropped.labels(reason).inc(d)
                self._synced["drop:" + reason] = n
        while core.rtt_samples:
            m.rtt.observe(core.rtt_samples.popleft())
        m.health.set(core.health)

    async def _tick_loop(self) -> None:
        core = self._need_core()
        last_sync = -math.inf
        while True:
            deadline = core.next_deadline()
            if deadline > trio.current_time():
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                self._wake = trio.Event()
            now = trio.current_time()
            if now >= core.next_deadline():
                self._execute(core.tick(now))
                self._wake = trio.Event()
            if now - last_sync >= 0.5:
                last_sync = now
                self._sync_metrics()
            await trio.lowlevel.checkpoint()

    async def _lag_loop(self) -> None:
        core = self._need_core()
        while True:
            period = _LAG_PERIOD if core.num_live() > 1 else _LAG_PERIOD_ALONE
            t0 = trio.current_time()
            await trio.sleep(period)
            now = trio.current_time()
            lag = max(0.0, now - t0 - period)
            self.metrics.lag.set(lag)
            core.report_lag(now, lag)

    async def _recv_loop(self, udp: trio.socket.SocketType) -> None:
        core = self._need_core()
        limit = self.settings.max_datagram
        while True:
            try:
                data, src = await udp.recvfrom(65536)
            except OSError:  # e.g. ICMP port unreachable surfaced on Linux; not fatal
                continue
            self.metrics.packets_in.inc()
            self.metrics.bytes_in.inc(len(data))
            if len(data) > limit:
                self._drop("too_large", src, f"a datagram of {len(data)} bytes, over max_datagram ({limit})")
                continue
            try:
                plain = self.sealer.open(time.time(), data)
            except OpenError as e:
                self._drop(e.reason, src)
                continue
            drops = core.drops
            self._execute(core.handle_packet(trio.current_time(), (src[0], src[1]), plain))
            self._handled(core, drops, src)

    async def _send_loop(self, udp: trio.socket.SocketType) -> None:
        async for addr, data in self._out_recv:
            sealed = self.sealer.seal(time.time(), data)
            try:
                await udp.sendto(sealed, addr)
            except (OSError, ValueError) as e:  # ValueError: a host name Python cannot encode
                self._drop("send_error")
                self.log.debug("membership: sending to %s:%d failed: %s", addr[0], addr[1], e)
                continue
            self.metrics.packets_out.inc()
            self.metrics.bytes_out.inc(len(sealed))

    # --- TCP ---------------------------------------------------------------------------

    async def _read_frame(self, stream: trio.abc.ReceiveStream, src: Any = None) -> bytes | None:
        header = await _read_exact(stream, _FRAME_HEADER.size)
        if header is None:
            return None
        (n,) = _FRAME_HEADER.unpack(header)
        limit = self.settings.max_tcp_message + self.sealer.overhead
        if n > limit:
            self._drop("too_large", src, f"a TCP frame of {n} bytes, over max_tcp_message ({limit})")
            return None
        body = await _read_exact(stream, n)
        if body is not None:
            self.metrics.bytes_in.inc(n + _FRAME_HEADER.size)
        return body

    async def _write_frame(self, stream: trio.abc.SendStream, plain: bytes) -> None:
        sealed = self.sealer.seal(time.time(), plain)
        await stream.send_all(_FRAME_HEADER.pack(len(sealed)) + sealed)
        self.metrics.bytes_out.inc(len(sealed) + _FRAME_HEADER.size)

    def _open(self, sealed: bytes | None, src: Any = None) -> bytes | None:
        if sealed is None:
            return None
        try:
            return self.sealer.open(time.time(), sealed)
        except OpenError as e:
            self._drop(e.reason, src)
            return None

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        core = self._need_core()
        self._tcp_open += 1
        try:
            src = stream.socket.getpeername()
            if self._tcp_open > _TCP_OPEN_MAX:
                self._drop("tcp_busy")
                self._peer_log.warning("tcp_busy", "membership: closed a TCP connection from %s:%s at once: "
                                       "%d are open already (a flood?)", src[0], src[1], _TCP_OPEN_MAX)
                return
            # The time limit covers the wait for a turn too: a stalled peer holds a turn
            # (and its descriptor) for this long at most.
            with trio.move_on_after(max(5.0, self.settings.probe_interval * 5)):
                async with self._serve_limit:
                    plain = self._open(await self._read_frame(stream, src), src)
                    if plain is None:
                        return
                    drops = core.drops
                    reply, actions = core.handle_stream(trio.current_time(), (src[0], src[1]), plain)
                    self._handled(core, drops, src)
                    self._execute(actions)
                    if reply is not None:
                        await self._write_frame(stream, reply)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._tcp_open -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _tcp_exchange(self, a: SendTcp | TcpProbe) -> None:
        core = self._need_core()
        reply: bytes | None = None
        timeout = self.settings.probe_interval if isinstance(a, TcpProbe) else max(5.0, self.settings.probe_interval * 5)
        async with self._tcp_limit:
            with trio.move_on_after(timeout):
                try:
                    stream = await trio.open_tcp_stream(a.addr[0], a.addr[1])
                    async with stream:
                        await self._write_frame(stream, a.data)
                        if isinstance(a, TcpProbe) or a.expect_reply:
                            reply = self._open(await self._read_frame(stream, a.addr), a.addr)
                # ValueError: a member's host name that Python cannot encode
                except (OSError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
                    reply = None
        now = trio.current_time()
        if isinstance(a, TcpProbe):
            self._execute(core.tcp_probe_result(now, a.seq, reply))
        elif a.expect_reply:
            drops = core.drops
            self._execute(core.handle_stream_reply(now, a.addr, reply))
            self._handled(core, drops, a.addr)


async def _read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(65536, n - len(buf)))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
