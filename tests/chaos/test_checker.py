"""The checker on synthetic histories: a clean run passes, each violation is caught.

Histories here are built by hand the way clients and the nemesis write them, so
every test names the one thing it breaks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from p2psched.chaos.checker import check, percentile
from p2psched.chaos.history import History, load_history

pytestmark = pytest.mark.chaos

NODES = ["n1", "n2", "n3"]
T0 = 1_000_000.0


def stdout_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() + "\n"


def expect_sha(data: bytes) -> dict[str, Any]:
    out = stdout_of(data)
    return {"kind": "sha256", "state": "succeeded", "output_sha256": hashlib.sha256(out.encode()).hexdigest(),
            "stdout": out}


EXPECT_SLEEP = {"kind": "sleep", "state": "timed_out", "output_sha256": None, "stdout": None}


class Run:
    """A tiny world: ops as clients log them, records as agents would hold them."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.records: dict[str, list[dict[str, Any]]] = {n: [] for n in NODES}
        self.t = T0

    def op(self, type: str, f: str, **kw: Any) -> None:
        self.t += 0.01
        self.ops.append({"type": type, "f": f, "time": self.t, "process": kw.pop("process", "client-0"), **kw})

    def submit(self, job: str, origin: str, expect: dict[str, Any], *, ack: bool = True) -> None:
        self.op("invoke", "submit", agent=origin, job=job, value={"try": 1, "expect": expect})
        if ack:
            self.op("ok", "submit", agent=origin, job=job, value={"status": 202, "origin": origin, "state": "queued"})
        else:
            self.op("info", "submit", agent=origin, job=job, value={"error": "ReadTimeout"})

    def record(self, job: str, origin: str, state: str, *, executor: str | None = None, output: bytes = b"",
               attempts: int = 1, timeline: list[dict[str, Any]] | None = None, holder: str | None = None,
               **extra: Any) -> dict[str, Any]:
        executor = executor or origin
        out = stdout_of(output) if state == "succeeded" else ""
        if timeline is None:
            timeline = [
                {"state": "submitted", "at": self.t, "node": origin, "detail": ""},
                {"state": "queued", "at": self.t, "node": origin, "detail": "accepted"},
                {"state": "placed", "at": self.t + 0.1, "node": executor, "detail": "runs here"},
                {"state": "running", "at": self.t + 0.1, "node": executor, "detail": "attempt 1"},
            ]
            if state != "queued":
                timeline.append({"state": state, "at": self.t + 0.3, "node": executor, "detail": state})
        rec = {"id": job, "origin": origin, "state": state, "executor": executor, "attempts": attempts,
               "timeline": timeline,
               "result": {"reason": "exit 0" if state == "succeeded" else state, "stdout": out,
                          "output_sha256": hashlib.sha256(out.encode()).hexdigest()}, **extra}
        self.records[holder or origin].append(rec)
        return rec

    def final(self, peers: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
        if peers is None:
            peers = {n: [{"node_id": m, "state": "alive"} for m in NODES] for n in NODES}
        return {"nodes": NODES, "records": self.records, "peers": peers}

    def check(self, **kw: Any):  # type: ignore[no-untyped-def]
        return check(self.ops, self.final(**kw), max_attempts=5)


def clean_run() -> Run:
    run = Run()
    for i in range(6):
        data = bytes([i]) * (i * 10)
        origin = NODES[i % 3]
        run.submit(f"j{i}", origin, expect_sha(data))
        run.record(f"j{i}", origin, "succeeded", executor=NODES[(i + 1) % 3], output=data)
    run.submit("s1", "n1", EXPECT_SLEEP)
    run.record("s1", "n1", "timed_out")
    # An executor's copy of a forwarded job is not the job's record.
    run.record("j0", "n1", "succeeded", executor="n2", output=bytes(0), holder="n2")
    return run


def kinds(verdict: Any) -> set[str]:
    return {v.kind for v in verdict.violations}


def test_a_clean_history_passes_with_its_counts() -> None:
    v = clean_run().check()
    assert v.ok, v.render()
    assert v.counts["acknowledged"] == 7
    assert v.counts["final_states"] == {"succeeded": 6, "timed_out": 1}
    assert v.figures["jobs_lost"] == 0
    assert v.figures["duplicate_results"] == 0
    assert v.figures["membership_converged"] is True
    assert "PASS" in v.render()


def test_an_acknowledged_job_no_agent_holds_is_lost() -> None:
    run = clean_run()
    run.submit("gone", "n2", expect_sha(b"x"))
    v = run.check()
    assert kinds(v) == {"lost"}
    assert v.figures["jobs_lost"] == 1
    assert "FAIL" in v.render() and "gone" in v.render()


def test_a_job_that_never_got_an_answer_may_be_missing() -> None:
    run = clean_run()
    run.submit("maybe", "n2", expect_sha(b"x"), ack=False)
    assert run.check().ok


def test_a_job_still_running_after_healing_is_unfinished_and_counts_as_lost() -> None:
    run = clean_run()
    run.submit("stuck", "n3", expect_sha(b"y"))
    run.record("stuck", "n3", "queued")
    v = run.check()
    assert kinds(v) == {"unfinished"}
    assert v.figures["jobs_lost"] == 1


def test_one_id_held_by_two_origins_is_two_jobs() -> None:
    run = clean_run()
    run.submit("twice", "n1", expect_sha(b"z"))
    run.record("twice", "n1", "succeeded", output=b"z")
    run.record("twice", "n2", "succeeded", output=b"z")
    v = run.check()
    assert kinds(v) == {"two_origins"}
    assert v.figures["duplicate_results"] == 1


def test_two_final_states_in_one_timeline_are_a_second_result() -> None:
    run = clean_run()
    run.submit("dbl", "n1", expect_sha(b"q"))
    rec = run.record("dbl", "n1", "succeeded", output=b"q")
    rec["timeline"].append({"state": "failed", "at": run.t + 1, "node": "n3", "detail": "late attempt"})
    v = run.check()
    assert kinds(v) == {"second_final"}
    assert v.figures["duplicate_results"] == 1


def test_a_final_state_a_client_was_told_must_not_change() -> None:
    run = clean_run()
    run.submit("flip", "n1", expect_sha(b"f"))
    run.op("invoke", "cancel", agent="n1", job="flip")
    run.op("ok", "cancel", agent="n1", job="flip", value={"state": "failed"})
    run.record("flip", "n1", "succeeded", output=b"f")
    assert kinds(run.check()) == {"second_final"}


def test_duplicate_attempts_are_counted_not_condemned() -> None:
    run = clean_run()
    run.submit("late", "n1", expect_sha(b"l"))
    run.record("late", "n1", "succeeded", output=b"l",
               duplicate_attempts=[{"executor": "n3", "attempt": 1, "reason": "exit 0", "at": run.t}])
    v = run.check()
    assert v.ok, v.render()
    assert v.figures["duplicate_attempts_recorded"] == 1
    assert v.figures["records_with_duplicate_attempts"] == 1
    assert v.figures["duplicate_results"] == 0


def test_a_succeeded_job_with_the_wrong_output_is_caught() -> None:
    run = clean_run()
    run.submit("bad", "n2", expect_sha(b"right"))
    run.record("bad", "n2", "succeeded", output=b"wrong")
    v = run.check()
    assert kinds(v) == {"wrong_output"}
    assert "bad" in str(v.violations[0])


def test_a_sleep_job_cannot_succeed() -> None:
    run = clean_run()
    run.submit("s2", "n2", EXPECT_SLEEP)
    run.record("s2", "n2", "succeeded", output=b"woke")
    assert kinds(run.check()) == {"wrong_output"}


def test_a_failed_job_is_counted_with_its_reason_not_judged_on_output() -> None:
    run = clean_run()
    run.submit("f1", "n2", expect_sha(b"a"))
    rec = run.record("f1", "n2", "failed", attempts=5)
    rec["result"]["reason"] = "retry budget spent: 5 attempts"
    v = run.check()
    assert v.ok, v.render()
    assert v.counts["failed_reasons"] == {"retry budget spent: 5 attempts": 1}
    assert v.counts["other_than_fault_free"] == {"sha256 ended failed": 1}


def test_more_attempts_than_the_budget_is_caught() -> None:
    run = clean_run()
    run.submit("many", "n3", expect_sha(b"m"))
    run.record("many", "n3", "succeeded", output=b"m", attempts=6)
    v = run.check()
    assert kinds(v) == {"over_budget"}
    assert v.counts["max_attempts_seen"] == 6


def test_a_confirmed_cancel_that_ends_succeeded_is_caught() -> None:
    run = clean_run()
    run.submit("c1", "n1", expect_sha(b"c"))
    run.op("invoke", "cancel", agent="n1", job="c1")
    run.op("ok", "cancel", agent="n1", job="c1", value={"state": "cancelled"})
    run.record("c1", "n1", "succeeded", output=b"c")
    assert "cancelled_succeeded" in kinds(run.check())


def test_a_timeline_with_cancelled_and_succeeded_is_caught() -> None:
    run = clean_run()
    run.submit("c2", "n1", expect_sha(b"c"))
    rec = run.record("c2", "n1", "succeeded", output=b"c")
    rec["timeline"].insert(-1, {"state": "cancelled", "at": run.t + 0.2, "node": "n1", "detail": "cancelled"})
    assert "cancelled_succeeded" in kinds(run.check())


def test_a_cancel_that_came_too_late_may_find_the_job_succeeded() -> None:
    run = clean_run()
    run.submit("c3", "n1", expect_sha(b"c"))
    run.op("invoke", "cancel", agent="n1", job="c3")
    run.op("fail", "cancel", agent="n1", job="c3", value={"status": 409, "body": "already ended"})
    run.record("c3", "n1", "succeeded", output=b"c")
    v = run.check()
    assert v.ok, v.render()
    assert v.counts["cancels_too_late_409"] == 1


def test_a_confirmed_cancel_that_ends_cancelled_passes() -> None:
    run = clean_run()
    run.submit("c4", "n1", EXPECT_SLEEP)
    run.op("invoke", "cancel", agent="n1", job="c4")
    run.op("ok", "cancel", agent="n1", job="c4", value={"state": "cancelled"})
    run.record("c4", "n1", "cancelled")
    v = run.check()
    assert v.ok, v.render()
    assert v.counts["cancels_confirmed"] == 1


@pytest.mark.parametrize("state", ["suspect", "dead", "absent"])
def test_membership_that_did_not_converge_is_caught(state: str) -> None:
    peers = {n: [{"node_id": m, "state": "alive"} for m in NODES] for n in NODES}
    peers["n2"] = [m for m in peers["n2"] if m["node_id"] != "n3"]
    if state != "absent":
        peers["n2"].append({"node_id": "n3", "state": state})
    v = clean_run().check(peers=peers)
    assert kinds(v) == {"not_converged"}
    assert f"n3 {state}" in str(v.violations[0])
    assert v.figures["membership_converged"] is False


def test_an_agent_that_did_not_answer_for_its_peers_has_not_converged() -> None:
    peers = {n: [{"node_id": m, "state": "alive"} for m in NODES] for n in NODES[:2]}
    assert kinds(clean_run().check(peers=peers)) == {"not_converged"}


def test_extra_completion_time_of_jobs_whose_executor_died() -> None:
    run = clean_run()  # six unaffected sha256 jobs, each 0.3 s from submission to the end
    run.submit("d1", "n1", expect_sha(b"d"))
    t = run.t
    run.record("d1", "n1", "succeeded", executor="n3", output=b"d", attempts=2, timeline=[
        {"state": "submitted", "at": t, "node": "n1", "detail": ""},
        {"state": "queued", "at": t, "node": "n1", "detail": "accepted"},
        {"state": "queued", "at": t + 0.05, "node": "n2", "detail": "accepted from n1"},
        {"state": "placed", "at": t + 0.1, "node": "n1", "detail": "forwarded to n2"},
        {"state": "running", "at": t + 0.1, "node": "n2", "detail": "attempt 1"},
        {"state": "queued", "at": t + 4.0, "node": "n1", "detail": "executor n2 dead; placing it again"},
        {"state": "placed", "at": t + 4.5, "node": "n1", "detail": "forwarded to n3"},
        {"state": "running", "at": t + 4.5, "node": "n3", "detail": "attempt 2"},
        {"state": "succeeded", "at": t + 4.8, "node": "n3", "detail": "exit 0"},
    ])
    v = run.check()
    assert v.ok, v.render()
    assert v.counts["jobs_whose_executor_died"] == 1
    assert v.counts["of_which_a_peer_executor"] == 1
    assert v.figures["p99_extra_completion_s_executor_died"] == pytest.approx(4.5, abs=0.01)
    assert v.figures["p99_extra_completion_s_peer_executor_died"] == pytest.approx(4.5, abs=0.01)
    assert v.figures["p99_extra_completion_s_origin_restarted"] is None


def test_a_job_rerun_by_its_restarted_origin_counts_apart() -> None:
    run = clean_run()
    run.submit("r1", "n2", expect_sha(b"r"))
    t = run.t
    run.record("r1", "n2", "succeeded", output=b"r", attempts=2, timeline=[
        {"state": "submitted", "at": t, "node": "n2", "detail": ""},
        {"state": "queued", "at": t, "node": "n2", "detail": "accepted"},
        {"state": "placed", "at": t + 0.1, "node": "n2", "detail": "runs here"},
        {"state": "running", "at": t + 0.1, "node": "n2", "detail": "attempt 1"},
        {"state": "queued", "at": t + 6.0, "node": "n2", "detail": "agent restarted while the job was in flight"},
        {"state": "placed", "at": t + 6.1, "node": "n2", "detail": "runs here"},
        {"state": "running", "at": t + 6.1, "node": "n2", "detail": "attempt 2"},
        {"state": "succeeded", "at": t + 6.3, "node": "n2", "detail": "exit 0"},
    ])
    v = run.check()
    assert v.counts["jobs_whose_executor_died"] == 1 and v.counts["of_which_a_peer_executor"] == 0
    assert v.figures["p99_extra_completion_s_origin_restarted"] == pytest.approx(6.0, abs=0.01)


def test_convergence_is_timed_from_each_heal_that_leaves_no_fault() -> None:
    run = clean_run()
    run.op("ok", "fault", process="nemesis", agent="n2", value={"kind": "kill"})
    run.op("ok", "membership", process="monitor", value={"converged": False})
    run.op("ok", "heal", process="nemesis", agent="n2", value={"kind": "kill"})
    heal_at = run.t
    run.op("ok", "membership", process="monitor", value={"converged": False})
    run.t = heal_at + 2.0
    run.op("ok", "membership", process="monitor", value={"converged": True})
    run.op("ok", "converge", process="harness", value={"seconds": 1.5})
    v = run.check()
    assert v.figures["converge_after_each_heal_s"]["heals"] == 1
    assert v.figures["converge_after_each_heal_s"]["measured"] == 1
    assert v.figures["converge_after_each_heal_s"]["max"] == pytest.approx(2.01, abs=0.001)
    assert v.figures["converge_after_final_heal_s"] == 1.5
    assert v.counts["faults"] == {"kill": 1}


def test_a_failed_final_convergence_is_not_converged() -> None:
    run = clean_run()
    run.op("fail", "converge", process="harness", value={"timeout_s": 60})
    assert run.check().figures["membership_converged"] is False


def test_the_checker_is_pure() -> None:
    run = clean_run()
    run.submit("gone", "n2", expect_sha(b"x"))
    a, b = run.check(), run.check()
    assert a.as_dict() == b.as_dict()


def test_nearest_rank_percentile() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([float(i) for i in range(1, 101)], 100) == 100.0


def test_history_round_trips_and_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    h = History(path)
    h.log("invoke", "submit", "client-0", agent="n1", job="j1", value={"try": 1})
    h.log("ok", "submit", "client-0", agent="n1", job="j1", value={"origin": "n1"})
    h.close()
    with open(path, "a") as f:
        f.write('{"type": "inv')
    ops = load_history(path)
    assert [o["type"] for o in ops] == ["invoke", "ok"]
    assert ops[1]["value"] == {"origin": "n1"}
    with pytest.raises(ValueError, match="not one of"):
        History(None).log("maybe", "submit", "client-0")


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"type": "ok"}\nnot json\n' + json.dumps({"type": "ok"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        load_history(path)


