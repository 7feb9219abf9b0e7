"""Length-prefixed msgpack frames for the transfer protocol. Sans-IO.

Wire layout of one frame::

    +----------------+------------------------------+
    | length: u32 BE | body: msgpack map, `length` B |
    +----------------+------------------------------+

The body is a map with a ``t`` key naming the message (see ``messages.py``). A
length over ``max_frame`` is refused before any of the body is read, and msgpack
runs with explicit limits, so a hostile peer can make the agent allocate at most
one frame.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]

#: A job offer carries the module (<= 64 MiB) and the input (<= 64 MiB); an
#: unforwarded HTTP request is capped at 96 MiB. 160 MiB holds both with room.
DEFAULT_MAX_FRAME = 160 * 1024 * 1024
_LEN = struct.Struct(">I")


class FrameError(ValueError):
    """A peer sent something that is not a valid frame; the connection is dropped."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_bin_len=max_frame,
            max_str_len=16 * 1024 * 1024, max_array_len=100_000, max_map_len=10_000, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several types; all mean the same to us
        raise FrameError(f"frame body is not valid msgpack: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise FrameError("frame body must be a map with a string 't' (message type)")
    return msg


class FrameReader:
    """Feed bytes in, get whole messages out."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet whole."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_frame:
                raise FrameError(f"frame of {n} bytes is over the limit of {self.max_frame}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            out.append(decode_body(body, self.max_frame))
        return out
