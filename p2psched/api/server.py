"""The HTTP API: JSON under /v1, served by hypercorn's trio worker.

The handlers are thin: they parse and validate, call the agent, and map its errors
to statuses. Bodies are read with a hard size limit before any parsing, so an
oversized request costs the agent at most ``max_request_bytes`` of memory, and with
a deadline, so a client that stops sending one holds no connection (and no file
descriptor) open for long.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from pydantic import ValidationError
from pydantic_core import from_json, to_json
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from p2psched import dashboard
from p2psched.agent.errors import AgentError
from p2psched.api.errors import error_body, field_errors
from p2psched.api.openapi import openapi_document
from p2psched.jobs.ids import JOB_ID_RE
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState
from p2psched.jobs.store import StoreError

log = logging.getLogger("p2psched.api")

#: Batch requests carry at most this many specs: enough to amortise one HTTP round
#: trip and one fsync over many jobs, small enough to answer within a second.
MAX_BATCH = 10_000
#: Jobs a label cancel takes per request when the body names no limit.
DEFAULT_CANCEL_LIMIT = 1_000
#: Long-polls are capped so that proxies and clients with default timeouts behave.
MAX_WAIT_S = 300.0
#: label= filters one listing may carry.
MAX_LABEL_FILTERS = 8
#: Nesting pydantic-core's JSON parser takes; a job spec needs four levels.
MAX_JSON_DEPTH = 200
#: Cursors and offsets are SQLite integers (signed 64-bit).
MAX_SEQ = 1 << 63
#: A request body's average rate, bytes/s, below which it is cut with 408 once its first
#: request_body_timeout_s have passed. 16 KiB/s (128 kbit/s) still takes the largest
#: body, 96 MiB, whole (in 1.7 hours; at 1 Mbit/s it takes 13 minutes), while a client
#: that trickles bytes to hold a connection open must send this much for each one it holds.
BODY_MIN_RATE = 16 * 1024
#: hypercorn's read_timeout: how long a connection may send nothing while a request is in
#: flight. It is no deadline for a body (that is read_limited_body's, and answers 408): in
#: hypercorn 0.18's trio worker its expiry ends the reading of the connection for good and
#: tells the app the client left, though its answer is still sent. So it must exceed every
#: silence of a client that is still there: a long-poll (MAX_WAIT_S) and the answer after
#: it, a download (the client sends nothing meanwhile; a keep-alive connection reused after
#: a longer one would get no answer), and the longest request_body_timeout_s (600 s), so a
#: stalled body gets its 408 first. What is left to it is a backstop for a body read
#: without a deadline. It also cuts neither an idle connection nor one whose headers stall:
#: both stay open until keep_alive_timeout.
READ_TIMEOUT_S = 900
#: hypercorn's keep_alive_timeout: how long an idle connection is kept, and the only
#: deadline on headers that never end. hypercorn stops it while a request is in flight,
#: so a long-poll needs no more. At 305 s, connections their clients had closed but
#: hypercorn's trio worker had not noticed (CLOSE_WAIT, a fifth to most of short-lived
#: clients' here) held an fd each for five minutes: at 100 new connections a second,
#: thousands of the agent's 20,000. Long enough for a client's pool to reuse one.
KEEP_ALIVE_S = 30


#: What every answer but the dashboard's page tells a browser: take the Content-Type as
#: given (never sniff job-controlled bytes into HTML), and render, run and load nothing
#: from it, even when it is opened directly from the dashboard's origin.
API_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}
_RAW_API_HEADERS = [(k.lower().encode(), v.encode()) for k, v in API_HEADERS.items()]
#: The result and output endpoints answer a job's own bytes: a browser saves them.
ATTACHMENT = {"Content-Disposition": "attachment"}


def hardened(app: Any) -> Any:
    """``app`` with API_HEADERS added to every answer outside the dashboard's page (which
    sets its own policy). Pure ASGI, not Starlette's BaseHTTPMiddleware: it costs one
    closure a request, and errors raised past Starlette's handlers are covered too."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in ("/", "/ui") or path.startswith("/ui/"):
            await app(scope, receive, send)
            return

        async def send_hardened(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *_RAW_API_HEADERS]
            await send(message)

        await app(scope, receive, send_hardened)

    return asgi


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """A request body stopped arriving, or came too slowly; the message says which."""


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # pydantic-core's encoder: a batch's thousand records encode in a fifth of
    # json.dumps's time, and it writes UTF-8 and never the invalid NaN.
    return Response(to_json(data), status_code=status, media_type="application/json", headers=headers)


