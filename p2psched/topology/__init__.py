"""Leaf-spine topology: files, their checks, and network cost between agents.

Public interface::

    Topology.load(path, weight="latency") -> Topology   # raises TopologyError
    topo.path(a, b) -> list[str]; topo.cost(a, b) -> float; topo.route(a, b)
    topo.locate(node_id, position="") -> Location      # .known False: default rule
    topo.reload_if_changed() -> bool                    # call on a timer (mtime check)
    generate(FabricShape(...)) -> str                   # YAML text
    pick_gossip_peers(rng, same_leaf, everyone, k, same_leaf_fraction)
"""

from p2psched.topology.generate import FabricShape, generate
from p2psched.topology.gossip import DEFAULT_SAME_LEAF_FRACTION, pick_gossip_peers
from p2psched.topology.model import WEIGHTS, Location, Topology, TopologyError, Weight, load

__all__ = [
    "DEFAULT_SAME_LEAF_FRACTION", "FabricShape", "Location", "Topology", "TopologyError", "WEIGHTS", "Weight",
    "generate", "load", "pick_gossip_peers",
]
