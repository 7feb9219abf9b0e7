"""Whether this host can run each runtime's jobs: a circuit breaker per runtime. Sans-IO.

A job this host could not run (its sandbox would not build, its wasm worker died, a
host limit such as open files was hit) goes back to the queue and tries again
(``Agent._retry_later``). One such failure says little. Several in a row, with no
job of that runtime running to its end in between, say that the host is broken for
the runtime: a full disk, a missing tool, a wedged worker. Left alone, such a host
keeps advertising free slots, so peers keep sending it jobs that bounce back: the
"black hole" that a scheduler must not have.

So each runtime has a breaker. It opens after ``fail_after`` host failures in a row,
or at once after one that no wait can mend (bubblewrap missing). While it is open,
the runtime is *impaired*: the agent gossips that, peers send it no such jobs, and
its own go to peers that can run them. It still runs them itself when no peer could,
so that a lone agent keeps trying. After ``cooldown_s`` the breaker half-opens: the
runtime is advertised again, and the next job tries it. A job that runs to its end
(whatever its own result) closes the breaker; one more host failure opens it again
for twice as long, up to ``cooldown_max_s``.

``HostHealth`` reads no clock: the agent passes ``now`` (trio's clock, so tests can
run it in virtual time) and acts on what each call returns.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Host failures in a row, with no run in between, that open a runtime's breaker.
FAIL_AFTER = 3
#: How long the first opening lasts; each reopening right after a half-open doubles it
#: (5, 10, 20 ... s): short at first, since most host trouble passes, and a probe costs
#: one job a host failure, which it is retried past.
COOLDOWN_S = 5.0
COOLDOWN_MAX_S = 600.0


@dataclass(slots=True)
class Breaker:
    failures: int = 0  # host failures since the last job of this runtime that ran to its end
    open_until: float | None = None  # impaired until then; None: closed or half-open
    opened_at: float = 0.0
    cooldown: float = 0.0  # of the current or last opening
    last_error: str = ""


class HostHealth:
    def __init__(self, *, fail_after: int = FAIL_AFTER, cooldown_s: float = COOLDOWN_S,
                 cooldown_max_s: float = COOLDOWN_MAX_S) -> None:
        if fail_after < 1:
            raise ValueError(f"fail_after must be at least 1, not {fail_after}")
        if not 0 < cooldown_s <= cooldown_max_s:
            raise ValueError(f"need 0 < cooldown_s <= cooldown_max_s, not {cooldown_s} and {cooldown_max_s}")
        self.fail_after = fail_after
        self.cooldown_s = cooldown_s
        self.cooldown_max_s = cooldown_max_s
        self._breakers: dict[str, Breaker] = {}
        #: The runtimes whose breaker is open, for the gossiped vector (read per job).
        self.impaired: tuple[str, ...] = ()

    @property
    def failing(self) -> bool:
        """Any runtime with a host failure not yet followed by a run: cheap, read per job."""
        return bool(self._breakers)

    def failed(self, runtime: str, now: float, error: str, *, certain: bool = False) -> bool:
        """A job of ``runtime`` could not run on this host. True when this opens the
        breaker (the runtime becomes impaired now). ``certain``: no wait can mend it."""
        b = self._breakers.setdefault(runtime, Breaker())
        b.failures += 1
        b.last_error = error
        if b.open_until is not None:
            return False  # already open: a job that no peer could take ran here and failed
        if not certain and b.failures < self.fail_after:
            return False
        # Right after a half-open (failures past the threshold) the pause doubles.
        b.cooldown = (min(self.cooldown_max_s, b.cooldown * 2) if b.cooldown and b.failures > self.fail_after
                      else self.cooldown_s)
        b.open_until = now + b.cooldown
        b.opened_at = now
        self._publish()
        return True

    def ran(self, runtime: str) -> bool:
        """A job of ``runtime`` ran to its end here. True when that closes a breaker
        that was open or half-open (the runtime works again)."""
        b = self._breakers.pop(runtime, None)
        if b is None:
            return False
        if b.open_until is not None:
            self._publish()
        return b.failures >= self.fail_after or b.open_until is not None

    def tick(self, now: float) -> list[str]:
        """Half-open each breaker whose cooldown has passed; returns those runtimes."""
        due = [rt for rt, b in self._breakers.items() if b.open_until is not None and b.open_until <= now]
        for rt in due:
            b = self._breakers[rt]
            b.open_until = None
            b.failures = max(b.failures, self.fail_after)  # one more failure opens it again
        if due:
            self._publish()
        return due

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do; None: nothing is open."""
        return min((b.open_until for b in self._breakers.values() if b.open_until is not None), default=None)

    def describe(self, now: float) -> dict[str, dict[str, object]]:
        """Runtimes with host failures, for the agent's views and its health check."""
        out: dict[str, dict[str, object]] = {}
        for rt, b in sorted(self._breakers.items()):
            out[rt] = {
                "state": "impaired" if b.open_until is not None else (
                    "trying again" if b.failures >= self.fail_after else "failing"),
                "failures_in_a_row": b.failures,
                "last_error": b.last_error,
                "retry_in_s": round(max(0.0, b.open_until - now), 1) if b.open_until is not None else None,
            }
        return out

    def _publish(self) -> None:
        self.impaired = tuple(sorted(rt for rt, b in self._breakers.items() if b.open_until is not None))
