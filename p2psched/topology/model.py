"""Leaf-spine topology files: the loader, its checks, and shortest-path queries.

File format (YAML; ``p2psched topology generate`` writes one)::

    name: small                 # optional, shown by `p2psched topology show`
    spines: [spine-0, spine-1]  # switch ids
    leaves: [leaf-0, leaf-1]    # switch ids; hosts hang off leaves
    hosts: [h0-0, h0-1, h1-0]   # an agent whose node id (or gossiped position)
                                # equals a host id sits at that host
    links:                      # undirected; both endpoints must be declared above
      - {a: h0-0, b: leaf-0, latency_us: 1.0, bandwidth_gbps: 25}
      - {a: leaf-0, b: spine-0, latency_us: 2.0, bandwidth_gbps: 100}

Every id is unique across spines, leaves and hosts. The loader refuses, with the
file line and the fix: an unknown key, a link to an undeclared node, a duplicate id,
a duplicate or self link, a non-positive latency or bandwidth, a host with no link,
and a graph that is not connected.

Edge weights (``weight=``):

* ``"latency"`` (default): ``latency_us``. Placement cares about how soon a job and
  its result cross the fabric, and in a leaf-spine fabric hop count dominates.
* ``"transfer"``: ``latency_us + 8000 / bandwidth_gbps``, the microseconds to move
  1 MB across the link store-and-forward. It is the bandwidth-derived weight: it
  penalises oversubscribed uplinks, which matters when jobs carry large inputs.

Shortest paths are Dijkstra over the chosen weight. A host has one link (to its
leaf), so every path from it runs through that neighbour: the cache keeps one
``single_source_dijkstra`` per *anchor* (the host's leaf), which lets a simulator of
a thousand hosts query every pair for the price of one search per leaf. The agent's
own searches are thus computed once and reused; ``reload_if_changed()`` re-reads the
file when its mtime or size changed and drops the cache.

Agents missing from the file: an agent whose position is not a host id is placed by
the *default rule*: it is attached to the leaf chosen by ``sha256(node_id) mod
len(leaves)`` (leaves in file order) through a virtual link with the median latency
and bandwidth of that leaf's host links. The rule is deterministic, so every agent
computes the same costs for the stranger, and ``locate()`` says it was applied
(``Location.known`` is False and ``Location.note`` is a sentence for the log).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import statistics
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import yaml

Weight = Literal["latency", "transfer"]
WEIGHTS: tuple[str, ...] = ("latency", "transfer")
TOP_KEYS = ("name", "spines", "leaves", "hosts", "links")
LINK_KEYS = ("a", "b", "latency_us", "bandwidth_gbps")

#: Sources whose shortest-path trees are kept. An agent needs one (its own leaf);
#: the simulator needs one per leaf. 256 covers the 64-leaf examples with room, at
#: roughly 50 kB a tree for a thousand-node graph.
PATH_CACHE_SOURCES = 256

#: Bits in the 1 MB payload that defines the "transfer" weight, divided by 1e3 so
#: that bits / (Gb/s * 1e3) gives microseconds.
_TRANSFER_KBITS = 8000.0

# libyaml is ~10x faster on the 2,000-link large example; pure Python also works.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class TopologyError(ValueError):
    """A topology file that cannot be used; the message names the item and the fix."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where an agent sits in the topology."""

    node_id: str
    host: str | None  # the host id, or None when the default rule placed it
    leaf: str  # the leaf it hangs off
    known: bool  # False: the default rule was applied
    note: str  # a sentence saying how the position was found


def _describe_ids(kind: str, ids: list[str]) -> str:
    if not ids:
        return f"no {kind} are declared"
    if len(ids) <= 4:
        return f"known {kind} are " + ", ".join(ids)
    return f"known {kind} are {ids[0]}..{ids[-1]} ({len(ids)} in all)"


