"""The job store on storage that misbehaves: real small disks (tmpfs), real locks held
by another process, real files removed under it. What a flush reports must match what
is on disk: a write that reached the disk is never reported as failed, and one that did
not is never reported as done."""

import sqlite3
import subprocess
import sys
import time

import pytest
import trio

from p2psched.jobs import store as store_module
from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState
from p2psched.jobs.store import Store, StoreError

from disks import fill, small_disk


def rec(i: int, size: int = 0) -> JobRecord:
    r = JobRecord(id=f"n1:{i}", seq=i, origin="n1", created_at=1.0,
                  spec=JobSpec(runtime="process", command=["/bin/echo", str(i)], input=b"x" * size))
    r.advance(JobState.QUEUED, 1.0, "n1")
    return r


@pytest.mark.root
async def test_a_checkpoint_the_full_disk_refuses_does_not_undo_a_commit_that_landed(tmp_path, monkeypatch):
    """The WAL reuses its own space after a checkpoint, so a commit can land on a full disk
    while the checkpoint after it, which must grow jobs.db, cannot. The jobs are on disk:
    reporting the flush as failed told their submitters 503 for jobs that then ran."""
    monkeypatch.setattr(store_module, "CHECKPOINT_ROWS", 30)
    with small_disk(tmp_path / "disk", "4m") as disk:
        store = Store(disk)
        for i in range(1, 31):  # a WAL of about 1 MB, checkpointed into jobs.db
            store.stage(rec(i, 30_000), new=True)
        await store.sync()
        fill(disk)
        later = [rec(i, 30_000) for i in range(31, 61)]  # as much again: fits the WAL, not jobs.db
        for r in later:
            store.stage(r, new=True)
        await store.sync()  # raised StoreError (database or disk is full) from the checkpoint
        assert store.write_error is None
        assert all(store.durable(r.id) for r in later)
        assert not store.discard(later[0].id)  # on disk: accepted, not to be taken back
        (disk / "filler").unlink()
        store.stage(rec(61), new=True)
        await store.sync()
        store.close()
        assert len(list(Store(disk).unfinished())) == 61


def hold_write_lock(db) -> subprocess.Popen[str]:
    """Another process (as an operator's `sqlite3 jobs.db` shell would) holding a write
    transaction on ``db`` until its stdin closes."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE');"
            " c.execute(\"INSERT INTO kv VALUES ('held', '1')\"); print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdout.readline() == "held\n"
    return p


async def test_a_store_another_process_holds_locked_never_stalls_the_event_loop_and_says_who_to_ask(tmp_path):
    """A small flush commits on the trio thread; SQLite's busy wait (5 s by default) there
    froze the whole agent, /healthz included, for 5 s per try while `sqlite3 jobs.db`
    held a transaction open. And the error said to check disk space."""
    store = Store(tmp_path)
    store.stage(rec(1), new=True)
    await store.sync()
    holder = hold_write_lock(tmp_path / "jobs.db")
    try:
        gaps = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await trio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            store.stage(rec(2), new=True)  # one row: a flush the trio thread would write itself
            started = time.monotonic()
            with pytest.raises(StoreError) as failed:
                await store.sync()
            waited = time.monotonic() - started
            await trio.sleep(0.05)  # the heartbeat wakes, and counts the gap
            nursery.cancel_scope.cancel()
        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.1f}s"
        assert waited < 3
        assert "database is locked" in str(failed.value)
        assert "another process holds a write transaction on it" in str(failed.value)
        assert store.write_error == str(failed.value)
    finally:
        holder.communicate("", timeout=10)
    await store.sync()  # the lock is gone: the held state is written
    assert store.write_error is None and store.durable("n1:2")
    store.close()
    assert {r.id for r in Store(tmp_path).unfinished()} == {"n1:1", "n1:2"}


async def test_module_and_output_dirs_removed_under_a_running_store_are_made_again(tmp_path):
    """A tmp cleaner (or an operator) removed data/modules and data/outputs while the agent
    ran: every submission of a new module, and every flush with a large output, failed
    with ENOENT, reported as a store that cannot be written, until a restart."""
    import shutil

    from p2psched.jobs.record import JobResult
    from p2psched.jobs.store import INLINE_OUTPUT_BYTES

    store = Store(tmp_path)
    r = rec(1)
    store.stage(r, new=True)
    await store.sync()
    shutil.rmtree(tmp_path / "modules")
    shutil.rmtree(tmp_path / "outputs")
    assert store.put_module("a" * 64, b"\0asm").read_bytes() == b"\0asm"
    for state in (JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED):
        r.advance(state, 2.0, "n1")
    r.result = JobResult(exit_code=0, reason="exit 0")
    store.stage(r, output=b"o" * (INLINE_OUTPUT_BYTES + 1), stderr=b"e" * 70_000, artifacts={"b" * 64: b"art"})
    await store.sync()
    assert store.write_error is None
    assert store.output(r.id) == b"o" * (INLINE_OUTPUT_BYTES + 1) and store.stderr(r.id) == b"e" * 70_000
    assert store.artifact(r.id, "b" * 64) == b"art"