def test_an_agent_that_exited_without_a_fault_is_a_crash() -> None:
    run = clean_run()
    run.op("info", "crash", process="harness", agent="n2",
           value={"exit_code": 1, "cause": "IllegalTransition: job j1: illegal transition timed_out -> timed_out"})
    v = run.check()
    assert kinds(v) == {"agent_crashed"}
    assert "n2 exited with 1" in str(v.violations[0]) and "IllegalTransition" in str(v.violations[0])
    assert v.counts["agent_crashes"] == 1


def test_a_heal_whose_convergence_the_next_fault_interrupted_is_not_timed() -> None:
    run = clean_run()
    run.op("invoke", "fault", process="nemesis", agent="n2", value={"kind": "pause"})
    run.op("ok", "fault", process="nemesis", agent="n2", value={"kind": "pause"})
    run.op("ok", "heal", process="nemesis", agent="n2", value={"kind": "pause"})
    run.op("ok", "membership", process="monitor", value={"converged": False})
    run.op("invoke", "fault", process="nemesis", agent="n3", value={"kind": "kill"})
    run.op("ok", "fault", process="nemesis", agent="n3", value={"kind": "kill"})
    run.t += 30
    run.op("ok", "heal", process="nemesis", agent="n3", value={"kind": "kill"})
    run.t += 3
    run.op("ok", "membership", process="monitor", value={"converged": True})
    fig = run.check().figures["converge_after_each_heal_s"]
    assert fig["heals"] == 2 and fig["interrupted"] == 1 and fig["measured"] == 1
    assert fig["max"] == pytest.approx(3.01, abs=0.001)


def test_jobs_of_an_origin_that_never_answered_are_unverified_not_lost() -> None:
    run = clean_run()
    run.submit("quiet", "n3", expect_sha(b"q"))
    run.records["n3"] = []
    final = run.final()
    final["unreachable"] = ["n3"]
    v = check(run.ops, final, max_attempts=5)
    assert "unverified" in kinds(v) and "lost" not in kinds(v)
    assert v.figures["jobs_lost"] == 0 and v.figures["jobs_unverified"] == 3