class _Source:
    """Reads values out of a composed YAML node tree, keeping line numbers for errors."""

    def __init__(self, name: str) -> None:
        self.name = name

    def err(self, node: yaml.Node | None, msg: str) -> TopologyError:
        if node is not None:
            return TopologyError(f"topology file {self.name} line {node.start_mark.line + 1}: {msg}")
        return TopologyError(f"topology file {self.name}: {msg}")

    def mapping(self, node: yaml.Node, what: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, f"{what} must be a mapping (key: value), not a {_yaml_kind(node)}")
        out: list[tuple[yaml.ScalarNode, yaml.Node]] = []
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.err(k, f"keys of {what} must be plain words")
            out.append((k, v))
        return out

    def id_list(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.err(node, f"'{what}' must be a list of ids, e.g. {what}: [a, b]")
        out: list[tuple[str, yaml.Node]] = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode) or not item.value.strip():
                raise self.err(item, f"each entry of '{what}' must be a non-empty id, not a {_yaml_kind(item)}")
            out.append((item.value.strip(), item))
        return out

    def positive(self, node: yaml.Node, key: str, example: str) -> float:
        if isinstance(node, yaml.ScalarNode):
            try:
                value = float(node.value)
            except ValueError:
                value = float("nan")
            if value > 0 and value != float("inf"):
                return value
        shown = node.value if isinstance(node, yaml.ScalarNode) else _yaml_kind(node)
        raise self.err(node, f"link {key} is {shown!r}; it must be a number greater than 0, e.g. {key}: {example}")


def _yaml_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "single value"


@dataclass(frozen=True, slots=True)
class _Parsed:
    name: str
    spines: list[str]
    leaves: list[str]
    hosts: list[str]
    graph: nx.Graph[str]


