"""`p2psched jobs`: newest first, counts by state, and a --limit past one page."""

import base64
import hashlib
import json

import pytest

from agents import WASM, cli, new_agent

pytestmark = pytest.mark.cluster


def test_jobs_pages_past_1000_lists_newest_first_and_counts_states(tmp_path):
    agent = new_agent(tmp_path, "lister").start()
    try:
        module = (WASM / "noop.wasm").read_bytes()
        with agent.client() as http:
            first = http.post("/v1/jobs", json={"module": base64.b64encode(module).decode(), "entry": "noop"}).json()
            spec = {"module_sha256": hashlib.sha256(module).hexdigest(), "entry": "noop"}
            ids = [first["id"]]
            for n in (1000, 4):
                results = http.post("/v1/jobs:batch", json={"jobs": [spec] * n}).json()["results"]
                ids += [r["job"]["id"] for r in results]
            http.get(f"/v1/jobs/{ids[-1]}", params={"wait": 120})
            while http.get("/v1/jobs", params={"state": "succeeded", "order": "newest", "limit": 1000}).json()[
                    "next_cursor"] is None:
                pass  # wait until more than a page has succeeded

        listing = json.loads(cli("jobs", "--limit", "1005", "--json", agent=agent, check=True).stdout)
        assert [j["id"] for j in listing["jobs"]] == ids

        newest = cli("jobs", "--newest", "--limit", "3", agent=agent, check=True).stdout.decode().splitlines()
        assert [line.split()[0] for line in newest] == ids[::-1][:3]

        partial = json.loads(cli("jobs", "--limit", "2", "--json", agent=agent, check=True).stdout)
        assert [j["id"] for j in partial["jobs"]] == ids[:2] and partial["next_cursor"] is not None

        counts = dict(line.split() for line in cli("jobs", "--counts", agent=agent, check=True).stdout.decode()
                      .splitlines())
        assert int(counts["succeeded"]) + int(counts["running"]) + int(counts["queued"]) \
            + int(counts["placed"]) == 1005 and counts["failed"] == "0"

        bad = cli("jobs", "--limit", "0", agent=agent)
        assert bad.returncode == 2 and b"--limit" in bad.stderr
    finally:
        agent.stop()


def test_a_sweep_is_listed_counted_and_cancelled_by_its_label(tmp_path):
    agent = new_agent(tmp_path, "sweeper", "--cpus", "1").start()
    try:
        with agent.client() as http:
            loop = {"runtime": "wasm", "module": base64.b64encode((WASM / "loop.wasm").read_bytes()).decode(),
                    "limits": {"wall_ms": 120_000}}
            sweep = [{**loop, "labels": {"sweep": "lr", "n": str(n)}} for n in range(3)]  # one runs, two wait
            other = {**loop, "labels": {"sweep": "wd"}}
            hello = {"runtime": "wasm", "module": base64.b64encode((WASM / "hello.wasm").read_bytes()).decode(),
                     "labels": {"sweep": "lr", "n": "done"}}
            first = http.post("/v1/jobs", json=hello).json()["id"]
            http.get(f"/v1/jobs/{first}", params={"wait": 30})  # ended before the cancel: left alone
            ids = [r["job"]["id"] for r in http.post("/v1/jobs:batch", json={"jobs": [*sweep, other]}).json()["results"]]

        listed = cli("jobs", "--label", "sweep=lr", agent=agent, check=True).stdout.decode().splitlines()
        assert [line.split()[0] for line in listed] == [first, *ids[:3]]
        assert "labels=sweep=lr,n=0" in listed[1].split()
        one = json.loads(cli("jobs", "--label", "sweep=lr", "--label", "n=1", "--json", agent=agent,
                             check=True).stdout)
        assert [j["id"] for j in one["jobs"]] == [ids[1]]
        counts = dict(line.split() for line in cli("jobs", "--counts", "--label", "sweep=lr", agent=agent,
                                                   check=True).stdout.decode().splitlines())
        assert counts["succeeded"] == "1" and int(counts["running"]) + int(counts["queued"]) \
            + int(counts["placed"]) == 3

        p = cli("cancel", "--label", "sweep=lr", agent=agent, check=True)
        assert sorted(line.split()[:2] for line in p.stdout.decode().splitlines()) == sorted(
            [i, "cancelled"] for i in ids[:3])
        assert b"3 unfinished job(s) labelled sweep=lr cancelled" in p.stderr
        with agent.client() as http:
            assert http.get(f"/v1/jobs/{ids[3]}").json()["state"] in ("running", "placed", "queued")  # not in the sweep
            assert http.get(f"/v1/jobs/{first}").json()["state"] == "succeeded"
        p = cli("cancel", ids[3], "nope", first, agent=agent)  # several at once: one request
        assert p.returncode == 3 and p.stdout.decode().split()[:2] == [ids[3], "cancelled"]
        assert b"1 unfinished job(s) named cancelled" in p.stderr and b"not cancelled: nope: no job 'nope'" in p.stderr
        assert f"not cancelled: {first}: job {first} already ended (succeeded)".encode() in p.stderr

        for args, says in [((), b"name the jobs"), (("x", "--label", "a=b"), b"name the jobs"),
                           (("--label", "nokey"), b"--label 'nokey' must be KEY=VALUE")]:
            bad = cli("cancel", *args, agent=agent)
            assert bad.returncode == 2 and says in bad.stderr, bad.stderr
        bad = cli("jobs", "--label", "=x", agent=agent)
        assert bad.returncode == 2 and b"must be KEY=VALUE" in bad.stderr
    finally:
        agent.stop()
