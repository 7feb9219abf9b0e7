"""What the p2psched client needs to act as a tenant: sign submissions and requests.

Public interface (used by ``p2psched/cli/client.py``):

* ``sign_submission(spec: dict, tenant, key_path_or_key, now=None, ttl=DEFAULT_TTL_S) -> dict``:
  the ``POST /v1/jobs`` body ``{"spec": ..., "auth": ...}`` for a spec given as JSON
  data (bytes as base64, as the API takes them).
* ``TenantAuth(tenant, key)``: an ``httpx.Auth`` signing each request as ``tenant``.
* ``RequestSigner(tenant, key_path).auth``: a ``TenantAuth``; pass it as
  ``httpx.Client(auth=...)`` and every request is signed over its method, its path
  *with the query string httpx builds*, and its body. ``signer.headers(method,
  raw_path, body)`` is for callers that build the final URL themselves: ``raw_path``
  must then include the query string exactly as it will be sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2psched.jobs.spec import JobSpec
from p2psched.security.keys import load_private_key
from p2psched.security.request_auth import build_auth_header
from p2psched.security.signing import DEFAULT_TTL_S, sign_spec


def sign_submission(spec: dict[str, Any], tenant: str, key_path: Path | str | Ed25519PrivateKey,
                    now: float | None = None, ttl: int = DEFAULT_TTL_S) -> dict[str, Any]:
    """Sign a JSON-form spec as ``tenant`` with the key in ``key_path`` (or the key itself,
    for callers that sign many); raises KeyFormatError or pydantic's ValidationError."""
    key = key_path if isinstance(key_path, Ed25519PrivateKey) else load_private_key(key_path)
    parsed = JobSpec.model_validate_json(json.dumps(spec))
    return sign_spec(parsed, tenant, key, time.time() if now is None else now, ttl=ttl).to_json()


class TenantAuth(httpx.Auth):
    """httpx authentication that signs each request as ``tenant`` (security/request_auth.py)."""

    requires_request_body = True

    def __init__(self, tenant: str, key: Ed25519PrivateKey) -> None:
        self.tenant = tenant
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = build_auth_header(
            request.method, request.url.raw_path, request.content, self.tenant, self.key, time.time()
        )
        yield request


class RequestSigner:
    def __init__(self, tenant: str, key_path: Path | str) -> None:
        self.tenant = tenant
        self.key = load_private_key(key_path)
        self.auth = TenantAuth(tenant, self.key)

    def headers(self, method: str, raw_path: str, body: bytes = b"") -> dict[str, str]:
        return {"Authorization": build_auth_header(method, raw_path, body, self.tenant, self.key, time.time())}
