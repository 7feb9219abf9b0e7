"""Signed job requests: what the client signs, and the first check an agent makes.

Public interface:

* Client: ``env = sign_spec(spec, tenant, private_key, now=time.time())`` then
  ``POST /v1/jobs`` with body ``env.to_json()``::

      {"spec": {...JobSpec JSON...},
       "auth": {"v": 1, "tenant": "alice", "key_id": "9f2c...", "nonce": "<32 hex>",
                "issued_at": 1700000000, "expires_at": 1700000300,
                "module_sha256": "<hex or null>", "input_sha256": "<hex>",
                "signature": "<128 hex>"}}

  An unsigned submission is ``{"spec": {...}}`` (or the bare spec); the agent answers
  it with 401 ``unsigned`` whenever a tenant registry is loaded.
* Agent: ``Auth.from_json(body["auth"])`` and ``verify_request(spec, auth, registry,
  now)``; normally through ``Admission.admit`` (admission.py), which adds the nonce,
  capability, quota and rate checks. Forwarded jobs carry ``auth.to_json()`` next to
  the spec unchanged, so the next hop runs the same verification on its own.

What is signed: ``b"p2psched/job/v1\\n"`` followed by the canonical JSON (keys.py) of
``{tenant, key_id, nonce, issued_at, expires_at, module_sha256, input_sha256, job}``
where ``job`` is ``spec.model_dump(mode="json", exclude={"module", "input"},
exclude_defaults=True)``: every field of the spec (id, runtime, command, args, env,
resources, limits, priority, capabilities, labels, ...) except the two byte blobs,
which are covered by their sha256 instead. Module bytes can therefore travel
separately (or be fetched from an agent's store by hash) without re-signing.
Leaving defaults out keeps a signature valid across agent versions that add a field
with a default; a changed default changes meaning, and then a mismatch is right.
Times are integer Unix seconds.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from p2psched.jobs.spec import SHA256_RE, JobSpec
from p2psched.security.errors import AdmissionError
from p2psched.security.keys import canonical_json, key_id, public_hex, verify_sig
from p2psched.security.tenants import Tenant, TenantRegistry

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ENVELOPE_VERSION = 1
JOB_DOMAIN = b"p2psched/job/v1\n"

#: 5 minutes: room for clock skew and a slow upload of a 64 MiB module, yet short, since
#: every unexpired nonce is held in memory to refuse replays (AWS SigV4 uses 5 minutes).
DEFAULT_TTL_S = 300
#: Longest lifetime an agent accepts; a longer one would make the nonce cache hold
#: entries for longer than any client needs.
MAX_TTL_S = 3600
#: Clocks of clients and agents may disagree this much (NTP keeps them within ~0.1 s;
#: Kerberos tolerates 5 minutes; a minute covers a laptop that slept).
CLOCK_SKEW_S = 60
#: A job can wait in its origin's queue for capacity; it stays forwardable this long
#: after its request expired. Past it, the job runs where it waits (see docs/security.md).
FORWARD_WINDOW_S = 3600


@dataclass(frozen=True, slots=True)
class Auth:
    tenant: str
    key_id: str
    nonce: str
    issued_at: int
    expires_at: int
    module_sha256: str | None
    input_sha256: str
    signature: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "v": ENVELOPE_VERSION, "tenant": self.tenant, "key_id": self.key_id, "nonce": self.nonce,
            "issued_at": self.issued_at, "expires_at": self.expires_at,
            "module_sha256": self.module_sha256, "input_sha256": self.input_sha256, "signature": self.signature,
        }

    @classmethod
    def from_json(cls, d: Any) -> Auth:
        """Parse an auth block, or raise AdmissionError(401, malformed_auth)."""
        if not isinstance(d, dict):
            raise AdmissionError("malformed_auth", "'auth' must be an object; sign the request with 'p2psched submit --tenant NAME --key FILE'")
        if d.get("v", ENVELOPE_VERSION) != ENVELOPE_VERSION:
            raise AdmissionError("malformed_auth", f"auth version {d.get('v')!r} is not supported; this agent speaks version {ENVELOPE_VERSION}")
        try:
            a = cls(
                tenant=_str(d, "tenant", 64), key_id=_str(d, "key_id", 16), nonce=_str(d, "nonce", 64),
                issued_at=_int(d, "issued_at"), expires_at=_int(d, "expires_at"),
                module_sha256=None if d.get("module_sha256") is None else _str(d, "module_sha256", 64),
                input_sha256=_str(d, "input_sha256", 64), signature=_str(d, "signature", 128),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AdmissionError("malformed_auth", f"the auth block is malformed: {e}; sign with 'p2psched submit --tenant NAME --key FILE'") from None
        for name in ("module_sha256", "input_sha256"):
            v = getattr(a, name)
            if v is not None and not SHA256_RE.match(v):
                raise AdmissionError("malformed_auth", f"auth.{name} must be 64 lowercase hex digits")
        return a


def _str(d: dict[str, Any], k: str, max_len: int) -> str:
    if k not in d:
        raise ValueError(f"auth.{k} is missing")
    v = d[k]
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise ValueError(f"auth.{k} must be a string of 1 to {max_len} characters")
    return v


def _int(d: dict[str, Any], k: str) -> int:
    if k not in d:
        raise ValueError(f"auth.{k} is missing")
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v < 2**40):
        raise ValueError(f"auth.{k} must be an integer number of Unix seconds")
    return v


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    spec: JobSpec
    auth: Auth

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(mode="json"), "auth": self.auth.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SignedEnvelope:
        """Parse ``{"spec", "auth"}``; a bad spec raises pydantic's ValidationError (a 422)."""
        spec = JobSpec.model_validate(d["spec"])
        return cls(spec, Auth.from_json(d.get("auth")))


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    tenant: Tenant
    auth: Auth


