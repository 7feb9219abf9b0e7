"""The transfer service: job offers, results and cancels between agents over TCP.

A thin trio adapter: it frames messages (``frames.py``), does mutual TLS when the
agent has cluster certificates (``security/tls.py``), pools outgoing connections
per peer, and hands each request to a handler the agent supplies. One request is
in flight per connection; the pool opens more connections when requests overlap.

    service = TransferService(bind, handler, tls=NodeTLS or None, node_id=...)
    await nursery.start(service.serve)
    reply = await service.request(peer_id, "10.0.0.2:7702", {"t": "offer", ...})
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2psched.logs import RateLimitedLog
from p2psched.transfer import messages as m
from p2psched.transfer.frames import DEFAULT_MAX_FRAME, FrameError, FrameReader, encode

log = logging.getLogger("p2psched.transfer")
#: Lines about what peers send (bad frames, failed handshakes), rate limited.
peer_log = RateLimitedLog(log)

Handler = Callable[[str | None, dict[str, Any]], Awaitable[dict[str, Any]]]

#: A request that gets no reply in this long fails, and the caller treats the peer
#: as unreachable for this attempt. Offers carry up to 128 MiB, ~1 s at 1 Gb/s.
REQUEST_TIMEOUT_S = 30.0
#: Idle pooled connections kept per peer. Requests beyond this open short-lived ones.
POOL_PER_PEER = 4
#: A connection that brings no request for this long is closed, so that stalled or
#: forgotten connections do not hold descriptors forever. A client's pooled connection
#: closed this way is replaced on its next request (``request`` retries on a fresh one).
IDLE_TIMEOUT_S = 120.0
#: Once a frame's first bytes are in, the whole frame must be in within this long:
#: what a client allows for a whole request, so no honest frame takes longer.
FRAME_TIMEOUT_S = REQUEST_TIMEOUT_S
_CHUNK = 256 * 1024


class TransferError(ConnectionError):
    """The request got no answer. ``sent``: it went out whole (on some connection), so
    the peer may have acted on it; False: it never left this host whole."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class TransferRefused(TransferError):
    """The peer was reached and answered with an ``error``: it did not understand or
    would not take the request."""


class _Busy(FrameError):
    """The frames arriving from peers are over the server's memory budget."""


class _Budget:
    """Bytes of frames not yet whole, over all of a server's connections. Without it each
    connection could hold a frame of up to max_frame half sent: N connections, N x 160 MiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class _Conn:
    def __init__(self, stream: trio.abc.Stream, max_frame: int) -> None:
        self.stream = stream
        self.reader = FrameReader(max_frame)
        self.pending: list[dict[str, Any]] = []
        self.held = 0  # of a _Budget, on the server side

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stream.send_all(encode(msg))

    async def receive(self) -> dict[str, Any] | None:
        while not self.pending:
            data = await self.stream.receive_some(_CHUNK)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    async def receive_request(self, budget: _Budget, idle_timeout: float, frame_timeout: float
                              ) -> dict[str, Any] | None:
        """The server's ``receive``: raises TooSlowError when no frame starts within
        ``idle_timeout`` or one takes over ``frame_timeout``, and FrameError when this
        connection's partial frame would overrun ``budget``."""
        frame_deadline = math.inf
        while not self.pending:
            deadline = frame_deadline if self.reader.buffered else trio.current_time() + idle_timeout
            with trio.fail_at(deadline):
                data = await self.stream.receive_some(_CHUNK)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
            if not self.reader.buffered:
                frame_deadline = math.inf
            elif frame_deadline == math.inf:
                frame_deadline = trio.current_time() + frame_timeout
            budget.used += self.reader.buffered - self.held
            self.held = self.reader.buffered
            if budget.used > budget.limit:
                raise _Busy(f"busy: {budget.used >> 20} MiB of frames are arriving from peers, over the "
                            f"limit of {budget.limit >> 20} MiB; try again shortly")
        return self.pending.pop(0)

    def release(self, budget: _Budget) -> None:
        budget.used -= self.held
        self.held = 0


