"""Start-up asks cheaply whether a killed agent left process-job debris, and finds it."""

import os
import subprocess

from p2psched.sandbox import cgroups, leftovers


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_scratch_of_a_dead_agent_is_found_and_a_live_ones_is_not(tmp_path):
    gone = tmp_path / f"job-abc-{dead_pid()}-0"
    mine = tmp_path / f"job-def-{os.getpid()}-0"
    gone.mkdir()
    mine.mkdir()
    assert leftovers.stale_dirs(tmp_path) == [gone]
    assert leftovers.any_left(tmp_path)
    gone.rmdir()
    assert leftovers.stale_dirs(tmp_path) == []
    assert leftovers.stale_dirs(tmp_path / "missing") == []


def test_job_cgroups_of_a_dead_agent_are_found(tmp_path):
    layout = cgroups.CgroupLayout(2, v2_dir=tmp_path)
    parent = tmp_path / cgroups.PARENT_NAME
    parent.mkdir()
    (parent / f"job-abc-{dead_pid()}-1").mkdir()
    (parent / f"job-def-{os.getpid()}-2").mkdir()
    assert cgroups.stale_names(layout) == {p.name for p in parent.iterdir() if p.name.startswith("job-abc")}
    assert cgroups.stale_names(cgroups.CgroupLayout(None)) == set()
