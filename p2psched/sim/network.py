"""A simulated network with a virtual clock, for driving sans-IO cores.

Generic on purpose: endpoints are any hashable address, and what they exchange is
opaque bytes. The membership simulator uses it, and a placement simulator can reuse it.

Modelled: per-link latency (a function of source and destination, so a topology can
supply it; jitter in it reorders packets as real networks do), random loss and
duplication of datagrams, partitions (groups that cannot reach each other), pauses
(a SIGSTOPped process: nothing runs, arriving datagrams wait in a bounded socket
buffer and are read on resume) and crashes (everything to and from it is lost).
Streams (TCP) are reliable but fail across partitions and to crashed or paused hosts.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

Address = Any  # any hashable
LatencyFn = Callable[[Any, Any], float]


@dataclass
class Endpoint:
    on_datagram: Callable[[Address, bytes], None]
    on_stream: Callable[[Address, bytes], bytes | None] | None = None
    on_resume: Callable[[], None] | None = None
    paused: bool = False
    crashed: bool = False
    buffer: list[tuple[Address, bytes]] = field(default_factory=list)


@dataclass
class LinkStats:
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_lost: int = 0
    stream_bytes_sent: int = 0


class SimNetwork:
    def __init__(
        self,
        rng: random.Random,
        latency: LatencyFn | None = None,
        loss: float = 0.0,
        duplicate: float = 0.0,
        overhead: int = 0,
        socket_buffer: int = 256,
        stream_timeout: float = 1.0,
    ) -> None:
        """``overhead``: bytes added to each datagram's count (encryption, UDP/IP
        headers) so byte figures match the wire. ``socket_buffer``: datagrams a paused
        endpoint's kernel buffer holds; more are dropped, as the kernel does."""
        self.rng = rng
        self.latency: LatencyFn = latency or (lambda a, b: 0.001)
        self.loss = loss
        self.duplicate = duplicate
        self.overhead = overhead
        self.socket_buffer = socket_buffer
        self.stream_timeout = stream_timeout
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._counter = itertools.count()
        self.endpoints: dict[Address, Endpoint] = {}
        self.stats: dict[Address, LinkStats] = defaultdict(LinkStats)
        self._side: dict[Address, int] = {}  # partition side; absent means side 0

    # --- clock --------------------------------------------------------------------

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (max(t, self.now), next(self._counter), fn, args))

    def after(self, dt: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def run_until(self, t: float) -> None:
        q = self._queue
        while q and q[0][0] <= t:
            when, _, fn, args = heapq.heappop(q)
            self.now = when
            fn(*args)
        self.now = max(self.now, t)

    # --- endpoints and faults -------------------------------------------------------

    def attach(self, addr: Address, endpoint: Endpoint) -> None:
        self.endpoints[addr] = endpoint

    def crash(self, addr: Address) -> None:
        self.endpoints[addr].crashed = True

    def pause(self, addr: Address) -> None:
        self.endpoints[addr].paused = True

    def resume(self, addr: Address) -> None:
        ep = self.endpoints[addr]
        ep.paused = False
        pending, ep.buffer = ep.buffer, []
        if ep.on_resume is not None:
            ep.on_resume()
        for src, data in pending:
            if not ep.crashed and not ep.paused:
                ep.on_datagram(src, data)

    def partition(self, groups: list[set[Address]]) -> None:
        """Each group can reach only itself; addresses in no group form one more group."""
        self._side = {a: i + 1 for i, g in enumerate(groups) for a in g}

    def heal(self) -> None:
        self._side = {}

    def reachable(self, a: Address, b: Address) -> bool:
        return self._side.get(a, 0) == self._side.get(b, 0)

    def is_up(self, addr: Address) -> bool:
        ep = self.endpoints.get(addr)
        return ep is not None and not ep.crashed and not ep.paused

    # --- datagrams -------------------------------------------------------------------

    def send(self, src: Address, dst: Address, data: bytes) -> None:
        st = self.stats[src]
        st.packets_sent += 1
        st.bytes_sent += len(data) + self.overhead
        if self.rng.random() < self.loss or not self.reachable(src, dst):
            st.packets_lost += 1
            return
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            self.after(self.latency(src, dst), self._deliver, src, dst, data)

    def _deliver(self, src: Address, dst: Address, data: bytes) -> None:
        ep = self.endpoints.get(dst)
        if ep is None or ep.crashed or not self.reachable(src, dst):
            return
        if ep.paused:
            if len(ep.buffer) < self.socket_buffer:
                ep.buffer.append((src, data))
            return
        ep.on_datagram(src, data)

    # --- streams -----------------------------------------------------------------------

    def stream(self, src: Address, dst: Address, data: bytes,
               on_reply: Callable[[bytes | None], None] | None) -> None:
        """One request over a fresh connection (handshake plus request: 1.5 round trips),
        and its reply if ``on_reply``. Fails after stream_timeout if dst cannot answer."""
        ep = self.endpoints.get(dst)
        if ep is None or ep.crashed or ep.paused or not self.reachable(src, dst):
            if on_reply is not None:
                self.after(self.stream_timeout, on_reply, None)
            return
        self.stats[src].stream_bytes_sent += len(data)
        lat = self.latency(src, dst)
        self.after(3 * lat, self._stream_arrive, src, dst, data, on_reply)

    def _stream_arrive(self, src: Address, dst: Address, data: bytes,
                       on_reply: Callable[[bytes | None], None] | None) -> None:
        ep = self.endpoints.get(dst)
        if ep is None or ep.crashed or ep.paused or ep.on_stream is None or not self.reachable(src, dst):
            if on_reply is not None:
                self.after(self.stream_timeout, on_reply, None)
            return
        reply = ep.on_stream(src, data)
        if on_reply is None:
            return
        if reply is None:
            self.after(self.latency(dst, src), on_reply, None)
            return
        self.stats[dst].stream_bytes_sent += len(reply)
        self.after(self.latency(dst, src), on_reply, reply)
