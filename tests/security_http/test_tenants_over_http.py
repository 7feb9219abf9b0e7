"""Tenants, signatures and attestation through a real agent subprocess and the CLI."""

import functools
import json
import signal
import time

import httpx
import pytest

import agents
from agents import new_agent, wasm_spec

# Every call must succeed unless it says check=False.
cli = functools.partial(agents.cli, check=True)

pytestmark = pytest.mark.cluster


def test_signed_jobs_unsigned_refused_tenants_see_only_their_own(tmp_path, tenants):
    reg, keys = tenants
    agent = new_agent(tmp_path, "secure", "--tenants", str(reg)).start()
    try:
        r = httpx.post(agent.url + "/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 401, r.text
        assert agent.url and "p2psched_admission_rejections_total" in httpx.get(agent.url + "/metrics").text

        alice = ["--tenant", "alice", "--key", str(keys / "alice.key")]
        p = cli("submit", "examples/wasm/hello.wasm", "--wait", "--json", *alice, agent=agent)
        rec = json.loads(p.stdout)
        assert rec["state"] == "succeeded" and rec["tenant"] == "alice"
        report = rec["result"]["attestation"]
        assert report["job_id"] == rec["id"] and report["node_id"] == "secure"

        p = cli("status", rec["id"], "--json", *alice, agent=agent)
        assert json.loads(p.stdout)["id"] == rec["id"]
        p = cli("status", rec["id"], "--tenant", "bob", "--key", str(keys / "bob.key"), agent=agent, check=False)
        # Another tenant's job is answered as one that does not exist: bob learns nothing of it.
        assert p.returncode == 3 and b"404" in p.stderr and b"no job" in p.stderr
        p = cli("status", rec["id"], "--tenant", "ops", "--key", str(keys / "ops.key"), agent=agent)
        assert rec["id"].encode() in p.stdout
        p = cli("status", rec["id"], agent=agent, check=False)
        assert p.returncode == 3 and b"401" in p.stderr

        listing = json.loads(cli("jobs", "--json", "--tenant", "bob", "--key", str(keys / "bob.key"),
                                 agent=agent).stdout)
        assert listing["jobs"] == []
        # Counts are scoped as listings are: a tenant counts its own jobs, an admin any tenant's.
        from p2psched.security.client import RequestSigner

        def counts(who, **params):
            auth = RequestSigner(who, keys / f"{who}.key").auth
            return httpx.get(agent.url + "/v1/jobs:counts", params=params, auth=auth)

        assert counts("alice").json() == {"counts": {**dict.fromkeys(
            ["submitted", "queued", "placed", "running", "failed", "cancelled", "timed_out", "rejected"], 0),
            "succeeded": 1}, "tenant": "alice"}
        assert counts("bob").json()["counts"]["succeeded"] == 0
        assert counts("bob", tenant="alice").status_code == 403
        # It names the tenant asked for (not a job: none is named) and what to do.
        p = cli("jobs", "--counts", "--of-tenant", "alice", "--tenant", "bob", "--key", str(keys / "bob.key"),
                agent=agent, check=False)
        said = p.stderr.decode()
        assert p.returncode == 3 and "403" in said, said
        assert "job *" not in said and "belongs to another tenant" not in said, said
        assert ("tenant 'bob' may list, count and cancel by label only its own jobs, not tenant 'alice''s; leave "
                "the tenant out (drop --of-tenant; in the API, the tenant parameter) to cover your own, or sign as "
                "an admin tenant to cover another's") in said, said
        assert counts("ops", tenant="alice").json()["counts"]["succeeded"] == 1
        assert httpx.get(agent.url + "/v1/jobs:counts").status_code == 401

        saved = tmp_path / "report.json"
        saved.write_text(json.dumps(report))
        assert cli("verify", str(saved), "--node-pubkey", report["node_pubkey"]).returncode == 0
        report["output_sha256"] = "0" * 64
        saved.write_text(json.dumps(report))
        p = cli("verify", str(saved), "--node-pubkey", report["node_pubkey"], check=False)
        assert p.returncode != 0
    finally:
        agent.stop()


def add_tenant_until_accepted(agent, reg, keys, name: str, *, sighup: bool) -> list[str]:
    """Create tenant ``name`` with `p2psched tenant`, refused until the running agent
    has the edited registry (told with SIGHUP, or noticing the change); its CLI flags."""
    flags = ["--tenant", name, "--key", str(keys / f"{name}.key")]
    cli("tenant", "keygen", name, "--out", str(keys))
    p = cli("submit", "examples/wasm/hello.wasm", *flags, agent=agent, check=False)
    assert p.returncode == 3 and b"401" in p.stderr
    cli("tenant", "add", name, "--pubkey", str(keys / f"{name}.pub"), "--tenants", str(reg), "--cap", "wasm")
    if sighup:
        agent.kill(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while cli("submit", "examples/wasm/hello.wasm", *flags, agent=agent, check=False).returncode != 0:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    return flags


def test_sighup_reloads_a_good_registry_and_keeps_the_old_on_a_bad_one(tmp_path, tenants):
    reg, keys = tenants
    agent = new_agent(tmp_path, "reloader", "--tenants", str(reg)).start()
    try:
        carol = add_tenant_until_accepted(agent, reg, keys, "carol", sighup=True)
        good = reg.read_text()
        reg.write_text(good + "\n[tenants.broken\n")
        agent.kill(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not reloaded" not in agent.log():
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.1)
        assert "line" in agent.log().split("not reloaded", 1)[1].splitlines()[0]
        assert cli("submit", "examples/wasm/hello.wasm", *carol, agent=agent, check=False).returncode == 0
    finally:
        agent.stop()


def test_an_edited_registry_applies_without_a_signal(tmp_path, tenants):
    """`p2psched tenant add` edits the file; the running agent notices within seconds."""
    reg, keys = tenants
    agent = new_agent(tmp_path, "watcher", "--tenants", str(reg)).start()
    try:
        add_tenant_until_accepted(agent, reg, keys, "dave", sighup=False)
        assert "tenant registry reloaded" in agent.log()
    finally:
        agent.stop()


def test_quota_counts_jobs_held_at_other_agents(tmp_path, tenants):
    from agents import start_cluster, stop_all
    from p2psched.security.client import RequestSigner, sign_submission

    reg, keys = tenants
    cli("tenant", "add", "alice", "--pubkey", str(keys / "alice.pub"), "--tenants", str(reg), "--cap", "wasm",
        "--max-jobs", "2")
    agents = start_cluster(tmp_path, ["qa", "qb"], "--tenants", str(reg),
                           auth=RequestSigner("ops", keys / "ops.key").auth)
    try:
        long_job = {"runtime": "wasm", "module": wasm_spec("loop.wasm")["module"], "limits": {"wall_ms": 20000}}
        for a in agents:
            r = httpx.post(a.url + "/v1/jobs", json=sign_submission(long_job, "alice", keys / "alice.key"), timeout=30)
            assert r.status_code == 202, r.text
        # qa learns of the job held at qb through gossip, then refuses a third.
        deadline = time.monotonic() + 20
        while True:
            r = httpx.post(agents[0].url + "/v1/jobs", json=sign_submission(long_job, "alice", keys / "alice.key"),
                           timeout=30)
            if r.status_code == 429:
                break
            assert r.status_code == 202 and time.monotonic() < deadline, r.text
            httpx.delete(agents[0].url + f"/v1/jobs/{r.json()['id']}", timeout=30,
                         auth=RequestSigner("alice", keys / "alice.key").auth)
            time.sleep(0.3)
        body = r.json()["error"]
        assert body["reason"].startswith("quota") and "2" in body["message"]
    finally:
        stop_all(agents)


def test_batch_signs_every_job_as_its_tenant(tmp_path, tenants):
    reg, keys = tenants
    agent = new_agent(tmp_path, "signed-batch", "--tenants", str(reg)).start()
    try:
        p = cli("batch", "examples/jobs/sweep.jsonl", "--wait", "--json", "--tenant", "alice",
                "--key", str(keys / "alice.key"), agent=agent)
        jobs = json.loads(p.stdout)["jobs"]
        assert [(j["state"], j["tenant"]) for j in jobs] == [("succeeded", "alice")] * 4
        assert all(j["result"]["attestation"]["tenant"] == "alice" for j in jobs)
        # Waiting for many jobs is read access to each: another tenant sees none of them.
        from p2psched.security.client import RequestSigner

        ids = [j["id"] for j in jobs]
        bob = RequestSigner("bob", keys / "bob.key").auth
        r = httpx.post(agent.url + "/v1/jobs:wait", json={"ids": ids}, auth=bob)
        assert r.status_code == 207
        assert [item["error"]["status"] for item in r.json()["results"]] == [404] * 4
        assert all("job" not in item for item in r.json()["results"]) and "succeeded" not in r.text
        assert httpx.post(agent.url + "/v1/jobs:wait", json={"ids": ids}).status_code == 401

        unsigned = cli("batch", "examples/jobs/sweep.jsonl", agent=agent, check=False)
        assert unsigned.returncode == 3 and b"401" in unsigned.stderr
        half = cli("batch", "examples/jobs/sweep.jsonl", "--tenant", "alice", agent=agent, check=False)
        assert half.returncode == 2 and b"--tenant and --key go together" in half.stderr
    finally:
        agent.stop()


def test_cancelling_many_jobs_reaches_only_the_callers_own(tmp_path, tenants):
    from p2psched.security.client import RequestSigner, sign_submission

    reg, keys = tenants
    agent = new_agent(tmp_path, "signed-cancel", "--tenants", str(reg)).start()
    try:
        loop = {**wasm_spec("loop.wasm", limits={"wall_ms": 60000}), "labels": {"sweep": "x"}}
        r = httpx.post(agent.url + "/v1/jobs", json=sign_submission(loop, "alice", keys / "alice.key"), timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        alice = RequestSigner("alice", keys / "alice.key").auth
        bob = RequestSigner("bob", keys / "bob.key").auth
        r = httpx.post(agent.url + "/v1/jobs:cancel", json={"ids": [job_id]}, auth=bob, timeout=60)
        assert r.status_code == 207 and r.json()["results"][0]["error"]["status"] == 404
        r = httpx.post(agent.url + "/v1/jobs:cancel", json={"labels": {"sweep": "x"}}, auth=bob, timeout=60)
        assert r.json()["results"] == []  # bob's label cancel sees only bob's jobs
        assert httpx.post(agent.url + "/v1/jobs:cancel", json={"ids": [job_id]}).status_code == 401
        assert httpx.get(agent.url + f"/v1/jobs/{job_id}", auth=alice).json()["state"] != "cancelled"
        r = httpx.post(agent.url + "/v1/jobs:cancel", json={"labels": {"sweep": "x"}}, auth=alice, timeout=60)
        assert [(item["job"]["id"], item["job"]["state"]) for item in r.json()["results"]] == [(job_id, "cancelled")]
    finally:
        agent.stop()
