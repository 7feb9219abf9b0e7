"""Signed reads and cancels: an ``Authorization`` header over the HTTP request itself.

Job submissions are authenticated by their signed envelope (signing.py); every other
API request (list, status, result, cancel, drain, ...) carries this header, so a
tenant sees and cancels only its own jobs and an admin tenant sees all.

Public interface:

* Client: ``httpx.Client(auth=TenantAuth("alice", key))`` (or ``AsyncClient``), with
  ``TenantAuth`` from ``security/client.py`` (kept there so that the agent never imports
  httpx), or ``build_auth_header(method, raw_path, body, tenant, key, now)`` for other clients.
* Agent: ``principal = verify_http_request(method, raw_path, body, authorization,
  registry, nonces, now)``, usually through ``Admission.authenticate`` which counts
  rejections. ``raw_path`` is the path and query exactly as sent, percent-encoding
  intact: in ASGI ``scope["raw_path"] + (b"?" + scope["query_string"] if it is non-empty)``.
  Then ``principal.may_access(job.tenant)`` before showing or cancelling a job (the
  agent answers a job the principal may not see exactly as a missing one: 404, and
  uncounted), and ``principal.admin`` for cluster-wide operations (403 ``forbidden``).
* Open mode (no registry): pass ``registry=None``; the result is ``OPEN_PRINCIPAL``
  (an admin), whatever the header says.

Header: ``Authorization: P2P-Ed25519 tenant=alice,key=<key id>,ts=<unix s>,nonce=<32 hex>,sig=<128 hex>``
signing ``b"p2psched/request/v1\\n" + "\\n".join([METHOD, raw_path, ts, nonce,
sha256(body) hex, tenant, key id])``. The timestamp must be within the clock skew of the
agent's clock; the nonce is remembered until then, so a captured request cannot be
sent again (harmless for a read, but a cancel should happen once).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2psched.security.errors import AdmissionError
from p2psched.security.keys import key_id, public_hex, verify_sig
from p2psched.security.nonces import NonceStore
from p2psched.security.signing import CLOCK_SKEW_S
from p2psched.security.tenants import TenantRegistry

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SCHEME = "P2P-Ed25519"
REQUEST_DOMAIN = b"p2psched/request/v1\n"
_PARAM = re.compile(r"^(tenant|key|ts|nonce|sig)=([A-Za-z0-9_.-]{1,128})$")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    admin: bool
    open: bool = False  # no registry: single-tenant mode

    def may_access(self, job_tenant: str) -> bool:
        return self.admin or self.tenant == job_tenant


OPEN_PRINCIPAL = Principal(tenant="default", admin=True, open=True)


def _as_bytes(raw_path: str | bytes) -> bytes:
    return raw_path.encode("ascii", "surrogateescape") if isinstance(raw_path, str) else raw_path


def request_message(method: str, raw_path: str | bytes, body: bytes, ts: int, nonce: str, tenant: str, kid: str) -> bytes:
    parts = [method.upper().encode(), _as_bytes(raw_path), str(ts).encode(), nonce.encode(),
             hashlib.sha256(body).hexdigest().encode(), tenant.encode(), kid.encode()]
    return REQUEST_DOMAIN + b"\n".join(parts)


def build_auth_header(
    method: str, raw_path: str | bytes, body: bytes, tenant: str, key: Ed25519PrivateKey, now: float,
    nonce: str | None = None,
) -> str:
    kid = key_id(public_hex(key))
    ts = int(now)
    nonce = nonce or secrets.token_hex(16)
    sig = key.sign(request_message(method, raw_path, body, ts, nonce, tenant, kid)).hex()
    return f"{SCHEME} tenant={tenant},key={kid},ts={ts},nonce={nonce},sig={sig}"


def parse_auth_header(value: str) -> dict[str, str]:
    scheme, _, rest = value.strip().partition(" ")
    if scheme != SCHEME:
        raise AdmissionError(
            "malformed_auth", f"the Authorization scheme is {scheme!r}; p2psched expects '{SCHEME} tenant=..,key=..,"
            "ts=..,nonce=..,sig=..' (the p2psched client and TenantAuth write it)",
        )
    params: dict[str, str] = {}
    for item in rest.split(","):
        m = _PARAM.match(item.strip())
        if not m or m.group(1) in params:
            raise AdmissionError("malformed_auth", f"the Authorization header has a bad or repeated parameter {item.strip()[:40]!r}")
        params[m.group(1)] = m.group(2)
    missing = {"tenant", "key", "ts", "nonce", "sig"} - params.keys()
    if missing:
        raise AdmissionError("malformed_auth", f"the Authorization header lacks {', '.join(sorted(missing))}")
    if not params["ts"].isdigit():
        raise AdmissionError("malformed_auth", "ts in the Authorization header must be integer Unix seconds")
    return params


def verify_http_request(
    method: str, raw_path: str | bytes, body: bytes, authorization: str | None,
    registry: TenantRegistry | None, nonces: NonceStore | None, now: float, *, clock_skew_s: int = CLOCK_SKEW_S,
) -> Principal:
    """Who sent this request; raise AdmissionError (401 or 409) if it does not prove it."""
    if registry is None:
        return OPEN_PRINCIPAL
    if not authorization:
        raise AdmissionError(
            "unsigned", "this agent requires signed requests (a tenant registry is loaded); "
            "pass --tenant NAME --key NAME.key to the p2psched client",
        )
    p = parse_auth_header(authorization)
    tenant = registry.get(p["tenant"])
    if tenant is None:
        raise AdmissionError("unknown_tenant", f"tenant {p['tenant']!r} is not in the tenant registry")
    pub = tenant.key_ids().get(p["key"])
    if pub is None:
        raise AdmissionError("unknown_key", f"key {p['key']} is not one of tenant {p['tenant']!r}'s keys; sign with a current key")
    ts = int(p["ts"])
    if not verify_sig(pub, p["sig"], request_message(method, raw_path, body, ts, p["nonce"], p["tenant"], p["key"])):
        raise AdmissionError(
            "bad_signature", "the request's signature does not match its method, path, body or header; "
            "sign the request exactly as it is sent",
        )
    if abs(now - ts) > clock_skew_s:
        reason = "expired" if ts < now else "not_yet_valid"
        raise AdmissionError(
            reason, f"the request was signed {abs(now - ts):.0f} s {'ago' if ts < now else 'in the future'}; "
            f"requests are valid for {clock_skew_s} s either side of the agent's clock; check the client's clock",
        )
    if nonces is not None:
        # "r:" keeps request nonces apart from job nonces in a shared store.
        if nonces.bound(p["tenant"], "r:" + p["nonce"], now) is not None:
            raise AdmissionError("replayed_nonce", "this signed request was already received once; sign each request anew")
        nonces.bind(p["tenant"], "r:" + p["nonce"], "", ts + clock_skew_s, now)
    return Principal(tenant=tenant.name, admin=tenant.admin)
