"""Admission: may this job be queued here? A sans-IO checker; ``now`` and usage come in.

Public interface (one ``Admission`` per agent)::

    adm = Admission(nonces=SQLiteNonceStore(data_dir / "nonces.db"),   # or MemoryNonceStore()
                    rejections=agent.metrics.admission_rejections)
    #   rejections: an existing prometheus Counter labelled by ``reason``; or pass
    #   metrics=CollectorRegistry to have Admission create p2psched_admission_rejections_total.

    # POST /v1/jobs, before the job is stored or queued:
    spec, auth = parse_submission(body)                    # signing.py
    admitted = adm.admit(spec, auth, registry=holder.registry if holder else None,
                         job_id=job_id, usage=tenant_usage, now=time.time())
    #   -> Admitted(tenant, duplicate, network, open) or raises AdmissionError
    #      (.status 401/403/409/429, .reason, .message, .retry_after; .to_json() is the body)
    #   duplicate=True: this exact job id was already admitted with this envelope
    #   (a client or peer retry): answer with the existing job, do not queue it again.

    # A job forwarded by a peer (transfer), with the envelope it arrived with:
    adm.admit(spec, auth, registry=..., job_id=job_id, usage=None, now=..., forwarded=True)

    # Every other API request (reads, cancels):
    principal = adm.authenticate(method, raw_path, body, headers.get("authorization"),
                                 registry=..., now=...)       # request_auth.Principal

Rules:

* ``registry=None`` is the open single-tenant mode (no ``--tenants``): everything is
  admitted, unsigned or not; the agent says so at start-up.
* ``job_id`` is the id the agent will store the job under, decided before admission
  (if the client chose ``spec.id``, the id derived from it, so that a retry maps to the
  same job). The nonce is bound to it: the same envelope under another job id is a
  replay (409); under the same job id it is a duplicate delivery.
* ``usage`` is the tenant's use of the cluster *before* this job: its unfinished jobs
  (queued or running) summed over all agents as gossip reports them, each job counted
  once, at the agent that holds it. ``TenantUsage.sum(...)`` adds per-agent counts.
  Gossip is seconds stale, so two agents admitting at the same moment can overshoot a
  quota by the jobs admitted in that window; quotas are a fairness bound, not a lock.
* Forwarded jobs are checked again for signature, hashes, time (with the forward
  window), nonce binding and capabilities, but not for quota or rate: the origin
  counted them once, and counting again would charge the tenant twice.
* Checks run in order: authentication (401), nonce (409), capabilities (403), quota
  (429/403), rate (429). Only a request that passes all of them consumes a rate token
  and binds its nonce, so a refused request can be retried unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from p2psched.jobs.spec import JobSpec
from p2psched.security.errors import REASONS, AdmissionError
from p2psched.security.nonces import MemoryNonceStore, NonceStore
from p2psched.security.request_auth import Principal, verify_http_request
from p2psched.security.signing import (
    CLOCK_SKEW_S,
    FORWARD_WINDOW_S,
    MAX_TTL_S,
    Auth,
    verify_request,
)
from p2psched.security.tenants import RateLimit, Tenant, TenantRegistry


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """One tenant's unfinished jobs (queued or running) and what they reserve."""

    jobs: int = 0
    queued: int = 0
    cpu: float = 0.0
    mem_mb: int = 0
    gpu_slots: int = 0

    def __add__(self, other: TenantUsage) -> TenantUsage:
        return TenantUsage(self.jobs + other.jobs, self.queued + other.queued, self.cpu + other.cpu,
                           self.mem_mb + other.mem_mb, self.gpu_slots + other.gpu_slots)

    @staticmethod
    def sum(parts: Iterable[TenantUsage]) -> TenantUsage:
        total = TenantUsage()
        for p in parts:
            total = total + p
        return total


@dataclass(slots=True)
class TokenBucket:
    """Classic token bucket; ``take`` returns 0 when allowed, else seconds until it would be."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, limit: RateLimit, now: float) -> TokenBucket:
        return cls(limit.per_second, float(limit.burst), float(limit.burst), now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_time(self, now: float, n: float = 1.0) -> float:
        self._refill(now)
        return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate

    def take(self, now: float, n: float = 1.0) -> float:
        wait = self.wait_time(now, n)
        if wait == 0.0:
            self.tokens -= n
        return wait

    def retune(self, limit: RateLimit) -> None:
        """Apply a reloaded registry's rate without refilling the bucket."""
        self.rate = limit.per_second
        self.burst = float(limit.burst)
        self.tokens = min(self.tokens, self.burst)


