"""The checker: a pure function from a run's history and final records to a verdict.

It reads no clock and touches no socket, so it is tested on synthetic histories
and can judge a recorded run again (``python -m p2psched.chaos check RUN_DIR``).

Inputs:

* ``ops``: the history (see :mod:`p2psched.chaos.history`). A submit's ``invoke``
  carries the job's expectation (``value.expect``); its ``ok`` carries the origin
  that acknowledged it (``value.origin``). A cancel's ``ok`` carries the state the
  agent answered with; a cancel ``fail`` with ``value.status == 409`` means the job
  had already ended. The harness logs ``converge`` (seconds until every agent saw
  every other alive after the last heal).
* ``final``: what the harness fetched after healing and waiting:
  ``{"nodes": [node ids], "records": {node: [record, ...]}, "peers": {node: [member, ...]}}``.
  ``records[node]`` is every record that agent holds; the checker keeps those whose
  ``origin`` is that agent (an executor's copy is not the job's record).

Invariants (each failure is a :class:`Violation`):

* ``lost``: an acknowledged job has no record at any origin;
* ``unfinished``: an acknowledged job's record is not final after healing and waiting;
* ``unverified``: an acknowledged job's origin never answered the final fetch
  (listed in ``final["unreachable"]``), so whether it was lost is unknown;
* ``two_origins``: two agents each hold the job as its origin (one job, two records);
* ``second_final``: a record's timeline holds two final states, or a final state a
  client was told differs from the final record;
* ``wrong_output``: a job succeeded with output other than its guest must produce;
* ``over_budget``: a job took more attempts than the retry budget allows;
* ``cancelled_succeeded``: a job a cancel confirmed as ``cancelled`` ended
  ``succeeded`` (or its timeline shows both);
* ``not_converged``: after healing, some agent does not see every agent alive;
* ``agent_crashed``: an agent process exited although no fault stopped it (the
  harness starts it again, as a supervisor would, and logs a ``crash``).

Figures (for the issue's table): jobs lost (missing or unfinished); duplicate
results (a second final state, or a second origin); duplicate attempts recorded
(``duplicate_attempts``: a late result kept, not applied; fine); the extra
completion time of jobs whose executor died: their submission-to-end time minus the
median of jobs of the same kind that lost no executor, p99 over all of them and
apart for a peer executor and for an origin that ran the job itself; and the time
to converge after healing.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from p2psched.chaos.history import Op

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "timed_out", "rejected"})
#: Must equal p2psched.agent.remote.MAX_ATTEMPTS; the harness passes the real one,
#: this default keeps the checker importable without the agent.
DEFAULT_MAX_ATTEMPTS = 5
#: How many violations of each kind the report spells out; the counts hold them all.
SHOWN_PER_KIND = 5


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    job: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.job + ': ' if self.job else ''}{self.detail}"


@dataclass(slots=True)
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(v.kind for v in self.violations))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "violations": [vars_(v) for v in self.violations], "by_kind": self.by_kind(),
                "counts": self.counts, "figures": self.figures}

    def render(self) -> str:
        lines = [f"verdict: {'PASS' if self.ok else 'FAIL'}"
                 + ("" if self.ok else f" ({len(self.violations)} violations: "
                    + ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind().items())) + ")")]
        shown: Counter[str] = Counter()
        for v in self.violations:
            shown[v.kind] += 1
            if shown[v.kind] <= SHOWN_PER_KIND:
                lines.append(f"  violation {v}")
        lines.append("counts:")
        for k, v in self.counts.items():
            lines.append(f"  {k}: {v}")
        lines.append("figures:")
        for k, v in self.figures.items():
            lines.append(f"  {k}: {_fmt(v)}")
        return "\n".join(lines)


def vars_(v: Violation) -> dict[str, Any]:
    return {"kind": v.kind, "job": v.job, "detail": v.detail}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _finals(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in timeline if t.get("state") in FINAL_STATES]


def _executor_died(rec: dict[str, Any]) -> str | None:
    """Whether the job went back to the queue after it had been placed, because its
    executor died, restarted or was cut off: ``"peer"`` when the executor was another
    agent (the origin placed it again), ``"origin"`` when the origin itself was
    running it and restarted; None when the job never lost its executor.

    An executor's own "accepted from <origin>" queued entry is the forward
    arriving, not a loss, so it does not count.
    """
    placed = False
    for t in sorted(rec.get("timeline", []), key=lambda t: t.get("at", 0.0)):
        state = t.get("state")
        if state in ("placed", "running"):
            placed = True
        elif state == "queued" and placed and not str(t.get("detail", "")).startswith("accepted from"):
            return "peer" if t.get("node") == rec.get("origin") and str(t.get("detail", "")).startswith(
                "executor ") else "origin"
    return None


def _completion_s(rec: dict[str, Any]) -> float | None:
    timeline = rec.get("timeline", [])
    finals = _finals(timeline)
    if not timeline or not finals:
        return None
    start = min(t.get("at", 0.0) for t in timeline)
    return float(finals[0]["at"] - start)


def check(ops: list[Op], final: dict[str, Any], *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Verdict:
    """Judge a run. Pure: same inputs, same verdict."""
    verdict = Verdict()
    bad = verdict.violations
    nodes: list[str] = list(final.get("nodes", []))

    # --- what clients were told
    expect: dict[str, dict[str, Any]] = {}
    acked: dict[str, str] = {}  # job -> origin that acknowledged it
    submitted: set[str] = set()
    indeterminate: set[str] = set()
    cancel_confirmed: dict[str, str] = {}  # job -> state a cancel answered with
    cancel_too_late: set[str] = set()
    cancel_unknown: set[str] = set()
    cancel_invoked: set[str] = set()
    told_final: dict[str, list[tuple[str, str]]] = defaultdict(list)  # job -> [(state, source)]
    converge: Op | None = None
    faults: Counter[str] = Counter()
    crashes: list[Op] = []
    polls: list[tuple[float, bool]] = []  # the monitor's membership polls: (time, converged)
    faulty: set[str] = set()
    calm_heals: list[float] = []  # heals after which no fault was in force
    fault_starts: list[float] = []
    for op in ops:
        f, typ, job = op.get("f"), op.get("type"), op.get("job")
        value = op.get("value") or {}
        if f == "submit" and job is not None:
            if typ == "invoke":
                submitted.add(job)
                if "expect" in value:
                    expect[job] = value["expect"]
            elif typ == "ok":
                acked.setdefault(job, value.get("origin") or op.get("agent") or "")
                state = value.get("state")
                if state in FINAL_STATES:
                    told_final[job].append((state, f"submit answer from {op.get('agent')}"))
            elif typ == "info":
                indeterminate.add(job)
        elif f == "cancel" and job is not None:
            if typ == "invoke":
                cancel_invoked.add(job)
            elif typ == "ok":
                state = value.get("state", "")
                cancel_confirmed[job] = state
                if state in FINAL_STATES:
                    told_final[job].append((state, f"cancel answer from {op.get('agent')}"))
            elif typ == "fail" and value.get("status") == 409:
                cancel_too_late.add(job)
            elif typ == "info":
                cancel_unknown.add(job)
        elif f == "fault" and typ == "ok":
            faults[str(value.get("kind", "?"))] += 1
        elif f == "converge":
            converge = op
        elif f == "crash":
            crashes.append(op)
        elif f == "membership" and typ == "ok":
            polls.append((float(op["time"]), bool(value.get("converged"))))
        if f == "fault" and typ == "invoke":
            fault_starts.append(float(op["time"]))
        if f in ("fault", "heal") and typ == "ok" and op.get("agent") is not None:
            node = str(op["agent"])
            if f == "fault" and value.get("kind") != "restart":
                faulty.add(node)
            else:
                faulty.discard(node)
                if not faulty:
                    calm_heals.append(float(op["time"]))

    # --- the records, at their origins
    at_origin: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    duplicates_seen = 0
    duplicate_records = 0
    for node, recs in (final.get("records") or {}).items():
        for rec in recs:
            if rec.get("origin") != node:
                continue
            at_origin[rec["id"]].append((node, rec))

    states: Counter[str] = Counter()
    fail_reasons: Counter[str] = Counter()
    off_expectation: Counter[str] = Counter()
    lost = unfinished = unverified = 0
    unreachable = set(final.get("unreachable") or [])
    second_finals = 0
    max_seen_attempts = 0
    died_extra: list[float] = []
    baseline: dict[str, list[float]] = defaultdict(list)
    died_jobs: list[tuple[str, float, str]] = []

    jobs_to_judge = sorted(set(acked) | (set(at_origin) & submitted))
    for job in jobs_to_judge:
        holders = at_origin.get(job, [])
        if not holders:
            if job in acked and acked[job] in unreachable:
                unverified += 1
                bad.append(Violation("unverified", job, f"acknowledged by {acked[job]}, which did not answer "
                                     "after healing; whether it kept the job is unknown"))
            elif job in acked:
                lost += 1
                bad.append(Violation("lost", job, f"acknowledged by {acked[job]} but no agent holds it as origin"))
            continue
        if len(holders) > 1:
            second_finals += len(holders) - 1
            bad.append(Violation("two_origins", job, "held as origin by " + ", ".join(n for n, _ in holders)
                                 + "; one id must be one job"))
        for node, rec in holders:
            state = rec.get("state", "")
            timeline = rec.get("timeline", [])
            finals = _finals(timeline)
            attempts = int(rec.get("attempts", 0))
            max_seen_attempts = max(max_seen_attempts, attempts)
            dups = rec.get("duplicate_attempts") or []
            if dups:
                duplicate_records += 1
                duplicates_seen += len(dups)
            if state not in FINAL_STATES:
                unfinished += 1
                last = timeline[-1] if timeline else {}
                bad.append(Violation("unfinished", job, f"still {state} at origin {node} after healing "
                                     f"(last: {last.get('state')} on {last.get('node')}: {last.get('detail')})"))
                continue
            states[state] += 1
            if len(finals) > 1:
                second_finals += 1
                bad.append(Violation("second_final", job, "timeline at " + node + " holds "
                                     + " then ".join(f"{t['state']} ({t.get('node')})" for t in finals)))
            for told, source in told_final.get(job, []):
                if told != state:
                    second_finals += 1
                    bad.append(Violation("second_final", job, f"{source} said {told}, the record at {node} "
                                         f"says {state}"))
            if attempts > max_attempts:
                bad.append(Violation("over_budget", job, f"{attempts} attempts; the budget is {max_attempts}"))
            exp = expect.get(job)
            result = rec.get("result") or {}
            if state == "succeeded" and exp is not None:
                want = exp.get("output_sha256")
                got = result.get("output_sha256")
                if want is None:
                    bad.append(Violation("wrong_output", job, f"a {exp.get('kind')} job cannot succeed, yet it did "
                                         f"on {rec.get('executor')}"))
                elif got != want:
                    bad.append(Violation("wrong_output", job, f"output sha256 {got} from {rec.get('executor')}, "
                                         f"expected {want} (stdout {result.get('stdout', '')[:80]!r})"))
            if state in ("failed", "rejected"):
                fail_reasons[str(result.get("reason", "?"))[:60]] += 1
            if exp is not None and state != exp.get("state") and state != "cancelled":
                off_expectation[f"{exp.get('kind')} ended {state}"] += 1
            if cancel_confirmed.get(job) == "cancelled" and state == "succeeded":
                bad.append(Violation("cancelled_succeeded", job, "a cancel was confirmed as cancelled, yet the "
                                     f"record at {node} says succeeded"))
            elif state == "succeeded" and any(t.get("state") == "cancelled" for t in finals):
                bad.append(Violation("cancelled_succeeded", job, "timeline holds both cancelled and succeeded"))
            took = _completion_s(rec)
            if took is not None and state != "cancelled" and exp is not None:
                died = _executor_died(rec)
                if died:
                    died_jobs.append((str(exp.get("kind")), took, died))
                else:
                    baseline[str(exp.get("kind"))].append(took)

    died_extra_by: dict[str, list[float]] = defaultdict(list)
    for kind, took, died in died_jobs:
        base = statistics.median(baseline[kind]) if baseline.get(kind) else 0.0
        died_extra.append(max(0.0, took - base))
        died_extra_by[died].append(max(0.0, took - base))

    # --- agents that died by themselves
    for op in crashes:
        value = op.get("value") or {}
        bad.append(Violation("agent_crashed", None, f"{op.get('agent')} exited with {value.get('exit_code')} "
                             f"without a fault: {value.get('cause', '?')}"))

    # --- membership
    converged = True
    peers: dict[str, list[dict[str, Any]]] = final.get("peers") or {}
    for node in nodes:
        view = peers.get(node)
        if view is None:
            converged = False
            bad.append(Violation("not_converged", None, f"{node} did not answer /v1/peers after healing"))
            continue
        seen = {m.get("node_id"): m.get("state") for m in view}
        wrong = {n: seen.get(n, "absent") for n in nodes if seen.get(n) not in ("alive",)}
        if wrong:
            converged = False
            bad.append(Violation("not_converged", None, f"{node} sees " + ", ".join(
                f"{n} {s}" for n, s in sorted(wrong.items()))))

    verdict.counts = {
        "submits_invoked": len(submitted),
        "acknowledged": len(acked),
        "indeterminate_never_acked": len(indeterminate - set(acked)),
        "final_states": dict(sorted(states.items())),
        "failed_reasons": dict(fail_reasons.most_common(8)),
        "other_than_fault_free": dict(sorted(off_expectation.items())),
        "cancels_invoked": len(cancel_invoked),
        "cancels_confirmed": sum(1 for s in cancel_confirmed.values() if s == "cancelled"),
        "cancels_too_late_409": len(cancel_too_late),
        "cancels_indeterminate": len(cancel_unknown - set(cancel_confirmed) - cancel_too_late),
        "faults": dict(sorted(faults.items())),
        "agent_crashes": len(crashes),
        "max_attempts_seen": max_seen_attempts,
        "retry_budget": max_attempts,
        "jobs_whose_executor_died": len(died_jobs),
        "of_which_a_peer_executor": sum(1 for _, _, d in died_jobs if d == "peer"),
    }
    conv_s = None
    if converge is not None:
        conv_s = (converge.get("value") or {}).get("seconds")
        if converge.get("type") != "ok":
            converged = False
    heal_converge = _converge_after_heals(calm_heals, polls, fault_starts)
    verdict.figures = {
        "jobs_lost": lost + unfinished,
        "jobs_unverified": unverified,
        "duplicate_results": second_finals,
        "duplicate_attempts_recorded": duplicates_seen,
        "records_with_duplicate_attempts": duplicate_records,
        "p99_extra_completion_s_executor_died": percentile(died_extra, 99),
        "p99_extra_completion_s_peer_executor_died": percentile(died_extra_by["peer"], 99),
        "p99_extra_completion_s_origin_restarted": percentile(died_extra_by["origin"], 99),
        "median_extra_completion_s_executor_died": statistics.median(died_extra) if died_extra else None,
        "converge_after_final_heal_s": conv_s,
        "converge_after_each_heal_s": heal_converge,
        "membership_converged": converged,
    }
    return verdict


def _converge_after_heals(heals: list[float], polls: list[tuple[float, bool]],
                          fault_starts: list[float]) -> dict[str, Any]:
    """For each heal that left no fault in force: seconds until the monitor first saw
    every agent see every agent alive. Median and max over those heals. A heal whose
    convergence the next fault interrupted says nothing about healing, so it is only
    counted (``interrupted``), as is one the run ended before (``not_seen_converging``)."""
    polls = sorted(polls)
    starts = sorted(fault_starts)
    took: list[float] = []
    never = interrupted = 0
    for t in heals:
        after = next((p for p, ok in polls if p >= t and ok), None)
        next_fault = next((s for s in starts if s > t), None)
        if after is None:
            never += 1
        elif next_fault is not None and next_fault < after:
            interrupted += 1
        else:
            took.append(after - t)
    return {"heals": len(heals), "measured": len(took), "median": statistics.median(took) if took else None,
            "max": max(took) if took else None, "interrupted": interrupted, "not_seen_converging": never}