def _error(e: AgentError) -> Response:
    headers = {"Retry-After": str(math.ceil(e.retry_after))} if e.retry_after is not None else {}
    if e.status == 415:
        headers["Accept-Encoding"] = "identity"  # RFC 9110 15.5.16: the codings it would have taken
    if e.status == 408:
        # RFC 9110 15.5.9: the server closes the connection rather than wait on; say so.
        headers["Connection"] = "close"
    return _json(error_body(e.status, e.reason, e.message, e.details), e.status, headers or None)


def _bad(reason: str, message: str, status: int = 400, details: list[dict[str, str]] | None = None) -> Response:
    return _json(error_body(status, reason, message, details), status)


async def read_limited_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request's body, or BodyTooLarge as soon as it passes ``limit`` bytes. With
    ``timeout_s``, BodyTimeout once none of it has come for ``timeout_s`` seconds, or once
    it has come slower than BODY_MIN_RATE on average after its first ``timeout_s``: a
    deadline for each chunk alone would let a client hold the connection for hours with
    a byte every few seconds, and one for the whole body alone would have to be hours
    long for the largest body on a slow link. starlette's ClientDisconnect when the
    client closes the connection first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge()
    chunks: list[bytes] = []
    size = 0
    stream = request.stream()
    started = trio.current_time()
    try:
        while True:
            waited_from = trio.current_time()
            deadline = math.inf
            if timeout_s is not None:
                deadline = min(waited_from + timeout_s, started + timeout_s + size / BODY_MIN_RATE)
            with trio.move_on_at(deadline) as waiting:
                chunk = await anext(stream, None)
            if waiting.cancelled_caught:
                now = trio.current_time()
                got = f"{size} of {declared} bytes" if declared is not None else f"{size} bytes"
                raise BodyTimeout(
                    f"the request body stopped or slowed: {got} came in {now - started:.0f} s, none in the last "
                    f"{now - waited_from:.0f} s (a body must keep arriving: at most {timeout_s:g} s without a byte, "
                    f"and {BODY_MIN_RATE // 1024} KiB/s on average after its first {timeout_s:g} s); the agent "
                    "stopped waiting and did nothing: send the request again on a connection that keeps it "
                    "flowing, or for a link that stalls longer raise the agent's request_body_timeout_s")
            if chunk is None:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge()
            chunks.append(chunk)
    finally:
        await stream.aclose()


T = TypeVar("T")


async def while_connected(request: Request, wait: Callable[[], Awaitable[T]]) -> T | None:
    """``wait()``, or None as soon as the client goes away. A long-poll the client gave up
    on otherwise held its handler, its waiter and its connection's descriptor for the
    whole wait (up to MAX_WAIT_S), however many such clients came and went."""
    outcome: list[T] = []
    failure: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        async def waiting() -> None:
            try:
                outcome.append(await wait())
            except Exception as e:  # noqa: BLE001 - raised again below, outside the nursery's group
                failure.append(e)
            nursery.cancel_scope.cancel()

        async def watching() -> None:
            # The request's body is read already (a GET has none): the next message is the end.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(waiting)
        nursery.start_soon(watching)
    if failure:
        raise failure[0]
    return outcome[0] if outcome else None


#: The answer to a client that has gone: nobody reads it.
GONE = Response(status_code=499)


def _named_id(item: Any) -> str | None:
    """The id a batch item gave its job, when it is one (a signed item carries it in its spec)."""
    if isinstance(item, dict) and isinstance(item.get("spec"), dict):
        item = item["spec"]
    job_id = item.get("id") if isinstance(item, dict) else None
    return job_id if isinstance(job_id, str) and JOB_ID_RE.match(job_id) else None


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {list: "an array", str: "a string", int: "a number", float: "a number"}.get(type(value), "an object")


