"""GPU-first placement across real subprocess agents with declared GPUs.

The agent a client talks to has no GPU; its peers declare whole GPUs, time-sliced
shares or MIG-style slots (``--gpus``, docs/gpu.md). Placement must send each GPU
job to a peer that gossips free slots of its type, prefer the tightest fit, and a
crashed executor's slots must be free again after its restart.
"""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents import ROOT, start_cluster, stop_all

pytestmark = pytest.mark.cluster

SMALL = ROOT / "topologies" / "small.yaml"
ENV_JOB = {"runtime": "process", "command": ["/usr/bin/env"], "limits": {"wall_ms": 20000}}
MIG_H100 = {"1g.10gb": 7, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "4g.40gb": 1, "7g.80gb": 1}


def env_of(rec: dict) -> dict[str, str]:
    return dict(line.split("=", 1) for line in rec["result"]["stdout"].splitlines() if "=" in line)


def gpu_view(agent, auth=None) -> dict[str, dict[str, int]]:
    """Free GPU slots per peer, as ``agent`` knows them from gossip."""
    peers = httpx.get(agent.url + "/v1/peers", timeout=10, auth=auth).json()["peers"]
    return {p["node_id"]: p["vector"]["gpu_free"] for p in peers if p["state"] == "alive"}


def wait_gpu_view(agent, want: dict[str, dict[str, int]], timeout: float = 60, auth=None) -> None:
    """Wait until ``agent`` sees each named peer with exactly these free GPU slots."""
    deadline = time.monotonic() + timeout
    while True:
        view = gpu_view(agent, auth)
        if all(view.get(node) == free for node, free in want.items()):
            return
        assert time.monotonic() < deadline, f"{agent.node_id} never saw {want}: {view}"
        time.sleep(0.2)


def wait_state(http: httpx.Client, job_id: str, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rec = http.get(f"/v1/jobs/{job_id}").json()
        if rec["state"] == state:
            return rec
        ended = rec["state"] in ("succeeded", "failed", "rejected", "cancelled", "timed_out")
        assert time.monotonic() < deadline and not ended, rec
        time.sleep(0.1)


def slots_in_use(agent) -> dict[str, float]:
    """GPU slots in use by type, from the agent's /metrics; its GPUs are all declared."""
    text = httpx.get(agent.url + "/metrics", timeout=10).text
    return {s.labels["type"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "p2psched_gpu_slots_in_use" for s in family.samples
            if s.labels["declared"] == "true"}


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory):
    """h0-0 has no GPU; h0-1 (same leaf) one MIG-carved H100; h1-0 (across the spine)
    two whole H100s and an L4 in quarters."""
    tmp = tmp_path_factory.mktemp("mixed")
    agents = start_cluster(tmp, ["h0-0", "h0-1", "h1-0"], "--cpus", "1", "--topology", str(SMALL), per_agent={
        "h0-1": ["--gpus", "1xH100-80GB/mig"],
        "h1-0": ["--gpus", "2xH100-80GB, 1xL4-24GB/shared:4"],
    })
    try:
        wait_gpu_view(agents[0], {"h0-0": {}, "h0-1": MIG_H100, "h1-0": {"whole": 2, "share-1/4": 4}})
        yield agents
    finally:
        stop_all(agents)


@pytest.mark.parametrize(("gpu_type", "executor", "visible"), [
    ("whole", "h1-0", r"GPU-declared-[01]"),
    ("share-1/4", "h1-0", r"GPU-declared-2"),
    ("3g.40gb", "h0-1", r"MIG-declared-0-\d+-3g\.40gb"),
])
def test_a_gpu_job_lands_on_the_peer_with_its_slot_type(mixed_cluster, gpu_type, executor, visible):
    # The same-leaf peer h0-1 is cheaper to reach, but only the peer that has the
    # slot type is a candidate: a whole GPU crosses the spine to h1-0.
    with mixed_cluster[0].client() as http:
        job = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 1, "gpu_type": gpu_type}}).json()["id"]
        rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
    assert rec["state"] == "succeeded", rec
    assert rec["executor"] == executor and rec["origin"] == "h0-0"
    env = env_of(rec)
    assert re.fullmatch(visible, env["CUDA_VISIBLE_DEVICES"]), env
    assert env["P2PSCHED_GPU_SLOT_TYPE"] == gpu_type and env["P2PSCHED_GPU_SLOTS"] == "1"


