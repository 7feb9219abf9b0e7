"""The local dispatch queue: priority first, then fair share between tenants.

Policies:
  * ``fair`` (default): the highest priority wins; at equal priority tenants take
    turns (round robin), and each tenant's jobs run in arrival order. One tenant
    submitting 10,000 jobs cannot starve another's single job.
  * ``fifo``: the highest priority wins; at equal priority, arrival order.

The queue is bounded by the agent (admission), not here, so that a full queue is
answered with 429 at the door rather than discovered after the job was accepted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any, Literal

from p2psched.jobs.record import JobRecord

Policy = Literal["fair", "fifo"]


class DispatchQueue:
    def __init__(self, policy: Policy = "fair") -> None:
        self.policy = policy
        # fair: priority -> tenant -> deque of records; tenants rotate by moving to the end
        self._levels: dict[int, OrderedDict[str, deque[tuple[int, JobRecord]]]] = {}
        self._prios: list[int] = []  # max-heap of priorities present (negated)
        # fifo: heap of (-priority, seq, id)
        self._heap: list[tuple[int, int, int, JobRecord]] = []
        # id -> token of its live entry; removed or superseded entries are skipped lazily
        self._ids: dict[str, int] = {}
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._ids

    def push(self, rec: JobRecord) -> None:
        self._insert(rec, front=False)

    def push_front(self, rec: JobRecord) -> None:
        """Put back a job just taken from the head (it could not stay where it went).

        Pushing back, in reverse order, the jobs popped since some moment restores
        the queue's order as it was then: each goes first in its tenant's line, and
        its tenant first in its priority's turn."""
        self._insert(rec, front=True)

    def _insert(self, rec: JobRecord, *, front: bool) -> None:
        if rec.id in self._ids:
            return
        self._tokens += 1
        token = self._ids[rec.id] = self._tokens
        p = rec.spec.priority
        if self.policy == "fifo":
            heapq.heappush(self._heap, (-p, rec.seq, token, rec))  # its seq keeps its place
            return
        level = self._levels.get(p)
        if level is None:
            level = self._levels[p] = OrderedDict()
            heapq.heappush(self._prios, -p)
        line = level.setdefault(rec.tenant, deque())
        if front:
            line.appendleft((token, rec))
            level.move_to_end(rec.tenant, last=False)
        else:
            line.append((token, rec))

    def peek(self) -> JobRecord | None:
        self._drop_cancelled()
        if self.policy == "fifo":
            return self._heap[0][3] if self._heap else None
        if not self._prios:
            return None
        level = self._levels[-self._prios[0]]
        tenant = next(iter(level))
        return level[tenant][0][1]

    def pop(self) -> JobRecord | None:
        rec = self.peek()
        if rec is None:
            return None
        del self._ids[rec.id]
        if self.policy == "fifo":
            heapq.heappop(self._heap)
            return rec
        p = -self._prios[0]
        level = self._levels[p]
        q = level[rec.tenant]
        q.popleft()
        if q:
            level.move_to_end(rec.tenant)  # the next job at this priority is another tenant's
        else:
            del level[rec.tenant]
        if not level:
            del self._levels[p]
            heapq.heappop(self._prios)
        return rec

    def firsts_at(self, priority: int) -> list[JobRecord]:
        """The first job queued at ``priority`` of each tenant that has one there (under
        ``fifo``, none: tenants take no turns there)."""
        level = self._levels.get(priority) if self.policy == "fair" else None
        if not level:
            return []
        found = []
        for q in level.values():
            while q and self._ids.get(q[0][1].id) != q[0][0]:
                q.popleft()  # removed entries at the front go now, as peek's do
            if q:
                found.append(q[0][1])
        return found

    def remove(self, job_id: str) -> bool:
        """Mark a queued job gone (cancel, hand-off); it is skipped lazily."""
        return self._ids.pop(job_id, None) is not None

    def _drop_cancelled(self) -> None:
        # Lazily discard entries removed by remove(): O(1) cancel, amortised cleanup.
        if self.policy == "fifo":
            while self._heap and self._ids.get(self._heap[0][3].id) != self._heap[0][2]:
                heapq.heappop(self._heap)
            return
        while self._prios:
            p = -self._prios[0]
            level = self._levels[p]
            while level:
                tenant, q = next(iter(level.items()))
                while q and self._ids.get(q[0][1].id) != q[0][0]:
                    q.popleft()
                if q:
                    return
                del level[tenant]
            del self._levels[p]
            heapq.heappop(self._prios)

    def __iter__(self) -> Iterator[JobRecord]:
        if self.policy == "fifo":
            items = sorted(self._heap)
            return iter([r for _, _, t, r in items if self._ids.get(r.id) == t])
        out: list[JobRecord] = []
        for p in sorted(self._levels, reverse=True):
            for q in self._levels[p].values():
                out.extend(r for t, r in q if self._ids.get(r.id) == t)
        return iter(out)


class DrainRate:
    """Jobs ended per second over the last ``window_s``: how fast the queue empties,
    for the Retry-After a full queue answers with. Pure: the caller gives ``now``."""

    #: The shortest span a rate is taken over: a few endings a moment apart say little.
    MIN_SPAN_S = 0.1

    def __init__(self, window_s: int = 10) -> None:
        self.window_s = window_s
        # [whole second, jobs ended in it, when the first of them ended], oldest first
        self._seconds: deque[list[Any]] = deque()

    def add(self, now: float) -> None:
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += 1
        else:
            self._seconds.append([second, 1, now])
            while self._seconds[0][0] <= second - self.window_s:
                self._seconds.popleft()

    def per_second(self, now: float) -> float:
        """Over the time since the first ending in the window, to the instant (so a
        burst that began a moment ago is neither averaged with the idle time before it
        nor stretched to a whole second); 0.0 when no job ended within the window."""
        inside = self._inside(now)
        if not inside:
            return 0.0
        span = max(self.MIN_SPAN_S, now - inside[0][2])
        return sum(n for _, n, _ in inside) / span

    def measured_s(self, now: float) -> float:
        """How long the rate has been measured for: since the first ending in the
        window (0.0 with none)."""
        inside = self._inside(now)
        return now - inside[0][2] if inside else 0.0

    def _inside(self, now: float) -> list[list[Any]]:
        start = int(now) - self.window_s
        return [bucket for bucket in self._seconds if bucket[0] > start]
