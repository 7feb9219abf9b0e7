"""``p2psched topology generate|show|path`` through click's runner."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from p2psched.cli.main import cli
from p2psched.topology import Topology

REPO = Path(__file__).resolve().parents[2]


def test_generate_writes_a_file_the_loader_accepts(tmp_path: Path) -> None:
    out = tmp_path / "fab.yaml"
    r = CliRunner().invoke(cli, ["topology", "generate", "--spines", "2", "--leaves", "3", "--hosts-per-leaf", "4",
                                 "--oversubscription", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 leaves, 12 hosts" in r.output
    topo = Topology.load(out)
    assert len(topo.hosts) == 12 and topo.hosts[-1] == "h2-3"
    assert topo.graph.edges["leaf-0", "spine-0"]["bandwidth_gbps"] == 4 * 25 / (2 * 2)


def test_generate_refuses_nonsense_sizes(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["topology", "generate", "--spines", "0", "--leaves", "3", "--hosts-per-leaf", "4",
                                 "-o", str(tmp_path / "x.yaml")])
    assert r.exit_code == 2
    assert "--spines is 0; a leaf-spine fabric needs at least 1 spine" in r.output


def test_shipped_files_match_the_generator() -> None:
    for name, args in (("small", ["2", "4", "2"]), ("medium", ["4", "16", "8"]), ("large", ["16", "64", "16"])):
        r = CliRunner().invoke(cli, ["topology", "generate", "--spines", args[0], "--leaves", args[1],
                                     "--hosts-per-leaf", args[2], "--name", name, "-o", "-"])
        assert r.exit_code == 0
        assert r.output == (REPO / "topologies" / f"{name}.yaml").read_text()


def test_show_summarises() -> None:
    r = CliRunner().invoke(cli, ["topology", "show", str(REPO / "topologies" / "small.yaml")])
    assert r.exit_code == 0, r.output
    assert "spines: 2   leaves: 4   hosts: 8   links: 16" in r.output
    assert "largest host-to-host cost: 6 us" in r.output


def test_show_reports_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("leaves: [leaf-0]\nhosts: [h0-0]\nlinks:\n  - {a: h0-0, b: leaf-7, latency_us: 1, bandwidth_gbps: 1}\n")
    r = CliRunner().invoke(cli, ["topology", "show", str(bad)])
    assert r.exit_code == 1
    assert "line 4: link references unknown switch 'leaf-7'" in r.output


def test_path_prints_route_and_cost() -> None:
    r = CliRunner().invoke(cli, ["topology", "path", "h0-0", "h0-1", "--topology",
                                 str(REPO / "topologies" / "small.yaml")])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["h0-0 -> leaf-0 -> h0-1", "cost: 2 us (latency), hops: 2"]


def test_path_notes_an_agent_placed_by_the_default_rule() -> None:
    r = CliRunner().invoke(cli, ["topology", "path", "h0-0", "stranger", "--topology",
                                                 str(REPO / "topologies" / "small.yaml")])
    assert r.exit_code == 0
    assert "default rule" in r.stderr
    assert r.stdout.splitlines()[0].endswith("-> stranger")