def _parse_spec(raw: Any, prefix: str = "") -> tuple[JobSpec, Any] | AgentError:
    """A spec, bare or signed as ``{"spec": ..., "auth": ...}``, with its auth block (or None)."""
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "(body)"  # a batch item's is "jobs.3."
        return AgentError(f"{'the body' if where == '(body)' else where} must be a JSON object holding a job spec, "
                          f"not {_json_kind(raw)}", reason="invalid_spec",
                          details=[{"field": where, "message": "must be a JSON object holding a job spec"}])
    auth = None
    if "spec" in raw:
        extra = set(raw) - {"spec", "auth"}
        if extra:
            return AgentError(f"a signed submission holds only 'spec' and 'auth'; remove {sorted(extra)}",
                              reason="invalid_spec",
                              details=[{"field": f"{prefix}{k}", "message": "not allowed beside 'spec' and 'auth'"}
                                       for k in sorted(extra)])
        if raw.get("auth") is not None:
            from p2psched.security.errors import AdmissionError
            from p2psched.security.signing import Auth

            try:
                auth = Auth.from_json(raw["auth"])
            except AdmissionError as e:
                return AgentError(e.message, reason=e.reason, status=e.status)
        raw = raw["spec"]
        if not isinstance(raw, dict):
            return AgentError("'spec' must be a JSON object holding a job spec", reason="invalid_spec",
                              details=[{"field": f"{prefix}spec", "message": "must be a JSON object holding a job spec"}])
        prefix = prefix + "spec."
    try:
        spec = JobSpec.model_validate(raw, strict=False)
    except ValidationError as e:
        details = field_errors(e, prefix=prefix)
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
        return AgentError(f"invalid job spec: {summary}", reason="invalid_spec", details=details)
    return spec, auth


#: A module larger than this is validated on a worker thread: wasmtime's validation
#: is linear in the module's size (tens of ms for a few MiB) and would stall the
#: event loop, and with it every other request and job, meanwhile.
VALIDATE_INLINE_BYTES = 64 * 1024


async def _wasm_check(agent: Any, spec: JobSpec, prefix: str = "",
                      seen: dict[str, str | None] | None = None) -> AgentError | None:
    """An error naming what is wrong with ``spec``'s module bytes, or None. A module
    this agent stores was valid when stored, and one already checked in this batch
    (``seen``: sha256 -> error) is not checked again."""
    if spec.runtime != "wasm" or spec.module is None:
        return None
    sha = spec.module_sha256 or ""
    if seen is not None and sha in seen:
        problem = seen[sha]
    elif agent.store.has_module(sha):
        problem = None
    else:
        from p2psched.sandbox.wasm import validate_module

        try:
            if len(spec.module) <= VALIDATE_INLINE_BYTES:
                validate_module(spec.module)
            else:
                await trio.to_thread.run_sync(validate_module, spec.module)
            problem = None
        except ValueError as e:
            problem = str(e)
        if seen is not None:
            seen[sha] = problem
    if problem is None:
        return None
    return AgentError(problem, reason="invalid_module", details=[{"field": prefix + "module", "message": problem}])


_SECONDS = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _wait_param(request: Request) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        if not _SECONDS.fullmatch(raw):  # float() also takes ' 5', '1_0', 'nan' and '٥'
            raise ValueError(raw)
        value = float(raw)
    except ValueError:
        raise AgentError(f"wait={raw!r} must be a number of seconds, 0 to {MAX_WAIT_S:g}", reason="invalid_query")
    if not 0 <= value <= MAX_WAIT_S or math.isnan(value):
        raise AgentError(f"wait={raw} is out of range; use 0 to {MAX_WAIT_S:g} seconds", reason="invalid_query")
    return value


def _parse_json(body: bytes) -> Any:
    """The body as JSON data. pydantic-core's parser, not json.loads: it also refuses
    what the store could never write (a lone surrogate such as "\\ud800" in a string),
    nesting past MAX_JSON_DEPTH, NaN and Infinity, and whole numbers too long to hold."""
    try:
        return from_json(body, allow_inf_nan=False)
    except ValueError as e:
        hint = ""
        if "escape" in str(e):
            hint = (" (a \\u escape of a surrogate, such as \\ud800, names half a character: send it in its "
                    "high-low pair)")
        elif "recursion limit" in str(e):
            hint = f" (nested more than {MAX_JSON_DEPTH} levels deep)"
        raise AgentError(f"body is not valid JSON: {e}{hint}", reason="malformed_json") from None


