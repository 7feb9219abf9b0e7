"""Keyring sealing, key files, and the packet decoder under random and mutated input."""

from __future__ import annotations

import base64
import random

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from p2psched.membership import codec
from p2psched.membership.keyring import (
    SEALED_OVERHEAD, Keyring, KeyringError, OpenError, PlainSealer, parse_keys, sealer_for,
)
from p2psched.membership.messages import Ack, Alive, Dead, Ping, PingReq, State, Suspect
from p2psched.membership.settings import MembershipSettings
from p2psched.membership.swim import Membership
from p2psched.resources import NodeState

K1, K2 = bytes(range(32)), bytes(range(1, 33))


def test_seal_open_roundtrip_and_overhead():
    ring = Keyring([K1], "prod")
    sealed = ring.seal(1000.0, b"hello")
    assert len(sealed) == 5 + SEALED_OVERHEAD
    assert Keyring([K1], "prod").open(1000.5, sealed) == b"hello"


def test_rotation_accepts_secondary_keys_and_seals_with_primary():
    old, rotating = Keyring([K1], "c"), Keyring([K2, K1], "c")
    assert rotating.open(1.0, old.seal(1.0, b"x")) == b"x"  # old agents still understood
    with pytest.raises(OpenError) as e:
        old.open(1.0, rotating.seal(1.0, b"y"))  # new primary not yet known there
    assert e.value.reason == "auth"


def test_wrong_key_or_cluster_name_fails_authentication():
    sealed = Keyring([K1], "c").seal(1.0, b"x")
    for ring in (Keyring([K2], "c"), Keyring([K1], "other")):
        with pytest.raises(OpenError) as e:
            ring.open(1.0, sealed)
        assert e.value.reason == "auth"


def test_replays_and_stale_packets_are_dropped():
    ring = Keyring([K1], "c", replay_window=60)
    sealed = Keyring([K1], "c").seal(100.0, b"x")
    assert ring.open(100.0, sealed) == b"x"
    with pytest.raises(OpenError, match="replay"):
        ring.open(101.0, sealed)
    with pytest.raises(OpenError, match="stale"):
        ring.open(100.0, Keyring([K1], "c").seal(30.0, b"old"))


def test_insecure_and_secure_agents_do_not_mix():
    plain, ring = PlainSealer("c"), Keyring([K1], "c")
    with pytest.raises(OpenError, match="unencrypted"):
        ring.open(1.0, plain.seal(1.0, b"x"))
    with pytest.raises(OpenError, match="encrypted"):
        plain.open(1.0, ring.seal(1.0, b"x"))
    with pytest.raises(OpenError, match="cluster"):
        PlainSealer("other").open(1.0, plain.seal(1.0, b"x"))


def test_key_file_errors_say_how_to_fix_them(tmp_path):
    with pytest.raises(KeyringError, match="keygen --gossip"):
        parse_keys("# only a comment\n")
    with pytest.raises(KeyringError, match="line 2: key is 5 bytes"):
        parse_keys("# c\n" + base64.b64encode(b"short").decode())
    with pytest.raises(KeyringError, match="--insecure"):
        sealer_for(None, False, "c", 60)
    with pytest.raises(KeyringError, match="cannot read"):
        sealer_for(tmp_path / "missing.key", False, "c", 60)


def test_keygen_writes_a_usable_private_key_file(tmp_path):
    from p2psched.cli.keys import keygen

    out = tmp_path / "gossip.key"
    r = CliRunner().invoke(keygen, ["--gossip", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_mode & 0o777 == 0o600
    ring = sealer_for(out, False, "c", 60)
    assert ring.open(5.0, ring.seal(5.0, b"ok")) == b"ok"
    again = CliRunner().invoke(keygen, ["--gossip", "-o", str(out)])
    assert again.exit_code != 0 and "--force" in again.output


# --- decoder fuzzing ------------------------------------------------------------------

def _valid_packets() -> list[bytes]:
    state = NodeState("b", 3).to_wire()
    msgs = [Ping(1, "a"), Ack(2), PingReq(3, "c", ("10.0.0.3", 7946), True), Suspect(1, "c", "b"),
            Alive(4, "b", ("10.0.0.2", 7946)), Dead(2, "c", "b"), State("b", 3, False, state)]
    return [codec.assemble("b", [codec.pack_part(m) for m in msgs[i:i + 3]]) for i in range(len(msgs))]


VALID = _valid_packets()


def _fresh_core() -> Membership:
    return Membership(MembershipSettings(insecure=True), "a", ("10.0.0.1", 7946), random.Random(0), 0.0)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1300))
