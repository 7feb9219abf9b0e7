import hashlib
import json
import sqlite3

import pytest
import trio

from p2psched.jobs.record import JobRecord, JobResult
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState
from p2psched.jobs import store as store_module
from p2psched.jobs.store import CHECKPOINT_ROWS, INLINE_OUTPUT_BYTES, Store, list_query

from disks import fill, small_disk


def rec(i: int) -> JobRecord:
    r = JobRecord(id=f"n1:{i}", seq=i, origin="n1", created_at=1.0,
                  spec=JobSpec(runtime="process", command=["/bin/echo", str(i)], input=b"\x00\xffin"))
    r.advance(JobState.QUEUED, 1.0, "n1")
    return r


def succeeded(store: Store, result: JobResult) -> JobRecord:
    """Job 1, staged new, then run to success with ``result`` (not staged again)."""
    r = rec(1)
    store.stage(r, new=True)
    for state in (JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED):
        r.advance(state, 2.0, "n1")
    r.result = result
    return r


async def test_synced_records_survive_reopening(tmp_path):
    store = Store(tmp_path)
    records = [rec(i) for i in range(1, 6)]
    for r in records:
        store.stage(r, new=True)
    records[0].advance(JobState.PLACED, 2.0, "n1")
    records[0].advance(JobState.RUNNING, 3.0, "n1")
    store.stage(records[0])
    await store.sync()
    store.close()

    again = Store(tmp_path)
    back = {r.id: r for r in again.unfinished()}
    assert set(back) == {r.id for r in records}
    assert back["n1:1"].state is JobState.RUNNING
    assert [t["state"] for t in back["n1:1"].timeline] == ["queued", "placed", "running"]
    assert back["n1:2"].spec.input == b"\x00\xffin"
    assert again.last_seq == 5


async def test_concurrent_syncs_share_flushes_and_all_land(tmp_path):
    store = Store(tmp_path)
    async with trio.open_nursery() as n:
        for i in range(1, 201):
            def one(i=i):
                store.stage(rec(i), new=True)
                return store.sync()
            n.start_soon(one)
    rows = sqlite3.connect(tmp_path / "jobs.db").execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert rows == 200


async def test_large_outputs_go_to_files_and_small_ones_inline(tmp_path):
    store = Store(tmp_path)
    small, big = rec(1), rec(2)
    for r, out in ((small, b"hi"), (big, b"x" * (INLINE_OUTPUT_BYTES + 1))):
        store.stage(r, new=True)
        for s in (JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED):
            r.advance(s, 2.0, "n1")
        r.result = JobResult(exit_code=0, reason="exit 0")
        store.stage(r, output=out)
    await store.sync()
    assert store.output(small.id) == b"hi"
    assert store.output(big.id) == b"x" * (INLINE_OUTPUT_BYTES + 1)
    assert (tmp_path / "outputs" / f"{big.id}.out").exists()
    assert not (tmp_path / "outputs" / f"{small.id}.out").exists()
    store.close()
    again = Store(tmp_path)
    got = again.get(big.id)
    assert got is not None and got.state is JobState.SUCCEEDED and got.result.exit_code == 0
    assert list(again.unfinished()) == []


async def test_artifacts_are_files_named_by_their_content_readable_before_and_after_the_flush(tmp_path):
    store = Store(tmp_path)
    r = succeeded(store, JobResult(exit_code=0, reason="exit 0"))
    blob = bytes(range(256)) * 1000
    sha = hashlib.sha256(blob).hexdigest()
    store.stage(r, output=b"", artifacts={hashlib.sha256(b"result\n").hexdigest(): b"result\n", sha: blob})
    assert store.artifact(r.id, sha) == blob  # staged, not yet written
    await store.sync()
    assert sorted(p.name for p in store.artifacts_dir(r.id).iterdir()) == sorted(
        [sha, hashlib.sha256(b"result\n").hexdigest()])
    store.close()
    again = Store(tmp_path)
    assert again.artifact(r.id, sha) == blob
    assert again.artifact(r.id, "0" * 64) is None


