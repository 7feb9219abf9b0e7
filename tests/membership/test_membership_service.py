"""The trio adapter in one process: real UDP and TCP on loopback, real zeroconf."""

from __future__ import annotations

import dataclasses
import errno
import logging
import uuid

import pytest
import trio
from prometheus_client import CollectorRegistry

from p2psched.membership.keyring import Keyring
from p2psched.membership.service import MembershipService
from p2psched.membership.settings import MembershipSettings
from p2psched.resources import NodeState, ResourceVector

KEY = bytes(range(32))


def fast(**over) -> MembershipSettings:
    base = MembershipSettings(mdns=False, cluster_name="svc-" + uuid.uuid4().hex[:8])
    return base.compressed(5).model_copy(update=over)


async def wait_until(cond, limit: float = 20.0) -> None:
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(0.05)


def service(settings, node_id, registry=None, **kw) -> MembershipService:
    return MembershipService(settings, node_id, ("127.0.0.1", 0), NodeState(node_id), registry,
                             logging.getLogger("test"), sealer=Keyring([KEY], settings.cluster_name), **kw)


async def test_join_state_events_metrics_and_leave():
    s = fast()
    reg = CollectorRegistry()
    a = service(s, "a", reg)
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(a.run)
        events = a.subscribe()
        b = service(s.model_copy(update={"join": [f"{addr[0]}:{addr[1]}"]}), "b")
        await nursery.start(b.run)
        await wait_until(lambda: {m.node_id for m in a.members() if m.state == "alive"} == {"a", "b"})

        b.update_local_state(lambda st: dataclasses.replace(st, vector=ResourceVector(cpu_total=16, cpu_free=3)))
        await wait_until(lambda: any(m.node_id == "b" and m.node_state and m.node_state.vector.cpu_free == 3
                                     for m in a.members()))
        view = {m.node_id: m for m in a.members()}["b"]
        assert view.as_dict()["resources"]["cpu_total"] == 16 and view.age_s >= 0

        # core counters reach prometheus at the adapter's next metrics sync (every 0.5 s)
        await wait_until(lambda: (reg.get_sample_value("p2psched_membership_probes_sent_total") or 0) >= 1)
        await b.leave()
        await wait_until(lambda: {m.node_id: m.state for m in a.members()}["b"] == "left", 5)
        kinds = []
        while True:
            try:
                ev = events.receive_nowait()
            except trio.WouldBlock:
                break
            if ev.node_id == "b":
                kinds.append(ev.kind)
        assert kinds[0] == "joined" and "updated" in kinds and kinds[-1] == "left"

        assert reg.get_sample_value("p2psched_membership_packets_in_total") > 0
        assert reg.get_sample_value("p2psched_membership_bytes_out_total") > 0
        await wait_until(lambda: (reg.get_sample_value("p2psched_membership_members", {"state": "left"}) or 0) == 1)
        assert reg.get_sample_value("p2psched_membership_health_score") is not None
        nursery.cancel_scope.cancel()


async def test_undecodable_and_foreign_packets_are_counted_not_fatal():
    s = fast()
    reg = CollectorRegistry()
    a = service(s, "a", reg)
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(a.run)
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.sendto(b"\x01" + b"garbage" * 10, addr)          # sealed-looking, wrong tag
            await sock.sendto(b"\x00\x01x hello", addr)                  # insecure packet to a keyed agent
            await sock.sendto(b"\x07", addr)                             # unknown format
            await sock.sendto(Keyring([KEY], "other").seal(0, b"x"), addr)  # another cluster's name
            await sock.sendto(b"\x01" * 1300, addr)                      # larger than any datagram we send
        await wait_until(lambda: sum(reg.get_sample_value("p2psched_membership_packets_dropped_total", {"reason": r}) or 0
                                     for r in ("auth", "unencrypted", "version", "too_large")) == 5)
        assert reg.get_sample_value("p2psched_membership_packets_dropped_total", {"reason": "auth"}) == 2
        assert [m.node_id for m in a.members()] == ["a"]
        nursery.cancel_scope.cancel()


async def test_mdns_discovery_joins_without_seeds():
    s = fast(mdns=True)
    a, b = service(s, "m-a"), service(s, "m-b")
    other = service(fast(mdns=True), "m-other")  # another cluster name on the same LAN
    async with trio.open_nursery() as nursery:
        for svc in (a, b, other):
            await nursery.start(svc.run)
        await wait_until(lambda: len(a.members()) == 2 and len(b.members()) == 2, 30)
        await trio.sleep(0.5)
        assert {m.node_id for m in a.members()} == {"m-a", "m-b"}
        assert [m.node_id for m in other.members()] == ["m-other"]
        nursery.cancel_scope.cancel()


async def test_key_file_problems_fail_at_construction(tmp_path):
    import pytest

    from p2psched.membership.keyring import KeyringError

    with pytest.raises(KeyringError, match="keygen --gossip"):
        MembershipService(MembershipSettings(mdns=False), "a", ("127.0.0.1", 0), NodeState("a"), None)
    bad = tmp_path / "k"
    bad.write_text("not base64!\n")
    with pytest.raises(KeyringError, match="line 1"):
        MembershipService(MembershipSettings(mdns=False, key_file=bad), "a", ("127.0.0.1", 0), NodeState("a"), None)


async def test_dns_name_seeds_are_resolved_and_joined():
    s = fast()
    a = service(s, "d-a")
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(a.run)
        b = service(s.model_copy(update={"dns_names": [f"localhost:{addr[1]}"], "dns_interval": 0.2}), "d-b")
        await nursery.start(b.run)
        await wait_until(lambda: {m.node_id for m in a.members()} == {"d-a", "d-b"})
        nursery.cancel_scope.cancel()


async def test_port_0_picks_again_when_the_udp_port_it_got_is_taken_for_tcp(monkeypatch):
    real = trio.open_tcp_listeners
    tried: list[int] = []

    async def taken_once(port, host=None, **kw):  # the first port the kernel hands out is held for TCP
        tried.append(port)
        if len(tried) == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real(port, host=host, **kw)

    monkeypatch.setattr(trio, "open_tcp_listeners", taken_once)
    udp, listeners = await MembershipService._bind_udp_and_tcp("127.0.0.1", 0)
    port = udp.getsockname()[1]
    try:
        assert len(tried) == 2
        assert port == tried[1] == listeners[0].socket.getsockname()[1]
    finally:
        udp.close()
        for listener in listeners:
            await listener.aclose()

    # A port the operator chose is not swapped for another: the error stands.
    tried.clear()
    with pytest.raises(OSError, match="in use"):
        await MembershipService._bind_udp_and_tcp("127.0.0.1", port)
    assert tried == [port]
