"""Admission: capabilities, quotas, rate, replays, and the rejection metric for each reason."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from prometheus_client import CollectorRegistry

from p2psched.jobs.spec import JobSpec
from p2psched.security.admission import Admission, TenantUsage, TokenBucket
from p2psched.security.errors import REASONS, AdmissionError
from p2psched.security.nonces import MemoryNonceStore
from p2psched.security.request_auth import build_auth_header
from p2psched.security.signing import sign_spec
from p2psched.security.tenants import RateLimit
from security_helpers import NOW, TenantKeys, registry, wasm_spec


@pytest.fixture
def keys() -> TenantKeys:
    return TenantKeys()


def signed(keys: TenantKeys, spec: JobSpec | None = None, tenant: str = "alice", now: float = NOW) -> Any:
    return sign_spec(spec or wasm_spec(tenant), tenant, keys.key(tenant), now)


def refuse(adm: Admission, keys: TenantKeys, env: Any, *, usage: TenantUsage = TenantUsage(),
           job_id: str = "j", now: float = NOW, **kw: Any) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        adm.admit(env.spec, env.auth, registry=registry(keys), job_id=job_id, usage=usage, now=now, **kw)
    return info.value


def rejections(metrics: CollectorRegistry, reason: str) -> float:
    return metrics.get_sample_value("p2psched_admission_rejections_total", {"reason": reason}) or 0.0


def test_open_mode_admits_unsigned_jobs() -> None:
    got = Admission().admit(wasm_spec("default", capabilities=["network"]), None, registry=None, job_id="j",
                            usage=None, now=NOW)
    assert got.open and got.tenant == "default" and got.network


@pytest.mark.parametrize(
    ("tenant", "spec_kw", "reason", "hint"),
    [
        ("bob", {"runtime": "process", "command": ["/bin/true"], "module": None}, "capability_missing", "--cap process"),
        ("bob", {"resources": {"gpu": 1}}, "capability_missing", "--cap gpu"),
        ("alice", {"capabilities": ["network"]}, "capability_missing", "network"),
        ("alice", {"priority": 51}, "priority_too_high", "--priority 50"),
        ("alice", {"labels": {"team": "web"}}, "label_not_allowed", "ml, vision"),
        ("alice", {"labels": {"owner": "x"}}, "label_not_allowed", "team, zone"),
    ],
    ids=["process", "gpu", "network", "priority", "label-value", "label-key"],
)
def test_capabilities(keys: TenantKeys, tenant: str, spec_kw: dict[str, Any], reason: str, hint: str) -> None:
    kw = {"tenant": tenant, "input": b"hello", **spec_kw}
    if "module" not in kw:
        kw["module"] = b"\0asm\x01\0\0\0"
    e = refuse(Admission(), keys, signed(keys, JobSpec(**kw), tenant))
    assert (e.status, e.reason) == (403, reason) and hint in e.message


def test_capabilities_that_are_held_pass(keys: TenantKeys) -> None:
    adm = Admission()
    ok = adm.admit(*_pair(signed(keys, wasm_spec(labels={"team": "ml", "zone": "eu-1"}, priority=50))),
                   registry=registry(keys), job_id="j1", usage=TenantUsage(), now=NOW)
    assert ok.tenant == "alice" and not ok.network
    root = signed(keys, wasm_spec("root", capabilities=["network", "gpu"], resources={"gpu": 2}, priority=900), "root")
    ok = adm.admit(*_pair(root), registry=registry(keys), job_id="j2", usage=TenantUsage(), now=NOW)
    assert ok.network


def _pair(env: Any) -> tuple[JobSpec, Any]:
    return env.spec, env.auth


@pytest.mark.parametrize(
    ("usage", "spec_kw", "status", "reason"),
    [
        (TenantUsage(jobs=4), {}, 429, "quota_concurrent"),
        (TenantUsage(jobs=1, queued=2), {}, 429, "quota_queued"),
        (TenantUsage(jobs=1, cpu=7.5), {"resources": {"cpu": 1}}, 429, "quota_cpu"),
        (TenantUsage(jobs=1, mem_mb=4000), {"resources": {"mem_mb": 128}}, 429, "quota_memory"),
        (TenantUsage(jobs=1, gpu_slots=2), {"resources": {"gpu": 1}}, 429, "quota_gpu"),
        (TenantUsage(), {"resources": {"cpu": 9}}, 403, "exceeds_quota"),
    ],
    ids=["concurrent", "queued", "cpu", "memory", "gpu", "never-fits"],
)
def test_quotas(keys: TenantKeys, usage: TenantUsage, spec_kw: dict[str, Any], status: int, reason: str) -> None:
    reg = registry(keys)
    env = signed(keys, wasm_spec(**spec_kw))
    adm = Admission()
    with pytest.raises(AdmissionError) as info:
        adm.admit(env.spec, env.auth, registry=reg, job_id="j", usage=usage, now=NOW)
    assert (info.value.status, info.value.reason) == (status, reason)
    if reason != "exceeds_quota":  # with room left, the same request is admitted
        assert adm.admit(env.spec, env.auth, registry=reg, job_id="j", usage=TenantUsage(), now=NOW).tenant == "alice"


def test_a_quota_reached_across_two_agents(keys: TenantKeys) -> None:
    """Alice may hold 4 unfinished jobs cluster-wide; 2 run on agent A and 2 wait on agent B.

    Each agent alone is under the quota; the sum that gossip reports is not. The HTTP-level
    version of this scenario runs with real agents in the cluster tests.
    """
    on_a = TenantUsage(jobs=2, queued=0, cpu=2.0, mem_mb=512)
    on_b = TenantUsage(jobs=2, queued=1, cpu=2.0, mem_mb=512)
    adm_a, adm_b = Admission(), Admission()
    reg = registry(keys)
    for adm in (adm_a, adm_b):
        local_only = on_a if adm is adm_a else on_b
        env = signed(keys)
        assert adm.admit(env.spec, env.auth, registry=reg, job_id=f"local-{id(adm)}", usage=local_only,
                         now=NOW).tenant == "alice"
    cluster = TenantUsage.sum([on_a, on_b])
    assert cluster == TenantUsage(jobs=4, queued=1, cpu=4.0, mem_mb=1024)
    for adm in (adm_a, adm_b):
        e = refuse(adm, keys, signed(keys), usage=cluster, job_id="over")
        assert (e.status, e.reason) == (429, "quota_concurrent") and "4 unfinished jobs" in e.message
    # A finished job on B frees room on either agent.
    freed = TenantUsage.sum([on_a, TenantUsage(jobs=1, queued=1, cpu=1.0, mem_mb=256)])
    env = signed(keys)
    assert adm_a.admit(env.spec, env.auth, registry=reg, job_id="fits", usage=freed, now=NOW).tenant == "alice"


def test_forwarded_jobs_are_not_charged_again(keys: TenantKeys) -> None:
    env = signed(keys)
    full = TenantUsage(jobs=4, queued=2, cpu=8.0)
    got = Admission().admit(env.spec, env.auth, registry=registry(keys), job_id="j", usage=full, now=NOW,
                            forwarded=True)
    assert got.tenant == "alice"


def test_rate_limit_is_a_token_bucket(keys: TenantKeys) -> None:
    adm = Admission()
    reg = registry(keys)  # alice: 1/s, burst 3
    for i in range(3):
        env = signed(keys)
        adm.admit(env.spec, env.auth, registry=reg, job_id=f"j{i}", usage=TenantUsage(), now=NOW)
    env = signed(keys)
    e = refuse(adm, keys, env, job_id="j3")
    assert (e.status, e.reason) == (429, "rate_limited") and e.retry_after == pytest.approx(1.0)
    assert e.to_json()["retry_after"] == 1.0
    # The refused request did not bind its nonce: sent again once a token is back, it is admitted.
    assert adm.admit(env.spec, env.auth, registry=reg, job_id="j3", usage=TenantUsage(), now=NOW + 1.0)
    # bob has the default 10/s: his submissions do not share alice's bucket.
    bob = signed(keys, tenant="bob")
    assert adm.admit(bob.spec, bob.auth, registry=reg, job_id="b", usage=TenantUsage(), now=NOW + 1.0)


def test_a_reloaded_rate_applies_without_refilling_the_bucket() -> None:
    b = TokenBucket.full(RateLimit(per_second=1.0, burst=3), NOW)
    assert [b.take(NOW) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    b.retune(RateLimit(per_second=4.0, burst=10))
    assert b.take(NOW) == pytest.approx(0.25)
    assert b.take(NOW + 0.25) == 0.0


def test_a_replayed_request_is_refused(keys: TenantKeys) -> None:
    adm = Admission()
    reg = registry(keys)
    env = signed(keys)
    adm.admit(env.spec, env.auth, registry=reg, job_id="j1", usage=TenantUsage(), now=NOW)
    e = refuse(adm, keys, env, job_id="j2", now=NOW + 10)
    assert (e.status, e.reason) == (409, "replayed_nonce") and "already accepted as job j1" in e.message
    # The client retrying the same submission for the same job id gets that job back.
    dup = adm.admit(env.spec, env.auth, registry=reg, job_id="j1", usage=TenantUsage(jobs=4), now=NOW + 10)
    assert dup.duplicate


def test_nonce_cache_is_bounded_and_never_forgets_early(keys: TenantKeys) -> None:
    store = MemoryNonceStore(max_entries=2)
    adm = Admission(nonces=store)
    reg = registry(keys, {"bob": "[tenants.bob.rate]\nburst = 100"})
    for i in range(2):
        env = signed(keys, tenant="bob")
        adm.admit(env.spec, env.auth, registry=reg, job_id=f"j{i}", usage=TenantUsage(), now=NOW)
    env = signed(keys, tenant="bob")
    with pytest.raises(AdmissionError) as info:
        adm.admit(env.spec, env.auth, registry=reg, job_id="j2", usage=TenantUsage(), now=NOW)
    assert (info.value.status, info.value.reason) == (429, "nonce_cache_full")
    # Entries live until expiry plus clock skew (300 s + 60 s), then make room.
    fresh = signed(keys, tenant="bob", now=NOW + 361)
    assert adm.admit(fresh.spec, fresh.auth, registry=reg, job_id="j3", usage=TenantUsage(), now=NOW + 361)
    assert len(store) == 1


def _case(reason: str, keys: TenantKeys) -> tuple[Admission, Callable[[Admission], Any]]:
    """A fresh agent's admission and the one request that it must refuse for ``reason``."""
    from p2psched.security.signing import signing_payload

    reg = registry(keys)
    adm = Admission()
    env = signed(keys)
    spec, auth, usage, now, kw = env.spec, env.auth.to_json(), TenantUsage(), NOW, {}
    if reason == "unsigned":
        auth = None
    elif reason == "malformed_auth":
        auth = {"tenant": 1}
    elif reason == "unknown_tenant":
        other = sign_spec(wasm_spec("zoe"), "zoe", keys.key("zoe"), NOW)
        spec, auth = other.spec, other.auth.to_json()
    elif reason == "unknown_key":
        auth = sign_spec(spec, "alice", keys.key("alice-old"), NOW).auth.to_json()
    elif reason == "bad_signature":
        spec = spec.model_copy(update={"priority": 1})
    elif reason == "expired":
        now = NOW + 301
    elif reason == "not_yet_valid":
        now = NOW - 61
    elif reason == "ttl_too_long":
        adm.max_ttl_s = 600
        auth = sign_spec(spec, "alice", keys.key("alice"), NOW, ttl=3600).auth.to_json()
    elif reason == "module_hash_mismatch":
        kw["module"] = b"other bytes"
    elif reason == "input_hash_mismatch":
        spec = spec.model_copy(update={"input": b"other input"})
    elif reason == "tenant_mismatch":
        spec = spec.model_copy(update={"tenant": "bob"})
        auth["signature"] = keys.key("alice").sign(signing_payload(spec, env.auth)).hex()
    elif reason in ("capability_missing", "priority_too_high", "label_not_allowed", "exceeds_quota"):
        spec_kw = {"capability_missing": {"capabilities": ["network"]}, "priority_too_high": {"priority": 99},
                   "label_not_allowed": {"labels": {"x": "y"}},
                   "exceeds_quota": {"resources": {"mem_mb": 5000}}}[reason]
        other = signed(keys, wasm_spec(**spec_kw))
        spec, auth = other.spec, other.auth.to_json()
    elif reason == "replayed_nonce":
        adm.admit(spec, auth, registry=reg, job_id="first", usage=usage, now=now)
    elif reason.startswith("quota_"):
        usage = {"quota_concurrent": TenantUsage(jobs=4), "quota_queued": TenantUsage(queued=2),
                 "quota_cpu": TenantUsage(cpu=8.0), "quota_memory": TenantUsage(mem_mb=4096),
                 "quota_gpu": TenantUsage(gpu_slots=2)}[reason]
        if reason == "quota_gpu":
            other = signed(keys, wasm_spec(resources={"gpu": 1}))
            spec, auth = other.spec, other.auth.to_json()
    elif reason == "rate_limited":
        for i in range(3):
            ok = signed(keys)
            adm.admit(ok.spec, ok.auth, registry=reg, job_id=f"r{i}", usage=usage, now=now)
    elif reason == "nonce_cache_full":
        adm.nonces = MemoryNonceStore(max_entries=0)
    elif reason == "forbidden":
        header = build_auth_header("GET", "/v1/jobs/j", b"", "bob", keys.key("bob"), NOW)
        principal = adm.authenticate("GET", "/v1/jobs/j", b"", header, registry=reg, now=NOW)
        assert not principal.may_access("alice")

        def cancel_alices_job(a: Admission) -> Any:
            raise a.forbidden(principal, "alice", "j")

        return adm, cancel_alices_job
    else:
        raise AssertionError(f"no test case for the rejection reason {reason!r}; add one")
    return adm, lambda a: a.admit(spec, auth, registry=reg, job_id=f"job-{reason}", usage=usage, now=now, **kw)


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_rejection_path_answers_its_status_and_is_counted(keys: TenantKeys, reason: str) -> None:
    metrics = CollectorRegistry()
    adm, attempt = _case(reason, keys)
    adm.rejections = None
    adm.metrics = metrics
    adm.__post_init__()
    for r in REASONS:
        assert rejections(metrics, r) == 0.0  # every label exists from the start, for rate()
    with pytest.raises(AdmissionError) as info:
        attempt(adm)
    assert (info.value.reason, info.value.status) == (reason, REASONS[reason])
    assert info.value.message and info.value.to_json()["error"] == reason
    assert rejections(metrics, reason) == 1.0
    assert sum(rejections(metrics, r) for r in REASONS) == 1.0


def test_admission_can_use_the_agents_own_counter(keys: TenantKeys) -> None:
    from prometheus_client import Counter

    metrics = CollectorRegistry()
    counter = Counter("p2psched_admission_rejections", "doc", ["reason"], registry=metrics)
    adm = Admission(rejections=counter)
    with pytest.raises(AdmissionError):
        adm.admit(wasm_spec(), None, registry=registry(keys), job_id="j", usage=None, now=NOW)
    assert rejections(metrics, "unsigned") == 1.0