def _parse(text: str, source_name: str) -> _Parsed:
    src = _Source(source_name)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise TopologyError(f"topology file {source_name}{where}: not valid YAML ({problem}); fix the syntax") from None
    if root is None:
        raise src.err(None, "is empty; it needs spines, leaves, hosts and links (`p2psched topology generate` writes one)")
    top = src.mapping(root, "the file")
    sections: dict[str, yaml.Node] = {}
    for k, v in top:
        if k.value not in TOP_KEYS:
            hint = difflib.get_close_matches(k.value, TOP_KEYS, n=1)
            did = f"; did you mean '{hint[0]}'?" if hint else ""
            raise src.err(k, f"unknown key '{k.value}'; the keys are {', '.join(TOP_KEYS)}{did}")
        if k.value in sections:
            raise src.err(k, f"key '{k.value}' appears twice; merge the two into one")
        sections[k.value] = v
    for needed in ("leaves", "hosts", "links"):
        if needed not in sections:
            raise src.err(root, f"has no '{needed}'; a topology needs leaves, hosts and links (spines optional)")

    kinds: dict[str, str] = {}
    first_line: dict[str, int] = {}
    by_kind: dict[str, list[str]] = {"spine": [], "leaf": [], "host": []}
    host_nodes: dict[str, yaml.Node] = {}
    for section, kind in (("spines", "spine"), ("leaves", "leaf"), ("hosts", "host")):
        if section not in sections:
            continue
        for ident, node in src.id_list(sections[section], section):
            if ident in kinds:
                raise src.err(
                    node,
                    f"duplicate id '{ident}' (first declared as a {kinds[ident]} at line {first_line[ident]}); "
                    "give each switch and host its own id",
                )
            kinds[ident] = kind
            first_line[ident] = node.start_mark.line + 1
            by_kind[kind].append(ident)
            if kind == "host":
                host_nodes[ident] = node
    if not by_kind["leaf"]:
        raise src.err(sections["leaves"], "declares no leaves; hosts hang off leaf switches, so add at least one")
    if not by_kind["host"]:
        raise src.err(sections["hosts"], "declares no hosts; add the hosts agents run on, e.g. hosts: [h0-0, h0-1]")

    graph: nx.Graph[str] = nx.Graph()
    for ident, kind in kinds.items():
        graph.add_node(ident, kind=kind)
    links = sections["links"]
    if not isinstance(links, yaml.SequenceNode):
        raise src.err(links, "'links' must be a list of {a, b, latency_us, bandwidth_gbps} mappings")
    link_line: dict[frozenset[str], int] = {}
    plural = {"spine": "spines", "leaf": "leaves", "host": "hosts"}
    for link in links.value:
        fields = dict((k.value, (k, v)) for k, v in src.mapping(link, "a link"))
        for key in fields:
            if key not in LINK_KEYS:
                raise src.err(fields[key][0], f"link has unknown key '{key}'; a link has {', '.join(LINK_KEYS)}")
        for key, example in (("a", "leaf-0"), ("b", "spine-0"), ("latency_us", "2.0"), ("bandwidth_gbps", "100")):
            if key not in fields:
                raise src.err(link, f"link lacks '{key}'; add it, e.g. {key}: {example}")
        ends = []
        for key in ("a", "b"):
            node = fields[key][1]
            if not isinstance(node, yaml.ScalarNode):
                raise src.err(node, f"link end '{key}' must be an id, not a {_yaml_kind(node)}")
            ident = node.value.strip()
            if ident not in kinds:
                close = difflib.get_close_matches(ident, list(kinds), n=1, cutoff=0.5)
                guess = kinds[close[0]] if close else ("host" if ident.startswith("h") else "leaf")
                noun = "host" if guess == "host" else "switch"
                did = f" (did you mean '{close[0]}'?)" if close else ""
                raise src.err(
                    node,
                    f"link references unknown {noun} '{ident}'{did}; {_describe_ids(plural[guess], by_kind[guess])}; "
                    f"declare it under {plural[guess]} or fix the name",
                )
            ends.append(ident)
        a, b = ends
        if a == b:
            raise src.err(link, f"link joins '{a}' to itself; a link needs two different ends")
        pair = frozenset((a, b))
        if pair in link_line:
            raise src.err(link, f"duplicate link between '{a}' and '{b}' (first at line {link_line[pair]}); keep one")
        link_line[pair] = link.start_mark.line + 1
        latency = src.positive(fields["latency_us"][1], "latency_us", "2.0")
        bandwidth = src.positive(fields["bandwidth_gbps"][1], "bandwidth_gbps", "100")
        graph.add_edge(a, b, latency_us=latency, bandwidth_gbps=bandwidth, transfer=latency + _TRANSFER_KBITS / bandwidth)

    for host in by_kind["host"]:
        if graph.degree(host) == 0:
            leaf = by_kind["leaf"][0]
            raise src.err(
                host_nodes[host],
                f"host '{host}' has no link; add one to its leaf, e.g. "
                f"- {{a: {host}, b: {leaf}, latency_us: 1.0, bandwidth_gbps: 25}}",
            )
    parts = list(nx.connected_components(graph))
    if len(parts) > 1:
        parts.sort(key=len, reverse=True)
        stray = parts[1]
        switches = sorted(n for n in stray if kinds[n] != "host") or sorted(stray)
        shown = ", ".join(sorted(stray)[:6]) + (", ..." if len(stray) > 6 else "")
        anchor = by_kind["spine"][0] if by_kind["spine"] else sorted(parts[0])[0]
        raise src.err(
            root,
            f"the graph is not connected: it falls into {len(parts)} parts, and {{{shown}}} cannot reach "
            f"'{anchor}'; link '{switches[0]}' to the rest (e.g. to '{anchor}')",
        )
    name_node = sections.get("name")
    name = name_node.value if isinstance(name_node, yaml.ScalarNode) else Path(source_name).stem
    return _Parsed(name, by_kind["spine"], by_kind["leaf"], by_kind["host"], graph)