def test_a_gpu_type_nobody_has_is_rejected_naming_the_shortfall(mixed_cluster):
    with mixed_cluster[0].client() as http:
        job = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 1, "gpu_type": "share-1/8"}}).json()["id"]
        rec = http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
        assert rec["state"] == "rejected", rec
        reason = rec["result"]["reason"]
        assert "needs GPU slots of type 'share-1/8'" in reason
        assert "whole" in reason and "share-1/4" in reason and "3g.40gb" in reason  # the types that do exist
        assert "ask for one of those with --gpu-type" in reason  # and what to do about it
        too_many = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 3, "gpu_type": "whole"}}).json()["id"]
        rec = http.get(f"/v1/jobs/{too_many}", params={"wait": 30}).json()
        assert rec["state"] == "rejected", rec
        assert "needs 3 'whole' GPU slots; the largest node has 2: ask for at most 2" in rec["result"]["reason"]


def test_the_cluster_totals_count_gpu_slots_by_type(mixed_cluster):
    # Slot types share hardware (one MIG-carved H100 offers all of MIG_H100), so a
    # single sum across types would claim far more GPUs than exist.
    totals = httpx.get(mixed_cluster[0].url + "/v1/cluster", timeout=10).json()
    assert totals["total"]["gpu"] == {**MIG_H100, "whole": 2, "share-1/4": 4}
    assert set(totals["free"]["gpu"]) == set(totals["total"]["gpu"])