async def test_wal_mode_is_on(tmp_path):
    Store(tmp_path)
    mode = sqlite3.connect(tmp_path / "jobs.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_the_wal_is_checkpointed_once_enough_rows_are_written_and_not_on_each_commit(tmp_path):
    # Small flushes commit on the trio thread; the checkpoint (which fsyncs) must not
    # run there, yet the WAL must not grow without bound either.
    store = Store(tmp_path)
    db = tmp_path / "jobs.db"
    before = db.stat().st_size
    for i in range(1, CHECKPOINT_ROWS):
        store.stage(rec(i), new=True)
        await store.sync()
    assert db.stat().st_size == before  # every commit so far is still only in the WAL
    store.stage(rec(CHECKPOINT_ROWS), new=True)
    await store.sync()
    assert db.stat().st_size > before
    store.close()
    assert len(list(Store(tmp_path).unfinished())) == CHECKPOINT_ROWS


async def test_wait_dirty_sleeps_while_everything_is_durable_and_wakes_on_staging(tmp_path):
    store = Store(tmp_path)
    woke = []

    async def waiter():
        await store.wait_dirty()
        woke.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        await trio.sleep(0.2)
        assert woke == []  # nothing staged: the flusher stays asleep
        store.stage(rec(1), new=True)
        await trio.sleep(0.05)
        assert len(woke) == 1
    await store.sync()
    with trio.move_on_after(0.2) as scope:
        await store.wait_dirty()
    assert scope.cancelled_caught  # durable again: it sleeps
    store.stage_delivery("n1:1", True)
    with trio.fail_after(5):
        await store.wait_dirty()


def test_a_stored_module_is_remembered_and_a_disk_check_sees_it_removed(tmp_path):
    store = Store(tmp_path)
    sha = "ab" * 32
    assert not store.has_module(sha)
    path = store.put_module(sha, b"\0asm\1\0\0\0")
    assert path.read_bytes() == b"\0asm\1\0\0\0" and store.module_path(sha) == path
    path.unlink()
    assert store.has_module(sha)  # remembered: no stat per job
    assert not store.has_module(sha, check_disk=True)
    assert not store.has_module(sha)  # and forgotten once seen gone
    store.put_module(sha, b"\0asm\1\0\0\0")
    store.close()
    reopened = Store(tmp_path)
    assert reopened.has_module(sha)  # a new store finds it on disk
    reopened.close()


@pytest.mark.parametrize("labels", [(), (("sweep", "lr"),), (("sweep", "lr"), ("seed", "3"))])
@pytest.mark.parametrize("newest_first", [False, True])
@pytest.mark.parametrize("state, tenant", [(None, None), ("failed", None), (None, "alice"), ("failed", "alice")])
def test_every_listing_reads_one_index_range_not_the_whole_table(tmp_path, state, tenant, newest_first, labels):
    """The dashboard lists the newest jobs every 2 s: a listing that sorted the whole
    table took 0.2 s at 300,000 jobs, on the agent's event loop."""
    store = Store(tmp_path)
    q, args = list_query(state=state, tenant=tenant, limit=50, after_seq=10, newest_first=newest_first,
                         labels=labels)
    plan = " ".join(row[3] for row in store._reader.execute("EXPLAIN QUERY PLAN " + q, args))
    assert ("USING INDEX" in plan or "USING PRIMARY KEY" in plan) and "TEMP B-TREE" not in plan, plan
    assert "SCAN" not in plan.replace("SCAN CONSTANT", ""), plan  # no table or index is read whole
    if labels:  # the label's range, then each job by its seq: not the state's range for every label row
        assert "SEARCH j USING INDEX jobs_seq (seq=?)" in plan, plan
    store.close()


def labelled(i: int, labels: dict[str, str], tenant: str = "default") -> JobRecord:
    r = rec(i)
    r.spec = r.spec.model_copy(update={"labels": labels, "tenant": tenant})
    return r


async def test_jobs_are_listed_and_counted_by_label(tmp_path):
    store = Store(tmp_path)
    jobs = [labelled(i, {"sweep": "lr", "seed": str(i % 3)}, tenant="alice" if i % 2 else "bob")
            for i in range(1, 31)]
    jobs += [labelled(31, {"sweep": "wd"}), labelled(32, {})]
    for r in jobs:
        store.stage(r, new=True)
    jobs[0].result = JobResult(exit_code=1, reason="exit 1")
    for state in (JobState.PLACED, JobState.RUNNING, JobState.FAILED):
        jobs[0].advance(state, 2.0, "n1")
    store.stage(jobs[0])  # a later state does not write its labels again
    await store.sync()

    def ids(**kw):
        return [int(r.id.split(":")[1]) for r in store.list(state=None, tenant=None, limit=100, **kw)]

    assert ids(labels=[("sweep", "lr")]) == list(range(1, 31))
    assert ids(labels=[("sweep", "lr"), ("seed", "0")]) == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert ids(labels=[("seed", "0"), ("sweep", "wd")]) == []
    assert ids(labels=[("sweep", "lr")], newest_first=True)[:3] == [30, 29, 28]
    page = store.list(state=None, tenant=None, limit=4, after_seq=10, labels=[("sweep", "lr")])
    assert [r.seq for r in page] == [11, 12, 13, 14]
    assert [r.id for r in store.list(state="failed", tenant=None, limit=9, labels=[("sweep", "lr")])] == ["n1:1"]
    assert len(store.list(state=None, tenant="alice", limit=100, labels=[("sweep", "lr"), ("seed", "1")])) == 5
    assert store.count_by_state(labels=[("sweep", "lr")]) == {"queued": 29, "failed": 1}
    assert store.count_by_state("bob", labels=[("sweep", "lr"), ("seed", "2")]) == {"queued": 5}
    assert store.count_by_state(labels=[("sweep", "none")]) == {}
    assert store._reader.execute("SELECT count(*) FROM job_labels").fetchone()[0] == 61
    store.close()


async def test_a_store_from_before_labels_were_indexed_indexes_them_when_it_opens(tmp_path):
    store = Store(tmp_path)
    for i in range(1, 6):
        store.stage(labelled(i, {"sweep": "old", "n": str(i)}), new=True)
    await store.sync()
    # As an older agent left it: no label rows, no mark that they were indexed.
    store._writer.execute("DELETE FROM job_labels")
    store._writer.execute("DELETE FROM kv WHERE key = 'job_labels_indexed'")
    store.close()
    reopened = Store(tmp_path)
    assert [r.seq for r in reopened.list(state=None, tenant=None, limit=9, labels=[("sweep", "old")])] == [1, 2, 3, 4, 5]
    assert [r.seq for r in reopened.list(state=None, tenant=None, limit=9, labels=[("n", "4")])] == [4]
    reopened.close()


async def test_a_record_stored_before_output_bytes_loads_and_says_its_text_may_be_partial(tmp_path):
    store = Store(tmp_path)
    r = succeeded(store, JobResult(exit_code=0, reason="exit 0", stdout="x" * 65536))
    store.stage(r, output=b"x" * 100_000)
    await store.sync()
    # As an older agent left it: none of the fields that say how much of the output the record holds.
    row = json.loads(store._reader.execute("SELECT record FROM jobs WHERE id = ?", (r.id,)).fetchone()[0])
    for key in ("output_bytes", "stdout_in_record_truncated", "stderr_in_record_truncated"):
        del row["result"][key]
    store._writer.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(row), r.id))
    store.close()
    got = Store(tmp_path).get(r.id)
    assert got is not None and got.state is JobState.SUCCEEDED and got.result is not None
    assert got.result.output_bytes is None and got.result.stdout_in_record_truncated
    assert got.as_dict()["result"]["output_bytes"] is None


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk", "2m") as d:
        yield d


