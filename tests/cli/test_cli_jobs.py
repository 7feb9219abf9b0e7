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
