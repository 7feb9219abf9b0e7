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

``module`` (the wasm bytes) is left out once the executor is known to hold them.
``vector`` in refuse, accept and result comes with ``vector_at``, the sender's
monotonic clock in ns when it was taken, so the newest wins when messages cross.
``job`` is the job as the origin knows it: ``spec`` (JobSpec in JSON mode, module
left out), ``origin``, ``origin_transfer`` (where results go), ``route``, ``cost``,
``hops``, ``attempts``, ``timeline`` and, for tenant-signed jobs, ``auth`` (the
tenant's original envelope, verified again by every hop).
"""

from __future__ import annotations

from typing import Any

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


def require(msg: dict[str, Any], *fields: str) -> None:
    missing = [f for f in fields if f not in msg]
    if missing:
        raise ValueError(f"{msg.get('t')} message lacks field(s) {missing}")
    if "id" in fields and not isinstance(msg["id"], str):
        raise ValueError(f"{msg.get('t')} message: 'id' must be a string")
