"""Signed reads and cancels, over a real HTTP server and a real httpx client."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from p2psched.security.admission import Admission
from p2psched.security.errors import AdmissionError
from p2psched.security.nonces import MemoryNonceStore
from p2psched.security.client import TenantAuth
from p2psched.security.request_auth import OPEN_PRINCIPAL, build_auth_header, verify_http_request
from security_helpers import NOW, TenantKeys, registry


@pytest.fixture
def keys() -> TenantKeys:
    return TenantKeys()


def raw_target(scope: dict[str, Any]) -> bytes:
    """The request target as sent, the way docs tell the integrator to build it."""
    qs = scope.get("query_string", b"")
    return scope["raw_path"] + (b"?" + qs if qs else b"")


def make_app(keys: TenantKeys, adm: Admission) -> Starlette:
    jobs = {"a-1": "alice", "b-1": "bob"}
    reg = registry(keys)

    async def guarded(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            who = adm.authenticate(request.method, raw_target(request.scope), body,
                                   request.headers.get("authorization"), registry=reg, now=time.time())
            job_id = request.path_params.get("job_id")
            if job_id is not None and not who.may_access(jobs[job_id]):
                raise adm.forbidden(who, jobs[job_id], job_id)
        except AdmissionError as e:
            return JSONResponse(e.to_json(), status_code=e.status)
        visible = [j for j, t in jobs.items() if who.may_access(t)]
        return JSONResponse({"tenant": who.tenant, "jobs": visible, "query": dict(request.query_params)})

    return Starlette(routes=[
        Route("/v1/jobs", guarded, methods=["GET"]),
        Route("/v1/jobs/{job_id}", guarded, methods=["GET", "DELETE"]),
        Route("/v1/drain", guarded, methods=["POST"]),
    ])


async def test_tenants_see_and_cancel_only_their_own_jobs_over_http(keys: TenantKeys) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    adm = Admission()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, make_app(keys, adm), config)  # type: ignore[arg-type]
        url = binds[0]
        async with httpx.AsyncClient(base_url=url, auth=TenantAuth("alice", keys.key("alice"))) as alice, \
                httpx.AsyncClient(base_url=url, auth=TenantAuth("root", keys.key("root"))) as root, \
                httpx.AsyncClient(base_url=url) as anonymous:
            r = await alice.get("/v1/jobs", params={"state": "queued", "q": "a b&c"})
            assert r.status_code == 200, r.text
            assert r.json() == {"tenant": "alice", "jobs": ["a-1"], "query": {"state": "queued", "q": "a b&c"}}
            assert (await alice.get("/v1/jobs/a-1")).status_code == 200
            assert (await alice.delete("/v1/jobs/a-1")).status_code == 200
            r = await alice.delete("/v1/jobs/b-1")
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
            r = await root.get("/v1/jobs")
            assert r.json()["jobs"] == ["a-1", "b-1"]  # the admin sees every tenant's jobs
            assert (await root.delete("/v1/jobs/b-1")).status_code == 200
            r = await alice.post("/v1/drain", content=b'{"why": "maintenance"}')
            assert r.status_code == 200
            r = await anonymous.get("/v1/jobs")
            assert r.status_code == 401 and r.json()["error"] == "unsigned"

            # A captured request sent again is refused, even though its signature is valid.
            captured = alice.build_request("DELETE", "/v1/jobs/a-1")
            captured = next(TenantAuth("alice", keys.key("alice")).auth_flow(captured))
            first = await anonymous.send(captured)
            again = await anonymous.send(captured)
            assert first.status_code == 200
            assert again.status_code == 409 and again.json()["error"] == "replayed_nonce"

            # The signature covers the path and query: pointing it at another job fails.
            signed = alice.build_request("GET", "/v1/jobs/a-1")
            signed = next(TenantAuth("alice", keys.key("alice")).auth_flow(signed))
            moved = anonymous.build_request("GET", "/v1/jobs/b-1", headers={"Authorization": signed.headers["Authorization"]})
            r = await anonymous.send(moved)
            assert r.status_code == 401 and r.json()["error"] == "bad_signature"
        nursery.cancel_scope.cancel()


def test_header_checks(keys: TenantKeys) -> None:
    reg = registry(keys)
    nonces = MemoryNonceStore()

    def check(header: str | None, *, method: str = "GET", path: str = "/v1/jobs", body: bytes = b"",
              now: float = NOW) -> str:
        try:
            return verify_http_request(method, path, body, header, reg, nonces, now).tenant
        except AdmissionError as e:
            return e.reason

    good = build_auth_header("DELETE", "/v1/jobs/x", b"", "alice", keys.key("alice"), NOW)
    assert check(good, method="DELETE", path="/v1/jobs/x") == "alice"
    assert check(good, method="DELETE", path="/v1/jobs/x") == "replayed_nonce"
    assert check(build_auth_header("GET", "/v1/jobs", b"", "alice", keys.key("alice"), NOW), method="POST") == "bad_signature"
    assert check(build_auth_header("POST", "/v1/drain", b"a", "alice", keys.key("alice"), NOW),
                 method="POST", path="/v1/drain", body=b"b") == "bad_signature"
    assert check(build_auth_header("GET", "/v1/jobs", b"", "alice", keys.key("alice"), NOW - 61)) == "expired"
    assert check(build_auth_header("GET", "/v1/jobs", b"", "alice", keys.key("alice"), NOW + 61)) == "not_yet_valid"
    assert check(build_auth_header("GET", "/v1/jobs", b"", "zoe", keys.key("zoe"), NOW)) == "unknown_tenant"
    assert check(build_auth_header("GET", "/v1/jobs", b"", "alice", keys.key("bob"), NOW)) == "unknown_key"
    assert check(None) == "unsigned"
    assert check("Bearer abc") == "malformed_auth"
    assert check("P2P-Ed25519 tenant=alice,key=1") == "malformed_auth"
    assert check(good.replace("tenant=alice", "tenant=alice,tenant=bob")) == "malformed_auth"
    # Open mode: no registry, every caller is the single (admin) tenant.
    assert verify_http_request("GET", "/", b"", None, None, nonces, NOW) is OPEN_PRINCIPAL