def _known_params(request: Request, *names: str) -> None:
    """Refuse a query parameter the route does not take (a misspelt one would be ignored),
    and one given twice that is not a list (label=): which of the two counts is a guess."""
    unknown = set(request.query_params) - set(names)
    if unknown:
        raise AgentError(f"unknown query parameter(s) {sorted(unknown)}; use {', '.join(names)}",
                         reason="invalid_query")
    twice = sorted(name for name in request.query_params if name != "label"
                   and len(request.query_params.getlist(name)) > 1)
    if twice:
        raise AgentError(f"query parameter(s) {twice} given more than once; give each once", reason="invalid_query")


def _whole(raw: str) -> int:
    """A whole number >= 0 as a query parameter writes it: ASCII digits only. Python's
    int() also takes '٥', '10_0' and ' 5', which no client means to send."""
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(raw)
    return int(raw)


def _label_params(request: Request) -> list[tuple[str, str]]:
    """The ``label=KEY=VALUE`` query parameters (repeatable; a job must carry each)."""
    raw = request.query_params.getlist("label")
    if len(raw) > MAX_LABEL_FILTERS:
        raise AgentError(f"{len(raw)} label filters; give at most {MAX_LABEL_FILTERS}", reason="invalid_query")
    labels = []
    for item in raw:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise AgentError(f"label={item!r} must be KEY=VALUE, e.g. label=sweep=lr", reason="invalid_query")
        labels.append((key, value))
    return labels


