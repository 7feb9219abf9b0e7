"""Durable job store: SQLite in WAL mode, with group commit.

Writers *stage* a record and then ``await sync()``; one flush writes everything
staged so far in a single transaction, and every waiter whose writes it covered is
released. Under load many submissions share one transaction, written on a worker
thread, so the store is not the throughput bottleneck. A flush of a few rows is
written on the trio thread instead: with synchronous=NORMAL a WAL commit is a
write() of a few pages, far cheaper than the two thread hand-offs, which on a
loaded host each wait for a CPU (ms). The WAL checkpoint, which does fsync, never
runs inline: the writer's auto-checkpoint is off and a worker-thread flush
checkpoints once enough rows have been written.

Layout under the data dir::

    jobs.db            the jobs table (spec written once, record on every transition)
    modules/<sha>.wasm module bytes, content-addressed
    outputs/<id>.out   raw outputs larger than INLINE_OUTPUT_BYTES
    outputs/<id>.err   raw stderr longer than the record keeps (RECORD_TEXT_BYTES)
    outputs/<id>.artifacts/<sha256>
                       the job's artifacts, by content: the record maps each name to
                       its size and sha256, so a record never names other bytes
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import trio
from pydantic_core import to_json

from p2psched.jobs.record import JobRecord, JobResult
from p2psched.jobs.spec import ACCEPTED, JobSpec
from p2psched.jobs.state import FINAL_STATES, JobState

#: Outputs up to this size live in the row; larger ones in a file, so the database
#: stays small enough to page through quickly.
INLINE_OUTPUT_BYTES = 64 * 1024
#: Finished records kept in memory, the most recently staged: a result on its way
#: to its origin, a client waiting on it. Older ones are read back from SQLite on
#: demand (a point read and a parse, about 100 us). A record is about 13 KB for a
#: noop job, and holds the job's input: 10,000 of them kept a busy agent at 180 MB.
FINISHED_CACHE = 1_000
#: Flushes of at most this many rows, with outputs of at most INLINE_OUTPUT_BYTES in
#: all, commit on the trio thread.
INLINE_FLUSH_ROWS = 8
#: A module's file mtime is its last use, refreshed at most this often (one utime
#: per module per hour, not per job).
MODULE_TOUCH_S = 3600.0
#: Rows written since the last WAL checkpoint that make the next flush checkpoint
#: (on its worker thread). About SQLite's default of 1,000 pages.
CHECKPOINT_ROWS = 1_000
#: How long a flush on a worker thread waits for another process's write transaction on
#: jobs.db (an operator's sqlite3 shell, a backup tool) to end before it fails. A flush
#: on the trio thread never waits there: it goes to a thread (SQLite's own default, 5 s
#: of waiting on the trio thread, froze the whole agent).
LOCK_WAIT_S = 1.0
#: The size the WAL is cut back to when it starts over after a checkpoint. Between two
#: checkpoints it holds up to CHECKPOINT_ROWS rows, inline outputs included (up to 64 MB),
#: and SQLite reuses that space rather than give it back: without a limit a burst of
#: large outputs kept the data dir that much larger until the agent stopped.
WAL_SIZE_LIMIT = 8 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    tenant TEXT NOT NULL,
    runtime TEXT NOT NULL,
    created_at REAL NOT NULL,
    spec TEXT NOT NULL,
    record TEXT NOT NULL,
    output BLOB,
    output_file TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs(tenant, seq);
-- Listings page by seq: without this, each page sorted the whole table (0.2 s at
-- 300,000 jobs, on the trio thread).
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs(seq);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Results this agent ran for another origin and has not yet had acknowledged.
CREATE TABLE IF NOT EXISTS deliveries (id TEXT PRIMARY KEY);
-- Each job's labels, for listings and counts by label (a sweep's jobs, say): one
-- index range per label, in submission order. Written with the job's first row.
CREATE TABLE IF NOT EXISTS job_labels (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (key, value, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_labels_seq ON job_labels(seq);
"""
#: kv key set once the labels of jobs stored before job_labels existed are indexed.
LABELS_INDEXED = "job_labels_indexed"


class StoreError(RuntimeError):
    pass


class _Locked(Exception):
    """A write that may not wait met another process's write transaction."""


def _code(e: sqlite3.Error) -> int:
    """SQLite's primary result code of ``e`` (SQLITE_BUSY, SQLITE_FULL, ...)."""
    return getattr(e, "sqlite_errorcode", 0) & 0xFF


