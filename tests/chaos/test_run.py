"""A real chaos run: four agents in network namespaces, kills, pauses, restarts and
partitions on a fixed seed, a few hundred jobs, and the checker's verdict.

Needs root (network namespaces, a bridge, veth pairs); it fails with the reason
where they cannot be made rather than running a weaker test. About a minute and a
half on a two-core machine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from p2psched.chaos.harness import RunConfig, run_chaos
from p2psched.chaos.hosts import STATE_DIR, netns_problem

pytestmark = [pytest.mark.chaos, pytest.mark.root]


def test_no_acknowledged_job_is_lost_under_faults(tmp_path: Path) -> None:
    problem = netns_problem()
    assert problem is None, f"this test needs network namespaces: {problem}"
    cfg = RunConfig(agents=4, duration=40, seed=6, jobs=300, clients=12, out=tmp_path / "run",
                    form_timeout_s=15, converge_timeout_s=30, settle_s=45)
    verdict, run_dir = run_chaos(cfg)

    report = verdict.render() + f"\n(run directory {run_dir})"
    print(report)  # shown with -rP or -s: the counts and figures of this run
    assert verdict.ok, report
    # The run did what it claims: jobs went in, and every kind of fault happened.
    assert verdict.counts["acknowledged"] >= 0.95 * cfg.jobs, report
    assert set(verdict.counts["faults"]) == {"kill", "pause", "restart", "partition"}, report
    assert verdict.figures["jobs_lost"] == 0
    assert verdict.figures["duplicate_results"] == 0
    assert (run_dir / "history.jsonl").stat().st_size > 0
    # Teardown left nothing behind: no record of this run's namespaces, no bridge.
    bridge = json.loads((run_dir / "hosts.json").read_text())["bridge"]
    assert not (STATE_DIR / f"{bridge.removeprefix('pcb')}.json").exists()
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0


def test_no_job_is_lost_while_hosts_sandboxes_break(tmp_path: Path) -> None:
    """The "sandbox" fault: for seconds at a time one agent's wasm workers die as
    soon as they start, so every job it runs fails for the host's fault. Its jobs
    must run again (there or on a peer), none lost or run to two results."""
    problem = netns_problem()
    assert problem is None, f"this test needs network namespaces: {problem}"
    cfg = RunConfig(agents=3, duration=30, seed=2, jobs=200, clients=9, out=tmp_path / "run", kinds=("sandbox",),
                    form_timeout_s=15, converge_timeout_s=30, settle_s=60)
    verdict, run_dir = run_chaos(cfg)

    report = verdict.render() + f"\n(run directory {run_dir})"
    print(report)
    assert verdict.ok, report
    assert set(verdict.counts["faults"]) == {"sandbox"}, report
    assert verdict.figures["jobs_lost"] == 0 and verdict.figures["duplicate_results"] == 0
    logs = "".join(p.read_text(errors="replace") for p in run_dir.glob("*.log"))
    retried = logs.count("this host could not run it")
    impaired = logs.count("wasm jobs: this host could not run")
    print(f"host failures retried: {retried}; times a host took itself out of wasm placement: {impaired}")
    assert retried > 0, "the fault broke no job: it did not reach the workers"