@pytest.mark.root
async def test_a_failed_write_keeps_every_state_and_a_job_restaged_meanwhile_is_written_whole(disk):
    from p2psched.jobs.store import StoreError

    store = Store(disk)
    records = [rec(i) for i in range(1, 40)]  # more rows than a flush writes on the trio thread
    for r in records:
        r.spec.input = b"x" * 20_000
        store.stage(r, new=True)
    fill(disk)
    failure = None
    async with trio.open_nursery() as nursery:
        async def write() -> None:
            nonlocal failure
            try:
                await store.sync()
            except StoreError as e:
                failure = e

        nursery.start_soon(write)
        while not store._inflight:  # the write is on its thread now
            await trio.sleep(0)
        records[0].advance(JobState.PLACED, 2.0, "n1")
        store.stage(records[0])  # staged again while its first write is in flight
    assert failure is not None and "full" in str(failure)
    assert store.write_error == str(failure)
    assert store.discard(records[1].id)  # never written: a caller may take it back
    assert not store.discard("n1:nope")

    (disk / "filler").unlink()
    await store.sync()
    assert store.write_error is None
    store.close()
    back = {r.id: r for r in Store(disk).unfinished()}
    assert set(back) == {r.id for r in records} - {records[1].id}
    assert back[records[0].id].state is JobState.PLACED  # its newer state, and its row with the spec
    assert back[records[0].id].spec.input == b"x" * 20_000


