"""Every membership message, and its wire layout, in one place.

A datagram's plaintext (before the keyring seals it) is one msgpack array::

    [PROTOCOL, sender_id, [part, part, ...]]

and each part is an array whose first element is its type code (the ``T_*``
constants). Several parts share one datagram: a ping plus piggybacked updates, or a
gossip round's batch. The encoder packs parts one by one and stops before the packet
budget is exceeded, so a datagram never exceeds ``max_datagram`` bytes once sealed.

TCP carries one part per frame, length-prefixed by the adapter (4 bytes big-endian)::

    [PROTOCOL, sender_id, part]

Field layouts, by type code:

===  ============  ===========================================================
code name          fields after the code
===  ============  ===========================================================
0    Ping          seq, target_id                  (reply: Ack to the sender)
1    PingReq       seq, target_id, host, port, want_nack
2    Ack           seq
3    Nack          seq                  (indirect probe sent, no ack yet)
4    Suspect       incarnation, node_id, from_id
5    Alive         incarnation, node_id, host, port
6    Dead          incarnation, node_id, from_id   (from_id == node_id: left)
7    State         node_id, version, partial, state (NodeState wire map)
8    PushPullReq   join, digest: [[node_id, incarnation, status, version], ...]
9    PushPullResp  entries: [Entry...], wants: [node_id...]
10   PushPullPush  entries: [Entry...]       (the entries the responder wanted)
===  ============  ===========================================================

``Entry`` is ``[node_id, host, port, incarnation, status, version, state|nil]``;
``status`` is 0 alive, 1 suspect, 2 dead, 3 left. ``partial`` marks a State carrying
only the resource vector because the whole node state did not fit the packet; the
receiver fetches the rest at the next push-pull.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Union

PROTOCOL = 1

#: The largest incarnation, state version or sequence number on the wire. msgpack
#: holds up to 2**64 - 1, and an agent answers a counter with the counter plus one
#: (a refutation, a newer state), so a peer's counter must stay well below that;
#: agents never count past this one (``next_counter``).
MAX_COUNTER = 2**63 - 1

T_PING, T_PING_REQ, T_ACK, T_NACK, T_SUSPECT, T_ALIVE, T_DEAD, T_STATE = range(8)
T_PUSH_PULL_REQ, T_PUSH_PULL_RESP, T_PUSH_PULL_PUSH = 8, 9, 10

ALIVE, SUSPECT, DEAD, LEFT = 0, 1, 2, 3
STATUS_NAMES = {ALIVE: "alive", SUSPECT: "suspect", DEAD: "dead", LEFT: "left"}

Addr = tuple[str, int]


class SchemaError(ValueError):
    """A decoded part does not have the layout its type code promises."""


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target_id: str


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target_id: str
    target: Addr
    want_nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node_id: str
    from_id: str


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node_id: str
    addr: Addr


@dataclass(frozen=True, slots=True)
class Dead:
    incarnation: int
    node_id: str
    from_id: str


@dataclass(frozen=True, slots=True)
class State:
    node_id: str
    version: int
    partial: bool
    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Entry:
    node_id: str
    addr: Addr
    incarnation: int
    status: int
    version: int
    state: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Digest:
    node_id: str
    incarnation: int
    status: int
    version: int


@dataclass(frozen=True, slots=True)
class PushPullReq:
    join: bool
    digest: list[Digest]


@dataclass(frozen=True, slots=True)
class PushPullResp:
    entries: list[Entry]
    wants: list[str]


@dataclass(frozen=True, slots=True)
class PushPullPush:
    entries: list[Entry]


Message = Union[Ping, PingReq, Ack, Nack, Suspect, Alive, Dead, State, PushPullReq, PushPullResp, PushPullPush]


def _entry_to_wire(e: Entry) -> list[Any]:
    return [e.node_id, e.addr[0], e.addr[1], e.incarnation, e.status, e.version, e.state]


def to_wire(m: Message) -> list[Any]:
    """The msgpack-ready list for one part (layouts in the module docstring)."""
    if isinstance(m, Ping):
        return [T_PING, m.seq, m.target_id]
    if isinstance(m, PingReq):
        return [T_PING_REQ, m.seq, m.target_id, m.target[0], m.target[1], m.want_nack]
    if isinstance(m, Ack):
        return [T_ACK, m.seq]
    if isinstance(m, Nack):
        return [T_NACK, m.seq]
    if isinstance(m, Suspect):
        return [T_SUSPECT, m.incarnation, m.node_id, m.from_id]
    if isinstance(m, Alive):
        return [T_ALIVE, m.incarnation, m.node_id, m.addr[0], m.addr[1]]
    if isinstance(m, Dead):
        return [T_DEAD, m.incarnation, m.node_id, m.from_id]
    if isinstance(m, State):
        return [T_STATE, m.node_id, m.version, m.partial, m.state]
    if isinstance(m, PushPullReq):
        return [T_PUSH_PULL_REQ, m.join, [[d.node_id, d.incarnation, d.status, d.version] for d in m.digest]]
    if isinstance(m, PushPullResp):
        return [T_PUSH_PULL_RESP, [_entry_to_wire(e) for e in m.entries], list(m.wants)]
    if isinstance(m, PushPullPush):
        return [T_PUSH_PULL_PUSH, [_entry_to_wire(e) for e in m.entries]]
    raise TypeError(f"not a membership message: {m!r}")


# --- schema checks -----------------------------------------------------------------
# Each reader takes the fields after the type code and raises SchemaError on anything
# off: a wrong count, a wrong type, a negative counter, an out-of-range port.

_MAX_ID = 128
_MAX_HOST = 255


def next_counter(n: int) -> int:
    """``n + 1``, but never past MAX_COUNTER: at the ceiling a forged counter can still
    win an argument about us, but it can no longer make us send what nobody decodes."""
    return min(n + 1, MAX_COUNTER)


def _int(v: Any, what: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_COUNTER:
        raise SchemaError(f"{what} must be an integer in 0..2**63-1")
    return v


def _str(v: Any, what: str, limit: int = _MAX_ID) -> str:
    if type(v) is not str or not v or len(v) > limit:
        raise SchemaError(f"{what} must be a string of 1..{limit} characters")
    return v


#: A node id on the wire: what an agent's --node-id may be (letters, digits, '.', '_'
#: and '-', starting with a letter or digit), up to the wire's 128 characters. Ids are
#: shown to operators (peers, logs, the dashboard): one holding a control character
#: or markup is refused here.
NODE_ID_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # --node-id's rule too (config.NODE_ID_PATTERN)
NODE_ID_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128"
_NODE_ID = re.compile(NODE_ID_CHARS)


def valid_node_id(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= _MAX_ID and _NODE_ID.fullmatch(v) is not None

# A DNS name (letters, digits, '-' and '_' in labels of 1..63) or an IP literal: an
# address we will send to. Anything else (an empty label, a space, a NUL) is refused
# here, before the socket layer fails on it with errors that are not OSError.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?:\.(?!-)[A-Za-z0-9_-]{1,63})*\.?")


def valid_host(host: str) -> bool:
    """Whether ``host`` is a DNS name or an IP literal (of at most 255 characters)."""
    if len(host) > _MAX_HOST:
        return False
    if _HOSTNAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host(v: Any) -> str:
    host = _str(v, "host", _MAX_HOST)
    if not valid_host(host):
        raise SchemaError(f"host {host[:64]!r} is neither a DNS name nor an IP address")
    return host


def _id(v: Any, what: str) -> str:
    if not valid_node_id(v):
        raise SchemaError(f"{what} {str(v)[:64]!r} is not a node id: {NODE_ID_RULE}")
    return str(v)


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise SchemaError(f"{what} must be a boolean")
    return v


def _port(v: Any) -> int:
    if type(v) is not int or not 0 < v < 65536:
        raise SchemaError("port must be an integer in 1..65535")
    return v


def _status(v: Any) -> int:
    if type(v) is not int or v not in STATUS_NAMES:
        raise SchemaError("status must be 0..3")
    return v


def _map(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise SchemaError(f"{what} must be a map")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise SchemaError(f"{what} must be an array")
    return v


def _fields(p: list[Any], n: int, name: str) -> list[Any]:
    if len(p) != n + 1:
        raise SchemaError(f"{name} has {len(p) - 1} fields, expected {n}")
    return p


def _entry(v: Any) -> Entry:
    e = _list(v, "entry")
    if len(e) != 7:
        raise SchemaError("entry must have 7 fields")
    state = None if e[6] is None else _map(e[6], "entry state")
    return Entry(
        _id(e[0], "node id"), (_host(e[1]), _port(e[2])), _int(e[3], "incarnation"),
        _status(e[4]), _int(e[5], "version"), state,
    )


def from_wire(p: Any) -> Message:
    """Check one decoded part against its layout and build the message."""
    if not isinstance(p, list) or not p or type(p[0]) is not int:
        raise SchemaError("a part must be an array starting with a type code")
    t = p[0]
    if t == T_PING:
        _fields(p, 2, "ping")
        return Ping(_int(p[1], "seq"), _id(p[2], "target id"))
    if t == T_PING_REQ:
        _fields(p, 5, "ping-req")
        return PingReq(_int(p[1], "seq"), _id(p[2], "target id"), (_host(p[3]), _port(p[4])),
                       _bool(p[5], "want_nack"))
    if t == T_ACK:
        _fields(p, 1, "ack")
        return Ack(_int(p[1], "seq"))
    if t == T_NACK:
        _fields(p, 1, "nack")
        return Nack(_int(p[1], "seq"))
    if t == T_SUSPECT:
        _fields(p, 3, "suspect")
        return Suspect(_int(p[1], "incarnation"), _id(p[2], "node id"), _id(p[3], "from id"))
    if t == T_ALIVE:
        _fields(p, 4, "alive")
        return Alive(_int(p[1], "incarnation"), _id(p[2], "node id"), (_host(p[3]), _port(p[4])))
    if t == T_DEAD:
        _fields(p, 3, "dead")
        return Dead(_int(p[1], "incarnation"), _id(p[2], "node id"), _id(p[3], "from id"))
    if t == T_STATE:
        _fields(p, 4, "state")
        return State(_id(p[1], "node id"), _int(p[2], "version"), _bool(p[3], "partial"), _map(p[4], "state"))
    if t == T_PUSH_PULL_REQ:
        _fields(p, 2, "push-pull request")
        digest = []
        for d in _list(p[2], "digest"):
            d = _list(d, "digest entry")
            if len(d) != 4:
                raise SchemaError("digest entry must have 4 fields")
            digest.append(Digest(_id(d[0], "node id"), _int(d[1], "incarnation"), _status(d[2]), _int(d[3], "version")))
        return PushPullReq(_bool(p[1], "join"), digest)
    if t == T_PUSH_PULL_RESP:
        _fields(p, 2, "push-pull response")
        return PushPullResp([_entry(e) for e in _list(p[1], "entries")],
                            [_id(w, "wanted id") for w in _list(p[2], "wants")])
    if t == T_PUSH_PULL_PUSH:
        _fields(p, 1, "push-pull push")
        return PushPullPush([_entry(e) for e in _list(p[1], "entries")])
    raise SchemaError(f"unknown message type {t}")