def signing_payload(spec: JobSpec, auth: Auth) -> bytes:
    job = spec.model_dump(mode="json", exclude={"module", "input"}, exclude_defaults=True)
    body = {
        "tenant": auth.tenant, "key_id": auth.key_id, "nonce": auth.nonce,
        "issued_at": auth.issued_at, "expires_at": auth.expires_at,
        "module_sha256": auth.module_sha256, "input_sha256": auth.input_sha256, "job": job,
    }
    return JOB_DOMAIN + canonical_json(body)


def sign_spec(
    spec: JobSpec, tenant: str, private_key: Ed25519PrivateKey, now: float,
    ttl: int = DEFAULT_TTL_S, nonce: str | None = None,
) -> SignedEnvelope:
    """Sign ``spec`` as ``tenant``. The spec's tenant is set to ``tenant`` if left at the default."""
    if spec.tenant != tenant:
        if spec.tenant != "default":
            raise ValueError(f"the spec names tenant {spec.tenant!r} but is being signed as {tenant!r}")
        spec = spec.model_copy(update={"tenant": tenant})
    if not 1 <= ttl <= MAX_TTL_S:
        raise ValueError(f"ttl must be 1..{MAX_TTL_S} seconds; agents refuse longer-lived requests")
    issued = int(now)
    auth = Auth(
        tenant=tenant, key_id=key_id(public_hex(private_key)), nonce=nonce or secrets.token_hex(16),
        issued_at=issued, expires_at=issued + ttl, module_sha256=spec.module_sha256,
        input_sha256=hashlib.sha256(spec.input).hexdigest(),
    )
    sig = private_key.sign(signing_payload(spec, auth)).hex()
    return SignedEnvelope(spec, Auth(**{**_fields(auth), "signature": sig}))


def _fields(a: Auth) -> dict[str, Any]:
    return {k: getattr(a, k) for k in Auth.__slots__}