async def test_prune_deletes_old_finished_jobs_and_their_outputs_and_keeps_the_rest(tmp_path):
    store = Store(tmp_path)

    def job(i: int, created_at: float, state: JobState | None, output: bytes | None = None,
            stderr: bytes | None = None, artifacts: dict[str, bytes] | None = None) -> JobRecord:
        r = labelled(i, {"batch": "b1"})
        r.created_at = created_at
        if state is not None:
            r.advance(JobState.PLACED, created_at, "n1")
            r.advance(JobState.RUNNING, created_at, "n1")
            r.result = JobResult(exit_code=0, reason="exit 0")
            r.advance(state, created_at, "n1")
        store.stage(r, new=True, output=output, stderr=stderr, artifacts=artifacts)
        return r

    old_done = [job(i, 100.0 + i, JobState.SUCCEEDED) for i in range(1, 2501)]  # more than one batch
    old_big = job(2501, 100.0, JobState.FAILED, output=b"x" * (INLINE_OUTPUT_BYTES + 1), stderr=b"e" * 70_000,
                  artifacts={hashlib.sha256(b"old").hexdigest(): b"old"})
    old_running = job(2502, 100.0, None)
    old_owed = job(2503, 100.0, JobState.SUCCEEDED)
    store.stage_delivery(old_owed.id, True)  # its result is still owed to its origin
    new_done = job(2504, 5_000.0, JobState.SUCCEEDED, artifacts={hashlib.sha256(b"new").hexdigest(): b"new"})
    await store.sync()
    big_files = sorted(store.outputs_dir.iterdir())
    assert [f.name for f in big_files] == [f"{old_big.id}.artifacts", f"{old_big.id}.err", f"{old_big.id}.out",
                                           f"{new_done.id}.artifacts"]
    assert store.artifact(old_big.id, hashlib.sha256(b"old").hexdigest()) == b"old"
    assert store.stderr(old_big.id) == b"e" * 70_000 and store.stderr(new_done.id) is None

    assert await store.prune(submitted_before=4_000.0) == 2501
    assert [f.exists() for f in big_files] == [False, False, False, True]
    assert store.artifact(new_done.id, hashlib.sha256(b"new").hexdigest()) == b"new"
    kept = {r.id for r in store.list(state=None, tenant=None, limit=1000)}
    assert kept == {old_running.id, old_owed.id, new_done.id}
    assert store.get(old_done[0].id) is None and store.get(old_big.id) is None  # gone from the cache too
    assert store.count_by_state() == {"queued": 1, "succeeded": 2}
    assert store._reader.execute("SELECT count(*) FROM job_labels").fetchone()[0] == 3  # the pruned jobs' went
    assert await store.prune(submitted_before=4_000.0) == 0
    store.close()


