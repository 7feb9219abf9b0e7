"""The dashboard: one page, served by every agent at ``/ui/``, that reads the agent's
own HTTP API from the browser (jobs, their timelines and results, members and
their resource vectors, totals) and refreshes itself.

The page is static: three files under ``static/``, no build step and nothing
fetched from elsewhere. It draws everything with ``textContent``, and its Content
Security Policy allows scripts, styles and requests only from the agent itself, so a
job's output or a member's name can never run as code in it.

An agent with a tenant registry answers only signed requests; ``p2psched
dashboard`` (``proxy.py``) serves the same page locally and signs its requests
with a tenant's key.
"""

from __future__ import annotations

import functools
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from p2psched.api.errors import error_body

STATIC = Path(__file__).resolve().with_name("static")
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
        # No DOM sink takes a string (innerHTML and the like): the browser holds the page to textContent.
        "require-trusted-types-for 'script'; trusted-types 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new agent version serves its own page: browsers revalidate rather than keep an old one.
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


async def _page(request: Request) -> Response:
    name = request.path_params.get("name") or "index.html"
    media = FILES.get(name)
    if media is None:
        # Answered here, not raised: the agent and `p2psched dashboard`'s proxy both serve this.
        return JSONResponse(error_body(404, "no_such_route", f"the dashboard has no file {name!r}; open /ui/"), 404)
    return Response(_read(name), media_type=media, headers=HEADERS)


async def _to_ui(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


def routes() -> list[Route]:
    """``/`` and ``/ui`` lead to the page; ``/ui/<file>`` serves its files."""
    return [
        Route("/", _to_ui, methods=["GET"]),
        Route("/ui", _to_ui, methods=["GET"]),
        Route("/ui/", _page, methods=["GET"]),
        Route("/ui/{name}", _page, methods=["GET"]),
    ]