def _fix(e: sqlite3.Error, data_dir: Path) -> str:
    """What to do about SQLite's error ``e`` on the job store in ``data_dir``."""
    code = _code(e)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return ("another process holds a write transaction on it (an sqlite3 shell, a backup tool): end that "
                "transaction or stop that process; the agent tries again each second")
    if code == sqlite3.SQLITE_FULL:
        return f"free space on the file system of {data_dir}; the agent tries again each second"
    return "check disk space and permissions"


def db_files(db: Path) -> tuple[Path, Path, Path]:
    """An SQLite database in WAL mode: the file, its -wal and its -shm."""
    return db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def private_files(db: Path) -> None:
    """Make an SQLite file of tenants' data, and its -wal and -shm, readable by this
    user only (they were 0644 in a 0755 data dir: any local user read every job's
    env). A file this user does not own is left as it is."""
    for path in db_files(db):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _record_row(rec: JobRecord) -> str:
    d = rec.as_dict()
    d.pop("id"), d.pop("tenant"), d.pop("runtime"), d.pop("priority")
    d.pop("duplicate_attempts", None)
    d.pop("labels", None)  # the spec holds them
    if rec.origin_transfer:
        d["origin_transfer"] = rec.origin_transfer
    if rec.auth is not None:
        d["auth"] = rec.auth
    if rec.duplicates:
        d["duplicates"] = rec.duplicates
    # pydantic-core's encoder: four times faster than json.dumps on a record, and a
    # record is encoded at least twice per job.
    return to_json(d).decode()


def _spec_row(spec: JobSpec) -> str:
    return spec.model_dump_json(exclude={"module"})