@dataclass(frozen=True, slots=True)
class Admitted:
    tenant: str
    duplicate: bool = False  # same job id, same envelope, already admitted here
    network: bool = False  # the job asked for, and its tenant holds, the network capability
    open: bool = False  # no registry: open single-tenant mode
    auth: Auth | None = None  # keep with the job; forward it unchanged


@dataclass
class Admission:
    nonces: NonceStore = field(default_factory=MemoryNonceStore)
    metrics: CollectorRegistry | None = None
    rejections: Any = None  # a Counter with one label, the reason
    clock_skew_s: int = CLOCK_SKEW_S
    max_ttl_s: int = MAX_TTL_S
    forward_window_s: int = FORWARD_WINDOW_S
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False)
    def __post_init__(self) -> None:
        if self.rejections is None and self.metrics is not None:
            self.rejections = Counter(
                "p2psched_admission_rejections", "Requests refused by admission, by reason.",
                ["reason"], registry=self.metrics,
            )
            for reason in REASONS:  # show every reason at 0, so a dashboard can rate() from the start
                self.rejections.labels(reason)

    def _reject(self, e: AdmissionError) -> AdmissionError:
        if self.rejections is not None:
            self.rejections.labels(e.reason).inc()
        return e

    def admit(
        self, spec: JobSpec, auth: Auth | dict[str, Any] | None, *, registry: TenantRegistry | None,
        job_id: str, usage: TenantUsage | None, now: float, forwarded: bool = False, module: bytes | None = None,
    ) -> Admitted:
        try:
            return self._admit(spec, auth, registry, job_id, usage, now, forwarded, module)
        except AdmissionError as e:
            raise self._reject(e) from None

    def authenticate(
        self, method: str, raw_path: str | bytes, body: bytes, authorization: str | None, *,
        registry: TenantRegistry | None, now: float,
    ) -> Principal:
        try:
            return verify_http_request(method, raw_path, body, authorization, registry, self.nonces, now,
                                       clock_skew_s=self.clock_skew_s)
        except AdmissionError as e:
            raise self._reject(e) from None

    def forbidden(self, principal: Principal, job_tenant: str, job_id: str) -> AdmissionError:
        """The error for a read or cancel of another tenant's job (counted as ``forbidden``)."""
        return self._reject(AdmissionError(
            "forbidden", f"job {job_id} belongs to another tenant; tenant {principal.tenant!r} sees only its own "
            "jobs (an admin tenant sees all)",
        ))

    def forbidden_tenant(self, principal: Principal, tenant: str) -> AdmissionError:
        """The error for a listing, count or label cancel that names another tenant
        (counted as ``forbidden``)."""
        return self._reject(AdmissionError(
            "forbidden", f"tenant {principal.tenant!r} may list, count and cancel by label only its own jobs, not "
            f"tenant {tenant!r}'s; leave the tenant out (drop --of-tenant; in the API, the tenant parameter) to "
            "cover your own, or sign as an admin tenant to cover another's",
        ))

    def _admit(
        self, spec: JobSpec, auth: Auth | dict[str, Any] | None, registry: TenantRegistry | None,
        job_id: str, usage: TenantUsage | None, now: float, forwarded: bool, module: bytes | None,
    ) -> Admitted:
        if registry is None:
            return Admitted(tenant=spec.tenant, network="network" in spec.capabilities, open=True,
                            auth=auth if isinstance(auth, Auth) else None)
        verified = verify_request(spec, auth, registry, now, forwarded=forwarded, module=module,
                                  clock_skew_s=self.clock_skew_s, max_ttl_s=self.max_ttl_s,
                                  forward_window_s=self.forward_window_s)
        a, tenant = verified.auth, verified.tenant
        prior = self.nonces.bound(a.tenant, a.nonce, now)
        if prior is not None and prior != job_id:
            raise AdmissionError(
                "replayed_nonce", f"this signed request was already accepted as job {prior}; "
                "to run the job again, sign a new request (each signature carries a fresh nonce)",
            )
        check_capabilities(tenant, spec)
        if prior is not None:
            return Admitted(tenant.name, duplicate=True, network="network" in spec.capabilities, auth=a)
        if not forwarded:
            check_quota(tenant, spec, usage or TenantUsage())
            bucket = self._buckets.get(tenant.name)
            if bucket is None:
                bucket = self._buckets[tenant.name] = TokenBucket.full(tenant.rate, now)
            else:
                bucket.retune(tenant.rate)
            wait = bucket.wait_time(now)
            if wait > 0:
                raise AdmissionError(
                    "rate_limited", f"tenant {tenant.name!r} may submit {tenant.rate.per_second:g} jobs/s "
                    f"(burst {tenant.rate.burst}); retry in {wait:.2f} s", retry_after=wait,
                )
        window = self.forward_window_s if forwarded else self.clock_skew_s
        self.nonces.bind(a.tenant, a.nonce, job_id, a.expires_at + window, now)
        if not forwarded:
            self._buckets[tenant.name].take(now)
        return Admitted(tenant.name, network="network" in spec.capabilities, auth=a)