def _check_ids(ids: list[Any], reason: str) -> None:
    """Refuse a body's ``ids`` list unless each is a non-empty string, naming the first that is not."""
    bad = next((i for i, v in enumerate(ids) if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise AgentError(f"ids.{bad} is {ids[bad]!r}; each id must be a non-empty string", reason=reason)


def _wait_body(raw: Any) -> tuple[list[str], float]:
    """The ``{"ids": [...], "wait": seconds}`` body of ``POST /v1/jobs:wait``, checked."""
    if not isinstance(raw, dict) or not isinstance(raw.get("ids"), list):
        raise AgentError('body must be {"ids": [job id, ...], "wait": seconds}', reason="invalid_wait")
    unknown = set(raw) - {"ids", "wait"}
    if unknown:
        raise AgentError(f"unknown field(s) {sorted(unknown)}; use ids and wait", reason="invalid_wait")
    ids = raw["ids"]
    if not 1 <= len(ids) <= MAX_BATCH:
        raise AgentError(f"ids names {len(ids)} jobs; name 1 to {MAX_BATCH}", reason="invalid_wait")
    _check_ids(ids, "invalid_wait")
    wait = raw.get("wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT_S:
        raise AgentError(f"wait={wait!r} must be a number of seconds, 0 to {MAX_WAIT_S:g}", reason="invalid_wait")
    return ids, float(wait)


def _cancel_body(raw: Any) -> tuple[list[str] | None, list[tuple[str, str]], str | None, int]:
    """The body of ``POST /v1/jobs:cancel``, checked: ``{"ids": [...]}``, or
    ``{"labels": {KEY: VALUE, ...}, "tenant": NAME, "limit": N}`` (the last two optional).
    Returns (ids or None, labels, tenant, limit)."""
    shape = '{"ids": [job id, ...]} or {"labels": {"KEY": "VALUE"}, "limit": N}'
    if not isinstance(raw, dict):
        raise AgentError(f"body must be {shape}", reason="invalid_cancel")
    unknown = set(raw) - {"ids", "labels", "tenant", "limit"}
    if unknown:
        raise AgentError(f"unknown field(s) {sorted(unknown)}; use ids, or labels with tenant and limit",
                         reason="invalid_cancel")
    if ("ids" in raw) == ("labels" in raw):
        raise AgentError(f"name the jobs by ids or by labels, not both or neither: {shape}", reason="invalid_cancel")
    if "ids" in raw:
        if set(raw) != {"ids"}:
            raise AgentError("tenant and limit go with labels, not with ids", reason="invalid_cancel")
        ids = raw["ids"]
        if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BATCH:
            raise AgentError(f"ids must be a list of 1 to {MAX_BATCH} job ids", reason="invalid_cancel")
        _check_ids(ids, "invalid_cancel")
        return ids, [], None, len(ids)
    labels = raw["labels"]
    if not isinstance(labels, dict) or not 1 <= len(labels) <= MAX_LABEL_FILTERS:
        raise AgentError(f"labels must map 1 to {MAX_LABEL_FILTERS} label keys to values, e.g. "
                         '{"sweep": "lr"}', reason="invalid_cancel")
    bad_label = next((k for k, v in labels.items() if not k or not isinstance(v, str)), None)
    if bad_label is not None:
        raise AgentError(f"labels.{bad_label or '(empty key)'}: each label needs a non-empty key and a string value",
                         reason="invalid_cancel")
    tenant = raw.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise AgentError(f"tenant={tenant!r} must be a tenant's name", reason="invalid_cancel")
    limit = raw.get("limit", DEFAULT_CANCEL_LIMIT)
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)  # 384.0 is a JSON integer too, as the OpenAPI schema's "integer" allows
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_BATCH:
        raise AgentError(f"limit={limit!r} must be an integer from 1 to {MAX_BATCH}", reason="invalid_cancel")
    return None, list(labels.items()), tenant, limit


def _refuse_cross_site(request: Request) -> None:
    """Refuse a state change that a page of another site sent through a browser.

    A browser sends a "simple" POST (a form, or fetch in no-cors mode) to any
    address without asking first, so without this any web page a user opens could
    submit jobs to, or drain, an agent that only the user's machine can reach.
    Browsers always name the page's origin on such requests; clients (the CLI,
    httpx, curl) send none, and the agent's own dashboard sends its own.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if origin in (f"http://{host}", f"https://{host}"):
        return
    raise AgentError(
        f"a {request.method} from a web page at {origin} is refused: this API changes state only for clients "
        "and for this agent's own dashboard", reason="cross_site_request", status=403,
    )


def create_app(agent: Any) -> Starlette:
    limit = agent.settings.max_request_bytes

    async def read_body(request: Request, too_large: str) -> bytes:
        coding = request.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            # Read as it came, a compressed body failed as "malformed JSON" (or, for a
            # drain, was not even looked at): say what is wrong with it instead.
            raise AgentError(f"the request body is sent with Content-Encoding {coding!r}, which the agent does not "
                             "decode; send it uncompressed, without that header", reason="unsupported_encoding",
                             status=415)
        try:
            return await read_limited_body(request, limit, agent.settings.request_body_timeout_s)
        except BodyTooLarge:
            raise AgentError(f"request body is larger than the limit of {limit} bytes; {too_large}",
                             reason="body_too_large", status=413) from None
        except BodyTimeout as e:
            raise AgentError(str(e), reason="body_timeout", status=408) from None

    async def load_json(request: Request) -> Any:
        body = await read_body(request, "send a smaller module or input, or raise max_request_bytes")
        return _parse_json(body)

    def refused(err: AgentError) -> AgentError:
        """``err``, counted: every submission refused at the door has its reason in
        p2psched_admission_rejections_total, as those refused further in do."""
        agent.metrics.admission_rejections.labels(err.reason).inc()
        return err

    async def load_submission(request: Request) -> Any:
        try:
            return await load_json(request)
        except AgentError as e:
            raise refused(e) from None

    async def submit(request: Request) -> Response:
        _refuse_cross_site(request)
        raw = await load_submission(request)
        parsed = _parse_spec(raw)
        if isinstance(parsed, AgentError):
            raise refused(parsed)
        spec, auth = parsed
        err = await _wasm_check(agent, spec)
        if err is not None:
            raise refused(err)
        rec, created = await agent.submit(spec, auth)
        return _json(rec, 202 if created else 200)

    async def submit_batch(request: Request) -> Response:
        _refuse_cross_site(request)
        raw = await load_submission(request)
        jobs = raw.get("jobs") if isinstance(raw, dict) else None
        if not isinstance(jobs, list):
            raise refused(AgentError('batch body must be {"jobs": [spec, ...]}', reason="invalid_batch"))
        if len(jobs) > MAX_BATCH:
            raise refused(AgentError(f"batch holds {len(jobs)} jobs; the limit is {MAX_BATCH}",
                                     reason="invalid_batch", status=413))
        specs: list[tuple[JobSpec, Any] | AgentError] = []
        seen: dict[str, str | None] = {}  # a module sent with every job of a batch is checked once
        for i, item in enumerate(jobs):
            parsed = _parse_spec(item, prefix=f"jobs.{i}.")
            if not isinstance(parsed, AgentError):
                parsed = await _wasm_check(agent, parsed[0], prefix=f"jobs.{i}.", seen=seen) or parsed
            specs.append(refused(parsed) if isinstance(parsed, AgentError) else parsed)
        results = await agent.submit_many(specs)
        out = []
        for raw_item, item in zip(jobs, results):
            if isinstance(item, AgentError):
                body = error_body(item.status, item.reason, item.message, item.details)
                if item.retry_after is not None:  # the Retry-After of a job refused alone
                    body["error"]["retry_after"] = math.ceil(item.retry_after)
                job_id = _named_id(raw_item)
                if job_id is not None:  # which of the client's jobs this is, beside its place in the list
                    body["id"] = job_id
                out.append(body)
            else:
                out.append({"status": 202 if item[1] else 200, "job": item[0]})
        return _json({"results": out}, 207 if any("error" in o for o in out) else 202)

    async def wait_jobs(request: Request) -> Response:
        """Many jobs' records in one answer, once every one has ended or ``wait`` passed:
        what `p2psched batch --wait` asks instead of one request per job."""
        body = await read_body(request, "name fewer jobs")
        who = await principal(request, body)  # the signature covers the body
        ids, wait = _wait_body(_parse_json(body))
        deadline = trio.current_time() + wait
        out: list[dict[str, Any]] = []

        async def each() -> bool:
            for job_id in ids:
                try:
                    agent.get(job_id, who)
                    rec = await agent.wait_final(job_id, max(0.0, deadline - trio.current_time()))
                except AgentError as e:
                    out.append({"id": job_id, **error_body(e.status, e.reason, e.message, e.details)})
                else:
                    out.append({"status": 200, "job": rec.as_dict()})
            return True

        if not await (while_connected(request, each) if wait else each()):
            return GONE
        return _json({"results": out}, 207 if any("error" in o for o in out) else 200)

    async def principal(request: Request, body: bytes = b"") -> Any:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        if request.scope.get("query_string"):
            raw_path = raw_path + b"?" + request.scope["query_string"]
        return agent.gate.authenticate(request.method, raw_path, body, request.headers.get("authorization"),
                                       time.time())

    async def readable(request: Request) -> Any:
        who = await principal(request)
        job_id = request.path_params["job_id"]
        agent.get(job_id, who)  # another tenant's job is answered as one that does not exist
        return job_id

    async def get_job(request: Request) -> Response:
        job_id = await readable(request)
        _known_params(request, "wait", "spec")
        spec = request.query_params.get("spec", "0")
        if spec not in ("0", "1"):
            raise AgentError(f"spec={spec!r}: use spec=1 to add the job's spec, or leave it out",
                             reason="invalid_query")
        wait = _wait_param(request)
        rec = await while_connected(request, lambda: agent.wait_final(job_id, wait)) if wait else (
            await agent.read(job_id))
        if rec is None:
            return GONE
        return _json(rec.as_dict(include_spec=spec == "1"))

    async def get_result(request: Request) -> Response:
        job_id = await readable(request)
        _known_params(request, "wait", "artifact")
        wait = _wait_param(request)
        rec = await while_connected(request, lambda: agent.wait_final(job_id, wait)) if wait else (
            await agent.read(job_id))
        if rec is None:
            return GONE
        headers = {"X-Job-State": rec.state.value}
        name = request.query_params.get("artifact")
        if name is not None:
            data, sha256 = await agent.artifact(rec.id, name)
            headers["X-Artifact-Sha256"] = sha256
        else:
            data = agent.output(rec.id)
        if rec.result is not None:
            headers["X-Job-Reason"] = rec.result.reason.encode("ascii", "replace").decode()[:200]
        return Response(data, media_type="application/octet-stream", headers={**headers, **ATTACHMENT})

    async def get_output(request: Request) -> Response:
        job_id = await readable(request)
        q = request.query_params
        _known_params(request, "stream", "offset", "wait")
        stream = q.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise AgentError(f"stream={stream!r} is not an output stream; use stdout or stderr", reason="invalid_query")
        raw = q.get("offset", "0")
        try:
            offset = _whole(raw)
        except ValueError:
            raise AgentError(f"offset={raw!r} must be a whole number of bytes >= 0 (X-Output-Next of the last "
                             "answer)", reason="invalid_query") from None
        if not 0 <= offset < MAX_SEQ:
            raise AgentError(f"offset={offset} must be 0 to {MAX_SEQ - 1}", reason="invalid_query")
        wait = _wait_param(request)
        chunk = await while_connected(request, lambda: agent.read_output(job_id, stream, offset, wait))
        if chunk is None:
            return GONE
        headers = {**ATTACHMENT, "X-Job-State": chunk.state, "X-Output-Next": str(chunk.next),
                   "X-Output-Complete": "true" if chunk.complete else "false", "X-Output-Attempt": str(chunk.attempt)}
        if chunk.note:
            headers["X-Output-Note"] = chunk.note.encode("ascii", "replace").decode()[:300]
        return Response(chunk.data, media_type="application/octet-stream", headers=headers)

    async def list_jobs(request: Request) -> Response:
        who = await principal(request)
        q = request.query_params
        _known_params(request, "state", "tenant", "label", "limit", "cursor", "order")
        labels = _label_params(request)
        order = q.get("order", "oldest")
        if order not in ("oldest", "newest"):
            raise AgentError(f"order={order!r} is not an order; use oldest (the default) or newest",
                             reason="invalid_query")
        state = q.get("state")
        if state is not None and state not in {s.value for s in JobState}:
            raise AgentError(f"state={state!r} is not a job state; use one of "
                             + ", ".join(s.value for s in JobState), reason="invalid_query")
        try:
            limit = _whole(q.get("limit", "100"))
            cursor = _whole(q.get("cursor", "0"))
        except ValueError:
            raise AgentError("limit and cursor must be integers", reason="invalid_query") from None
        if not 1 <= limit <= 1000 or not 0 <= cursor < MAX_SEQ:
            raise AgentError(f"limit must be 1-1000 and cursor 0 to {MAX_SEQ - 1} (next_cursor of the last page)",
                             reason="invalid_query")
        tenant = visible_tenant(who, q.get("tenant"))
        recs = await agent.list_jobs(state=state, tenant=tenant, limit=limit, cursor=cursor,
                                     newest_first=order == "newest", labels=labels)
        next_cursor = recs[-1].seq if len(recs) == limit else None
        return _json({"jobs": [r.as_dict() for r in recs], "next_cursor": next_cursor})

    def visible_tenant(who: Any, tenant: str | None) -> str | None:
        """The tenant a listing covers: any the caller asks for if admin, else its own."""
        if who.admin:
            return tenant
        if tenant is not None and tenant != who.tenant:
            agent.gate.check_tenant(who, tenant)
        return str(who.tenant)

    async def job_counts(request: Request) -> Response:
        who = await principal(request)
        _known_params(request, "tenant", "label")
        labels = _label_params(request)
        tenant = visible_tenant(who, request.query_params.get("tenant"))
        return _json({"counts": await agent.job_counts(tenant, labels), "tenant": tenant,
                      **({"labels": dict(labels)} if labels else {})})

    async def cancel_jobs(request: Request) -> Response:
        """Many jobs cancelled in one request: named by id, or every unfinished job with
        the given labels (at most ``limit`` a request; ``more`` says whether some are left)."""
        _refuse_cross_site(request)
        body = await read_body(request, "name fewer jobs")
        who = await principal(request, body)  # the signature covers the body
        ids, labels, tenant, limit = _cancel_body(_parse_json(body))
        more = False
        if ids is None:
            ids, matched = agent.unfinished_labelled(labels, visible_tenant(who, tenant), limit)
            more = matched > len(ids)
        refused: dict[int, AgentError] = {}
        allowed: list[str] = []
        for i, job_id in enumerate(ids):
            try:
                agent.get(job_id, who)
            except AgentError as e:
                refused[i] = e
            else:
                allowed.append(job_id)
        outcomes = iter(await agent.cancel_many(allowed))
        out: list[dict[str, Any]] = []
        for i, job_id in enumerate(ids):
            outcome = refused.get(i) or next(outcomes)
            if isinstance(outcome, AgentError):
                out.append({"id": job_id, **error_body(outcome.status, outcome.reason, outcome.message,
                                                       outcome.details)})
            else:
                out.append({"status": 200, "job": outcome.as_dict()})
        cancelled = sum(1 for o in out if o.get("job", {}).get("state") == "cancelled")
        return _json({"results": out, "cancelled": cancelled, "more": more},
                     207 if any("error" in o for o in out) else 200)

    async def cancel_job(request: Request) -> Response:
        _refuse_cross_site(request)
        rec = await agent.cancel(await readable(request))
        return _json(rec.as_dict())

    async def healthz(request: Request) -> Response:
        if not agent.accepting:
            return _json({"status": "draining", "node_id": agent.node_id, "version": agent_version()}, 503)
        if agent.store.write_error is not None:
            return _json({"status": "store_unwritable", "node_id": agent.node_id, "version": agent_version(),
                          "detail": agent.store.write_error}, 503)
        # Still 200 with a runtime impaired: the agent serves and forwards its jobs to peers.
        impaired = {rt: v for rt, v in agent.health.describe(trio.current_time()).items() if v["state"] == "impaired"}
        return _json({"status": "ok", "node_id": agent.node_id, "version": agent_version(),
                      **({"impaired": impaired} if impaired else {})})

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        await agent.refresh_gpu_usage()
        return Response(generate_latest(agent.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return _json(openapi_document())

    async def peers(request: Request) -> Response:
        await principal(request)
        return _json({"peers": agent.peers_view()})

    async def cluster(request: Request) -> Response:
        await principal(request)
        return _json(agent.cluster_view())

    async def drain(request: Request) -> Response:
        _refuse_cross_site(request)
        who = await principal(request, await read_body(request, "a drain request needs no body"))
        if not who.admin:
            raise AgentError(f"draining an agent needs an admin tenant; {who.tenant!r} is not one",
                             reason="forbidden", status=403)
        return _json(await agent.drain())

    async def on_agent_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AgentError)
        return _error(exc)

    async def on_store_error(request: Request, exc: Exception) -> Response:
        # A read waits until the state it reports is on disk, and now it cannot be.
        return _error(AgentError(f"agent {agent.node_id} cannot write its job store now ({exc}); retry in a "
                                 "moment, or free space in its data dir", reason="store_unwritable", status=503,
                                 retry_after=1.0))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        reason = {404: "no_such_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        allowed = ""
        if exc.status_code == 405:
            # The routes of one path are separate Routes: each 405 names only its own methods.
            methods = {m for r in routes if isinstance(r, Route) and r.methods
                       and r.matches(request.scope)[0] != Match.NONE for m in r.methods}
            headers["Allow"] = allowed = ", ".join(sorted(methods))
        msg = {404: f"no route {request.url.path}; see /openapi.json for the API",
               405: f"{request.method} is not allowed on {request.url.path}; use {allowed} (see /openapi.json)"}
        response = _bad(reason, msg.get(exc.status_code, str(exc.detail)), exc.status_code)
        response.headers.update(headers)
        return response

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # The client closed the connection before its body ended: no bug, and nothing was
        # done (a body is read whole before anything acts on it). No one is left to read an
        # answer; this one is for hypercorn, which also reports a client gone silent for
        # READ_TIMEOUT_S as gone, and that client may still read it.
        log.debug("%s %s: the client left before its request body ended", request.method, request.url.path)
        return _bad("client_disconnected", "the connection ended before the request body did; nothing was done: "
                    "send the request again", 400)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug: say so in JSON, as every other error is, and keep the traceback.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _bad("internal_error", f"agent {agent.node_id} failed on {request.method} {request.url.path} "
                    f"({type(exc).__name__}); this is a bug, and its log holds the traceback. Nothing this request "
                    "asked for is certain to have happened: check before retrying", 500)

    routes = [
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs:batch", submit_batch, methods=["POST"]),
        Route("/v1/jobs", list_jobs, methods=["GET"]),
        Route("/v1/jobs:counts", job_counts, methods=["GET"]),
        Route("/v1/jobs:wait", wait_jobs, methods=["POST"]),
        Route("/v1/jobs:cancel", cancel_jobs, methods=["POST"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}", cancel_job, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/result", get_result, methods=["GET"]),
        Route("/v1/jobs/{job_id}/output", get_output, methods=["GET"]),
        Route("/v1/peers", peers, methods=["GET"]),
        Route("/v1/cluster", cluster, methods=["GET"]),
        Route("/v1/drain", drain, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *dashboard.routes(),
    ]
    return Starlette(routes=routes, exception_handlers={AgentError: on_agent_error, StoreError: on_store_error,
                                                        HTTPException: on_http_error,
                                                        ClientDisconnect: on_client_gone, Exception: on_unexpected})


def agent_version() -> str:
    from p2psched import __version__

    return __version__


async def serve_api(agent: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [agent.settings.api]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.read_timeout = READ_TIMEOUT_S
    config.graceful_timeout = 1.0
    app = hardened(create_app(agent))
    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]
