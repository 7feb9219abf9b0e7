"""Every transfer message, in one place. Each is a msgpack map; ``t`` names it.

    offer       origin -> executor   {id, job, module?}            reply: accept | refuse
    accept      executor -> origin   {id, vector}
    refuse      executor -> origin   {id, reason, vector, need_module?}   late binding said no, or the
                                                                   offer named a module it lacks
    status      executor -> origin   {id, entry}                   best effort (e.g. running)
    result      executor -> origin   {id, executor, attempt, result, output, stderr?, artifacts?, timeline}
                                                                   reply: ack; artifacts: name -> bytes
    ack         origin -> executor   {id, duplicate}               delivered; executor may forget
    cancel      origin -> executor   {id}                          reply: cancel_ack
    cancel_ack  executor -> origin   {id, state}                   "cancelling", "unknown" or a final state
    submit      any -> home agent    {spec, auth}                  a client-chosen id's home takes the job
    submitted   home -> any          {job, created}                or submit_error {status, reason, message}
    output      origin -> executor   {id, stream, offset, wait}    reply: output_data
    handback    executor -> origin   {id, executor, attempt, error}   reply: ack {taken, state}: this host
                                                                   could not run it; place it again
    output_data executor -> origin   {id, data, next, complete, state, note}   a running job's output so far
    error       either               {message}                     the request was not understood

A request is checked whole, every field's type, before its handler runs
(:func:`check_request`): a peer's bug gets an ``error`` reply naming the fields,
and no job is left half changed by a message found wrong halfway.

``module`` (the wasm bytes) is left out once the executor is known to hold them.
``vector`` in refuse, accept and result comes with ``vector_at``, the sender's
monotonic clock in ns when it was taken, so the newest wins when messages cross.
``job`` is the job as the origin knows it: ``spec`` (JobSpec in JSON mode, module
left out), ``origin``, ``origin_transfer`` (where results go), ``route``, ``cost``,
``hops``, ``attempts``, ``timeline`` and, for tenant-signed jobs, ``auth`` (the
tenant's original envelope, verified again by every hop).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

OFFER = "offer"
ACCEPT = "accept"
REFUSE = "refuse"
STATUS = "status"
RESULT = "result"
ACK = "ack"
CANCEL = "cancel"
CANCEL_ACK = "cancel_ack"
ERROR = "error"
SUBMIT = "submit"
SUBMITTED = "submitted"
SUBMITTED_ERROR = "submit_error"
OUTPUT = "output"
OUTPUT_DATA = "output_data"
HANDBACK = "handback"

REQUESTS = frozenset({OFFER, STATUS, RESULT, CANCEL, SUBMIT, OUTPUT, HANDBACK})


def error(message: str) -> dict[str, Any]:
    return {"t": ERROR, "message": message}


#: The states a result may end its job in.
ResultState = Literal["succeeded", "failed", "cancelled", "timed_out"]


def check_request(msg: dict[str, Any]) -> None:
    """Raise ValueError, naming each field that is missing or of the wrong type, unless
    ``msg`` is a well-formed request (fields not listed here are ignored).

    Handlers act on a request field by field, and a field found wrong halfway (a
    result whose ``state`` is not a state, after the job left the queue for it)
    would leave the job half changed. So every field is checked first, strictly
    (no "1" for 1), before any handler runs."""
    kind = msg.get("t")
    adapter = _request_adapters().get(kind) if isinstance(kind, str) else None
    if adapter is None:
        raise ValueError(f"unknown transfer message type {kind!r}; known: {', '.join(sorted(REQUESTS))}")
    try:
        adapter.validate_python(msg)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise ValueError(f"{kind} message: {problems}") from None


# The requests' fields. Strict: msgpack gives each value its own type, and a peer
# that sends "1" for 1 has a bug worth hearing about.
_STRICT = ConfigDict(strict=True)
_Map = dict[str, Any]


class _TimelineEntry(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    state: str
    at: float
    node: str
    detail: NotRequired[str]


class _Job(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    spec: _Map  # checked as a JobSpec by the handler, before it changes anything
    origin: str
    origin_transfer: NotRequired[str]
    route: NotRequired[list[str]]
    cost: NotRequired[float]
    hops: NotRequired[int]
    attempts: NotRequired[int]
    timeline: NotRequired[list[_TimelineEntry]]
    auth: NotRequired[_Map | None]


class _Result(TypedDict):  # JobResult's fields, as its as_dict sends them
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    exit_code: int | None
    reason: str
    stdout: NotRequired[str]
    stderr: NotRequired[str]
    stdout_truncated: NotRequired[bool]
    stderr_truncated: NotRequired[bool]
    stdout_in_record_truncated: NotRequired[bool]
    stderr_in_record_truncated: NotRequired[bool]
    cpu_ms: NotRequired[float]
    peak_mem_bytes: NotRequired[int]
    output_sha256: NotRequired[str]
    output_bytes: NotRequired[int | None]
    limit_hit: NotRequired[str | None]
    signal: NotRequired[int | None]
    warnings: NotRequired[list[str]]
    attestation: NotRequired[_Map | None]
    artifacts: NotRequired[dict[str, _Map]]


class _Vector(TypedDict):  # replies and results may carry the sender's resource vector
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    vector: NotRequired[_Map | None]
    vector_at: NotRequired[int | None]


class _Offer(_Vector):
    id: str
    job: _Job
    module: NotRequired[bytes | None]


class _ResultMsg(_Vector):
    id: str
    executor: str
    attempt: NotRequired[int | None]
    state: NotRequired[ResultState | None]
    result: _Result
    output: NotRequired[bytes | None]
    stderr: NotRequired[bytes | None]
    artifacts: NotRequired[dict[str, bytes] | None]
    timeline: NotRequired[list[_TimelineEntry]]


class _Status(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: str
    entry: _Map


class _Cancel(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: str


class _Submit(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    spec: _Map  # checked as a JobSpec by the handler
    auth: NotRequired[_Map | None]


class _Output(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: str
    stream: Literal["stdout", "stderr"]
    offset: Annotated[int, Field(ge=0)]
    wait: NotRequired[float]


class _Handback(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: str
    executor: str
    attempt: NotRequired[int | None]
    error: NotRequired[str]


class _SubmittedJob(TypedDict):  # the record as the home agent's API shows it; the rest passes through
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    id: str
    state: str


class _Submitted(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    job: _SubmittedJob
    created: bool


class _SubmitError(TypedDict):
    __pydantic_config__ = _STRICT  # type: ignore[misc]
    status: Annotated[int, Field(ge=400, le=599)]
    reason: str
    message: str
    retry_after: NotRequired[Annotated[float, Field(ge=0, le=3600)] | None]


def check_submit_reply(reply: dict[str, Any]) -> None:
    """Raise ValueError, naming the fields, unless ``reply`` is a well-formed answer
    to a ``submit``: ``submitted`` with the job's record, or ``submit_error``. The
    requesting agent hands either to its client as it is."""
    adapter = _reply_adapters().get(reply.get("t"))  # type: ignore[arg-type]
    if adapter is None:
        raise ValueError(f"a reply of type {reply.get('t')!r:.40}, not {SUBMITTED} or {SUBMITTED_ERROR}")
    try:
        adapter.validate_python(reply)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise ValueError(f"{reply['t']} reply: {problems}") from None


@functools.cache
def _reply_adapters() -> dict[str, TypeAdapter[Any]]:
    return {SUBMITTED: TypeAdapter(_Submitted), SUBMITTED_ERROR: TypeAdapter(_SubmitError)}


@functools.cache
def _request_adapters() -> dict[str, TypeAdapter[Any]]:
    """Built on the first request: an agent that never talks to a peer never builds them."""
    kinds: dict[str, Any] = {OFFER: _Offer, RESULT: _ResultMsg, STATUS: _Status, CANCEL: _Cancel, SUBMIT: _Submit,
                             OUTPUT: _Output, HANDBACK: _Handback}
    assert set(kinds) == REQUESTS
    return {kind: TypeAdapter(t) for kind, t in kinds.items()}