class TransferService:
    def __init__(self, bind: tuple[str, int], handler: Handler, *, node_id: str, tls: Any = None,
                 max_frame: int = DEFAULT_MAX_FRAME, max_buffered: int | None = None,
                 idle_timeout: float = IDLE_TIMEOUT_S, frame_timeout: float = FRAME_TIMEOUT_S) -> None:
        """``max_buffered``: bytes of frames not yet whole over all connections (default:
        two frames of ``max_frame``); a connection that would go over gets an error."""
        self.bind = bind
        self.handler = handler
        self.node_id = node_id
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self._budget = _Budget(max_buffered if max_buffered is not None else 2 * max_frame)
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        if tls is not None:
            from p2psched.security.tls import client_context, server_context

            self._server_ctx = server_context(tls)
            self._client_ctx = client_context(tls)
        self._idle: dict[str, list[_Conn]] = defaultdict(list)
        self.refused_handshakes = 0

    # ------------------------------------------------------------------ server

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = self.bind
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(trio.serve_listeners, self._handle_connection, [listener])
                task_status.started()
        finally:
            for listener in listeners:
                await listener.aclose()

    async def _handle_connection(self, tcp: trio.SocketStream) -> None:
        peer: str | None = None
        stream: trio.abc.Stream = tcp
        conn: _Conn | None = None
        try:
            try:
                host, port = tcp.socket.getpeername()[:2]
                where = f"{host}:{port}"
            except OSError:
                where = "a peer that is gone"
            if self._server_ctx is not None:
                from p2psched.security.tls import accept_peer

                try:
                    with trio.fail_after(10):
                        stream, peer = await accept_peer(tcp, self._server_ctx)
                except (ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
                    self.refused_handshakes += 1
                    peer_log.warning("handshake", "transfer: refused a connection without a valid cluster certificate "
                                     "from %s: %s", where, str(e) or type(e).__name__)
                    return
            conn = _Conn(stream, self.max_frame)
            while True:
                try:
                    msg = await conn.receive_request(self._budget, self.idle_timeout, self.frame_timeout)
                except trio.TooSlowError:
                    if conn.reader.buffered:  # an idle connection is closed quietly: pools leave them so
                        peer_log.warning("slow", "transfer: closed the connection from %s (%s): a frame took over "
                                         "%g s", where, peer or "no certificate", self.frame_timeout)
                    return
                except FrameError as e:
                    peer_log.warning("busy" if isinstance(e, _Busy) else "frame",
                                     "transfer: dropping the connection from %s (%s): %s",
                                     where, peer or "no certificate", e)
                    await conn.send(m.error(str(e)))
                    return
                if msg is None:
                    return
                try:
                    reply = await self.handler(peer, msg)
                except ValueError as e:
                    reply = m.error(str(e))
                except Exception as e:  # noqa: BLE001 - a bug on one message must not stop the agent
                    log.exception("transfer: handling a %r message from %s failed", msg.get("t"), peer or "peer")
                    reply = m.error(f"{self.node_id} could not handle this {msg.get('t')} message "
                                    f"({type(e).__name__}: {e}); its log has the details")
                await conn.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return
        finally:
            if conn is not None:
                conn.release(self._budget)
            await trio.aclose_forcefully(stream)

    # ------------------------------------------------------------------ client

    async def _connect(self, node_id: str, address: str) -> _Conn:
        host, _, port = address.rpartition(":")
        if self._client_ctx is not None:
            from p2psched.security.tls import connect_peer

            stream: trio.abc.Stream = await connect_peer(host, int(port), node_id, self._client_ctx)
        else:
            stream = await trio.open_tcp_stream(host, int(port))
        return _Conn(stream, self.max_frame)

    async def request(self, node_id: str, address: str, msg: dict[str, Any],
                      timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Send one request and return the reply; raises TransferError when the peer can't be reached."""
        idle = self._idle[node_id]
        sent = False
        for fresh in (False, True):
            conn = None
            try:
                with trio.fail_after(timeout):
                    conn = idle.pop() if (idle and not fresh) else await self._connect(node_id, address)
                    await conn.send(msg)
                    sent = True
                    reply = await conn.receive()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    ssl.SSLError, FrameError) as e:
                if conn is not None:
                    await trio.aclose_forcefully(conn.stream)
                # A pooled connection the peer closed fails at once: try a fresh one. A peer
                # that gave no answer for the whole timeout gets no second one (it doubled
                # every wait on a hung peer, and sent the request twice).
                if fresh or isinstance(e, trio.TooSlowError):
                    raise TransferError(f"cannot reach {node_id} at {address}: {e or type(e).__name__}",
                                        sent=sent) from e
                continue
            if reply is None:
                await trio.aclose_forcefully(conn.stream)
                if fresh:
                    raise TransferError(f"{node_id} at {address} closed the connection without replying", sent=sent)
                continue
            if len(idle) < POOL_PER_PEER:
                idle.append(conn)
            else:
                await trio.aclose_forcefully(conn.stream)
            if reply.get("t") == m.ERROR:
                raise TransferRefused(f"{node_id} refused the request: {reply.get('message')}")
            return reply
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await trio.aclose_forcefully(conn.stream)
        self._idle.clear()