def verify_request(
    spec: JobSpec, auth: Auth | dict[str, Any] | None, registry: TenantRegistry, now: float, *,
    forwarded: bool = False, module: bytes | None = None,
    clock_skew_s: int = CLOCK_SKEW_S, max_ttl_s: int = MAX_TTL_S, forward_window_s: int = FORWARD_WINDOW_S,
) -> VerifiedRequest:
    """Check who signed ``spec`` and that it arrived as signed; raise AdmissionError.

    ``module``: the module's bytes when they did not come inside the spec (fetched by
    hash from the agent's store or a peer); checked against the signed hash.
    ``forwarded``: the job was accepted by another agent and forwarded here; its request
    may have expired while it waited, so it is accepted until ``expires_at +
    forward_window_s``. Nonce, capability, quota and rate checks are in admission.py.
    """
    if auth is None:
        raise AdmissionError(
            "unsigned", "this agent requires signed requests (a tenant registry is loaded); "
            "submit with 'p2psched submit --tenant NAME --key NAME.key'",
        )
    if not isinstance(auth, Auth):
        auth = Auth.from_json(auth)
    tenant = registry.get(auth.tenant)
    if tenant is None:
        raise AdmissionError(
            "unknown_tenant", f"tenant {auth.tenant!r} is not in the tenant registry; "
            f"an operator adds it with 'p2psched tenant add {auth.tenant} --pubkey {auth.tenant}.pub --cap wasm --tenants FILE'",
        )
    pub = tenant.key_ids().get(auth.key_id)
    if pub is None:
        raise AdmissionError(
            "unknown_key", f"key {auth.key_id} is not one of tenant {auth.tenant!r}'s keys (it may have been "
            "rotated out); sign with a current key or ask an operator to add its .pub file",
        )
    # Hashes before the signature: a module altered in transit then gets the precise
    # reason. It leaks nothing, since the declared hashes travel in the clear anyway.
    _check_hashes(spec, auth, module)
    if not verify_sig(pub, auth.signature, signing_payload(spec, auth)):
        raise AdmissionError(
            "bad_signature", f"the signature of tenant {auth.tenant!r} does not match this job: the spec, "
            "its hashes or its times changed after signing (or it was signed with another key); sign it again",
        )
    if spec.tenant != auth.tenant:  # covered by the signature too; this names the problem precisely
        raise AdmissionError("tenant_mismatch", f"the spec names tenant {spec.tenant!r} but tenant {auth.tenant!r} signed it")
    if auth.expires_at <= auth.issued_at:
        raise AdmissionError("malformed_auth", "expires_at must be after issued_at")
    if auth.expires_at - auth.issued_at > max_ttl_s:
        raise AdmissionError(
            "ttl_too_long", f"the request is valid for {auth.expires_at - auth.issued_at} s; "
            f"agents accept at most {max_ttl_s} s; sign with a shorter --ttl",
        )
    if auth.issued_at > now + clock_skew_s:
        raise AdmissionError(
            "not_yet_valid", f"the request was issued {auth.issued_at - now:.0f} s in the future; "
            f"clocks may differ by {clock_skew_s} s at most; check the client's clock (NTP)",
        )
    deadline = auth.expires_at + (forward_window_s if forwarded else 0)
    if now > deadline:
        what = f"it expired {now - auth.expires_at:.0f} s ago"
        if forwarded:
            what += f", beyond the {forward_window_s} s a waiting job stays forwardable"
        raise AdmissionError("expired", f"the signed request is no longer valid: {what}; sign and submit it again")
    return VerifiedRequest(tenant, auth)


def _check_hashes(spec: JobSpec, auth: Auth, module: bytes | None) -> None:
    if spec.module_sha256 != auth.module_sha256:
        raise AdmissionError(
            "module_hash_mismatch", f"the spec declares module {spec.module_sha256} but the tenant signed "
            f"{auth.module_sha256}; submit the module that was signed",
        )
    for blob in (spec.module, module):
        if blob is not None:
            got = hashlib.sha256(blob).hexdigest()
            if got != auth.module_sha256:
                raise AdmissionError(
                    "module_hash_mismatch", f"the module's bytes hash to {got} but the tenant signed "
                    f"{auth.module_sha256}; the module was altered or is not the one signed",
                )
    got = hashlib.sha256(spec.input).hexdigest()
    if got != auth.input_sha256:
        raise AdmissionError(
            "input_hash_mismatch", f"the input hashes to {got} but the tenant signed {auth.input_sha256}; "
            "the input was altered or is not the one signed",
        )


def parse_submission(body: Any) -> tuple[JobSpec, Auth | None]:
    """Split a ``POST /v1/jobs`` body into spec and auth (None when unsigned).

    Accepts ``{"spec": ..., "auth": ...}``, ``{"spec": ...}`` and a bare spec. A bad
    spec raises pydantic's ValidationError (answer 422); a bad auth block raises
    AdmissionError(401, malformed_auth).
    """
    if isinstance(body, dict) and "spec" in body:
        spec = JobSpec.model_validate(body["spec"])
        raw = body.get("auth")
        return spec, None if raw is None else Auth.from_json(raw)
    return JobSpec.model_validate(body), None


__all__ = [
    "Auth", "SignedEnvelope", "VerifiedRequest", "sign_spec", "verify_request", "signing_payload",
    "parse_submission", "AdmissionError", "ValidationError", "DEFAULT_TTL_S", "MAX_TTL_S", "CLOCK_SKEW_S",
    "FORWARD_WINDOW_S",
]