def _load(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    job_id, seq, spec_json, record_json = row
    d = json.loads(record_json)
    spec = JobSpec.model_validate_json(spec_json, context=ACCEPTED) if spec_json else None
    assert spec is not None
    result = d.get("result")
    return JobRecord(
        id=job_id, spec=spec, origin=d["origin"], state=JobState(d["state"]), executor=d.get("executor"),
        route=d.get("route", []), cost=d.get("cost", 0.0), hops=d.get("hops", 0), attempts=d.get("attempts", 0),
        timeline=d.get("timeline", []), result=JobResult.from_dict(result) if result else None,
        wait_reason=d.get("wait_reason"), created_at=d.get("created_at", 0.0), seq=seq,
        origin_transfer=d.get("origin_transfer", ""), auth=d.get("auth"), duplicates=d.get("duplicates", []),
    )


def list_query(*, state: str | None, tenant: str | None, limit: int, after_seq: int = 0,
               newest_first: bool = False, labels: Sequence[tuple[str, str]] = ()) -> tuple[str, list[Any]]:
    """The SQL of ``Store.list``: one index range, whatever the filters. With
    ``labels`` (each must match) the range is the first label's, in job_labels."""
    seq = "l.seq" if labels else "seq"
    if labels:
        q = ("SELECT j.id, j.seq, j.spec, j.record FROM job_labels l JOIN jobs j ON j.seq = l.seq"
             f" WHERE l.key = ? AND l.value = ? AND {seq} {'<' if newest_first else '>'} ?")
        args: list[Any] = [labels[0][0], labels[0][1]]
    else:
        q = f"SELECT id, seq, spec, record FROM jobs WHERE {seq} {'<' if newest_first else '>'} ?"
        args = []
    args.append((after_seq or 2**62) if newest_first else after_seq)
    q, args = _filters(q, args, state=state, tenant=tenant, labels=labels)
    q += f" ORDER BY {seq} DESC LIMIT ?" if newest_first else f" ORDER BY {seq} LIMIT ?"
    args.append(limit)
    return q, args


def _filters(q: str, args: list[Any], *, state: str | None, tenant: str | None,
             labels: Sequence[tuple[str, str]]) -> tuple[str, list[Any]]:
    """``q`` (over ``jobs``, or ``job_labels l`` joined to ``jobs j``) narrowed to
    ``state``, ``tenant`` and every label after the first."""
    # Joined to job_labels, each job is found by its seq: "+" keeps SQLite from taking
    # the state or tenant index instead and reading that whole range for every label row.
    j = "+j." if labels else ""
    if state:
        q += f" AND {j}state = ?"
        args.append(state)
    if tenant:
        q += f" AND {j}tenant = ?"
        args.append(tenant)
    for key, value in labels[1:]:
        q += " AND EXISTS (SELECT 1 FROM job_labels m WHERE m.key = ? AND m.value = ? AND m.seq = l.seq)"
        args += [key, value]
    return q, args


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.modules_dir = data_dir / "modules"
        self._modules: dict[str, Path] = {}  # sha256 -> file, for modules known to be on disk
        self._module_touched: dict[str, float] = {}  # sha256 -> when its file's mtime was last set
        self._module_used: dict[str, float] = {}  # sha256 -> when a job last named it
        self.outputs_dir = data_dir / "outputs"
        # The tenants' specs (their env), inputs and outputs: this agent's user only.
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.modules_dir, self.outputs_dir):
            d.mkdir(exist_ok=True)
        self.path = data_dir / "jobs.db"
        if _size(self.path) == 0 and not _size(db_files(self.path)[1]):
            # The store writes its header a moment after it creates the file: an empty one was cut, and
            # opening it would start a new store that silently forgets every job.
            raise StoreError(
                f"cannot open the job store {self.path}: it is empty (0 bytes), so it was cut (a copy that failed, "
                "a file system that lost its blocks in a crash); restore it from a backup, or delete it to start "
                "with an empty store (the jobs it held are then forgotten)")
        try:
            self._connect()
        except sqlite3.Error as e:
            raise StoreError(
                f"cannot open the job store {self.path}: {e}. Check that the data dir is writable and has space; "
                "if the file is damaged, restore it from a backup, or move it aside to start with an empty store "
                "(the jobs it held are then forgotten)"
            ) from None
        self._pending: dict[str, tuple[str, str | None, int, str, str, str, float, bytes | None]] = {}
        # Records are serialised at flush time, not at each stage: a job that moves
        # through several states between two flushes is encoded once.
        self._staged_records: dict[str, JobRecord] = {}
        #: Why the last flush failed (disk full, I/O error), until one succeeds.
        self.write_error: str | None = None
        self._inflight: dict[str, tuple[str, str | None, int, str, str, str, float, bytes | None]] = {}
        # Raw stderr of jobs whose record could not hold it all, written with their next flush.
        self._stderr_pending: dict[str, bytes] = {}
        self._stderr_inflight: dict[str, bytes] = {}
        # Artifacts (sha256 -> bytes) of jobs that ended, written with their next flush.
        self._artifacts_pending: dict[str, dict[str, bytes]] = {}
        self._artifacts_inflight: dict[str, dict[str, bytes]] = {}
        self._deliveries: dict[str, bool] = {}  # job id -> owed (True) or acknowledged (False)
        self._kv_pending: dict[str, str | None] = {}  # kv key -> its new value, or None to delete it
        self._staged_gen = 0
        self._staged_event = trio.Event()
        self._committed_gen = 0
        self._flushing = False
        self._flushed = trio.Event()
        self._rows_since_checkpoint = 0
        self._finished: OrderedDict[str, JobRecord] = OrderedDict()
        row = self._reader.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        self.last_seq: int = int(row[0])
        if self.get_kv(LABELS_INDEXED) is None:
            self._index_old_labels()

    def _connect(self) -> None:
        # The writer connection is used only inside flushes, one at a time; the reader
        # serves point lookups on the trio thread (WAL lets it read while a flush writes).
        self._writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        private_files(self.path)  # before WAL mode: SQLite gives -wal and -shm the file's mode
        self._writer.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (kill -9); only a power
        # loss can drop the last transactions. That is the trade-off etcd and Consul make too.
        self._writer.execute("PRAGMA synchronous=NORMAL")
        self._writer.execute("PRAGMA wal_autocheckpoint=0")  # see the module docstring
        self._writer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._writer.executescript(SCHEMA)
        self._reader = sqlite3.connect(self.path, check_same_thread=False)
        self._reader.execute("SELECT count(*) FROM jobs WHERE seq < 0").fetchone()
        self._lock_wait: bool | None = None  # the writer's busy_timeout: LOCK_WAIT_S (True) or 0
        self._files = self._identity()

    def _identity(self) -> tuple[tuple[int, int] | None, ...]:
        """Which files jobs.db, its -wal and its -shm are now (device, inode; None if missing)."""
        found: list[tuple[int, int] | None] = []
        for path in db_files(self.path):
            try:
                st = os.stat(path)
                found.append((st.st_dev, st.st_ino))
            except OSError:
                found.append(None)
        return tuple(found)

    @property
    def files_removed(self) -> bool:
        """Whether jobs.db, its -wal or its -shm was removed (or replaced) since the store
        opened them. SQLite goes on writing to the files it holds open, so nothing fails,
        but a restart would find none of it: ``rewrite_files`` writes them again."""
        return self._identity() != self._files

    async def rewrite_files(self) -> None:
        """Write jobs.db again, whole, from the connections that still hold the removed
        files, and reopen it. StoreError if it cannot be written (a full disk)."""
        while self._flushing:
            await self._flushed.wait()
        self._flushing = True  # no write may land in the old files once they are copied
        try:
            tmp = self.path.with_name(self.path.name + ".rewrite")
            await trio.to_thread.run_sync(self._copy_to, tmp)
            self._writer.close()
            self._reader.close()
            for stale in db_files(self.path)[1:]:  # a removed one's twin no longer matches the copy
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            os.replace(tmp, self.path)
            self._connect()
            self.write_error = None
        except (OSError, sqlite3.Error) as e:
            self.write_error = (f"could not write the job store {self.path} again after it was removed: {e}; "
                                "check disk space and permissions")
            raise StoreError(self.write_error) from e
        finally:
            self._flushing = False
            done, self._flushed = self._flushed, trio.Event()
            done.set()

    def _copy_to(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        dst = sqlite3.connect(tmp)
        try:
            self._writer.backup(dst)
        finally:
            dst.close()
        private_files(tmp)

    def _index_old_labels(self) -> None:
        """Index the labels of jobs stored before job_labels existed: once, when such a
        store opens (and in no time for a new one)."""
        try:
            self._writer.execute("BEGIN")
            self._writer.execute(
                "INSERT OR IGNORE INTO job_labels (key, value, seq) SELECT l.key, l.value, j.seq"
                " FROM jobs j, json_each(j.spec, '$.labels') l WHERE l.type = 'text'")
            self._writer.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, '1')", (LABELS_INDEXED,))
            self._writer.execute("COMMIT")
        except sqlite3.Error as e:
            self._writer.execute("ROLLBACK") if self._writer.in_transaction else None
            raise StoreError(f"cannot index the job labels in {self.path}: {e}; check disk space and "
                             "permissions") from None

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    # -- modules and outputs -------------------------------------------------

    def module_path(self, sha256: str) -> Path:
        path = self._modules.get(sha256)
        return path if path is not None else self.modules_dir / f"{sha256}.wasm"

    def has_module(self, sha256: str, *, check_disk: bool = False) -> bool:
        """Whether the module is stored here. A module seen once is remembered: a stat
        and a Path per job cost more than a noop job. ``check_disk`` looks again (for
        offers from peers, which trust the answer to leave the bytes out)."""
        path = self._modules.get(sha256)
        if path is not None and not check_disk:
            self._used(sha256, path)
            return True
        path = self.modules_dir / f"{sha256}.wasm"
        if path.exists():
            self._modules[sha256] = path
            self._used(sha256, path)
            return True
        self._modules.pop(sha256, None)
        return False

    def _used(self, sha256: str, path: Path) -> None:
        """Mark a module used now, so that pruning keeps the modules jobs still name:
        here at every use, and in its file's mtime (what survives a restart) at most
        once per MODULE_TOUCH_S. Pruning reads both: with the mtime alone, a retention
        under an hour deleted a module named every 2 s."""
        now = time.time()
        self._module_used[sha256] = now
        if now - self._module_touched.get(sha256, 0.0) >= MODULE_TOUCH_S:
            self._module_touched[sha256] = now
            with contextlib.suppress(OSError):
                os.utime(path)

    def unused_modules(self, unused_since: float, compiled_dir: Path | None) -> list[Path]:
        """Module files (and compiled copies) not used since ``unused_since``: the
        candidates for ``prune_modules``. Blocking (a stat per file): call it from a thread."""
        found = []
        for d in (self.modules_dir, compiled_dir):
            if d is None:
                continue
            with contextlib.suppress(OSError):
                for entry in os.scandir(d):
                    with contextlib.suppress(OSError):
                        if entry.is_file() and entry.stat().st_mtime < unused_since:
                            found.append(Path(entry.path))
        return found

    def prune_modules(self, candidates: list[Path], in_use: set[str], unused_since: float) -> int:
        """Delete the candidate files whose module no unfinished job names and that
        nobody used since they were listed. A job that names a deleted module later
        is refused with unknown_module (send its bytes), and a peer is asked for them."""
        n = 0
        for path in candidates:
            sha256 = path.name.split(".")[0]
            if sha256 in in_use or self._module_used.get(sha256, 0.0) >= unused_since:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                if path.parent == self.modules_dir:
                    self._modules.pop(sha256, None)
                    self._module_touched.pop(sha256, None)
                    self._module_used.pop(sha256, None)
                    n += 1
        return n

    def put_module(self, sha256: str, data: bytes) -> Path:
        path = self.modules_dir / f"{sha256}.wasm"
        if path.exists():
            self._used(sha256, path)
        else:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            try:
                self.modules_dir.mkdir(exist_ok=True)  # removed under us (a tmp cleaner): made again
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"could not store module {sha256[:16]} in {self.modules_dir}: {e.strerror}; "
                                 "check disk space and permissions") from e
        self._modules[sha256] = path
        return path

    def stderr(self, job_id: str) -> bytes | None:
        """A finished job's raw stderr, if it was longer than its record holds."""
        held = self._stderr_pending.get(job_id) or self._stderr_inflight.get(job_id)
        if held is not None:
            return held
        try:
            return (self.outputs_dir / f"{job_id}.err").read_bytes()
        except FileNotFoundError:
            return None

    def artifacts_dir(self, job_id: str) -> Path:
        return self.outputs_dir / f"{job_id}.artifacts"

    def artifact(self, job_id: str, sha256: str) -> bytes | None:
        """The bytes of ``job_id``'s artifact with this sha256 (as its record names
        it), or None if they are not stored here. Blocking for a large one: an
        artifact may be MiBs, so call it from a thread."""
        for held in (self._artifacts_pending.get(job_id), self._artifacts_inflight.get(job_id)):
            if held is not None and sha256 in held:
                return held[sha256]
        try:
            return (self.artifacts_dir(job_id) / sha256).read_bytes()
        except FileNotFoundError:
            return None

    def output(self, job_id: str) -> bytes | None:
        row = self._reader.execute("SELECT output, output_file FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        blob, file = row
        if file:
            return (self.outputs_dir / file).read_bytes()
        if blob is not None:
            return bytes(blob)
        pending = self._pending.get(job_id) or self._inflight.get(job_id)
        return pending[7] if pending else None

    # -- staging and group commit -------------------------------------------

    def stage(self, rec: JobRecord, *, new: bool = False, output: bytes | None = None,
              stderr: bytes | None = None, artifacts: dict[str, bytes] | None = None) -> None:
        """Queue ``rec``'s current state for the next flush; ``stderr``: its raw stderr,
        kept as a file, for one longer than the record holds; ``artifacts``: the files
        its result names, by their sha256 (sha256 -> bytes), kept as files too."""
        if stderr is not None:
            self._stderr_pending[rec.id] = stderr
        if artifacts:
            self._artifacts_pending[rec.id] = artifacts
        prev = self._pending.get(rec.id)
        spec = _spec_row(rec.spec) if new else (prev[1] if prev else None)
        out = output if output is not None else (prev[7] if prev else None)
        self._pending[rec.id] = (
            rec.id, spec, rec.seq, rec.state.value, rec.tenant, rec.runtime, rec.created_at, out,
        )
        self._staged_records[rec.id] = rec
        self._staged_gen += 1
        self._staged_event.set()
        if rec.state in FINAL_STATES:
            self._finished[rec.id] = rec
            self._finished.move_to_end(rec.id)
            while len(self._finished) > FINISHED_CACHE:
                self._finished.popitem(last=False)
        elif new and self._finished:
            self._finished.pop(rec.id, None)  # an id that ended here runs again (a job given back, offered anew)

    def stage_delivery(self, job_id: str, owed: bool) -> None:
        """Record that a result is owed to its origin (or no longer is), in the next flush."""
        self._deliveries[job_id] = owed
        self._staged_gen += 1
        self._staged_event.set()

    def stage_kv(self, key: str, value: str | None) -> None:
        """Set ``key`` of the kv table to ``value`` (None: delete it) in the next flush."""
        self._kv_pending[key] = value
        self._staged_gen += 1
        self._staged_event.set()

    def kv_items(self, prefix: str) -> dict[str, str]:
        """The stored kv pairs whose keys start with ``prefix`` (and hold no NUL)."""
        rows = self._reader.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\x7f"))
        return dict(rows.fetchall())

    def owed_deliveries(self) -> list[str]:
        return [r[0] for r in self._reader.execute("SELECT id FROM deliveries")]

    @property
    def dirty(self) -> bool:
        return self._committed_gen < self._staged_gen

    async def wait_dirty(self) -> None:
        """Return once something staged is not yet durable (at once if it already is)."""
        while not self.dirty:
            self._staged_event = trio.Event()
            await self._staged_event.wait()

    def durable(self, job_id: str) -> bool:
        """Whether the state last staged for ``job_id`` is on disk (no flush holds it yet)."""
        return job_id not in self._pending and job_id not in self._inflight

    async def sync(self) -> None:
        """Return once everything staged before this call is durable."""
        target = self._staged_gen
        while self._committed_gen < target:
            if self._flushing:
                await self._flushed.wait()
                continue
            self._flushing = True
            batch: dict[str, tuple[Any, ...]] = {}
            staged: dict[str, JobRecord] = {}
            deliveries: dict[str, bool] = {}
            kvs: dict[str, str | None] = {}
            try:
                # Let the tasks runnable now stage too, so that they share this commit.
                await trio.lowlevel.cancel_shielded_checkpoint()
                batch, self._pending = self._pending, {}
                errs, self._stderr_pending = self._stderr_pending, {}
                self._stderr_inflight = errs
                arts, self._artifacts_pending = self._artifacts_pending, {}
                self._artifacts_inflight = arts
                staged, self._staged_records = self._staged_records, {}
                records = {job_id: _record_row(r) for job_id, r in staged.items()}
                labels = {job_id: r.spec.labels for job_id, r in staged.items()
                          if r.spec.labels and batch.get(job_id, (None, None))[1] is not None}
                deliveries, self._deliveries = self._deliveries, {}
                kvs, self._kv_pending = self._kv_pending, {}
                gen = self._staged_gen
                self._inflight = batch
                rows = len(batch) + len(deliveries) + len(kvs)
                self._rows_since_checkpoint += rows
                checkpoint = self._rows_since_checkpoint >= CHECKPOINT_ROWS
                if checkpoint:
                    self._rows_since_checkpoint = 0
                outputs = sum(len(v[7]) for v in batch.values() if v[7] is not None)
                if (rows <= INLINE_FLUSH_ROWS and outputs <= INLINE_OUTPUT_BYTES and not checkpoint and not errs
                        and not arts):
                    try:
                        self._write(batch, records, deliveries, labels=labels, kvs=kvs, wait=False)
                    except _Locked:  # another process writes: wait for it on a thread, not here
                        await trio.to_thread.run_sync(functools.partial(self._write, batch, records, deliveries,
                                                                        labels=labels, kvs=kvs))
                else:
                    await trio.to_thread.run_sync(functools.partial(self._write, batch, records, deliveries,
                                                                    checkpoint, errs, labels=labels,
                                                                    artifacts=arts, kvs=kvs))
            except BaseException as e:
                if isinstance(e, StoreError):
                    self.write_error = str(e)
                # Put the batch back (without clobbering newer stagings) so nothing is lost.
                for k, v in batch.items():
                    newer = self._pending.get(k)
                    if newer is None:
                        self._pending[k] = v
                    else:  # staged again meanwhile: its new state, with the spec and output not yet written
                        self._pending[k] = (newer[0], newer[1] if newer[1] is not None else v[1], *newer[2:7],
                                            newer[7] if newer[7] is not None else v[7])
                for k, rec in staged.items():
                    self._staged_records.setdefault(k, rec)
                for k, owed in deliveries.items():
                    self._deliveries.setdefault(k, owed)
                for k, value in kvs.items():
                    self._kv_pending.setdefault(k, value)
                for k, err in errs.items():
                    self._stderr_pending.setdefault(k, err)
                for k, art in arts.items():
                    self._artifacts_pending.setdefault(k, art)
                raise
            finally:
                self._inflight = {}
                self._stderr_inflight = {}
                self._artifacts_inflight = {}
                self._flushing = False
                done, self._flushed = self._flushed, trio.Event()
                done.set()
            self._committed_gen = gen
            self.write_error = None

    async def prune(self, submitted_before: float, batch: int = 1_000) -> int:
        """Delete the finished jobs submitted before ``submitted_before`` (Unix time),
        with their output files, except results still owed to their origin. Returns
        how many. The writes take turns with the flushes, batch by batch."""
        total = 0
        while True:
            while self._flushing:
                await self._flushed.wait()
            self._flushing = True
            try:
                ids, more = await trio.to_thread.run_sync(self._prune_batch, submitted_before, batch)
            finally:
                self._flushing = False
                done, self._flushed = self._flushed, trio.Event()
                done.set()
            for job_id in ids:
                self._finished.pop(job_id, None)
            total += len(ids)
            if not more:
                return total

    def _prune_batch(self, submitted_before: float, batch: int) -> tuple[list[str], bool]:
        finals = {s.value for s in FINAL_STATES}
        owed = {r[0] for r in self._writer.execute("SELECT id FROM deliveries")}
        doomed: list[tuple[str, int, str | None]] = []
        after, more = 0, True
        # Oldest first along the seq index; the few old unfinished or owed jobs are stepped over.
        while more and len(doomed) < batch:
            rows = self._writer.execute(
                "SELECT id, seq, state, created_at, output_file FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, batch)).fetchall()
            more = len(rows) == batch
            for job_id, seq, state, created_at, output_file in rows:
                after = seq
                if created_at >= submitted_before:
                    more = False
                    break
                if state in finals and job_id not in owed:
                    doomed.append((job_id, seq, output_file))
        if not doomed:
            return [], False
        try:
            self._writer.execute("BEGIN")
            self._writer.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id, _, _ in doomed])
            self._writer.executemany("DELETE FROM job_labels WHERE seq = ?", [(seq,) for _, seq, _ in doomed])
            self._writer.execute("COMMIT")
        except sqlite3.Error as e:
            self._writer.execute("ROLLBACK") if self._writer.in_transaction else None
            raise StoreError(f"could not prune the job store {self.path}: {e}") from e
        for job_id, _, output_file in doomed:
            if output_file:
                with contextlib.suppress(OSError):
                    (self.outputs_dir / output_file).unlink()
            with contextlib.suppress(OSError):
                (self.outputs_dir / f"{job_id}.err").unlink()
            shutil.rmtree(self.artifacts_dir(job_id), ignore_errors=True)
        return [job_id for job_id, _, _ in doomed], more

    def discard(self, job_id: str) -> bool:
        """Forget ``job_id``'s staged state if none of it is on disk yet (a submission
        whose write failed, so that it is not written later as if accepted).
        False if some of it is on disk already: that job was accepted."""
        entry = self._pending.get(job_id)
        if entry is None or entry[1] is None or job_id in self._inflight:
            return False  # never staged here, or written already (its row is an update), or being written
        del self._pending[job_id]
        self._staged_records.pop(job_id, None)
        return True

    def _write(self, batch: dict[str, tuple[Any, ...]], records: dict[str, str],
               deliveries: dict[str, bool] | None = None, checkpoint: bool = False,
               errs: dict[str, bytes] | None = None, *, labels: dict[str, dict[str, str]] | None = None,
               artifacts: dict[str, dict[str, bytes]] | None = None, kvs: dict[str, str | None] | None = None,
               wait: bool = True) -> None:
        """Write a flush: the files, then the rows in one transaction. ``wait``: wait up to
        LOCK_WAIT_S for another process's write transaction; without it, raise _Locked."""
        rows_new = []
        rows_upd = []
        label_rows: list[tuple[str, str, int]] = []
        try:  # the files first: the commit below makes the job's end durable, and names them
            if errs or artifacts or any(v[7] is not None and len(v[7]) > INLINE_OUTPUT_BYTES for v in batch.values()):
                self.outputs_dir.mkdir(exist_ok=True)  # removed under us (a tmp cleaner): made again
            for job_id, err in (errs or {}).items():
                (self.outputs_dir / f"{job_id}.err").write_bytes(err)
            for job_id, arts in (artifacts or {}).items():
                self._write_artifacts(job_id, arts)
            for job_id, (jid, spec, seq, state, tenant, runtime, created, out) in batch.items():
                rec_json = records[job_id]
                out_file = None
                if out is not None and len(out) > INLINE_OUTPUT_BYTES:
                    out_file = f"{job_id}.out"
                    (self.outputs_dir / out_file).write_bytes(out)
                    out = None
                if spec is not None:
                    rows_new.append((jid, seq, state, tenant, runtime, created, spec, rec_json, out, out_file))
                    labelled = labels.get(job_id) if labels else None
                    if labelled:
                        label_rows += [(k, v, seq) for k, v in labelled.items()]
                else:
                    rows_upd.append((state, rec_json, out, out_file, jid))
        except OSError as e:  # a full disk: the agent holds the states and tries again, as for SQLite's errors
            raise StoreError(f"could not write job output under {self.outputs_dir}: {e}; "
                             "check disk space and permissions") from e
        try:
            if self._lock_wait is not wait:  # set only when it changes: most flushes keep it
                self._writer.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT_S * 1000) if wait else 0}")
                self._lock_wait = wait
            self._writer.execute("BEGIN")
            if rows_new:
                self._writer.executemany(
                    "INSERT INTO jobs (id, seq, state, tenant, runtime, created_at, spec, record, output, output_file)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET state=excluded.state,"
                    " record=excluded.record, output=COALESCE(excluded.output, output),"
                    " output_file=COALESCE(excluded.output_file, output_file)",
                    rows_new,
                )
            if label_rows:
                self._writer.executemany("INSERT OR IGNORE INTO job_labels (key, value, seq) VALUES (?,?,?)",
                                         label_rows)
            if rows_upd:
                self._writer.executemany(
                    "UPDATE jobs SET state=?, record=?, output=COALESCE(?, output),"
                    " output_file=COALESCE(?, output_file) WHERE id=?",
                    rows_upd,
                )
            for job_id, owed in (deliveries or {}).items():
                if owed:
                    self._writer.execute("INSERT OR IGNORE INTO deliveries (id) VALUES (?)", (job_id,))
                else:
                    self._writer.execute("DELETE FROM deliveries WHERE id = ?", (job_id,))
            for key, value in (kvs or {}).items():
                if value is None:
                    self._writer.execute("DELETE FROM kv WHERE key = ?", (key,))
                else:
                    self._writer.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))
            self._writer.execute("COMMIT")
        except Exception as e:
            # Never leave the transaction open, or every later write fails on BEGIN; that
            # includes a value SQLite cannot bind, which a bug upstream let in.
            self._writer.execute("ROLLBACK") if self._writer.in_transaction else None
            if isinstance(e, sqlite3.Error):
                if not wait and _code(e) == sqlite3.SQLITE_BUSY:
                    raise _Locked from e
                raise StoreError(f"could not write the job store {self.path}: {e}; {_fix(e, self.data_dir)}") from e
            raise StoreError(f"could not write the job store {self.path}: {type(e).__name__}: {e}; this is a bug, "
                             "please report it with the log") from e
        if checkpoint:
            try:
                self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                # The commit landed in the WAL, which reuses its own space; jobs.db could not grow
                # to take its pages (a full disk). The rows are durable all the same: the next
                # flush tries the checkpoint again.
                self._rows_since_checkpoint = CHECKPOINT_ROWS

    def _write_artifacts(self, job_id: str, arts: dict[str, bytes]) -> None:
        """Each artifact (sha256 -> bytes) as a file named by its sha256. Bytes a record
        already names are never rewritten in place: a new file appears whole (rename)
        or not at all. An earlier attempt's files stay until retention deletes the
        job's directory."""
        d = self.artifacts_dir(job_id)
        d.mkdir(exist_ok=True)
        for sha256, data in arts.items():
            path = d / sha256
            if path.exists():
                continue
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    # -- reads ----------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """A finished or unknown job's record (active jobs live in the agent's memory)."""
        rec = self._finished.get(job_id)
        if rec is not None:
            return rec
        row = self._reader.execute("SELECT id, seq, spec, record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _load(row) if row else None

    def unfinished(self) -> Iterator[JobRecord]:
        finals = tuple(s.value for s in FINAL_STATES)
        q = f"SELECT id, seq, spec, record FROM jobs WHERE state NOT IN ({','.join('?' * len(finals))}) ORDER BY seq"
        for row in self._reader.execute(q, finals):
            yield _load(row)

    def list(self, *, state: str | None, tenant: str | None, limit: int, after_seq: int = 0,
             newest_first: bool = False, labels: Sequence[tuple[str, str]] = ()) -> list[JobRecord]:
        """Jobs in submission order from ``after_seq`` on; or, ``newest_first``, the newest
        ones below ``after_seq`` (0: from the newest). ``labels``: only jobs carrying
        every one of these (key, value) pairs.

        With labels it reads the label's whole range when few of its jobs match the
        other filters (tens of ms at 30,000 jobs): it then opens its own read-only
        connection, so call it from a thread."""
        q, args = list_query(state=state, tenant=tenant, limit=limit, after_seq=after_seq, newest_first=newest_first,
                             labels=labels)
        if not labels:
            return [_load(r) for r in self._reader.execute(q, args)]
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return [_load(r) for r in conn.execute(q, args)]
        finally:
            conn.close()

    def count_by_state(self, tenant: str | None = None, labels: Sequence[tuple[str, str]] = ()) -> dict[str, int]:
        """How many stored jobs are in each state (of ``tenant``, or all; carrying every
        one of ``labels``, or any).

        Blocking, and a full index scan: call it from a thread. It opens its own
        read-only connection, so it never shares the trio thread's reader."""
        if labels:
            q, args = _filters("SELECT j.state, count(*) FROM job_labels l JOIN jobs j ON j.seq = l.seq"
                               " WHERE l.key = ? AND l.value = ?", [*labels[0]], state=None, tenant=tenant,
                               labels=labels)
            q += " GROUP BY j.state"
        else:
            q, args = _filters("SELECT state, count(*) FROM jobs WHERE 1", [], state=None, tenant=tenant, labels=())
            q += " GROUP BY state"
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return dict(conn.execute(q, args).fetchall())
        finally:
            conn.close()

    def get_kv(self, key: str) -> str | None:
        row = self._reader.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

