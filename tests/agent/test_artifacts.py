"""Artifacts: files a process job writes at the paths its spec names, kept with its
result and served at /v1/jobs/{id}/result?artifact=NAME, by the agent that ran it
and by the origin of a job that ran on a peer.

In-process agents with real sockets and real process sandboxes (bubblewrap).
"""

from __future__ import annotations

import hashlib

import pytest
import trio

from agents import FAST_MEMBERSHIP, await_peers, cli, running_agent, start_running

pytestmark = pytest.mark.root

#: 256,000 bytes of every byte value: more than a pipe or a frame's small-read path.
BLOB = bytes(range(256)) * 1000
WRITES = ["/usr/bin/python3", "-c",
          "import os; open('out.txt', 'w').write('result\\n'); os.mkdir('d');"
          " open('d/blob', 'wb').write(bytes(range(256)) * 1000); print('done')"]


def described(data: bytes) -> dict[str, object]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_a_process_jobs_artifacts_are_kept_listed_and_served_and_survive_a_restart(tmp_path):
    spec = {"runtime": "process", "command": WRITES, "artifacts": ["out.txt", "d/blob", "never-written"]}
    async with running_agent(tmp_path) as (agent, http):
        job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
        rec = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
        assert rec["state"] == "succeeded", rec
        assert rec["result"]["artifacts"] == {"out.txt": described(b"result\n"), "d/blob": described(BLOB)}
        assert any("'never-written'" in w for w in rec["result"]["warnings"]), rec["result"]["warnings"]
        assert (await http.get(f"/v1/jobs/{job_id}/result")).content == b"done\n"  # stdout, as before

        r = await http.get(f"/v1/jobs/{job_id}/result", params={"artifact": "d/blob"})
        assert r.status_code == 200 and r.content == BLOB
        assert r.headers["x-artifact-sha256"] == hashlib.sha256(BLOB).hexdigest()
        # stored beside the job's output in the data dir, by content
        assert (agent.store.artifacts_dir(job_id) / hashlib.sha256(BLOB).hexdigest()).read_bytes() == BLOB

        r = await http.get(f"/v1/jobs/{job_id}/result", params={"artifact": "never-written"})
        assert r.status_code == 404 and r.json()["error"]["reason"] == "unknown_artifact"
        assert r.json()["error"]["message"] == \
            f"job {job_id} has no artifact 'never-written'; its artifacts are 'd/blob', 'out.txt'"

    async with running_agent(tmp_path) as (_agent, http):  # the same data dir: durable
        r = await http.get(f"/v1/jobs/{job_id}/result", params={"artifact": "out.txt"})
        assert r.status_code == 200 and r.content == b"result\n"
        # and through the CLI, as a user fetches one
        url = str(http.base_url).rstrip("/")
        p = await trio.to_thread.run_sync(cli, "result", job_id, "--artifact", "d/blob", "--agent", url)
        assert p.returncode == 0 and p.stdout == BLOB, p.stderr
        p = await trio.to_thread.run_sync(cli, "result", job_id, "--artifact", "nope", "--agent", url)
        assert p.returncode != 0 and b"has no artifact 'nope'; its artifacts are 'd/blob', 'out.txt'" in p.stderr


async def test_an_artifact_of_a_job_that_has_not_ended_is_a_409(tmp_path):
    async with running_agent(tmp_path) as (_agent, http):
        job_id = await start_running(http, {"runtime": "process", "command": ["/bin/sleep", "60"],
                                            "artifacts": ["out.txt"]})
        r = await http.get(f"/v1/jobs/{job_id}/result", params={"artifact": "out.txt"})
        assert r.status_code == 409 and r.json()["error"]["reason"] == "not_finished"
        assert r.json()["error"]["message"].startswith(f"job {job_id} is running; its artifact 'out.txt' exists "
                                                       "once it ends")
        await http.delete(f"/v1/jobs/{job_id}")


async def test_a_job_without_artifacts_says_how_to_keep_some(tmp_path):
    async with running_agent(tmp_path) as (_agent, http):
        job_id = (await http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/true"]})).json()["id"]
        await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})
        r = await http.get(f"/v1/jobs/{job_id}/result", params={"artifact": "out.txt"})
        assert r.status_code == 404
        assert "list the files to keep in the spec's 'artifacts'" in r.json()["error"]["message"]


async def test_the_artifacts_of_a_job_run_on_a_peer_are_carried_to_its_origin(tmp_path):
    """The origin has one CPU and the job asks for two: it runs on the peer, whose
    result brings the artifact's bytes home, where the origin serves them."""
    async with running_agent(tmp_path / "e", node_id="exec", cpus=2, membership=FAST_MEMBERSHIP) as (executor, _):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(origin, "exec")
            spec = {"runtime": "process", "command": WRITES, "artifacts": ["d/blob"], "resources": {"cpu": 2}}
            job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
            rec = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
            assert (rec["state"], rec["executor"]) == ("succeeded", "exec"), rec
            assert rec["result"]["artifacts"] == {"d/blob": described(BLOB)}
            r = await http.get(f"/v1/jobs/{job_id}/result", params={"artifact": "d/blob"})
            assert r.status_code == 200 and r.content == BLOB
            # the origin holds its own copy: the executor may prune or lose its own
            assert (origin.store.artifacts_dir(job_id) / hashlib.sha256(BLOB).hexdigest()).read_bytes() == BLOB
            with trio.fail_after(30):  # the executor forgets the delivery once acknowledged
                while executor.store.owed_deliveries():
                    await trio.sleep(0.05)
