"""`p2psched submit`'s limit flags reach the job as given, a zero included, and the
help's defaults are the spec's."""

import json
import re

import pytest

from agents import cli, new_agent

pytestmark = pytest.mark.cluster


def test_every_limit_flag_reaches_the_jobs_spec(tmp_path):
    agent = new_agent(tmp_path, "limits").start()
    try:
        p = cli("submit", "--process", "--json",
                "--pids", "8", "--nofile", "32", "--fsize-bytes", "4096", "--scratch-mb", "8",
                "--stdout-bytes", "100", "--stderr-bytes", "200", "--violation", "graceful", "--grace-ms", "500",
                "--stack-bytes", "131072", "--mem-limit-mb", "64", "--wall-ms", "5000", "--cpu-ms", "4000",
                "--mask", "s3cr3t", "--mask", r"token=\w+", "--artifact", "out/model.bin", "--artifact", "log.txt",
                "--", "/bin/true", agent=agent, check=True)
        job_id = json.loads(p.stdout)["id"]
        with agent.client() as http:
            spec = http.get(f"/v1/jobs/{job_id}", params={"spec": "1"}).json()["spec"]
        assert spec["limits"] == {
            "pids": 8, "nofile": 32, "fsize_bytes": 4096, "scratch_mb": 8, "stdout_bytes": 100, "stderr_bytes": 200,
            "violation": "graceful", "grace_ms": 500, "stack_bytes": 131072, "mem_bytes": 64 * 1024 * 1024,
            "wall_ms": 5000, "cpu_ms": 4000, "fuel": None,
        }
        assert spec["mask_patterns"] == ["s3cr3t", r"token=\w+"]
        assert spec["artifacts"] == ["out/model.bin", "log.txt"]
    finally:
        agent.stop()


def test_a_zero_memory_limit_is_refused_not_dropped_for_the_default(tmp_path):
    agent = new_agent(tmp_path, "zero").start()
    try:
        # It used to be dropped as falsy, so the job ran with the default 256 MiB.
        zero = cli("submit", "--process", "--mem-limit-mb", "0", "--", "/bin/true", agent=agent)
        assert zero.returncode == 3, zero.stdout
        assert b"400: invalid job spec: limits.mem_bytes" in zero.stderr, zero.stderr
        with agent.client() as http:
            assert http.get("/v1/jobs").json()["jobs"] == []
    finally:
        agent.stop()


def test_the_limit_flags_help_shows_the_specs_defaults():
    from p2psched.cli.client import submit
    from p2psched.jobs.spec import Limits

    helps = {p.name: getattr(p, "help", "") for p in submit.params}
    for name in ("stack_bytes", "pids", "nofile", "fsize_bytes", "scratch_mb", "stdout_bytes", "stderr_bytes",
                 "violation", "grace_ms", "wall_ms"):
        shown = re.search(r"\[([^\]]+)\]\.?$", helps[name])  # the flag is named as the field
        assert shown and shown.group(1) == str(Limits.model_fields[name].default), (name, helps[name])


def test_a_relative_program_reaches_the_agent_as_given_and_is_refused_with_the_fix(tmp_path):
    agent = new_agent(tmp_path, "relative").start()
    try:
        # click's Path type turned ./train.sh into train.sh, which the executor then
        # looked up in its PATH: "command 'train.sh' was not found on the executor".
        p = cli("submit", "--process", "--", "./train.sh", agent=agent)
        assert p.returncode == 3, p.stdout
        assert b"command: the program './train.sh' is a relative path; give its absolute path" in p.stderr, p.stderr
        ok = cli("submit", "--process", "--wait", "--", "/bin/echo", "hi", agent=agent)
        assert ok.returncode == 0 and ok.stdout == b"hi\n", (ok.stdout, ok.stderr)
    finally:
        agent.stop()
