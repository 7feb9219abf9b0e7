"""Start-up asks cheaply whether a killed agent left process-job debris, and finds it."""

import multiprocessing
import os
import subprocess
import sys

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


def _bwrap_building(seccomp_fd: int, block_r: int) -> subprocess.Popen:
    """bwrap as the process sandbox starts it, held where the agent holds it: its
    init waits on --block-fd while the agent moves it into the job's cgroup."""
    import shutil

    bwrap = shutil.which("bwrap")
    assert bwrap, "bubblewrap is installed by scripts/setup.sh"
    return subprocess.Popen(
        [bwrap, "--unshare-pid", "--unshare-user", "--die-with-parent", "--dev-bind", "/", "/",
         "--seccomp", str(seccomp_fd), "--block-fd", str(block_r), "--", "/bin/true"],
        pass_fds=[seccomp_fd, block_r],
    )


def _init_of(monitor: int) -> int:
    import time

    for _ in range(500):
        kids = subprocess.run(["pgrep", "-P", str(monitor)], capture_output=True, text=True).stdout.split()
        if kids:
            return int(kids[0])
        time.sleep(0.01)
    raise AssertionError("bwrap started no sandbox init")


@pytest.mark.root
def test_a_sandbox_left_half_built_by_a_killed_agent_is_found_and_killed(tmp_path):
    """--die-with-parent does not yet cover a sandbox's init while it is being
    built: an agent killed then left the init running, out of any job cgroup (for
    good where it waited on bwrap's eventfd). Made here by killing its bwrap
    parent while the init waits on --block-fd, which another process holds."""
    import signal
    import time

    from p2psched.sandbox import process, seccomp_filter

    seccomp_fd = seccomp_filter.bpf_fd()
    block_r, block_w = os.pipe()
    live = _bwrap_building(seccomp_fd, block_r)
    left = _bwrap_building(seccomp_fd, block_r)
    os.close(seccomp_fd)
    os.close(block_r)
    try:
        live_init, left_init = _init_of(live.pid), _init_of(left.pid)
        # (other tests' agents may leave sandboxes of their own for a moment: only ours count)
        assert {live_init, left_init}.isdisjoint(leftovers.orphaned_sandboxes()), "bwrap runs: not left over"

        left.send_signal(signal.SIGKILL)
        left.wait()
        time.sleep(0.2)
        assert os.path.exists(f"/proc/{left_init}"), "bwrap's init outlived its parent"
        orphans = leftovers.orphaned_sandboxes()
        assert left_init in orphans and live_init not in orphans
        assert leftovers.any_left()
        # doctor names it, with the way to end it now, as a warning (the next agent start mends it)
        doctor = subprocess.run([sys.executable, "-m", "p2psched", "doctor", "--data-dir", str(tmp_path), "--api", "127.0.0.1:0",
                                 "--gossip", "127.0.0.1:0", "--transfer", "127.0.0.1:0"],
                                capture_output=True, text=True, timeout=120)
        row = next(line for line in doctor.stdout.splitlines() if "leftovers" in line)
        assert row.startswith("[warn]") and "half-built sandbox" in row and str(left_init) in row, doctor.stdout
        assert "start the agent: it removes them before it serves" in doctor.stdout

        assert process.reap_stale() >= 1
        for _ in range(500):
            if not os.path.exists(f"/proc/{left_init}"):
                break
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{left_init}")
        assert os.path.exists(f"/proc/{live_init}"), "the live sandbox is left alone"
        assert live_init not in leftovers.orphaned_sandboxes()
    finally:
        os.close(block_w)  # the live sandbox runs /bin/true and ends
        live.wait()
