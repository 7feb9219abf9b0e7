"""Errors the agent raises to the API layer; each maps to one HTTP status."""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)


def first_of(error: BaseException, kind: type[_E]) -> _E | None:
    """``error`` if it is a ``kind``, else the first ``kind`` in it when it is a
    (nested) exception group, as trio's nurseries wrap what their tasks raise."""
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for sub in error.exceptions:
            found = first_of(sub, kind)
            if found is not None:
                return found
    return None


class AgentError(Exception):
    status = 400
    reason = "bad_request"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None,
                 retry_after: float | None = None, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        if status:
            self.status = status
        self.retry_after = retry_after
        self.details = details or []


class NotFound(AgentError):
    status = 404
    reason = "not_found"


class Conflict(AgentError):
    status = 409
    reason = "conflict"


class QueueFull(AgentError):
    status = 429
    reason = "queue_full"


class Unavailable(AgentError):
    status = 503
    reason = "shutting_down"


class StartupError(RuntimeError):
    """The agent cannot start as configured; the message says which setting and why."""
