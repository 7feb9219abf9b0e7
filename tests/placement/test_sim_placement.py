"""The placement simulator drives the real core in virtual time; checks of its model."""

from __future__ import annotations

import json
import math
from pathlib import Path

from click.testing import CliRunner

from p2psched.placement import PlacementSettings
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


GPU_MIX = (1, 1, 1, 2, 4, 8)


def test_gpu_jobs_run_once_within_each_hosts_gpus_and_their_load_counts_gpus() -> None:
    trace = make_trace(len(MEDIUM.hosts), 8, 0.8, 1500, 1.0, "exp", seed=3, sizes=GPU_MIX, gpus=True)
    # The load counts GPU slots: the mean request is 17/6 GPUs, so arrivals are that much rarer.
    assert trace.rate == 0.8 * len(MEDIUM.hosts) * 8 / (17 / 6 * 1.0)
    assert {j.gpu for j in trace.jobs} == set(GPU_MIX) and all(j.cpu == j.gpu for j in trace.jobs)
    for sched in (PeerToPeer(MEDIUM, 8, _fresh(trace), 1, "p2p", 0.2, gpus=True),
                  PeerToPeer(MEDIUM, 8, _fresh(trace), 1, "p2p", 0.2, gpus=True,
                             settings=PlacementSettings(gpu_first=True)),
                  Omniscient(MEDIUM, 8, _fresh(trace), 1, gpus=True), RandomPlacement(MEDIUM, 8, _fresh(trace), 1),
                  PowerOfTwo(MEDIUM, 8, _fresh(trace), 1)):
        sched.run()  # take() asserts no host ever runs more GPUs than it has
        assert sched.done == 1500 and sched.free == [8] * len(MEDIUM.hosts)
        assert all(j.arrival <= j.start and j.finish >= j.start + j.duration for j in sched.jobs)
    p2p = PeerToPeer(MEDIUM, 8, [], 1, "p2p", 0.2, gpus=True)
    p2p.setup()  # what a simulated agent gossips: its GPUs, as a real agent does
    assert p2p._snapshot(0).vector.gpu_total == {"whole": 8} == p2p._snapshot(0).vector.gpu_free


def test_gpu_figures_per_request_size_add_up_to_the_total() -> None:
    reports = simulate(MEDIUM, load=0.8, jobs=1500, seed=4, mean_duration=1.0, gpu_mix=GPU_MIX)
    assert [r.scheduler for r in reports] == ["p2p", "p2p/fit-last", "omniscient", "random", "power-of-two"]
    assert reports == simulate(MEDIUM, load=0.8, jobs=1500, seed=4, mean_duration=1.0, gpu_mix=GPU_MIX)
    for r in reports:
        assert [*r.by_size] == [1, 2, 4, 8], r.scheduler
        assert sum(f.jobs for f in r.by_size.values()) == r.jobs == 1350
        assert math.isclose(sum(f.jobs * f.mean_jct for f in r.by_size.values()) / r.jobs, r.mean_jct)
        assert math.isclose(sum(f.jobs * f.mean_wait for f in r.by_size.values()) / r.jobs, r.mean_wait)
        assert all(f.mean_wait >= 0 and f.p99_wait >= 0 and f.p50_jct <= f.p99_jct for f in r.by_size.values())
    # CPU runs give no per-size figures.
    assert all(not r.by_size for r in simulate(MEDIUM, load=0.8, jobs=300, seed=4, cpus_per_host=2,
                                               mean_duration=1.0))


def test_fit_first_keeps_hosts_whole_so_8_gpu_jobs_wait_less_than_fit_last() -> None:
    """The point of fit-first: small jobs fill the tightest hosts, not whichever is near
    or here, so a host with all 8 GPUs free is there when an 8-GPU job comes. This run
    with seeds 1-5: the 8-GPU jobs' mean wait is 0-148 ms fit-first against 217-2,055 ms
    fit-last."""
    reports = {r.scheduler: r for r in simulate(MEDIUM, load=0.8, jobs=4000, seed=1, gpu_mix=GPU_MIX,
                                                baselines=False)}
    first, last = reports["p2p"].by_size[8], reports["p2p/fit-last"].by_size[8]
    assert first.mean_wait < last.mean_wait / 2, (first, last)
    assert reports["p2p"].mean_jct < reports["p2p/fit-last"].mean_jct


def test_cli_gpu_mix_prints_rows_per_size_and_checks_the_mix() -> None:
    args = ["--topology", str(REPO / "topologies" / "small.yaml"), "--jobs", "300", "--mean-duration", "1"]
    r = CliRunner().invoke(cli, args + ["--gpu-mix", "1,2,8"])
    assert r.exit_code == 0, r.output
    assert "8 whole GPU slots" in r.output and "p2p/fit-last" in r.output and "  8 GPUs" in r.output
    r = CliRunner().invoke(cli, args + ["--gpu-mix", "1,2,8", "--json", "--no-baselines"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["gpu_mix"] == [1, 2, 8] and [x["scheduler"] for x in out["results"]] == ["p2p", "p2p/fit-last"]
    assert sorted(out["results"][0]["by_size"]) == ["1", "2", "8"]
    # One fit-first row per sample size, the default one named plainly p2p; then fit-last.
    r = CliRunner().invoke(cli, args + ["--gpu-mix", "1,2,8", "--json", "--no-baselines",
                                        "--fit-sample", "0", "--fit-sample", "4"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["results"]
    assert [x["scheduler"] for x in rows] == ["p2p/d=0", "p2p", "p2p/fit-last"]
    assert rows[1] == out["results"][0] and rows[2] == out["results"][1]
    r = CliRunner().invoke(cli, args + ["--gpu-mix", "1,two"])
    assert r.exit_code == 2 and "comma-separated list of GPU counts" in r.output
    r = CliRunner().invoke(cli, args + ["--gpu-mix", "1,16"])
    assert r.exit_code == 2 and "raise --gpus-per-host" in r.output
