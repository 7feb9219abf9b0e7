"""Operator node labels across real subprocess agents: one labelled with --label, one
through P2PSCHED_LABELS. A job's node.* labels send it to the agent that carries them,
learnt through gossip, and a label nobody carries is rejected naming it; an agent
restarted with other labels is known by its new ones."""

import httpx
import pytest

from agents import cli, start_cluster, stop_all, wait_converged, wait_for, wasm_spec

pytestmark = pytest.mark.cluster


def test_a_job_runs_on_the_agent_with_its_node_label_and_an_unknown_label_is_rejected(tmp_path):
    agents = start_cluster(tmp_path, ["za", "zb"], per_agent={"za": ["--label", "zone=a"]},
                           per_agent_env={"zb": {"P2PSCHED_LABELS": "zone=b,rack=r1"}})
    za, zb = agents
    try:
        def peer_labels():
            peers = httpx.get(za.url + "/v1/peers", timeout=10).json()["peers"]
            return {p["node_id"]: p for p in peers} if all(p["labels"] for p in peers) else None

        peers = wait_for(peer_labels, what="za learning both agents' labels")
        assert {k: v for k, v in peers["za"]["labels"].items() if not k.startswith("gpu.")} == {"zone": "a"}
        assert {k: v for k, v in peers["zb"]["labels"].items() if not k.startswith("gpu.")} == {
            "zone": "b", "rack": "r1"}
        assert "gpu.source" in peers["zb"]["labels"]  # the inventory's labels are kept beside them
        # Labels are the node's own, like its addresses: not part of the cluster-wide measurement.
        assert peers["za"]["measurement"] == peers["zb"]["measurement"]
        table = cli("peers", agent=za, check=True).stdout.decode().splitlines()
        assert "rack=r1,zone=b" in next(line for line in table if "zb" in line).split()

        with za.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels={"node.zone": "b"})).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "zb", rec
            here = http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels={"node.zone": "a"})).json()["id"]
            rec = http.get(f"/v1/jobs/{here}", params={"wait": 60}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "za", rec

            nowhere = http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels={"node.zone": "c"})).json()["id"]
            rec = http.get(f"/v1/jobs/{nowhere}", params={"wait": 60}).json()
            assert rec["state"] == "rejected", rec
            assert rec["result"]["reason"] == (
                "rejected: needs a node labelled zone=c; none of the 2 known nodes carries that: start an agent with "
                "--label zone=c, or submit the job without those node.* labels")
        said = cli("submit", "examples/wasm/hello.wasm", "--label", "node.zone=c", "--wait", agent=za)
        assert said.returncode != 0 and b" rejected: needs a node labelled zone=c" in said.stderr, said.stderr
        assert b"rejected: rejected" not in said.stderr  # the state, then the reason once

        # Labels are fixed for an agent's life: a new set takes a restart, and the
        # restarted agent's state must replace what peers hold of its older life.
        zb.stop()
        zb.env["P2PSCHED_LABELS"] = "zone=c"
        zb.start()
        wait_converged(agents)
        wait_for(lambda: (peer_labels() or {}).get("zb", {}).get("labels", {}).get("zone") == "c",
                 what="za learning zb's new labels")
        with za.client() as http:
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels={"node.zone": "c"})).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "zb", rec
    finally:
        stop_all(agents)


def test_an_agent_refuses_a_label_the_gpu_inventory_owns(tmp_path):
    p = cli("agent", "--node-id", "x", "--data-dir", tmp_path, "--label", "gpu.model=H100")
    assert p.returncode == 2
    assert b"labels: label key 'gpu.model': gpu.* labels are set by the GPU inventory" in p.stderr, p.stderr
