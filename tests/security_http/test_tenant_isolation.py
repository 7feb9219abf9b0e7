"""Another tenant's jobs, as an attacker holding a valid key for tenant bob sees them.

Real agent subprocesses, joined: alice's jobs run at the agent she submits to and at
its peer (forwarded), and bob asks both agents for them with his own signature. He
must learn nothing, not even that they exist: each answer is the one a job id that
no agent holds gets.
"""

import time

import httpx
import pytest

from agents import start_cluster, stop_all, wasm_spec

pytestmark = pytest.mark.cluster


def running(url: str, job_id: str, auth, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rec = httpx.get(f"{url}/v1/jobs/{job_id}", auth=auth, timeout=30).json()
        if rec["state"] == "running":
            return rec
        assert time.monotonic() < deadline, rec
        time.sleep(0.05)


def test_another_tenants_jobs_are_answered_as_jobs_that_do_not_exist(tmp_path, tenants):
    from p2psched.security.client import RequestSigner, sign_submission

    reg, keys = tenants
    alice = RequestSigner("alice", keys / "alice.key").auth
    bob = RequestSigner("bob", keys / "bob.key").auth
    agents = start_cluster(tmp_path, ["ia", "ib"], "--cpus", "1", "--tenants", str(reg),
                           auth=RequestSigner("ops", keys / "ops.key").auth)
    ia, ib = agents
    try:
        loop = wasm_spec("loop.wasm", limits={"wall_ms": 60000}, labels={"sweep": "secret"})
        here = httpx.post(ia.url + "/v1/jobs", json=sign_submission(loop, "alice", keys / "alice.key"), timeout=30)
        here = here.json()["id"]
        assert running(ia.url, here, alice)["executor"] == "ia"
        time.sleep(0.5)  # ia's full vector reaches ib
        there = httpx.post(ia.url + "/v1/jobs", json=sign_submission(loop, "alice", keys / "alice.key"), timeout=30)
        there = there.json()["id"]
        assert running(ia.url, there, alice)["executor"] == "ib"  # forwarded: ib holds a copy

        missing = "ia:" + "0" * 17  # an id of the same origin that no agent holds

        def probe(url: str, job_id: str) -> list[tuple[int, str]]:
            """bob's answers about ``job_id``, with the id itself taken out."""
            answers = [
                httpx.get(f"{url}/v1/jobs/{job_id}", auth=bob),
                httpx.get(f"{url}/v1/jobs/{job_id}", params={"wait": 1}, auth=bob),
                httpx.get(f"{url}/v1/jobs/{job_id}/result", auth=bob),
                httpx.get(f"{url}/v1/jobs/{job_id}/result", params={"artifact": "x"}, auth=bob),
                httpx.get(f"{url}/v1/jobs/{job_id}/output", auth=bob),
                httpx.post(f"{url}/v1/jobs:wait", json={"ids": [job_id], "wait": 0}, auth=bob),
                httpx.post(f"{url}/v1/jobs:cancel", json={"ids": [job_id]}, auth=bob, timeout=30),
                httpx.delete(f"{url}/v1/jobs/{job_id}", auth=bob, timeout=30),
            ]
            return [(r.status_code, r.text.replace(job_id, "ID")) for r in answers]

        for agent in agents:
            expected = probe(agent.url, missing)
            assert all(status in (404, 207) for status, _ in expected), expected
            for job_id in (here, there):
                got = probe(agent.url, job_id)
                assert got == expected, f"{agent.node_id} tells bob that alice's job {job_id} exists"
        for job_id in (here, there):
            assert httpx.get(f"{ia.url}/v1/jobs/{job_id}", auth=alice).json()["state"] == "running"
        # Nor does the unsigned /metrics tell: a counter that moved only for jobs that
        # exist would answer the question the 404 hides.
        for agent in agents:
            counted = [line for line in httpx.get(agent.url + "/metrics").text.splitlines()
                       if line.startswith('p2psched_admission_rejections_total{reason="forbidden"}')]
            assert counted in ([], ['p2psched_admission_rejections_total{reason="forbidden"} 0.0']), counted
        # Listings, counts and label cancels cover bob's own jobs only.
        for agent in agents:
            assert httpx.get(agent.url + "/v1/jobs", params={"label": "sweep=secret"}, auth=bob).json()["jobs"] == []
            counts = httpx.get(agent.url + "/v1/jobs:counts", params={"label": "sweep=secret"}, auth=bob).json()
            assert set(counts["counts"].values()) == {0}
            r = httpx.post(agent.url + "/v1/jobs:cancel", json={"labels": {"sweep": "secret"}}, auth=bob, timeout=30)
            assert r.json() == {"results": [], "cancelled": 0, "more": False}
            for params in ({"tenant": "alice"}, {"tenant": "alice", "label": "sweep=secret"}):
                assert httpx.get(agent.url + "/v1/jobs", params=params, auth=bob).status_code == 403
                assert httpx.get(agent.url + "/v1/jobs:counts", params=params, auth=bob).status_code == 403
        for job_id in (here, there):
            httpx.delete(f"{ia.url}/v1/jobs/{job_id}", auth=alice, timeout=30)
    finally:
        stop_all(agents)


def test_a_job_id_chosen_by_another_tenant_is_neither_handed_over_nor_shared(tmp_path, tenants):
    """Submitting a spec whose ``id`` is another tenant's job once answered that job's
    record (stdout, labels, attestation): idempotency by id must not cross tenants."""
    from p2psched.security.client import RequestSigner, sign_submission

    reg, keys = tenants
    agents = start_cluster(tmp_path, ["ka", "kb"], "--tenants", str(reg),
                           auth=RequestSigner("ops", keys / "ops.key").auth)
    try:
        def submit(url: str, who: str, spec: dict, batch: bool = False) -> tuple[int, dict]:
            signed = sign_submission(spec, who, keys / f"{who}.key")
            if not batch:
                r = httpx.post(url + "/v1/jobs", json=signed, timeout=30)
                return r.status_code, r.json()
            r = httpx.post(url + "/v1/jobs:batch", json={"jobs": [signed]}, timeout=30)
            item = r.json()["results"][0]
            return item.get("status") or item["error"]["status"], item

        # Ids whose home is either agent: some are proxied to their home, some not.
        ids = [f"alice-secret-{i}" for i in range(6)]
        for job_id in ids:
            status, rec = submit(agents[0].url, "alice", wasm_spec("hello.wasm", id=job_id,
                                                                   labels={"sweep": "secret"}))
            assert status == 202 and rec["tenant"] == "alice", rec
        for job_id in ids:
            for agent in agents:
                for batch in (False, True):
                    status, answer = submit(agent.url, "bob", wasm_spec("exit3.wasm", id=job_id), batch)
                    assert status == 409, answer
                    text = str(answer)
                    assert "alice" not in text.replace(job_id, "") and "secret" not in text.replace(job_id, "")
                    assert "hello from p2psched" not in text
        # The other way round: an id bob took first is not handed to alice as her job.
        for i in range(4):
            status, rec = submit(agents[1].url, "bob", wasm_spec("exit3.wasm", id=f"taken-{i}"))
            assert status == 202 and rec["tenant"] == "bob"
            for agent in agents:
                status, answer = submit(agent.url, "alice", wasm_spec("hello.wasm", id=f"taken-{i}"))
                assert status == 409 and answer["error"]["reason"] == "id_taken", answer
                assert "bob" not in str(answer)
        # Alice's own retry of her id still answers her job, idempotently.
        status, rec = submit(agents[1].url, "alice", wasm_spec("hello.wasm", id=ids[0], labels={"sweep": "secret"}))
        assert status == 200 and rec["id"] == ids[0] and rec["tenant"] == "alice"
    finally:
        stop_all(agents)
