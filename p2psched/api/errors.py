"""Turning bad input into 4xx answers that name the field and the fix."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def field_errors(e: ValidationError, *, prefix: str = "") -> list[dict[str, str]]:
    out = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after[_runtime_fields(), JobSpec]",))
        field = (prefix + loc) if loc else (prefix.rstrip(".") or "(body)")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling (see /openapi.json)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append({"field": field, "message": msg})
    return out


def error_body(status: int, reason: str, message: str, details: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"status": status, "reason": reason, "message": message}}
    if details:
        body["error"]["fields"] = details
    return body