def check_capabilities(tenant: Tenant, spec: JobSpec) -> None:
    """Raise AdmissionError(403) unless the tenant may run this job at all."""
    needed = {spec.runtime, *spec.capabilities}
    if spec.resources.gpu > 0:
        needed.add("gpu")
    missing = sorted(needed - tenant.capabilities)
    if missing:
        raise AdmissionError(
            "capability_missing", f"tenant {tenant.name!r} lacks the capability {', '.join(missing)} this job needs "
            f"(it holds {', '.join(sorted(tenant.capabilities)) or 'none'}); an operator grants it with "
            f"'p2psched tenant add {tenant.name} --pubkey FILE --cap {' --cap '.join(sorted(tenant.capabilities | set(missing)))} --tenants FILE'",
        )
    if spec.priority > tenant.max_priority:
        raise AdmissionError(
            "priority_too_high", f"priority {spec.priority} is above tenant {tenant.name!r}'s maximum of "
            f"{tenant.max_priority}; submit with --priority {tenant.max_priority} or lower",
        )
    for k, v in sorted(spec.labels.items()):
        if not tenant.label_allowed(k, v):
            allowed = tenant.labels or {}
            choices = allowed.get(k)
            hint = (f"allowed values for {k!r} are {', '.join(choices)}" if isinstance(choices, tuple)
                    else f"allowed label keys are {', '.join(sorted(allowed)) or 'none'}")
            raise AdmissionError(
                "label_not_allowed", f"tenant {tenant.name!r} may not use the label {k}={v}; {hint}",
            )


def check_quota(tenant: Tenant, spec: JobSpec, usage: TenantUsage) -> None:
    """Raise AdmissionError unless ``usage`` plus this job stays within the tenant's quota."""
    q, r, name = tenant.quota, spec.resources, tenant.name
    sizes = (("CPU slots", q.cpu, r.cpu, usage.cpu, "quota_cpu"),
             ("MiB of memory", q.mem_mb, r.mem_mb, usage.mem_mb, "quota_memory"),
             ("GPU slots", q.gpu_slots, r.gpu, usage.gpu_slots, "quota_gpu"))
    for noun, limit, asked, _, _ in sizes:
        if limit is not None and asked > limit:
            raise AdmissionError(
                "exceeds_quota", f"this job asks for {asked:g} {noun}, more than tenant {name!r}'s whole quota of "
                f"{limit:g}; it could never run: ask for less, or have an operator raise the quota",
            )
    if q.concurrent_jobs is not None and usage.jobs + 1 > q.concurrent_jobs:
        raise AdmissionError(
            "quota_concurrent", f"tenant {name!r} has {usage.jobs} unfinished jobs in the cluster, its quota is "
            f"{q.concurrent_jobs}; submit again when one finishes",
        )
    if q.queued_jobs is not None and usage.queued + 1 > q.queued_jobs:
        raise AdmissionError(
            "quota_queued", f"tenant {name!r} has {usage.queued} jobs waiting in the cluster, its quota is "
            f"{q.queued_jobs}; submit again when some have started",
        )
    for noun, limit, asked, used, reason in sizes:
        if limit is not None and used + asked > limit:
            raise AdmissionError(
                reason, f"tenant {name!r} holds {used:g} of its quota of {limit:g} {noun} and this job asks "
                f"for {asked:g} more; submit again when jobs finish",
            )