def test_modules_no_job_used_since_the_cutoff_are_deleted_with_their_compiled_copies(tmp_path):
    import os

    store = Store(tmp_path)
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    for name in ("a", "b", "c"):
        store.put_module(name * 64, b"\0asm" + name.encode())
        (compiled / f"{name * 64}.fp1.cwasm").write_bytes(b"compiled")
    for path in [*store.modules_dir.iterdir(), *compiled.iterdir()]:
        os.utime(path, (1_000.0, 1_000.0))  # last used long ago
    assert store.has_module("c" * 64)  # used now: its mtime moves on (once an hour at most)

    candidates = store.unused_modules(2_000.0, compiled)
    assert {p.name for p in candidates if p.parent == store.modules_dir} == {"a" * 64 + ".wasm", "b" * 64 + ".wasm"}
    assert store.prune_modules(candidates, in_use={"a" * 64}, unused_since=2_000.0) == 1
    assert not store.has_module("b" * 64) and not (compiled / f"{'b' * 64}.fp1.cwasm").exists()
    assert store.has_module("a" * 64) and store.has_module("c" * 64)  # named by a job / used since
    assert (compiled / f"{'a' * 64}.fp1.cwasm").exists() and (compiled / f"{'c' * 64}.fp1.cwasm").exists()
    store.close()


@pytest.mark.root
async def test_an_output_file_that_cannot_be_written_is_a_store_error_and_loses_nothing(disk):
    """A full disk must reach the agent as the store's error (it then holds the states
    and refuses jobs), not as an OSError that would end the flush loop."""
    from p2psched.jobs.store import StoreError

    store = Store(disk)
    r = rec(1)
    store.stage(r, new=True)
    await store.sync()
    r.advance(JobState.PLACED, 2.0, "n1")
    r.advance(JobState.RUNNING, 2.0, "n1")
    r.result = JobResult(exit_code=0, reason="exit 0")
    r.advance(JobState.SUCCEEDED, 2.0, "n1")
    fill(disk)
    store.stage(r, output=b"o" * (INLINE_OUTPUT_BYTES + 1), stderr=b"e" * 70_000)
    with pytest.raises(StoreError, match="could not write job output"):
        await store.sync()
    (disk / "filler").unlink()
    await store.sync()
    assert store.output(r.id) == b"o" * (INLINE_OUTPUT_BYTES + 1) and store.stderr(r.id) == b"e" * 70_000


async def test_only_the_newest_finished_records_stay_in_memory_and_older_ones_read_back_whole(tmp_path,
                                                                                             monkeypatch):
    monkeypatch.setattr(store_module, "FINISHED_CACHE", 2)
    store = Store(tmp_path)
    ended = []
    for i in range(1, 6):
        r = rec(i)
        store.stage(r, new=True)
        for state in (JobState.PLACED, JobState.RUNNING, JobState.SUCCEEDED):
            r.advance(state, 2.0 + i, "n1")
        r.result = JobResult(exit_code=0, reason="exit 0", stdout=f"out {i}")
        store.stage(r)
        await store.sync()
        if i == 1:  # a late duplicate result while its record is still in memory
            r.duplicates.append({"executor": "n2", "attempt": 2, "reason": "exit 0", "at": 8.0})
            store.stage(r)
            await store.sync()
        ended.append(r)
    # The two staged last are the very objects; the older three come back equal, not the same.
    assert store.get("n1:5") is ended[4] and store.get("n1:4") is ended[3]
    assert len(store._finished) == 2
    for r in ended[:3]:
        back = store.get(r.id)
        assert back is not None and back is not r
        assert back.as_dict(include_spec=True) == r.as_dict(include_spec=True)
        assert back.seq == r.seq and back.spec == r.spec

    # A second late duplicate, on a copy read back: both are kept, in memory and on disk.
    late = store.get("n1:1")
    assert late is not None and len(late.duplicates) == 1
    late.duplicates.append({"executor": "n3", "attempt": 3, "reason": "exit 0", "at": 9.0})
    store.stage(late)
    await store.sync()
    assert store.get("n1:1") is late
    store.close()
    reopened = Store(tmp_path).get("n1:1")
    assert reopened is not None and [d["executor"] for d in reopened.duplicates] == ["n2", "n3"]


