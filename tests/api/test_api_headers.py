"""Every API answer tells a browser not to render it: the result and output endpoints
serve job-controlled bytes from the dashboard's origin, and a browser must neither
sniff them into HTML nor run them, directly or through `p2psched dashboard`'s proxy."""

from __future__ import annotations

import httpx

from agents import running_agent, wasm_spec
from p2psched.dashboard.proxy import create_proxy

CSP = "default-src 'none'; sandbox"


def assert_hardened(r: httpx.Response, raw_bytes: bool = False) -> None:
    what = f"{r.request.method} {r.request.url.raw_path.decode()} ({r.status_code})"
    assert r.headers.get("x-content-type-options") == "nosniff", what
    assert r.headers.get("content-security-policy") == CSP, what
    assert len(r.headers.get_list("content-security-policy")) == 1, what
    if raw_bytes:
        assert r.headers.get("content-disposition") == "attachment", what


async def test_every_api_answer_carries_the_hardening_headers(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
        assert r.status_code == 202
        assert_hardened(r)
        job_id = r.json()["id"]
        r = await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})
        assert r.json()["state"] == "succeeded"
        assert_hardened(r)
        r = await http.get(f"/v1/jobs/{job_id}/result")
        assert r.content == b"hello from p2psched\n"
        assert_hardened(r, raw_bytes=True)
        r = await http.get(f"/v1/jobs/{job_id}/output")
        assert r.content == b"hello from p2psched\n"
        assert_hardened(r, raw_bytes=True)
        answers = [
            await http.get("/v1/jobs"), await http.get("/v1/jobs:counts"), await http.get("/v1/peers"),
            await http.get("/v1/cluster"), await http.get("/v1/jobs/nope"), await http.get("/v1/jobs/nope/result"),
            await http.get("/v1/jobs", params={"limit": "x"}), await http.put("/v1/jobs"),
            await http.get("/v1/nothing"), await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")]}),
            await http.post("/v1/jobs:wait", json={"ids": [job_id]}), await http.post("/v1/jobs", content=b"{"),
            await http.get("/healthz"), await http.get("/metrics"), await http.get("/openapi.json"),
        ]
        assert [r.status_code for r in answers] == [200, 200, 200, 200, 404, 404, 400, 405, 404, 202, 200, 400,
                                                    200, 200, 200]
        for r in answers:
            assert_hardened(r)
        assert "content-disposition" not in answers[0].headers  # JSON is shown, not saved
        # The dashboard keeps its own policy: its scripts must run.
        page = await http.get("/ui/")
        assert page.status_code == 200 and "sandbox" not in page.headers["content-security-policy"]
        assert "script-src 'self'" in page.headers["content-security-policy"]


async def test_the_dashboard_proxy_passes_the_hardening_headers_on(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        job_id = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        assert (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()["state"] == "succeeded"
        proxy = create_proxy(str(http.base_url), auth=None, allowed_hosts={"proxy.test"})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://proxy.test") as via:
            r = await via.get(f"/v1/jobs/{job_id}/result")
            assert r.status_code == 200 and r.content == b"hello from p2psched\n"
            assert_hardened(r, raw_bytes=True)
            r = await via.get(f"/v1/jobs/{job_id}/output")
            assert_hardened(r, raw_bytes=True)
            for r in (await via.get(f"/v1/jobs/{job_id}"), await via.get("/v1/jobs/nope")):
                assert_hardened(r)
