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

Sans-IO: time comes in as ``now``; nothing here reads a clock.
"""

from __future__ import annotations

import heapq
from typing import Protocol

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
