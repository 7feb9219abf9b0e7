"""The memory of nonces already used, so that a captured request cannot be sent twice.

Interface (a ``typing.Protocol``; the agent may back it with SQLite to survive restarts):

* ``bound(tenant, nonce, now) -> str | None``: the job id the nonce was accepted for
  (``""`` for a read/cancel request), or None if unseen or expired.
* ``bind(tenant, nonce, job_id, expires_at, now)``: remember it until ``expires_at``;
  raises AdmissionError(429, nonce_cache_full) rather than forget an unexpired nonce.

A nonce is bound to a job id rather than merely "seen": the same job forwarded to the
next hop, or delivered twice by a retrying peer, carries the same envelope and the same
job id, and is a duplicate (idempotent), not a replay. The same envelope under a new
job id is a replay and is refused with 409.

Two stores: ``MemoryNonceStore`` (forgets on restart) and ``SQLiteNonceStore(path)``
(survives restarts, so an envelope accepted just before a restart cannot be replayed
just after it). Neither reads a clock: time comes in as ``now``.
"""

from __future__ import annotations

import heapq
import sqlite3
from pathlib import Path
from typing import Protocol

from p2psched.jobs.store import private_files
from p2psched.security.errors import AdmissionError

#: 100,000 entries (~20 MB): at the 5-minute default TTL, 330 signed requests per second
#: sustained on one agent, well over what one agent admits. When full, new requests get
#: 429 until entries expire: forgetting an unexpired nonce would reopen replays.
DEFAULT_MAX_ENTRIES = 100_000


class NonceStore(Protocol):
    def bound(self, tenant: str, nonce: str, now: float) -> str | None: ...

    def bind(self, tenant: str, nonce: str, job_id: str, expires_at: float, now: float) -> None: ...


class MemoryNonceStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[str, float]] = {}
        self._expiry: list[tuple[float, str, str]] = []  # heap of (expires_at, tenant, nonce)

    def __len__(self) -> int:
        return len(self._entries)

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            exp, tenant, nonce = heapq.heappop(self._expiry)
            entry = self._entries.get((tenant, nonce))
            if entry is not None and entry[1] <= exp:  # not re-bound with a later expiry
                del self._entries[(tenant, nonce)]

    def bound(self, tenant: str, nonce: str, now: float) -> str | None:
        self._purge(now)
        entry = self._entries.get((tenant, nonce))
        return entry[0] if entry is not None else None

    def bind(self, tenant: str, nonce: str, job_id: str, expires_at: float, now: float) -> None:
        self._purge(now)
        key = (tenant, nonce)
        old = self._entries.get(key)
        if old is None and len(self._entries) >= self.max_entries:
            wait = self._expiry[0][0] - now if self._expiry else 1.0
            raise AdmissionError(
                "nonce_cache_full",
                f"this agent holds {len(self._entries)} unexpired request nonces, its limit; retry in "
                f"{max(wait, 0):.0f} s, or raise the nonce cache size / sign with a shorter --ttl",
                retry_after=max(wait, 0.0),
            )
        if old is not None and old[1] >= expires_at:
            self._entries[key] = (job_id, old[1])
            return
        self._entries[key] = (job_id, expires_at)
        heapq.heappush(self._expiry, (expires_at, tenant, nonce))


class SQLiteNonceStore:
    """Nonces in their own SQLite file (WAL), apart from the job store so neither waits on the other.

    ``synchronous=NORMAL``: a power cut may lose the last few bindings, which reopens
    replays for at most those envelopes' remaining lifetime; an fsync per admission
    would cost more than the rest of admission together.
    """

    def __init__(self, path: str | Path, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        private_files(Path(path))  # before WAL mode: SQLite gives -wal and -shm the file's mode
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS nonces (tenant TEXT NOT NULL, nonce TEXT NOT NULL, job_id TEXT NOT NULL, "
            "expires_at REAL NOT NULL, PRIMARY KEY (tenant, nonce)) WITHOUT ROWID"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at)")
        self._count = self._db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0]
        self._purged_at = float("-inf")

    def __len__(self) -> int:
        return int(self._count)

    def close(self) -> None:
        self._db.close()

    def _purge(self, now: float) -> None:
        # At most once a second: the delete walks the expiry index, and entries live minutes.
        if now - self._purged_at >= 1.0:
            self._count -= self._db.execute("DELETE FROM nonces WHERE expires_at < ?", (now,)).rowcount
            self._purged_at = now

    def bound(self, tenant: str, nonce: str, now: float) -> str | None:
        row = self._db.execute(
            "SELECT job_id FROM nonces WHERE tenant = ? AND nonce = ? AND expires_at >= ?", (tenant, nonce, now)
        ).fetchone()
        return None if row is None else str(row[0])

    def bind(self, tenant: str, nonce: str, job_id: str, expires_at: float, now: float) -> None:
        self._purge(now)
        exists = self._db.execute("SELECT 1 FROM nonces WHERE tenant = ? AND nonce = ?", (tenant, nonce)).fetchone()
        if exists is None and self._count >= self.max_entries:
            self._purged_at = float("-inf")
            self._purge(now)
            if self._count >= self.max_entries:
                raise AdmissionError(
                    "nonce_cache_full",
                    f"this agent holds {self._count} unexpired request nonces, its limit; retry later, or raise "
                    "the nonce cache size / sign with a shorter --ttl",
                    retry_after=1.0,
                )
        self._db.execute(
            "INSERT INTO nonces (tenant, nonce, job_id, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant, nonce) DO UPDATE SET job_id = excluded.job_id, "
            "expires_at = MAX(expires_at, excluded.expires_at)",
            (tenant, nonce, job_id, expires_at),
        )
        if exists is None:
            self._count += 1
