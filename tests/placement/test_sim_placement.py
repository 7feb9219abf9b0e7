"""The placement simulator drives the real core in virtual time; checks of its model."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from p2psched.sim.placement import (
    Omniscient, PeerToPeer, PowerOfTwo, RandomPlacement, _fresh, cli, gossip_model, make_trace, simulate,
)
from p2psched.topology import Topology

REPO = Path(__file__).resolve().parents[2]
MEDIUM = Topology.load(REPO / "topologies" / "medium.yaml")


def test_every_job_runs_once_within_capacity_and_after_it_arrives() -> None:
    trace = make_trace(len(MEDIUM.hosts), 2, 0.9, 1500, 1.0, "exp", seed=3)
    for sched in (PeerToPeer(MEDIUM, 2, _fresh(trace), 1, "p2p", 0.2), Omniscient(MEDIUM, 2, _fresh(trace), 1),
                  RandomPlacement(MEDIUM, 2, _fresh(trace), 1), PowerOfTwo(MEDIUM, 2, _fresh(trace), 1)):
        sched.run()  # take() asserts no host ever runs more than its slots
        assert sched.done == 1500
        assert sched.free == [2] * len(MEDIUM.hosts)
        for j in sched.jobs:
            assert j.arrival <= j.start and j.finish >= j.start + j.duration
            assert 0 <= j.executor < len(MEDIUM.hosts)


def test_same_seed_same_figures() -> None:
    a = simulate(MEDIUM, load=0.8, jobs=800, seed=5, cpus_per_host=2, mean_duration=1.0)
    b = simulate(MEDIUM, load=0.8, jobs=800, seed=5, cpus_per_host=2, mean_duration=1.0)
    assert a == b
    assert [r.scheduler for r in a] == ["p2p", "omniscient", "random", "power-of-two"]


def test_ideal_beats_random_and_p2p_forwards_only_when_the_origin_is_full() -> None:
    reports = {r.scheduler: r for r in simulate(MEDIUM, load=0.85, jobs=3000, seed=2, cpus_per_host=2,
                                                mean_duration=1.0)}
    assert reports["omniscient"].mean_jct < reports["random"].mean_jct
    assert reports["p2p"].mean_jct < reports["random"].mean_jct
    # Jobs that fit at their origin never move: fewer hops than a central scheduler's
    # dispatch of every job.
    assert reports["p2p"].hops_per_job < reports["omniscient"].hops_per_job
    assert reports["random"].messages_per_placement == 1 and reports["power-of-two"].messages_per_placement == 5


def test_gossip_same_leaf_preference_cuts_cross_spine_traffic() -> None:
    uniform, local = gossip_model(MEDIUM, fractions=(0.0, 0.8), trials=4, seed=1)
    assert local.cross_spine_per_node_round < uniform.cross_spine_per_node_round / 2
    assert uniform.rounds_max < 20 and local.rounds_max < 20


def test_cli_prints_table_and_json() -> None:
    args = ["--topology", str(REPO / "topologies" / "small.yaml"), "--jobs", "300", "--cpus-per-host", "2",
            "--mean-duration", "1"]
    r = CliRunner().invoke(cli, args + ["--gossip", "--same-leaf-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    assert "omniscient" in r.output and "power-of-two" in r.output and "cross-spine" in r.output
    r = CliRunner().invoke(cli, args + ["--json", "--policy", "round-robin", "--no-baselines"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [x["scheduler"] for x in out["results"]] == ["p2p/round-robin"]
    r = CliRunner().invoke(cli, args + ["--load", "1.2"])
    assert r.exit_code == 2 and "it must lie strictly between 0 and 1" in r.output


def test_black_hole_hosts_draw_jobs_until_their_breaker_gives_them_away() -> None:
    """Broken hosts gossip free slots but fail every job: without the agent's breaker
    (agent/health.py, run here in virtual time) p2p sends them job after job, as
    power-of-two does; with it, only a few jobs meet them."""
    reports = {r.scheduler: r for r in simulate(MEDIUM, load=0.8, jobs=4000, seed=3, cpus_per_host=2,
                                                mean_duration=1.0, broken=4)}
    assert [*reports] == ["p2p", "p2p/no-breaker", "omniscient", "random", "power-of-two"]
    bounced = {name: r.extra["jobs_bounced_pct"] for name, r in reports.items()}
    assert bounced["omniscient"] == 0  # it never uses a host it knows is broken
    assert bounced["p2p"] < bounced["p2p/no-breaker"] / 5, bounced
    assert bounced["p2p"] < bounced["power-of-two"], bounced
    assert bounced["power-of-two"] > bounced["random"] > 0, bounced  # an idle black hole has the shortest queue


def test_every_job_still_runs_once_with_broken_hosts() -> None:
    trace = make_trace(len(MEDIUM.hosts), 2, 0.8, 1500, 1.0, "exp", seed=4)
    broken = frozenset({0, 5, 17})
    for sched in (PeerToPeer(MEDIUM, 2, _fresh(trace), 1, "p2p", 0.2, broken),
                  PeerToPeer(MEDIUM, 2, _fresh(trace), 1, "p2p", 0.2, broken, breaker=False),
                  RandomPlacement(MEDIUM, 2, _fresh(trace), 1, broken), PowerOfTwo(MEDIUM, 2, _fresh(trace), 1, broken)):
        sched.run()
        assert sched.done == 1500 and sched.free == [2] * len(MEDIUM.hosts)
        assert all(j.executor not in broken and j.start >= j.arrival for j in sched.jobs)
