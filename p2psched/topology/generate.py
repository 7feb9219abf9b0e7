"""Write leaf-spine topology files: every leaf linked to every spine.

Names follow one scheme so that agents started with ``--node-id h3-1`` find their
place without configuration: spines ``spine-<i>``, leaves ``leaf-<i>``, hosts
``h<leaf>-<index>``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Host links: 25 Gb/s is the common server NIC in current AI/HPC racks; 1 us covers
#: a NIC and a cut-through top-of-rack switch hop.
HOST_GBPS = 25.0
HOST_LATENCY_US = 1.0
#: Leaf-spine links: 2 us for the longer cable run and the spine's hop.
FABRIC_LATENCY_US = 2.0


@dataclass(frozen=True, slots=True)
class FabricShape:
    spines: int
    leaves: int
    hosts_per_leaf: int
    #: Host bandwidth under a leaf divided by its uplink bandwidth. 1.0 is a
    #: non-blocking fabric; 3.0 is a typical enterprise ratio.
    oversubscription: float = 1.0
    host_gbps: float = HOST_GBPS
    host_latency_us: float = HOST_LATENCY_US
    fabric_latency_us: float = FABRIC_LATENCY_US

    def check(self) -> None:
        if self.spines < 1:
            raise ValueError(f"--spines is {self.spines}; a leaf-spine fabric needs at least 1 spine")
        if self.leaves < 1:
            raise ValueError(f"--leaves is {self.leaves}; it needs at least 1 leaf")
        if self.hosts_per_leaf < 1:
            raise ValueError(f"--hosts-per-leaf is {self.hosts_per_leaf}; each leaf needs at least 1 host")
        if not self.oversubscription > 0:
            raise ValueError(f"--oversubscription is {self.oversubscription}; it must be greater than 0 (1.0 is non-blocking)")

    @property
    def uplink_gbps(self) -> float:
        """Each leaf-spine link's bandwidth, so that a leaf's uplinks carry its hosts / ratio."""
        return self.hosts_per_leaf * self.host_gbps / (self.oversubscription * self.spines)


def _num(x: float) -> str:
    return repr(round(x, 6)) if x != int(x) else f"{int(x)}.0"


def generate(shape: FabricShape, name: str = "") -> str:
    """The YAML text of the fabric, with a comment header saying how it was made."""
    shape.check()
    name = name or f"leaf-spine-{shape.spines}x{shape.leaves}x{shape.hosts_per_leaf}"
    spines = [f"spine-{i}" for i in range(shape.spines)]
    leaves = [f"leaf-{i}" for i in range(shape.leaves)]
    lines = [
        f"# {name}: {shape.spines} spines x {shape.leaves} leaves x {shape.hosts_per_leaf} hosts per leaf,",
        f"# oversubscription {shape.oversubscription:g}:1; written by `p2psched topology generate`.",
        "# Format: docs/scheduling.md. Links are undirected; latency in microseconds, bandwidth in Gb/s.",
        f"name: {name}",
        "spines: [" + ", ".join(spines) + "]",
        "leaves: [" + ", ".join(leaves) + "]",
        "hosts:",
    ]
    for li in range(shape.leaves):
        for hi in range(shape.hosts_per_leaf):
            lines.append(f"  - h{li}-{hi}")
    lines.append("links:")
    host_lat, host_bw = _num(shape.host_latency_us), _num(shape.host_gbps)
    up_lat, up_bw = _num(shape.fabric_latency_us), _num(shape.uplink_gbps)
    for li, leaf in enumerate(leaves):
        for spine in spines:
            lines.append(f"  - {{a: {leaf}, b: {spine}, latency_us: {up_lat}, bandwidth_gbps: {up_bw}}}")
        for hi in range(shape.hosts_per_leaf):
            lines.append(f"  - {{a: h{li}-{hi}, b: {leaf}, latency_us: {host_lat}, bandwidth_gbps: {host_bw}}}")
    return "\n".join(lines) + "\n"
