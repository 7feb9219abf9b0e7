"""Start-up asks cheaply whether a killed agent left process-job debris, and finds it."""

import multiprocessing
import os
import subprocess

import pytest

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


def _mount_count(path) -> int:
    return sum(line.split()[4] == str(path) for line in open("/proc/self/mountinfo"))


def _umount_all(path) -> None:
    from p2psched.sandbox.process import _umount

    while _mount_count(path) and _umount(path):
        pass


@pytest.mark.root
def test_agents_starting_together_bind_the_runtime_dir_once(tmp_path):
    """Each agent makes the runtime dir a private bind of itself on its first process
    job. Several starting together each saw no bind and made one; the later binds
    hid the earlier ones' job mounts from every clean-up after. (Before the lock,
    16 processes stacked binds in 8 rounds of 10.)"""
    from p2psched.sandbox import process

    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        runtime = tmp_path / f"run{round_}"
        barrier = ctx.Barrier(16)

        def first_job() -> None:
            process._PRIVATE_DIRS.clear()  # as in a fresh agent process
            barrier.wait()
            process._private_runtime_dir(runtime)

        procs = [ctx.Process(target=first_job) for _ in range(16)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join(30)
            assert [p.exitcode for p in procs] == [0] * 16
            assert _mount_count(runtime) == 1
        finally:
            _umount_all(runtime)


@pytest.mark.root
def test_a_scratch_mount_that_a_later_mount_covers_is_not_reported_as_debris(tmp_path):
    from p2psched.sandbox.process import ProcessSandboxConfig, _bind, _mount_tmpfs, _umount, reap_stale

    runtime = tmp_path / "run"
    runtime.mkdir()
    _bind(str(runtime), runtime)
    scratch = runtime / f"job-abc-{dead_pid()}-1" / "scratch"
    scratch.mkdir(parents=True)
    _mount_tmpfs(scratch, 1 << 20, 0, 0)
    try:
        assert leftovers.stale_mounts(runtime) == [scratch]
        _bind(str(runtime), runtime)  # a second bind on top: the scratch mount is out of reach
        assert leftovers.stale_mounts(runtime) == [] and leftovers.stale_dirs(runtime) == []
        assert not leftovers.any_left(runtime)
        assert _umount(runtime)  # the top bind gone: the scratch mount is reachable again
        assert leftovers.stale_mounts(runtime) == [scratch]
        assert reap_stale(ProcessSandboxConfig(runtime_dir=runtime, cgroups="off")) >= 1
        assert leftovers.stale_mounts(runtime) == [] and not scratch.parent.exists()
    finally:
        _umount_all(runtime)  # detaches what is mounted beneath it too
