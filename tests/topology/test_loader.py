"""The topology loader: generated files, every refusal, paths, costs and the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2psched.topology import FabricShape, Topology, TopologyError, generate

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "topologies" / "small.yaml"

GOOD = """\
name: tiny
spines: [spine-0, spine-1]
leaves: [leaf-0, leaf-1]
hosts: [h0-0, h0-1, h1-0]
links:
  - {a: leaf-0, b: spine-0, latency_us: 2, bandwidth_gbps: 100}
  - {a: leaf-0, b: spine-1, latency_us: 2, bandwidth_gbps: 100}
  - {a: leaf-1, b: spine-0, latency_us: 2, bandwidth_gbps: 100}
  - {a: leaf-1, b: spine-1, latency_us: 2, bandwidth_gbps: 100}
  - {a: h0-0, b: leaf-0, latency_us: 1, bandwidth_gbps: 25}
  - {a: h0-1, b: leaf-0, latency_us: 1, bandwidth_gbps: 25}
  - {a: h1-0, b: leaf-1, latency_us: 1, bandwidth_gbps: 25}
"""


@pytest.mark.parametrize(("spines", "leaves", "per_leaf"), [(2, 4, 2), (4, 16, 8), (1, 1, 1), (3, 5, 7)])
def test_generated_fabric_has_every_host_and_every_leaf_spine_link(spines: int, leaves: int, per_leaf: int) -> None:
    topo = Topology.from_text(generate(FabricShape(spines, leaves, per_leaf)))
    assert len(topo.spines) == spines and len(topo.leaves) == leaves
    assert list(topo.hosts) == [f"h{li}-{hi}" for li in range(leaves) for hi in range(per_leaf)]
    for leaf in topo.leaves:
        for spine in topo.spines:
            assert topo.graph.has_edge(leaf, spine)
    for li in range(leaves):
        assert topo.leaf_of(f"h{li}-0") == f"leaf-{li}"
    assert topo.graph.number_of_edges() == leaves * spines + leaves * per_leaf


def test_oversubscription_sets_uplink_bandwidth() -> None:
    topo = Topology.from_text(generate(FabricShape(2, 2, 8, oversubscription=4.0, host_gbps=25.0)))
    # 8 hosts x 25 Gb/s under a leaf, 4:1, over 2 spines: 25 Gb/s per uplink.
    assert topo.graph.edges["leaf-0", "spine-1"]["bandwidth_gbps"] == 25.0
    assert topo.graph.edges["h0-0", "leaf-0"]["bandwidth_gbps"] == 25.0


@pytest.mark.parametrize("name,hosts", [("small", 8), ("medium", 128), ("large", 1024)])
def test_shipped_examples_load(name: str, hosts: int) -> None:
    topo = Topology.load(REPO / "topologies" / f"{name}.yaml")
    assert topo.name == name and len(topo.hosts) == hosts


def test_path_and_cost_on_small() -> None:
    topo = Topology.load(SMALL)
    assert topo.path("h0-0", "h0-1") == ["h0-0", "leaf-0", "h0-1"]
    assert topo.cost("h0-0", "h0-1") == 2.0
    route = topo.path("h0-0", "h3-1")
    assert route[0] == "h0-0" and route[1] == "leaf-0" and route[2] in topo.spines and route[3:] == ["leaf-3", "h3-1"]
    assert topo.cost("h0-0", "h3-1") == 6.0
    assert topo.cost("h3-1", "h0-0") == 6.0
    assert topo.cost("h1-1", "h1-1") == 0.0 and topo.path("h1-1", "h1-1") == ["h1-1"]
    assert topo.cost("leaf-0", "spine-1") == 2.0
    assert topo.route("h0-0", "h3-1") == (topo.path("h0-0", "h3-1"), 6.0)


def test_transfer_weight_prices_bandwidth() -> None:
    topo = Topology.load(SMALL, weight="transfer")
    # Each link: latency + 8000/Gbps us (1 MB store-and-forward); small.yaml is all 25 Gb/s.
    assert topo.cost("h0-0", "h0-1") == pytest.approx(2 * (1.0 + 320.0))
    assert topo.cost("h0-0", "h3-1") == pytest.approx(2 * (1.0 + 320.0) + 2 * (2.0 + 320.0))
    with pytest.raises(TopologyError, match="unknown weight 'hops'; use one of latency, transfer"):
        Topology.load(SMALL, weight="hops")  # type: ignore[arg-type]


def test_transfer_weight_avoids_a_slow_link() -> None:
    text = GOOD.replace("{a: leaf-0, b: spine-0, latency_us: 2, bandwidth_gbps: 100}",
                        "{a: leaf-0, b: spine-0, latency_us: 1, bandwidth_gbps: 1}")
    assert "spine-0" in Topology.from_text(text).path("h0-0", "h1-0")
    assert "spine-1" in Topology.from_text(text, weight="transfer").path("h0-0", "h1-0")


def test_agent_missing_from_file_is_placed_by_the_default_rule() -> None:
    topo = Topology.load(SMALL)
    loc = topo.locate("gpu-box-7")
    assert not loc.known and loc.host is None and loc.leaf in topo.leaves
    assert "default rule" in loc.note and "gpu-box-7" in loc.note and loc.leaf in loc.note
    assert topo.locate("gpu-box-7") == loc  # deterministic: every agent agrees
    # The stranger hangs off its leaf by a median host link: 1 us to its leaf.
    same_leaf_host = next(h for h in topo.hosts if topo.leaf_of(h) == loc.leaf)
    assert topo.cost("gpu-box-7", same_leaf_host) == 2.0
    assert topo.path("gpu-box-7", same_leaf_host) == ["gpu-box-7", loc.leaf, same_leaf_host]
    assert topo.path(same_leaf_host, "gpu-box-7") == [same_leaf_host, loc.leaf, "gpu-box-7"]
    # A gossiped position that is a host wins over the node id.
    there = topo.locate("gpu-box-7", position="h2-1")
    assert there.known and there.host == "h2-1" and there.leaf == "leaf-2"
    assert topo.locate("h1-0").known


def test_paths_from_one_host_are_computed_once() -> None:
    topo = Topology.load(SMALL)
    for h in topo.hosts:
        topo.cost("h0-0", h)
        topo.path("h0-0", h)
    assert topo.searches == 1  # one Dijkstra from h0-0's leaf answered them all
    topo.cost("h0-1", "h3-0")  # same leaf, same tree
    assert topo.searches == 1
    topo.cost("h3-0", "h0-1")
    assert topo.searches == 2


def test_cache_is_recomputed_when_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(GOOD)
    topo = Topology.load(f)
    assert topo.cost("h0-0", "h1-0") == 6.0
    assert not topo.reload_if_changed()
    f.write_text(GOOD.replace("latency_us: 2,", "latency_us: 5,"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems
    assert topo.reload_if_changed()
    assert topo.cost("h0-0", "h1-0") == 12.0
    assert not topo.reload_if_changed()


def test_a_bad_edit_keeps_the_old_topology(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(GOOD)
    topo = Topology.load(f)
    f.write_text(GOOD.replace("b: leaf-1, latency_us: 1", "b: leaf-9, latency_us: 1"))
    with pytest.raises(TopologyError, match="unknown switch 'leaf-9'"):
        topo.reload_if_changed()
    assert topo.cost("h0-0", "h1-0") == 6.0


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def _refused(text: str) -> str:
    with pytest.raises(TopologyError) as e:
        Topology.from_text(text, name="t.yaml")
    return str(e.value)


def test_link_to_unknown_switch_names_the_line_and_the_known_ones() -> None:
    text = GOOD.replace("{a: leaf-1, b: spine-1,", "{a: leaf-1, b: spine-9,")
    msg = _refused(text)
    line = _line_of(text, "spine-9")
    assert msg.startswith(f"topology file t.yaml line {line}: link references unknown switch 'spine-9'")
    assert "known spines are spine-0, spine-1" in msg and "declare it under spines or fix the name" in msg


def test_link_to_unknown_host_lists_host_range() -> None:
    text = generate(FabricShape(2, 4, 2)).replace("{a: h3-1, b: leaf-3", "{a: h7-1, b: leaf-3")
    msg = _refused(text)
    assert f"line {_line_of(text, 'h7-1')}:" in msg
    assert "unknown host 'h7-1'" in msg and "known hosts are h0-0..h3-1 (8 in all)" in msg


def test_duplicate_id_names_both_lines() -> None:
    text = GOOD.replace("hosts: [h0-0, h0-1, h1-0]", "hosts: [h0-0, h0-1, h1-0, leaf-1]")
    msg = _refused(text)
    assert f"line {_line_of(text, 'hosts:')}: duplicate id 'leaf-1' (first declared as a leaf at line 3)" in msg
    assert "give each switch and host its own id" in msg


def test_host_with_no_link_says_which_link_to_add() -> None:
    text = GOOD.replace("  - {a: h1-0, b: leaf-1, latency_us: 1, bandwidth_gbps: 25}\n", "")
    msg = _refused(text)
    assert f"line {_line_of(text, 'hosts:')}: host 'h1-0' has no link" in msg
    assert "{a: h1-0, b: leaf-0, latency_us: 1.0, bandwidth_gbps: 25}" in msg


def test_disconnected_graph_names_the_stray_part() -> None:
    text = GOOD.replace("  - {a: leaf-1, b: spine-0, latency_us: 2, bandwidth_gbps: 100}\n", "").replace(
        "  - {a: leaf-1, b: spine-1, latency_us: 2, bandwidth_gbps: 100}\n", "")
    msg = _refused(text)
    assert "the graph is not connected: it falls into 2 parts, and {h1-0, leaf-1} cannot reach 'spine-0'" in msg
    assert "link 'leaf-1' to the rest" in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("latency_us: 1, bandwidth_gbps: 25}\n", "latency_us: -1, bandwidth_gbps: 25}\n"),
         "link latency_us is '-1'; it must be a number greater than 0"),
        (("bandwidth_gbps: 25}\n", "bandwidth_gbps: fast}\n"), "link bandwidth_gbps is 'fast'"),
        (("{a: h0-0, b: leaf-0, latency_us: 1, bandwidth_gbps: 25}", "{a: h0-0, b: leaf-0, bandwidth_gbps: 25}"),
         "link lacks 'latency_us'; add it, e.g. latency_us: 2.0"),
        (("{a: h0-0, b: leaf-0, latency_us: 1,", "{a: h0-0, b: leaf-0, latncy_us: 1,"),
         "link has unknown key 'latncy_us'"),
        (("{a: h0-0, b: leaf-0,", "{a: h0-0, b: h0-0,"), "link joins 'h0-0' to itself"),
        (("spines:", "spine:"), "unknown key 'spine'; the keys are name, spines, leaves, hosts, links; did you mean 'spines'?"),
        (("hosts: [h0-0, h0-1, h1-0]\n", ""), "has no 'hosts'"),
        (("links:\n", "links: [\n"), "not valid YAML"),
    ],
)
def test_other_mistakes_are_refused_with_the_fix(edit: tuple[str, str], expected: str) -> None:
    text = GOOD.replace(edit[0], edit[1], 1)
    assert text != GOOD
    assert expected in _refused(text)


def test_duplicate_link_is_refused() -> None:
    text = GOOD + "  - {a: spine-0, b: leaf-0, latency_us: 3, bandwidth_gbps: 100}\n"
    msg = _refused(text)
    assert "duplicate link between 'spine-0' and 'leaf-0' (first at line 6); keep one" in msg


def test_empty_file_and_missing_file() -> None:
    assert "is empty" in _refused("")
    with pytest.raises(TopologyError, match="cannot read topology file .*nope.yaml: No such file"):
        Topology.load("/nonexistent/nope.yaml")


def test_binary_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TopologyError, match="is not UTF-8 text"):
        Topology.load(f)
