"""Every reason admission can refuse a request for, with its HTTP status.

The reason is the label of ``p2psched_admission_rejections_total{reason}`` and the
``reason`` field of the API's error body; the message is the sentence for the person.

Status choice: 401 when the request does not prove who sent it or what they sent
(signature, key, time window, content hashes); 403 when it does, but the tenant may
not do this; 409 when it is a replay; 429 when it is allowed in principle but not now
(quota, rate): retrying later can succeed.
"""

from __future__ import annotations

REASONS: dict[str, int] = {
    "unsigned": 401,  # a registry is loaded and the request carries no signature
    "malformed_auth": 401,  # the auth block or header does not parse
    "unknown_tenant": 401,
    "unknown_key": 401,  # key id not among the tenant's keys (removed or rotated)
    "bad_signature": 401,  # the signature does not cover what was received
    "expired": 401,
    "not_yet_valid": 401,  # issued in the future beyond the allowed clock skew
    "ttl_too_long": 401,
    "module_hash_mismatch": 401,  # module bytes are not the ones the tenant signed
    "input_hash_mismatch": 401,
    "tenant_mismatch": 403,  # spec.tenant differs from the signing tenant
    "capability_missing": 403,
    "priority_too_high": 403,
    "label_not_allowed": 403,
    "exceeds_quota": 403,  # the job alone is larger than the tenant's quota: it can never run
    "forbidden": 403,  # a listing or count of another tenant's jobs (a job of another tenant
    # is answered 404, as a missing one is, and not counted: see Agent.get)
    "replayed_nonce": 409,
    "quota_concurrent": 429,
    "quota_queued": 429,
    "quota_cpu": 429,
    "quota_memory": 429,
    "quota_gpu": 429,
    "rate_limited": 429,
    "nonce_cache_full": 429,
}


class AdmissionError(Exception):
    """A refused request: ``status`` for HTTP, ``reason`` for metrics, ``message`` for people."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown admission reason {reason!r}; add it to REASONS")
        super().__init__(message)
        self.reason = reason
        self.status = REASONS[reason]
        self.message = message
        self.retry_after = retry_after  # seconds, for a Retry-After header on 429

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.reason, "status": self.status, "message": self.message}
        if self.retry_after is not None:
            body["retry_after"] = round(self.retry_after, 3)
        return body

    def __repr__(self) -> str:
        return f"AdmissionError({self.status}, {self.reason!r}, {self.message!r})"
