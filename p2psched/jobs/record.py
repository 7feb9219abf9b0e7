"""The job record: the spec plus everything the cluster learned about the job.

The record is what the API returns, what the store persists and what travels back
from executor to origin. Its JSON form is the public contract (``issues show 2``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState, check_transition

#: Text of stdout/stderr kept inside the JSON record; the raw bytes come from /result.
RECORD_TEXT_BYTES = 64 * 1024


def record_text(data: bytes) -> tuple[str, bool]:
    """The record's text of an output stream: its first RECORD_TEXT_BYTES as UTF-8
    with replacement; and whether that is only the first part of ``data``."""
    return data[:RECORD_TEXT_BYTES].decode("utf-8", "replace"), len(data) > RECORD_TEXT_BYTES


@dataclass(slots=True)
class JobResult:
    exit_code: int | None
    reason: str
    stdout: str = ""
    stderr: str = ""
    # Two ways a stream can be cut. ``stdout_truncated``: the sandbox cut stdout at the
    # job's ``stdout_bytes`` (the rest is lost). ``stdout_in_record_truncated``: this
    # record's text is the first RECORD_TEXT_BYTES only (all of it is at /result).
    # ``stderr_truncated`` is set for either cut of stderr, as it was before the second
    # flag existed (readers take it to mean the text is not all there is);
    # ``stderr_in_record_truncated`` says the record cut it (all of it is at /output).
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_in_record_truncated: bool = False
    stderr_in_record_truncated: bool = False
    cpu_ms: float = 0.0
    peak_mem_bytes: int = 0
    output_sha256: str = ""
    # Bytes of the whole stdout, as /result serves it and output_sha256 hashes it. None:
    # not known, in a result stored before the field existed.
    output_bytes: int | None = 0
    limit_hit: str | None = None
    signal: int | None = None
    warnings: list[str] = field(default_factory=list)
    attestation: dict[str, Any] | None = None
    # name -> {"size": bytes, "sha256": hex}: the files the spec's ``artifacts`` named that
    # the job wrote; the bytes are at /v1/jobs/{id}/result?artifact=NAME
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code, "reason": self.reason, "stdout": self.stdout, "stderr": self.stderr,
            "stdout_truncated": self.stdout_truncated, "stderr_truncated": self.stderr_truncated,
            "stdout_in_record_truncated": self.stdout_in_record_truncated,
            "stderr_in_record_truncated": self.stderr_in_record_truncated,
            "cpu_ms": round(self.cpu_ms, 3), "peak_mem_bytes": self.peak_mem_bytes,
            "output_sha256": self.output_sha256, "output_bytes": self.output_bytes, "limit_hit": self.limit_hit,
            "signal": self.signal, "warnings": list(self.warnings), "attestation": self.attestation,
            "artifacts": {name: dict(a) for name, a in self.artifacts.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobResult:
        res = cls(**{k: d[k] for k in cls.__slots__ if k in d})  # type: ignore[attr-defined]
        if "output_bytes" not in d:
            # Stored, or sent by an executor, before these fields existed. A text as long
            # as a record holds may have been cut: say so, and a reader fetches the whole.
            res.output_bytes = None
            res.stdout_in_record_truncated = len(res.stdout.encode()) >= RECORD_TEXT_BYTES
            res.stderr_in_record_truncated = res.stderr_truncated and len(res.stderr.encode()) >= RECORD_TEXT_BYTES
        return res


@dataclass(slots=True)
class JobRecord:
    id: str
    spec: JobSpec
    origin: str
    state: JobState = JobState.SUBMITTED
    executor: str | None = None
    route: list[str] = field(default_factory=list)
    cost: float = 0.0
    hops: int = 0
    attempts: int = 0
    timeline: list[dict[str, Any]] = field(default_factory=list)
    result: JobResult | None = None
    wait_reason: str | None = None
    created_at: float = 0.0
    seq: int = 0  # arrival order at this agent, for FIFO within a tenant
    # Where an executor sends the result: the origin's transfer address. Empty at the origin.
    origin_transfer: str = ""
    # The tenant's signed envelope, kept so every hop can verify the job on its own.
    auth: dict[str, Any] | None = None
    # Results that arrived after the first final one: recorded, never applied.
    duplicates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    @property
    def runtime(self) -> str:
        return self.spec.runtime

    def advance(self, state: JobState, at: float, node: str, detail: str = "") -> None:
        """Move to ``state``, stamping the timeline; raises IllegalTransition on a bug."""
        check_transition(self.id, self.state, state)
        self.state = state
        self.timeline.append({"state": state.value, "at": at, "node": node, "detail": detail})
        if state.final:
            self.wait_reason = None  # an ended job waits for nothing (an offer's reason could linger)

    def as_dict(self, *, include_spec: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "state": self.state.value, "tenant": self.tenant, "runtime": self.runtime,
            "origin": self.origin, "executor": self.executor, "route": list(self.route), "cost": self.cost,
            "hops": self.hops, "attempts": self.attempts, "timeline": list(self.timeline),
            "result": self.result.as_dict() if self.result else None, "wait_reason": self.wait_reason,
            "priority": self.spec.priority, "created_at": self.created_at,
        }
        if self.spec.labels:
            d["labels"] = dict(self.spec.labels)
        if self.duplicates:
            d["duplicate_attempts"] = list(self.duplicates)
        if include_spec:
            d["spec"] = self.spec.model_dump(mode="json", exclude={"module"})
        return d
