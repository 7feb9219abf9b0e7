"""``p2psched dashboard``: the dashboard served from this machine, reading an agent
through a proxy that signs each request as a tenant.

An agent with a tenant registry answers only signed requests, and a browser holds no
tenant key. This proxy serves the same page and passes the page's reads (``GET
/healthz`` and ``/v1/...``) and cancels (``DELETE /v1/jobs/{id}``, and ``POST
/v1/jobs:cancel`` from its own page) to the agent, signed with the tenant's key. It
passes nothing else: the dashboard cannot submit jobs or drain agents.

Whoever can reach the proxy acts as that tenant, so it listens on loopback by default,
and it answers only requests addressed to the name it listens on (a page of another
site that rebinds its DNS name to 127.0.0.1 gets 403).
"""

from __future__ import annotations

from typing import Any

import httpx
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from p2psched import dashboard
from p2psched.api.errors import error_body
from p2psched.api.server import API_HEADERS, BodyTimeout, BodyTooLarge, read_limited_body

#: The largest cancel body passed on: 10,000 job ids, or labels, with room to spare.
MAX_CANCEL_BYTES = 1 << 20
#: A cancel's body (a list of ids, or labels) that sends nothing this long is cut with 408:
#: a page that stalls must not hold the proxy's connection.
CANCEL_BODY_TIMEOUT_S = 30.0
#: Response headers passed back from the agent; hop-by-hop and length headers are not.
_PASSED = ("content-type", "x-job-state", "x-job-reason", "retry-after", "x-output-next", "x-output-complete",
           "x-output-attempt", "x-output-note", "x-artifact-sha256", "x-content-type-options",
           "content-security-policy", "content-disposition")


def create_proxy(agent_url: str, *, auth: httpx.Auth | None, allowed_hosts: set[str]) -> Starlette:
    """The proxy's app: the dashboard's files, and the page's requests passed to
    ``agent_url`` signed by ``auth``, for requests to one of ``allowed_hosts``."""
    client = httpx.AsyncClient(base_url=agent_url.rstrip("/"), auth=auth, timeout=httpx.Timeout(10.0, read=60.0))

    def refused(request: Request) -> Response | None:
        if request.headers.get("host", "") in allowed_hosts:
            return None
        names = ", ".join(sorted(allowed_hosts))
        return _error(403, "wrong_host", f"this dashboard proxy answers only requests to {names}")

    async def forward(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        path = request.url.path
        if request.method == "DELETE" and not (path.startswith("/v1/jobs/") and path.count("/") == 3):
            return _error(405, "method_not_allowed", "the dashboard proxy passes only reads and job cancels")
        body = b""
        if request.method == "POST":
            if path != "/v1/jobs:cancel":
                return _error(405, "method_not_allowed", "the dashboard proxy passes only reads and job cancels")
            # A page of another site may POST here without asking first (a form, or
            # fetch in no-cors mode): only the dashboard's own page, which sends JSON
            # and names this proxy as its origin, or a client that names none, may.
            origin = request.headers.get("origin")
            if origin is not None and origin not in {f"http://{h}" for h in allowed_hosts}:
                return _error(403, "cross_site_request",
                              f"a POST from a web page at {origin} is refused: this proxy cancels jobs only for "
                              "its own dashboard page")
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return _error(415, "unsupported_media_type", "send the cancel as application/json")
            try:
                body = await read_limited_body(request, MAX_CANCEL_BYTES, CANCEL_BODY_TIMEOUT_S)
            except BodyTooLarge:
                return _error(413, "body_too_large", f"a cancel through this proxy is at most "
                                                     f"{MAX_CANCEL_BYTES} bytes; name fewer jobs")
            except BodyTimeout as e:
                return _error(408, "body_timeout", str(e).replace(
                    "raise the agent's request_body_timeout_s", "send the cancel to the agent itself"))
            except ClientDisconnect:
                return _error(400, "client_disconnected", "the page left before its cancel arrived")
        # The path as the browser sent it: the signature covers the exact bytes.
        target = request.scope.get("raw_path", path.encode()).decode("ascii", "replace")
        if request.url.query:
            target += "?" + request.url.query
        try:
            resp = await client.request(request.method, target, content=body or None,
                                        headers={"content-type": "application/json"} if body else None)
        except httpx.HTTPError as e:
            return _error(502, "agent_unreachable", f"cannot reach the agent at {agent_url}: {e}")
        headers = {k: v for k, v in resp.headers.items() if k.lower() in _PASSED}
        return Response(resp.content, status_code=resp.status_code, headers=headers)

    def guarded(endpoint: Any) -> Any:
        async def page(request: Request) -> Response:
            no = refused(request)
            return no if no is not None else await endpoint(request)

        return page

    routes = [
        Route("/healthz", forward, methods=["GET"]),
        Route("/v1/{rest:path}", forward, methods=["GET", "DELETE", "POST"]),
        *(Route(r.path, guarded(r.endpoint), methods=["GET"]) for r in dashboard.routes()),
    ]
    return Starlette(routes=routes)


def _error(status: int, reason: str, message: str) -> Response:
    return JSONResponse(error_body(status, reason, message), status, headers=API_HEADERS)


def hosts_for(host: str, port: int) -> set[str]:
    """The Host headers a browser sends to ``host:port`` (and to loopback's names for it)."""
    names = {host}
    if host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return {f"{name}:{port}" for name in names}


async def serve_proxy(app: Starlette, bind: str, *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [bind]
    config.accesslog = None
    config.graceful_timeout = 1.0
    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]
