"""The resource vector an agent gossips, and that placement reads.

It is plain data with a compact wire form (short msgpack keys) because it rides in
every gossip packet: at 1,200 bytes a datagram, each byte of a vector is a byte less
for piggybacked membership updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2psched.membership.messages import NODE_ID_RULE, valid_host, valid_node_id

#: The largest count or amount a peer may gossip (a CPU, MiB or slot count, a queue
#: length): far past any host, and small enough that sums of many stay exact.
MAX_AMOUNT = 2**48


def _amount(v: Any, key: str) -> float:
    """A gossiped amount, checked: a number, finite, from 0 to MAX_AMOUNT. A peer's
    NaN, infinity or negative would otherwise win or lose every comparison placement
    and quotas make with it, silently."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= MAX_AMOUNT):
        raise ValueError(f"{key} must be a number from 0 to {MAX_AMOUNT}, not {v!r:.40}")
    return v


def _text(v: Any, key: str, limit: int = 128, *, empty: bool = True) -> str:
    """A gossiped string, checked: printable (no control, bidi or invisible character,
    since operators read these in `p2psched peers`, logs and the dashboard) and at most
    ``limit`` characters."""
    if not isinstance(v, str) or len(v) > limit or not v.isprintable() or (not v and not empty):
        raise ValueError(f"{key} must be printable text of {0 if empty else 1} to {limit} characters, not {v!r:.80}")
    return v


def _address(v: Any, key: str) -> str:
    """'' or HOST:PORT, as an agent advertises its API and transfer addresses."""
    text = _text(v, key, 262)
    if text:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) <= 65535 or not valid_host(host.strip("[]")):
            raise ValueError(f"{key} must be HOST:PORT, not {text!r:.80}")
    return text


def _map(value: Any, key: str, limit: int) -> dict[Any, Any]:
    if not isinstance(value, dict) or len(value) > limit:
        raise ValueError(f"{key} must be a map of at most {limit} entries, not {value!r:.80}")
    return value


def _slots(value: Any, key: str) -> dict[str, int]:
    return {_text(k, f"{key} slot type", 64, empty=False): int(_amount(v, f"{key}.{k}"))
            for k, v in _map(value, key, 64).items()}


def _runtimes(value: Any) -> tuple[str, ...]:
    """A gossiped list of runtime names, checked: a peer's bad value is refused, not stored."""
    if not isinstance(value, (list, tuple)) or len(value) > 8:
        raise ValueError(f"impaired runtimes must be a list of at most 8 names, not {value!r:.80}")
    return tuple(_text(rt, "impaired runtimes", 32, empty=False) for rt in value)


@dataclass(slots=True)
class ResourceVector:
    cpu_total: float = 0.0
    cpu_free: float = 0.0
    mem_total_mb: int = 0
    mem_free_mb: int = 0
    gpu_free: dict[str, int] = field(default_factory=dict)  # slot type -> free slots
    gpu_total: dict[str, int] = field(default_factory=dict)  # slot type -> slots
    queue_len: int = 0
    running: int = 0
    load: float = 0.0  # 1-minute load average divided by cpu_total
    draining: bool = False
    #: Runtimes this node cannot run now: its jobs of them kept failing for the host's
    #: fault (agent/health.py). Peers send it none; it still runs them if nobody else can.
    impaired: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "ct": self.cpu_total, "cf": self.cpu_free, "mt": self.mem_total_mb, "mf": self.mem_free_mb,
            "gf": self.gpu_free, "gt": self.gpu_total, "q": self.queue_len, "r": self.running,
            "l": round(self.load, 3), "d": self.draining,
        }
        if self.impaired:  # rare: healthy nodes gossip no key for it
            wire["i"] = list(self.impaired)
        return wire

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ResourceVector:
        """Raises ValueError (naming the field) on anything but the amounts a vector holds."""
        return cls(
            cpu_total=float(_amount(d.get("ct", 0), "ct")), cpu_free=float(_amount(d.get("cf", 0), "cf")),
            mem_total_mb=int(_amount(d.get("mt", 0), "mt")), mem_free_mb=int(_amount(d.get("mf", 0), "mf")),
            gpu_free=_slots(d.get("gf", {}), "gf"), gpu_total=_slots(d.get("gt", {}), "gt"),
            queue_len=int(_amount(d.get("q", 0), "q")), running=int(_amount(d.get("r", 0), "r")),
            load=float(_amount(d.get("l", 0), "l")), draining=bool(d.get("d", False)),
            impaired=_runtimes(d.get("i", ())),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_total": self.cpu_total, "cpu_free": self.cpu_free,
            "mem_total_mb": self.mem_total_mb, "mem_free_mb": self.mem_free_mb,
            "gpu_free": dict(self.gpu_free), "gpu_total": dict(self.gpu_total),
            "queue_len": self.queue_len, "running": self.running, "load": self.load,
            "draining": self.draining, "impaired": list(self.impaired),
        }


@dataclass(slots=True)
class NodeState:
    """Everything one agent tells the cluster about itself, versioned as a whole.

    A newer ``version`` replaces an older one (scuttlebutt-style); the vector changes
    often, the rest rarely.
    """

    node_id: str
    version: int = 0
    vector: ResourceVector = field(default_factory=ResourceVector)
    agent_version: str = ""
    api: str = ""  # "host:port" of the HTTP API
    transfer: str = ""  # "host:port" of the job transfer service
    labels: dict[str, str] = field(default_factory=dict)
    position: str = ""  # host id in the topology, e.g. "h0-1"
    node_pubkey: str = ""  # Ed25519 public key, hex (attestation)
    measurement: str = ""  # sha256 of code and config (attestation)
    # Unfinished jobs each tenant holds at this agent as origin: [jobs, queued, cpu,
    # mem_mb, gpu]. Quotas are cluster-wide sums of these, as gossip reports them.
    tenants: dict[str, list[float]] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "n": self.node_id, "v": self.version, "rv": self.vector.to_wire(), "av": self.agent_version,
            "api": self.api, "tr": self.transfer, "lb": self.labels, "pos": self.position,
            "pk": self.node_pubkey, "ms": self.measurement, "tu": self.tenants,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NodeState:
        """Raises ValueError (naming the field) on what no agent would gossip: a peer's
        strings reach operators' terminals and pages, and its addresses our sockets."""
        node_id = d["n"]
        if not valid_node_id(node_id):
            raise ValueError(f"n must be a node id ({NODE_ID_RULE}), not {node_id!r:.80}")
        return cls(
            node_id=node_id, version=int(d.get("v", 0)),
            vector=ResourceVector.from_wire(_map(d.get("rv", {}), "rv", 32)),
            agent_version=_text(d.get("av", ""), "av", 64), api=_address(d.get("api", ""), "api"),
            transfer=_address(d.get("tr", ""), "tr"),
            labels={_text(k, "lb key", 63, empty=False): _text(v, f"lb.{k}", 64)
                    for k, v in _map(d.get("lb", {}), "lb", 64).items()},
            position=_text(d.get("pos", ""), "pos"), node_pubkey=_text(d.get("pk", ""), "pk"),
            measurement=_text(d.get("ms", ""), "ms"),
            tenants={_text(k, "tu tenant", 64, empty=False): [float(_amount(x, f"tu.{k}")) for x in list(v)[:5]]
                     for k, v in _map(d.get("tu", {}), "tu", 10_000).items()},
        )
