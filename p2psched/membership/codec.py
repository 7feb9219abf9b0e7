"""msgpack with strict limits, and the packing of several parts into one datagram.

Decoding never trusts the peer: msgpack's own limits bound every string, array and
map before memory is allocated, nesting is bounded by msgpack's stack, and each part
is then checked against its layout (``messages.from_wire``). Anything off raises
``DecodeError`` whose ``reason`` the adapter counts in
``p2psched_membership_packets_dropped_total{reason}``.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, cast

import msgpack  # type: ignore[import-untyped]

from p2psched.membership.messages import (
    NODE_ID_RULE, PROTOCOL, Message, SchemaError, from_wire, to_wire, valid_node_id,
)

# Limits for one datagram: nothing in a 1,200-byte packet can be longer than the
# packet, and no legitimate packet has more than a few dozen parts or map keys.
DATAGRAM_LIMITS: dict[str, int] = dict(
    max_str_len=1500, max_bin_len=0, max_array_len=256, max_map_len=64, max_ext_len=0,
)


def frame_limits(max_message: int) -> dict[str, int]:
    """Limits for one TCP frame: a full state has one array entry per member."""
    return dict(max_str_len=65536, max_bin_len=0, max_array_len=100_000, max_map_len=256,
                max_ext_len=0)


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def pack_part(m: Message) -> bytes:
    return cast(bytes, msgpack.packb(to_wire(m), use_bin_type=True))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 65536:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def datagram_overhead(sender_id: str) -> int:
    """Bytes of the datagram envelope around its parts (with a 3-byte array header)."""
    return 1 + len(msgpack.packb(PROTOCOL)) + len(msgpack.packb(sender_id)) + 3


@functools.lru_cache(maxsize=4096)
def _envelope_head(sender_id: str) -> bytes:
    return b"\x93" + cast(bytes, msgpack.packb(PROTOCOL)) + cast(bytes, msgpack.packb(sender_id))


def assemble(sender_id: str, parts: list[bytes]) -> bytes:
    """``[PROTOCOL, sender_id, [parts...]]`` from parts already packed (no re-encoding)."""
    return _envelope_head(sender_id) + _array_header(len(parts)) + b"".join(parts)


def _unpack(data: bytes, limits: dict[str, int]) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, **limits)
    except Exception as e:  # msgpack raises ValueError, StackError, ExtraData, TypeError...
        raise DecodeError("msgpack", f"{type(e).__name__}: {e}") from None


def _envelope(obj: Any) -> tuple[str, Any]:
    if not isinstance(obj, list) or len(obj) != 3:
        raise DecodeError("schema", "envelope must be [protocol, sender, body]")
    if obj[0] != PROTOCOL or type(obj[0]) is not int:
        raise DecodeError("protocol", f"protocol {obj[0]!r} is not {PROTOCOL}; upgrade the older agent")
    if not valid_node_id(obj[1]):
        raise DecodeError("schema", f"sender id must be a node id: {NODE_ID_RULE}")
    return obj[1], obj[2]


def decode_datagram(data: bytes) -> tuple[str, list[Message]]:
    obj = _unpack(data, DATAGRAM_LIMITS)
    sender, body = _envelope(obj)
    if not isinstance(body, list):
        raise DecodeError("schema", "datagram body must be an array of parts")
    try:
        return sender, [from_wire(p) for p in body]
    except SchemaError as e:
        raise DecodeError("schema", str(e)) from None


def encode_frame(sender_id: str, m: Message) -> bytes:
    return cast(bytes, msgpack.packb([PROTOCOL, sender_id, to_wire(m)], use_bin_type=True))


def decode_frame(data: bytes, max_message: int) -> tuple[str, Message]:
    if len(data) > max_message:
        raise DecodeError("too_large", f"{len(data)} bytes over the {max_message}-byte limit")
    sender, body = _envelope(_unpack(data, frame_limits(max_message)))
    try:
        return sender, from_wire(body)
    except SchemaError as e:
        raise DecodeError("schema", str(e)) from None