def test_random_bytes_never_crash_the_decoder_or_core(data):
    try:
        codec.decode_datagram(data)
    except codec.DecodeError as e:
        assert e.reason in {"msgpack", "schema", "protocol"}
    _fresh_core().handle_packet(1.0, ("10.0.0.9", 1), data)
    try:
        Keyring([K1], "c").open(1.0, data)
    except OpenError:
        pass


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 1300))
def test_mutated_packets_never_crash_the_core(packet, flips, cut):
    data = bytearray(packet)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    data = bytes(data[: max(1, cut)])
    m = _fresh_core()
    m.handle_packet(1.0, ("10.0.0.9", 1), data)
    reply, _ = m.handle_stream(1.0, ("10.0.0.9", 1), data)
    m.handle_stream_reply(1.0, ("10.0.0.9", 1), data)
    assert set(m.dropped) <= {"msgpack", "schema", "protocol", "wrong_target", "bad_state", "unexpected_tcp",
                              "unexpected_udp", "too_large", "extra_request"}


def test_hostile_shapes_are_rejected_by_limits():
    import msgpack

    deep = b"\x91" * 3000 + b"\x00"
    wide = msgpack.packb([1, "x", [[0, 1, "a"]] * 300])
    huge_str = msgpack.packb([1, "x" * 2000, []])
    for data, reason in ((deep, "msgpack"), (wide, "msgpack"), (huge_str, "msgpack")):
        with pytest.raises(codec.DecodeError) as e:
            codec.decode_datagram(data)
        assert e.value.reason == reason
    with pytest.raises(codec.DecodeError) as e:
        codec.decode_datagram(msgpack.packb([2, "x", []]))
    assert e.value.reason == "protocol" and "upgrade" in str(e.value)


# What a peer names reaches operators' terminals (`p2psched peers` is a rich table that
# passed escape sequences and markup through) and pages, and its addresses our sockets.
HOSTILE_TEXT = ["a\x1b]0;pwned\x07", "[bold]x[/bold]", "\u202eevil", "zero\u200bwidth", "a b", "-lead"]


@pytest.mark.parametrize("bad", HOSTILE_TEXT)
def test_a_node_id_that_no_agent_could_have_is_refused_on_the_wire(bad):
    with pytest.raises(codec.DecodeError) as e:
        codec.decode_datagram(codec.assemble("peer", [codec.pack_part(Alive(1, bad, ("10.0.0.1", 7701)))]))
    assert e.value.reason == "schema" and "is not a node id" in str(e.value)
    with pytest.raises(codec.DecodeError) as e:
        codec.decode_datagram(codec.assemble(bad, []))
    assert e.value.reason == "schema" and "sender id must be a node id" in str(e.value)
    for msg in (Suspect(1, bad, "peer"), Dead(1, "peer", bad), Ping(1, bad)):
        with pytest.raises(codec.DecodeError):
            codec.decode_datagram(codec.assemble("peer", [codec.pack_part(msg)]))


def _state(**wire):
    honest = NodeState("h0-1.rack_a", api="10.0.0.5:7700", transfer="[::1]:7702",
                       labels={"zone": "a", "gpu.model": "NVIDIA H100 80GB HBM3"}, position="h0-1").to_wire()
    return {**honest, **wire}


def test_a_peers_state_holds_printable_bounded_text_and_real_addresses():
    s = NodeState.from_wire(_state())
    assert (s.node_id, s.api, s.transfer) == ("h0-1.rack_a", "10.0.0.5:7700", "[::1]:7702")
    assert s.labels["gpu.model"] == "NVIDIA H100 80GB HBM3"  # the GPU inventory's, spaces and all
    refused = [{"n": bad} for bad in HOSTILE_TEXT]
    refused += [{"api": "evil.example/phish?x=1:80"}, {"api": "127.0.0.1"}, {"tr": "host:99999"},
                {"lb": {"zone": "\x1b[2Ja"}}, {"lb": {"zone": "\u202ea"}}, {"lb": {"z": "x" * 65}}, {"lb": {"": "a"}},
                {"lb": {f"k{i}": "v" for i in range(65)}}, {"lb": {"zone": 7}}, {"pos": "\x00"}, {"av": "x" * 65},
                {"tu": {"\x1b": [1]}}, {"rv": {"gf": {"\x1b[31m": 1}}}]
    for wire in refused:
        with pytest.raises(ValueError):
            NodeState.from_wire(_state(**wire))