class Topology:
    """A loaded topology with cached shortest paths. Not thread-safe; one per agent."""

    def __init__(self, text: str, *, source_name: str = "<text>", path: Path | None = None,
                 weight: Weight = "latency") -> None:
        if weight not in WEIGHTS:
            raise TopologyError(f"unknown weight {weight!r}; use one of {', '.join(WEIGHTS)}")
        self.weight: Weight = weight
        self.path_on_disk = path
        self._stamp: tuple[int, int] | None = None
        self._install(_parse(text, source_name))

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, weight: Weight = "latency") -> Topology:
        p = Path(path)
        try:
            st = p.stat()
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise TopologyError(f"cannot read topology file {p}: {e.strerror}; check the path") from None
        except UnicodeDecodeError:
            raise TopologyError(f"topology file {p} is not UTF-8 text; write it as YAML in UTF-8") from None
        topo = cls(text, source_name=str(p), path=p, weight=weight)
        topo._stamp = (st.st_mtime_ns, st.st_size)
        return topo

    @classmethod
    def from_text(cls, text: str, *, name: str = "<text>", weight: Weight = "latency") -> Topology:
        return cls(text, source_name=name, weight=weight)

    def _install(self, parsed: _Parsed) -> None:
        self.name = parsed.name
        self.spines: tuple[str, ...] = tuple(parsed.spines)
        self.leaves: tuple[str, ...] = tuple(parsed.leaves)
        self.hosts: tuple[str, ...] = tuple(parsed.hosts)
        self.graph: nx.Graph[str] = parsed.graph
        self._host_set = frozenset(parsed.hosts)
        self._leaf_set = frozenset(parsed.leaves)
        self._trees: OrderedDict[str, tuple[dict[str, float], dict[str, list[str]]]] = OrderedDict()
        self.searches = 0  # Dijkstra runs since the last (re)load; tests read it to see the cache work
        self._host_leaf: dict[str, str] = {}
        for h in parsed.hosts:
            leaves = [n for n in self.graph.neighbors(h) if n in self._leaf_set]
            self._host_leaf[h] = min(leaves) if leaves else min(self.graph.neighbors(h))
        self._anchors: dict[str, tuple[str, float, str | None]] = {}
        self._virtual_link: dict[str, tuple[float, float]] = {}
        every = [self.graph.edges[h, self._host_leaf[h]] for h in parsed.hosts]
        overall = (statistics.median(e["latency_us"] for e in every), statistics.median(e["bandwidth_gbps"] for e in every))
        for leaf in parsed.leaves:
            links = [self.graph.edges[h, leaf] for h in self.graph.neighbors(leaf) if h in self._host_set]
            self._virtual_link[leaf] = (
                (statistics.median(e["latency_us"] for e in links), statistics.median(e["bandwidth_gbps"] for e in links))
                if links else overall
            )
        # Precomputed because placement prices every peer on every decision.
        for n in self.graph.nodes:
            self._anchors[n] = self._attach(n)

    # -- file changes -------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Re-read the file if its mtime or size changed; True if it did.

        A file that fails to load raises TopologyError and leaves this topology as it
        was, so a bad edit never takes an agent's placement down.
        """
        if self.path_on_disk is None:
            return False
        try:
            st = self.path_on_disk.stat()
        except OSError as e:
            raise TopologyError(
                f"cannot read topology file {self.path_on_disk}: {e.strerror}; keeping the topology loaded before"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            text = self.path_on_disk.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TopologyError(
                f"cannot read topology file {self.path_on_disk} ({e}); keeping the topology loaded before"
            ) from None
        self._install(_parse(text, str(self.path_on_disk)))
        self._stamp = stamp
        return True

    # -- positions ----------------------------------------------------------------

    def is_host(self, ident: str) -> bool:
        return ident in self._host_set

    def leaf_of(self, host: str) -> str:
        """The leaf a host hangs off (the lowest-named one if it has several)."""
        try:
            return self._host_leaf[host]
        except KeyError:
            return self.locate(host).leaf

    def locate(self, node_id: str, position: str = "") -> Location:
        """Where the agent ``node_id`` (gossiping ``position``) sits; see the default rule above."""
        for candidate in (position, node_id):
            if candidate and candidate in self._host_set:
                return Location(node_id, candidate, self._host_leaf[candidate], True,
                                f"agent '{node_id}' sits at host '{candidate}' of topology '{self.name}'")
        digest = hashlib.sha256(node_id.encode()).digest()
        leaf = self.leaves[int.from_bytes(digest[:8], "big") % len(self.leaves)]
        asked = f"position '{position}'" if position else f"node id '{node_id}'"
        return Location(
            node_id, None, leaf, False,
            f"agent '{node_id}': {asked} is not a host of topology '{self.name}', so the default rule "
            f"placed it on {leaf} (sha256 of the node id mod {len(self.leaves)} leaves); "
            "list it under hosts, or start the agent with a node id or position that is one",
        )

    # -- paths --------------------------------------------------------------------

    def _tree(self, source: str) -> tuple[dict[str, float], dict[str, list[str]]]:
        tree = self._trees.get(source)
        if tree is not None:
            self._trees.move_to_end(source)
            return tree
        self.searches += 1
        dist, paths = nx.single_source_dijkstra(self.graph, source, weight=self._wkey)
        fresh: tuple[dict[str, float], dict[str, list[str]]] = (dist, paths)  # type: ignore[assignment]
        self._trees[source] = fresh
        if len(self._trees) > PATH_CACHE_SOURCES:
            self._trees.popitem(last=False)
        return fresh

    def _attach(self, ident: str) -> tuple[str, float, str | None]:
        """(anchor node in the graph, weight to reach it, name to prepend or append)."""
        known = self._anchors.get(ident)
        if known is not None:
            return known
        if ident in self.graph:
            if self.graph.degree(ident) == 1:
                (nbr,) = self.graph.neighbors(ident)
                return nbr, float(self.graph.edges[ident, nbr][self._wkey]), ident
            return ident, 0.0, None
        leaf = self.locate(ident).leaf
        lat, bw = self._virtual_link[leaf]
        w = lat if self.weight == "latency" else lat + _TRANSFER_KBITS / bw
        return leaf, w, ident

    @property
    def _wkey(self) -> str:
        return "latency_us" if self.weight == "latency" else "transfer"

    def _query(self, a: str, b: str, want_path: bool) -> tuple[float, list[str]]:
        if a == b:
            return 0.0, [a]
        anchor_a, wa, head = self._attach(a)
        if b in self.graph:
            anchor_b, wb, tail = b, 0.0, None
        else:
            anchor_b, wb, tail = self._attach(b)
        dist, paths = self._tree(anchor_a)
        cost = wa + dist[anchor_b] + wb
        if not want_path:
            return cost, []
        route = list(paths[anchor_b])
        if head is not None:
            route.insert(0, head)
        if tail is not None:
            route.append(tail)
        return cost, route

    def pricer(self, a: str) -> Callable[[str], float]:
        """A function ``b -> cost(a, b)``, for pricing many peers from one agent.

        Placement prices every peer on every decision; this resolves ``a`` and its
        Dijkstra tree once, so each peer costs a dict lookup.
        """
        anchor_a, wa, _ = self._attach(a)
        dist = self._tree(anchor_a)[0]

        def price(b: str) -> float:
            if b == a:
                return 0.0
            d = dist.get(b)
            if d is not None:
                return wa + d
            return self._query(a, b, False)[0]

        return price

    def cost(self, a: str, b: str) -> float:
        """Weighted shortest-path length between two nodes (host, switch or agent id)."""
        return self._query(a, b, False)[0]

    def path(self, a: str, b: str) -> list[str]:
        """The shortest path from ``a`` to ``b``, switches included, ends included."""
        return self._query(a, b, True)[1]

    def route(self, a: str, b: str) -> tuple[list[str], float]:
        """``path`` and ``cost`` at once, for a placement's Forward."""
        cost, route = self._query(a, b, True)
        return route, cost

    def max_host_cost(self) -> float:
        """The largest cost between two hosts (the fabric's diameter as hosts see it)."""
        best = 0.0
        far: dict[str, float] = {}
        for h in self.hosts:
            anchor, w, _ = self._attach(h)
            if anchor not in far:
                dist, _ = self._tree(anchor)
                far[anchor] = max(dist[o] for o in self.hosts)
            best = max(best, w + far[anchor])
        return best

    def summary(self) -> dict[str, Any]:
        lat = [d["latency_us"] for _, _, d in self.graph.edges(data=True)]
        return {
            "name": self.name,
            "spines": len(self.spines),
            "leaves": len(self.leaves),
            "hosts": len(self.hosts),
            "links": self.graph.number_of_edges(),
            "latency_us": (min(lat), max(lat)),
            "weight": self.weight,
        }


def load(path: str | os.PathLike[str], *, weight: Weight = "latency") -> Topology:
    """Load and check a topology file; raises TopologyError with line and fix."""
    return Topology.load(path, weight=weight)