async def test_a_value_sqlite_cannot_bind_rolls_the_write_back(tmp_path):
    # Such a value cannot come through the API any more (its JSON parser refuses lone
    # surrogates); if a bug lets one in, the write fails as a StoreError with its
    # transaction rolled back, where it once left BEGIN failing for every later write.
    store = Store(tmp_path)
    store.stage(rec(1), new=True)
    await store.sync()
    bad = rec(2)
    bad.spec.labels = {"\ud800": "x"}
    store.stage(bad, new=True)
    with pytest.raises(store_module.StoreError, match="UnicodeEncodeError.*this is a bug"):
        await store.sync()
    assert not store._writer.in_transaction
    assert store.get("n1:1") is not None


async def test_a_job_stored_before_the_argv_checks_still_loads(tmp_path):
    # NULs and env names with '=' are refused at submission now; a job an older agent
    # accepted with one is read back as it was (it fails at run time, as it did).
    from p2psched.jobs.spec import ACCEPTED

    store = Store(tmp_path)
    r = rec(1)
    r.spec = JobSpec.model_validate({"runtime": "process", "command": ["/bin/echo", "a\0b"], "env": {"A=B": "x"}},
                                    context=ACCEPTED)
    store.stage(r, new=True)
    await store.sync()
    store.close()
    [back] = Store(tmp_path).unfinished()
    assert back.spec.command == ["/bin/echo", "a\0b"] and back.spec.env == {"A=B": "x"}
    with pytest.raises(ValueError, match="NUL"):
        JobSpec.model_validate(back.spec.model_dump())


def test_a_module_named_since_the_cutoff_is_kept_whatever_its_files_mtime_says(tmp_path, monkeypatch):
    """A module's mtime moves at most once per MODULE_TOUCH_S (an hour): with a
    retention under that, a module named every 2 s looked unused by its mtime and
    was deleted, and its next job refused with unknown_module."""
    import os
    import time as time_module

    clock = [10_000.0]
    monkeypatch.setattr(time_module, "time", lambda: clock[0])
    store = Store(tmp_path)
    sha = "d" * 64
    path = store.put_module(sha, b"\0asmd")
    assert store.has_module(sha)  # used at 10,000: its mtime too
    os.utime(path, (10_000.0, 10_000.0))
    for clock[0] in (10_020.0, 10_040.0, 10_042.0):  # named every 20 s; the mtime stays
        assert store.has_module(sha)
    cutoff = 10_044.0 - 36  # a retention of 36 s
    candidates = store.unused_modules(cutoff, None)
    assert path in candidates  # by its mtime, unused
    assert store.prune_modules(candidates, in_use=set(), unused_since=cutoff) == 0
    assert store.has_module(sha)
    store.close()


async def test_a_wal_grown_by_a_burst_of_large_outputs_is_cut_back_once_checkpointed(tmp_path):
    store = Store(tmp_path)
    wal = tmp_path / "jobs.db-wal"
    output = b"x" * (INLINE_OUTPUT_BYTES - 1)  # the largest output a row holds
    for i in range(1, 301):  # about 20 MB of rows, in the WAL until the checkpoint
        store.stage(rec(i), new=True, output=output)
    await store.sync()
    assert wal.stat().st_size > 2 * store_module.WAL_SIZE_LIMIT
    for i in range(301, CHECKPOINT_ROWS + 2):  # enough rows for a checkpoint, then one more commit
        store.stage(rec(i), new=True)
        await store.sync()
    assert wal.stat().st_size <= store_module.WAL_SIZE_LIMIT
    store.close()
    again = Store(tmp_path)
    assert again.output("n1:300") == output and len(list(again.unfinished())) == CHECKPOINT_ROWS + 1


async def test_staged_kv_pairs_are_written_with_the_next_flush_and_deleted_with_none(tmp_path):
    store = Store(tmp_path)
    store.stage_kv("doubt:a", "n2")
    store.stage_kv("doubt:b", "n3")
    store.stage_kv("other", "x")
    assert store.dirty
    await store.sync()
    store.stage_kv("doubt:b", None)
    await store.sync()
    store.close()
    again = Store(tmp_path)
    assert again.kv_items("doubt:") == {"doubt:a": "n2"}
    assert again.get_kv("other") == "x"
