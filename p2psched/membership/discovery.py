"""Where the first peers come from: static seeds, DNS names, and mDNS.

Each source is optional; together they produce one set of seed addresses, handed to
the core whenever it changes (``on_seeds``). The core joins through them while it
knows no live peer and keeps retrying those that are not live members.

* ``--join HOST:PORT`` (repeatable): static seeds.
* DNS names (``NAME:PORT``) resolving to several addresses, re-resolved every
  ``dns_interval`` so that new docker compose replicas are found.
* mDNS: advertise and browse ``_p2psched._udp.local.`` with zeroconf. zeroconf runs
  its own threads; its callbacks cross into trio only through
  ``trio.from_thread.run_sync`` with our trio token, onto a memory channel.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable

import trio

from p2psched.membership.messages import Addr
from p2psched.membership.settings import MembershipSettings

MDNS_SERVICE = "_p2psched._udp.local."


def parse_hostport(text: str, what: str = "--join", allow_any_port: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; the error says what a valid value looks like.
    ``allow_any_port`` accepts port 0 (bind: let the kernel choose)."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    low = 0 if allow_any_port else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"{what} {text!r} is not HOST:PORT; write it like 10.0.0.5:7946, node-3:7946 or [fe80::1]:7946")
    return host, int(port)


def primary_address() -> str:
    """This host's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the outgoing interface
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def advertise_address(advertise: str | None, bind_host: str, port: int) -> Addr:
    if advertise:
        return parse_hostport(advertise, "advertise")
    if bind_host in ("", "0.0.0.0", "::"):
        return primary_address(), port
    return bind_host, port


async def resolve(entries: list[tuple[str, int]], log: logging.Logger) -> set[Addr]:
    out: set[Addr] = set()
    for host, port in entries:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as e:
            log.warning("membership: cannot resolve seed %s:%d (%s); will retry", host, port, e)
            continue
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                out.add((str(sockaddr[0]), int(sockaddr[1])))
    return out


async def run(
    settings: MembershipSettings,
    node_id: str,
    addr: Addr,
    on_seeds: Callable[[list[Addr]], None],
    log: logging.Logger,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    static = [parse_hostport(x, "--join") for x in settings.join]
    names = [parse_hostport(x, "DNS name") for x in settings.dns_names]
    found_mdns: dict[str, Addr] = {}
    current: set[Addr] = set()

    def publish(dns_seeds: set[Addr]) -> None:
        nonlocal current
        seeds = (dns_seeds | set(found_mdns.values())) - {addr}
        if seeds != current:
            current = seeds
            on_seeds(sorted(seeds))

    dns_seeds = await resolve(static + names, log)
    publish(dns_seeds)
    async with trio.open_nursery() as nursery:
        if settings.mdns:
            send, recv = trio.open_memory_channel[tuple[str, Addr | None]](256)
            await nursery.start(_mdns, settings, node_id, addr, send, log)

            async def consume() -> None:
                async for name, found in recv:
                    if found is None:
                        found_mdns.pop(name, None)
                    elif found != addr:
                        found_mdns[name] = found
                    publish(dns_seeds)

            nursery.start_soon(consume)
        task_status.started()
        if static or names:
            while True:
                await trio.sleep(settings.dns_interval)
                dns_seeds = await resolve(static + names, log)
                publish(dns_seeds)


async def _mdns(
    settings: MembershipSettings,
    node_id: str,
    addr: Addr,
    send: trio.MemorySendChannel[tuple[str, Addr | None]],
    log: logging.Logger,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    token = trio.lowlevel.current_trio_token()
    cluster = settings.cluster_name.encode()

    def deliver(item: tuple[str, Addr | None]) -> None:  # runs in trio
        try:
            send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def handler(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # Runs on zeroconf's thread: blocking lookups are fine here, trio state is not.
        item: tuple[str, Addr | None] | None = None
        if state_change is ServiceStateChange.Removed:
            item = (name, None)
        else:
            info = zeroconf.get_service_info(service_type, name, timeout=1000)
            if info is None or info.properties.get(b"cluster") != cluster or info.port is None:
                return
            v4 = [a for a in info.parsed_addresses() if ":" not in a]
            addrs = v4 or info.parsed_addresses()
            if addrs:
                item = (name, (addrs[0], int(info.port)))
        if item is not None:
            try:
                trio.from_thread.run_sync(deliver, item, trio_token=token)
            except trio.RunFinishedError:
                pass

    info = ServiceInfo(
        MDNS_SERVICE, f"{node_id}.{MDNS_SERVICE}", port=addr[1],
        addresses=[socket.inet_pton(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, addr[0])],
        properties={"id": node_id, "cluster": settings.cluster_name},
    )
    state: dict[str, Any] = {}

    def start() -> None:
        zc = Zeroconf()
        state["zc"] = zc
        zc.register_service(info)
        state["browser"] = ServiceBrowser(zc, MDNS_SERVICE, handlers=[handler])

    def stop() -> None:
        zc = state.get("zc")
        if zc is None:
            return
        browser = state.get("browser")
        if browser is not None:
            browser.cancel()
        try:
            zc.unregister_service(info)
        finally:
            zc.close()

    try:
        await trio.to_thread.run_sync(start)
    except Exception as e:  # no multicast route, no interface: mDNS is a convenience
        log.warning("membership: mDNS disabled, zeroconf failed to start (%s); use --join or DNS names", e)
        await trio.to_thread.run_sync(stop)
        task_status.started()
        return
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(stop)