def test_the_cluster_view_marks_declared_gpu_slots_per_node_and_in_the_totals(mixed_cluster):
    # Every GPU here is declared (--gpus): the totals say so per type, and each
    # member's gossiped labels say which nodes they are on.
    origin = mixed_cluster[0]
    wait_gpu_view(origin, {"h0-1": MIG_H100, "h1-0": {"whole": 2, "share-1/4": 4}})
    totals = httpx.get(origin.url + "/v1/cluster", timeout=10).json()
    assert totals["total"]["gpu_declared"] == totals["total"]["gpu"] == {**MIG_H100, "whole": 2, "share-1/4": 4}
    assert totals["free"]["gpu_declared"] == totals["free"]["gpu"]
    peers = {p["node_id"]: p for p in httpx.get(origin.url + "/v1/peers", timeout=10).json()["peers"]}
    for node in ("h0-1", "h1-0"):
        assert peers[node]["labels"]["gpu.declared"] == "true" and peers[node]["labels"]["gpu.source"] == "declared"
    assert peers["h0-0"]["labels"]["gpu.source"] == "none" and "gpu.declared" not in peers["h0-0"]["labels"]


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a printed table by first cell, with wrapped cells joined back."""
    rows: dict[str, list[str]] = {}
    last: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith(("│", "┃")):  # body and header rows
            continue
        cells = [c.strip() for c in re.split("[│┃]", line.strip("│┃"))]
        if cells[0]:
            last = rows[cells[0].split()[0]] = cells
        elif last is not None:  # a wrapped cell continues on the next line
            last[:] = [f"{a} {b}".strip() for a, b in zip(last, cells)]
    return rows


def test_peers_cli_shows_the_gpu_slots_of_each_peer(mixed_cluster):
    origin = mixed_cluster[0]
    wait_gpu_view(origin, {"h0-1": MIG_H100, "h1-0": {"whole": 2, "share-1/4": 4}})
    # os.environ, not the C-level environment a subprocess would otherwise inherit: a
    # library in this test process may have set COLUMNS there, which `peers` honours.
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    p = subprocess.run([sys.executable, "-m", "p2psched", "peers", "--agent", origin.url], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    rows = table_rows(p.stdout)
    assert set(rows) == {"node", "h0-0", "h0-1", "h1-0"}, p.stdout
    gpu_column = rows["node"].index("GPU slots free")
    assert rows["h1-0"][gpu_column] == "whole 2/2, share-1/4 4/4 (declared)", p.stdout
    assert rows["h0-1"][gpu_column] == (
        "7g.80gb 1/1, 4g.40gb 1/1, 3g.40gb 2/2, 2g.20gb 3/3, 1g.20gb 4/4, 1g.10gb 7/7 (declared)"), p.stdout
    assert rows["h0-0"][gpu_column] == "-"


def test_best_fit_sends_the_job_to_the_peer_it_fills(tmp_path):
    # The origin sits on leaf-0; both GPU peers on leaf-1 cost the same to reach and
    # are equally idle, so the GPU fit decides (placement/core.py): h1-0 has exactly
    # the one free whole GPU the job needs, h1-1 would keep two idle.
    agents = start_cluster(tmp_path, ["h0-0", "h1-0", "h1-1"], "--cpus", "1", "--topology", str(SMALL),
                           per_agent={"h1-0": ["--gpus", "1xH100-80GB"], "h1-1": ["--gpus", "3xH100-80GB"]})
    origin = agents[0]
    idle = {"h1-0": {"whole": 1}, "h1-1": {"whole": 3}}
    try:
        with origin.client() as http:
            for _ in range(3):
                wait_gpu_view(origin, idle)
                job = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 1, "gpu_type": "whole"}}).json()["id"]
                rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
                assert rec["state"] == "succeeded" and rec["executor"] == "h1-0", rec
                assert env_of(rec)["CUDA_VISIBLE_DEVICES"] == "GPU-declared-0"
            # Two slots: only h1-1 has them, so it takes the job although h1-0 fits tighter for one.
            wait_gpu_view(origin, idle)
            job = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 2, "gpu_type": "whole"}}).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "h1-1", rec
            assert env_of(rec)["P2PSCHED_GPU_SLOTS"] == "2"
    finally:
        stop_all(agents)


def test_fit_first_a_job_leaves_its_origin_for_the_peer_it_fills(tmp_path):
    # --gpu-placement fit-first: the fit comes before the network. The origin's two
    # free GPUs stay whole for a 2-GPU job; a 1-GPU job goes across the spine to the
    # peer with one. (With fit-last it would run at its origin.)
    agents = start_cluster(tmp_path, ["h0-0", "h2-0"], "--cpus", "1", "--topology", str(SMALL),
                           "--gpu-placement", "fit-first",
                           per_agent={"h0-0": ["--gpus", "2xH100-80GB"], "h2-0": ["--gpus", "1xH100-80GB"]})
    origin = agents[0]
    try:
        with origin.client() as http:
            wait_gpu_view(origin, {"h2-0": {"whole": 1}})
            job = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 1, "gpu_type": "whole"}}).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "h2-0", rec
            assert rec["route"][0] == "h0-0" and rec["route"][-1] == "h2-0" and rec["cost"] == 6.0, rec
            job = http.post("/v1/jobs", json={**ENV_JOB, "resources": {"gpu": 2, "gpu_type": "whole"}}).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "h0-0", rec
    finally:
        stop_all(agents)


def test_a_killed_executor_frees_its_gpu_slots_after_restart(tmp_path):
    agents = start_cluster(tmp_path, ["o", "g1", "g2"], "--cpus", "1",
                           per_agent={"g1": ["--gpus", "1xH100-80GB"], "g2": ["--gpus", "1xH100-80GB"]})
    origin = agents[0]
    try:
        wait_gpu_view(origin, {"g1": {"whole": 1}, "g2": {"whole": 1}})
        with origin.client() as http:
            sleep = {"runtime": "process", "command": ["/bin/sleep", "20"], "resources": {"gpu": 1, "gpu_type": "whole"}}
            job = http.post("/v1/jobs", json=sleep).json()["id"]
            first = wait_state(http, job, "running")
            victim = next(a for a in agents if a.node_id == first["executor"])
            survivor = next(a for a in agents if a.node_id not in ("o", victim.node_id))
            assert slots_in_use(victim) == {"whole": 1.0}
            victim.kill(signal.SIGKILL)
            # The origin learns the executor is dead and places the job on the other GPU peer.
            deadline = time.monotonic() + 60
            while (rec := http.get(f"/v1/jobs/{job}").json())["executor"] != survivor.node_id \
                    or rec["state"] != "running":
                assert time.monotonic() < deadline, rec
                time.sleep(0.1)
            assert rec["attempts"] == 2
            assert any(f"executor {victim.node_id} was declared dead" in t["detail"] for t in rec["timeline"])
            victim.start()
            # The restarted agent holds no slot for the job that now runs elsewhere.
            deadline = time.monotonic() + 60
            while slots_in_use(victim) != {"whole": 0.0} or gpu_view(victim).get(victim.node_id) != {"whole": 1}:
                assert time.monotonic() < deadline, (slots_in_use(victim), gpu_view(victim))
                time.sleep(0.1)
            assert http.get(f"/v1/jobs/{job}").json()["state"] == "running"  # freed while the job still runs
            assert slots_in_use(survivor) == {"whole": 1.0}
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
        assert rec["state"] == "succeeded" and rec["executor"] == survivor.node_id and rec["attempts"] == 2, rec
        # The restarted agent ran the job again; the origin cancelled that stale attempt.
        assert [(d["executor"], d["reason"]) for d in rec["duplicate_attempts"]] == [(victim.node_id, "cancelled")]
        with victim.client() as http:
            assert http.get(f"/v1/jobs/{job}").json()["state"] == "cancelled"
        wait_gpu_view(origin, {"g1": {"whole": 1}, "g2": {"whole": 1}})
        assert slots_in_use(victim) == slots_in_use(survivor) == {"whole": 0.0}
    finally:
        stop_all(agents)


def test_a_tenant_gpu_quota_counts_slots_held_through_other_agents(tmp_path):
    from p2psched.security.client import RequestSigner, sign_submission

    keys, reg = tmp_path / "keys", tmp_path / "tenants.toml"
    for name, flags in (("alice", ["--cap", "process", "--cap", "gpu", "--max-gpu", "1"]),
                        ("ops", ["--cap", "process", "--admin"])):
        for args in (["keygen", name, "--out", str(keys)],
                     ["add", name, "--pubkey", str(keys / f"{name}.pub"), "--tenants", str(reg), *flags]):
            p = subprocess.run([sys.executable, "-m", "p2psched", "tenant", *args], capture_output=True, text=True,
                               cwd=ROOT, timeout=120)
            assert p.returncode == 0, p.stderr
    ops = RequestSigner("ops", keys / "ops.key").auth
    alice = RequestSigner("alice", keys / "alice.key").auth
    agents = start_cluster(tmp_path, ["qa", "qb"], "--cpus", "2", "--tenants", str(reg), auth=ops,
                           per_agent={"qb": ["--gpus", "2xH100-80GB"]})
    qa, qb = agents

    def submit(agent, spec):
        return httpx.post(agent.url + "/v1/jobs", json=sign_submission(spec, "alice", keys / "alice.key"), timeout=30)

    gpu_job = {"runtime": "process", "command": ["/bin/sleep", "60"], "resources": {"gpu": 1, "cpu": 0.5}}
    try:
        wait_gpu_view(qa, {"qb": {"whole": 2}}, auth=ops)
        with httpx.Client(base_url=qa.url, auth=alice, timeout=30) as http:
            first = submit(qa, gpu_job)
            assert first.status_code == 202, first.text
            held = wait_state(http, first.json()["id"], "running")
            assert held["executor"] == "qb" and held["origin"] == "qa"
        # qb has a free GPU, but alice's one slot is held by a job whose origin is qa:
        # qb learns that through gossip and refuses a second GPU job.
        deadline = time.monotonic() + 60
        while (r := submit(qb, gpu_job)).status_code != 429:
            assert r.status_code == 202 and time.monotonic() < deadline, r.text
            httpx.delete(qb.url + f"/v1/jobs/{r.json()['id']}", auth=alice, timeout=30)
            time.sleep(0.3)
        error = r.json()["error"]
        assert error["reason"] == "quota_gpu", error
        assert "GPU slots" in error["message"] and "1" in error["message"]
        # The quota is on GPU slots only: a CPU job is still admitted there.
        cpu_only = submit(qb, {**gpu_job, "command": ["/bin/true"], "resources": {"cpu": 0.5}})
        assert cpu_only.status_code == 202, cpu_only.text
        # Once the first job ends, its slot no longer counts anywhere.
        httpx.delete(qa.url + f"/v1/jobs/{first.json()['id']}", auth=alice, timeout=60)
        deadline = time.monotonic() + 60
        while (r := submit(qb, gpu_job)).status_code != 202:
            assert r.status_code == 429 and time.monotonic() < deadline, r.text
            time.sleep(0.3)
        httpx.delete(qb.url + f"/v1/jobs/{r.json()['id']}", auth=alice, timeout=60)
    finally:
        stop_all(agents)
