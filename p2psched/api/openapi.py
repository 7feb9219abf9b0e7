"""The OpenAPI description served at /openapi.json.

Generated: the JobSpec schema (with Resources and Limits) comes from the pydantic
models that validate submissions, so it cannot drift from what the agent accepts.

Written here by hand: the paths, their parameters, the bodies of the many-job
requests, and every response schema (JobRecord, JobOutcome, Member, Cluster, Health,
Error), because the handlers build answers as plain dicts (JobRecord.as_dict,
Agent.self_view and cluster_view, server.py). tests/api/test_openapi.py keeps those
true: every route of the app is here with its methods and nothing else is; the
document is valid OpenAPI 3.1; and real agents' answers from every operation fit
their schema, with no key it does not name, so a key added to an answer fails that
test until it is described here. Request bodies by hand are not checked there.

Answers' objects leave additionalProperties open: a client that validates against
this document keeps working when a later agent adds a key.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from p2psched import __version__
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState

_ERR = {"$ref": "#/components/schemas/Error"}
_ERR_DETAIL = {"$ref": "#/components/schemas/ErrorDetail"}
_REC = {"$ref": "#/components/schemas/JobRecord"}
_STATES = [s.value for s in JobState]
#: alive, suspect, dead, left as membership knows them; draining: alive, taking no work
_MEMBER_STATES = ["alive", "draining", "suspect", "dead", "left"]
_GPU_SLOTS = {"type": "object", "additionalProperties": {"type": "integer"}, "description": "slots by GPU type"}
_ATTESTATION = {
    "type": ["object", "null"],
    "description": "The executor's signed report of the run (docs/security.md says how to verify it): every key "
                   "but `signature` is signed, so a reader must keep the report as it came.",
    "required": ["type", "job_id", "tenant", "runtime", "module_sha256", "input_sha256", "output_sha256",
                 "node_id", "node_pubkey", "measurement", "sandbox", "limits", "started_at_ms", "ended_at_ms",
                 "exit_code", "reason", "signature"],
    "properties": {
        "type": {"type": "string"}, "job_id": {"type": "string"}, "tenant": {"type": "string"},
        "runtime": {"type": "string"}, "module_sha256": {"type": ["string", "null"]},
        "input_sha256": {"type": "string"}, "output_sha256": {"type": "string"},
        "stderr_sha256": {"type": ["string", "null"]},
        "artifacts_sha256": {"type": "object", "additionalProperties": {"type": "string"}},
        "spec_sha256": {"type": ["string", "null"]},
        "node_id": {"type": "string"}, "node_pubkey": {"type": "string"}, "measurement": {"type": "string"},
        "sandbox": {"type": "object", "properties": {"kind": {"type": "string"}}, "additionalProperties": True,
                    "description": "what the sandbox reports of itself and its settings; its other keys vary "
                                   "with the kind"},
        "limits": {"type": "object", "additionalProperties": True, "description": "the spec's limits as the "
                   "executor applied them: the keys of Limits as that agent's version has them"},
        "started_at_ms": {"type": "integer"}, "ended_at_ms": {"type": "integer"},
        "exit_code": {"type": ["integer", "null"]}, "reason": {"type": "string"},
        "signature": {"type": "string", "description": "Ed25519, hex, by node_pubkey"}},
}


def _resp(desc: str, schema: dict[str, Any] | None = None, ctype: str = "application/json") -> dict[str, Any]:
    r: dict[str, Any] = {"description": desc}
    if schema is not None:
        r["content"] = {ctype: {"schema": schema}}
    return r


def _errors(*codes: int) -> dict[str, Any]:
    """The error answers an operation gives, each with the Error body; the default
    covers the rest (401 unsigned, 403 not the caller's, 503 store unwritable, ...)."""
    text = {400: "Invalid input: `error.message` says what and how to fix it; for a spec, `error.fields` names "
                 "each bad field.", 404: "Unknown job.",
            409: "Conflict with the job's state.", 413: "Body too large.",
            415: "Body sent compressed (Content-Encoding); send it as it is.", 429: "Queue full; see Retry-After.",
            503: "Agent shutting down."}
    return {**{str(c): _resp(text[c], _ERR) for c in codes},
            "default": _resp("Any other error: 401 unsigned or badly signed, 403 not the caller's, 503 the "
                             "agent cannot write its store now (see Retry-After), ...", _ERR)}


def _many(outcome: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The body of a many-job answer: one outcome per job, in order, and ``extra``."""
    return {"type": "object", "required": ["results", *extra],
            "properties": {"results": {"type": "array", "items": outcome}, **extra}}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_WAIT = {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 300},
         "description": "Long-poll: wait up to this many seconds for the job to end."}
_SPEC = {"name": "spec", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]},
         "description": "1: the record carries its `spec` too."}
_LABEL = {"name": "label", "in": "query",
          "schema": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+="}, "maxItems": 8},
          "style": "form", "explode": True,
          "description": "KEY=VALUE, repeatable: only jobs carrying every one of these labels."}


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = spec_schema.pop("$defs", {})
    schemas: dict[str, Any] = {**defs, "JobSpec": spec_schema}
    schemas["ErrorDetail"] = {
        "type": "object", "required": ["status", "reason", "message"],
        "properties": {
            "status": {"type": "integer"}, "reason": {"type": "string", "description": "a stable word to branch on"},
            "message": {"type": "string", "description": "what went wrong and what to do instead"},
            "fields": {"type": "array", "description": "each bad field of the input; absent when none is to blame",
                       "items": {"type": "object", "required": ["field", "message"], "properties": {
                           "field": {"type": "string"}, "message": {"type": "string"}}}},
            "retry_after": {"type": "integer", "description": "in a batch's results only: seconds until a job "
                            "refused for now (status 429) may be sent again, as Retry-After says for one job"}},
    }
    # A submission is a bare spec, or the spec with the tenant's signature
    # (security/signing.py); an agent with a tenant registry takes only the latter.
    schemas["Auth"] = {
        "type": "object", "required": ["tenant", "key_id", "nonce", "issued_at", "expires_at", "input_sha256",
                                       "signature"],
        "properties": {
            "v": {"type": "integer", "const": 1}, "tenant": {"type": "string"}, "key_id": {"type": "string"},
            "nonce": {"type": "string"}, "issued_at": {"type": "integer", "description": "Unix seconds"},
            "expires_at": {"type": "integer", "description": "Unix seconds"},
            "module_sha256": {"type": ["string", "null"]}, "input_sha256": {"type": "string"},
            "signature": {"type": "string", "description": "Ed25519, hex"}},
        "additionalProperties": False,
    }
    schemas["Submission"] = {
        "description": "A job spec, bare or as {spec, auth} signed by its tenant (p2psched submit --tenant NAME "
                       "--key FILE signs it)",
        "oneOf": [{"$ref": "#/components/schemas/JobSpec"},
                  {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {
                      "spec": {"$ref": "#/components/schemas/JobSpec"}, "auth": {"$ref": "#/components/schemas/Auth"}}}],
    }
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": _ERR_DETAIL}}
    schemas["JobRecord"] = {
        "type": "object",
        "description": "A job as the cluster knows it. Clients should ignore keys they do not know: later "
                       "versions add some.",
        "required": ["id", "state", "tenant", "runtime", "origin", "executor", "route", "cost", "hops", "attempts",
                     "timeline", "result", "wait_reason", "priority", "created_at"],
        "properties": {
            "id": {"type": "string"}, "state": {"type": "string", "enum": _STATES},
            "tenant": {"type": "string"}, "runtime": {"type": "string"},
            "origin": {"type": "string", "description": "the agent the job was submitted to"},
            "executor": {"type": ["string", "null"], "description": "the agent that runs or ran it; null before "
                         "placement"},
            "route": {"type": "array", "items": {"type": "string"}, "description": "the graph path from origin "
                      "to executor; empty when it runs where it was submitted"},
            "cost": {"type": "number"}, "hops": {"type": "integer"}, "attempts": {"type": "integer"},
            "timeline": {"type": "array", "items": {"type": "object", "required": ["state", "at", "node", "detail"],
                                                    "properties": {
                "state": {"type": "string", "enum": _STATES}, "at": {"type": "number", "description": "Unix time"},
                "node": {"type": "string"}, "detail": {"type": "string"}}}},
            "result": {"type": ["object", "null"], "description": "null until the job ends", "required": [
                "exit_code", "reason", "stdout", "stderr", "stdout_truncated", "stderr_truncated",
                "stdout_in_record_truncated", "stderr_in_record_truncated", "cpu_ms", "peak_mem_bytes",
                "output_sha256", "output_bytes", "limit_hit", "signal", "warnings", "attestation", "artifacts"],
                "properties": {
                "exit_code": {"type": ["integer", "null"]}, "reason": {"type": "string"},
                "stdout": {"type": "string", "description": "the first 64 KiB of stdout as UTF-8 text (invalid "
                           "bytes replaced); the bytes, all of them, at /v1/jobs/{id}/result"},
                "stderr": {"type": "string", "description": "the first 64 KiB of stderr as UTF-8 text; all of it at "
                           "/v1/jobs/{id}/output?stream=stderr"},
                "stdout_truncated": {"type": "boolean", "description": "the job's limits.stdout_bytes cut its "
                                     "stdout: the rest was not kept"},
                "stderr_truncated": {"type": "boolean", "description": "the record's stderr is not all the job "
                                     "wrote: limits.stderr_bytes cut it (the rest was not kept), or the record "
                                     "did (stderr_in_record_truncated), or both"},
                "stdout_in_record_truncated": {"type": "boolean", "description": "`stdout` is only its first 64 "
                                               "KiB; /v1/jobs/{id}/result has all output_bytes of it"},
                "stderr_in_record_truncated": {"type": "boolean", "description": "`stderr` is only its first 64 "
                                               "KiB; /v1/jobs/{id}/output?stream=stderr has all of it"},
                "cpu_ms": {"type": "number"}, "peak_mem_bytes": {"type": "integer"},
                "output_sha256": {"type": "string"},
                "output_bytes": {"type": ["integer", "null"], "description": "the size of the whole stdout, as "
                                 "/v1/jobs/{id}/result serves it and output_sha256 hashes it; null in a result "
                                 "stored before the field existed"},
                "limit_hit": {"type": ["string", "null"], "description": "the limit that ended the job, e.g. "
                              "out_of_fuel or wall_timeout; null if none did"},
                "signal": {"type": ["integer", "null"]},
                "warnings": {"type": "array", "items": {"type": "string"}},
                "attestation": _ATTESTATION,
                "artifacts": {"type": "object", "description": "name -> {size, sha256} of each file collected; "
                              "the bytes at /v1/jobs/{id}/result?artifact=NAME",
                              "additionalProperties": {"type": "object", "required": ["size", "sha256"],
                                                       "properties": {
                                  "size": {"type": "integer"}, "sha256": {"type": "string"}}}}}},
            "wait_reason": {"type": ["string", "null"], "description": "why the job waits, while it does"},
            "priority": {"type": "integer"}, "created_at": {"type": "number", "description": "Unix time"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "the spec's labels; absent when it has none"},
            "duplicate_attempts": {
                "type": "array", "description": "results that arrived after the first final one (another "
                "attempt's, e.g. from a peer that kept running a forwarded job): recorded, never applied; absent "
                "when there were none",
                "items": {"type": "object", "required": ["executor", "attempt", "reason", "at"], "properties": {
                    "executor": {"type": "string"}, "attempt": {"type": ["integer", "null"]},
                    "reason": {"type": ["string", "null"]}, "at": {"type": "number", "description": "Unix time"}}}},
            "spec": {"$ref": "#/components/schemas/JobSpec",
                     "description": "the job's spec, without the module's bytes (module_sha256 names them); only "
                                    "with ?spec=1"},
        },
    }
    schemas["JobOutcome"] = {
        "description": "One job's part of a many-job answer: its record, or an error in its place",
        "oneOf": [
            {"type": "object", "required": ["status", "job"], "properties": {
                "status": {"const": 200, "description": "as for the one-job request"},
                "job": _REC}},
            {"type": "object", "required": ["id", "error"], "properties": {
                "id": {"type": "string", "description": "the id named"}, "error": _ERR_DETAIL}},
        ],
    }
    schemas["ResourceVector"] = {
        "type": "object", "description": "An agent's capacity and load, as it gossips them",
        "required": ["cpu_total", "cpu_free", "mem_total_mb", "mem_free_mb", "gpu_free", "gpu_total", "queue_len",
                     "running", "load", "draining", "impaired"],
        "properties": {
            "cpu_total": {"type": "number"}, "cpu_free": {"type": "number"},
            "mem_total_mb": {"type": "integer"}, "mem_free_mb": {"type": "integer"},
            "gpu_free": _GPU_SLOTS, "gpu_total": _GPU_SLOTS,
            "queue_len": {"type": "integer", "description": "jobs waiting there"},
            "running": {"type": "integer"}, "load": {"type": "number", "description": "the host's load average"},
            "draining": {"type": "boolean", "description": "it takes no new work (draining, or its store cannot be "
                         "written)"},
            "impaired": {"type": "array", "items": {"type": "string"}, "description": "runtimes it cannot run now"}},
    }
    schemas["RuntimeHealth"] = {
        "type": "object", "description": "A runtime whose jobs failed on this host for host reasons",
        "required": ["state", "failures_in_a_row", "last_error", "retry_in_s"],
        "properties": {
            "state": {"type": "string", "enum": ["failing", "impaired", "trying again"],
                      "description": "impaired: its jobs go to peers until retry_in_s passes"},
            "failures_in_a_row": {"type": "integer"}, "last_error": {"type": "string"},
            "retry_in_s": {"type": ["number", "null"]}},
    }
    schemas["Member"] = {
        "type": "object", "description": "An agent as membership sees it; `self` is the one answering",
        "required": ["node_id", "address", "api", "transfer", "state", "incarnation", "age_s", "vector", "position",
                     "labels", "node_pubkey", "measurement", "self"],
        "properties": {
            "node_id": {"type": "string"}, "address": {"type": "string", "description": "gossip host:port"},
            "api": {"type": "string", "description": "API host:port"},
            "transfer": {"type": "string", "description": "job transfer host:port"},
            "state": {"type": "string", "enum": _MEMBER_STATES},
            "incarnation": {"type": "integer"},
            "age_s": {"type": "number", "description": "seconds since this agent last learned about it"},
            "vector": {"$ref": "#/components/schemas/ResourceVector"},
            "position": {"type": "string", "description": "its host in the topology; empty without one"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "node_pubkey": {"type": "string", "description": "the key its attestation reports are signed with"},
            "measurement": {"type": "string"},
            "agent_version": {"type": "string", "description": "its p2psched version (a peer's as it gossips it)"},
            "self": {"type": "boolean"},
            "runtimes": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/RuntimeHealth"},
                         "description": "runtimes with host failures; in the answering agent's own row only"}},
    }
    schemas["Health"] = {
        "type": "object", "required": ["status", "node_id", "version"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "draining", "store_unwritable"]},
            "node_id": {"type": "string"}, "version": {"type": "string"},
            "impaired": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/RuntimeHealth"},
                         "description": "runtimes it cannot run now (their jobs go to peers); absent when none"},
            "detail": {"type": "string", "description": "with store_unwritable: the write error"}},
    }
    capacity = {"type": "object", "required": ["cpu", "mem_mb", "gpu", "gpu_declared"], "properties": {
        "cpu": {"type": "number"}, "mem_mb": {"type": "integer"},
        "gpu": {**_GPU_SLOTS, "description": "GPU slots by type (types share hardware, so they are not summed)"},
        "gpu_declared": {**_GPU_SLOTS, "description": "those of `gpu` on GPUs declared with --gpus, which no "
                         "hardware backs"}}}
    schemas["Cluster"] = {
        "type": "object", "required": ["members", "by_state", "total", "free"],
        "description": "Members by state, and the resources of the alive and draining ones",
        "properties": {
            "members": {"type": "integer"},
            "by_state": {"type": "object", "propertyNames": {"enum": _MEMBER_STATES},
                         "additionalProperties": {"type": "integer"}},
            "total": capacity, "free": capacity},
    }
    batch_answer = _many({"oneOf": [
        {"type": "object", "required": ["status", "job"], "properties": {
            "status": {"type": "integer", "enum": [200, 202], "description": "as POST /v1/jobs answers for it"},
            "job": _REC}},
        {"type": "object", "required": ["error"], "properties": {
            "error": _ERR_DETAIL,
            "id": {"type": "string", "description": "the id the spec gave its job, when it gave a valid one"}}}]})
    wait_answer = _many({"$ref": "#/components/schemas/JobOutcome"})
    cancel_answer = _many({"$ref": "#/components/schemas/JobOutcome"},
                       cancelled={"type": "integer", "description": "how many of these jobs are now cancelled"},
                       more={"type": "boolean", "description": "by labels: other unfinished jobs match; ask again"})
    health = {"$ref": "#/components/schemas/Health"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "p2psched agent API", "version": __version__},
        "paths": {
            "/v1/jobs": {
                "post": {"summary": "Submit a job", "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submission"}}}},
                    "responses": {"202": _resp("Accepted", _REC), "200": _resp("Same id: the existing job", _REC),
                                  **_errors(400, 413, 415, 429, 503)}},
                "get": {"summary": "List jobs", "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string", "enum": [s.value for s in JobState]}},
                    {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                    _LABEL,
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query",
                     "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["oldest", "newest"]},
                     "description": "oldest (default): from cursor on; newest: newest first, below cursor"}],
                    "responses": {"200": _resp("Jobs", {"type": "object", "required": ["jobs", "next_cursor"],
                                                        "properties": {
                        "jobs": {"type": "array", "items": _REC},
                        "next_cursor": {"type": ["integer", "null"], "description": "the cursor for the next page; "
                                        "null when this one is the last"}}}),
                        **_errors(400)}},
            },
            "/v1/jobs:counts": {"get": {"summary": "Stored jobs by state", "parameters": [
                {"name": "tenant", "in": "query", "schema": {"type": "string"}}, _LABEL],
                "responses": {"200": _resp("Counts", {"type": "object", "required": ["counts", "tenant"],
                                                      "properties": {
                    "counts": {"type": "object", "description": "every state, 0 where none",
                               "required": _STATES, "properties": {st: {"type": "integer"} for st in _STATES}},
                    "tenant": {"type": ["string", "null"]},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"},
                               "description": "the label filters, when given"}}}), **_errors(400)}}},
            "/v1/jobs:batch": {"post": {"summary": "Submit many jobs", "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "required": ["jobs"], "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Submission"}}}}}}},
                "responses": {"202": _resp("One record or error per spec, in order", batch_answer),
                              "207": _resp("Some specs failed; see each result. A spec refused for now (a full "
                                           "queue: error.status 429) has error.retry_after, in seconds", batch_answer),
                              **_errors(400, 413, 415)}}},
            "/v1/jobs:wait": {"post": {
                "summary": "Many jobs' records, once each has ended or `wait` seconds passed",
                "description": "Read access to each job as for GET /v1/jobs/{job_id}. Records come in the order "
                               "named; a job that is unknown or not the caller's to read has an error in its place "
                               "(and the answer is 207).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["ids"], "additionalProperties": False, "properties": {
                        "ids": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                                "maxItems": 10000},
                        "wait": {"type": "number", "minimum": 0, "maximum": 300, "default": 0}}}}}},
                "responses": {"200": _resp("One record per id, in order", wait_answer),
                              "207": _resp("Some ids have an error in place of a record", wait_answer),
                              **_errors(400, 413, 415)}}},
            "/v1/jobs:cancel": {"post": {
                "summary": "Cancel many jobs: named by id, or every unfinished job with the given labels",
                "description": "Access as for DELETE /v1/jobs/{job_id}. Jobs that have not started are cancelled "
                               "first, all at once; running ones are stopped and waited for (up to 30 s each). "
                               "By labels, at most `limit` jobs a request (waiting ones first, oldest first) of "
                               "the caller's tenant (an admin's: `tenant`, or every tenant); `more` says whether "
                               "others match: ask again. A job that is unknown, not the caller's, or already "
                               "ended has an error in its place (and the answer is 207).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False,
                    # ids, or labels (with tenant and limit): one of the two, never both
                    "oneOf": [{"required": ["ids"], "not": {"anyOf": [{"required": ["labels"]},
                                                                      {"required": ["tenant"]},
                                                                      {"required": ["limit"]}]}},
                              {"required": ["labels"], "not": {"required": ["ids"]}}],
                    "properties": {
                        "ids": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                                "maxItems": 10000},
                        "labels": {"type": "object", "propertyNames": {"minLength": 1},
                                   "additionalProperties": {"type": "string"}, "minProperties": 1, "maxProperties": 8},
                        "tenant": {"type": "string", "minLength": 1},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}}}}},
                "responses": {"200": _resp("One record per job, in order, with `cancelled` (how many are now "
                                           "cancelled) and `more`", cancel_answer),
                              "207": _resp("Some jobs have an error in place of a record", cancel_answer),
                              **_errors(400, 413, 415)}}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "A job's record", "parameters": [_JOB_ID, _WAIT, _SPEC],
                        "responses": {"200": _resp("The record", _REC), **_errors(404)}},
                "delete": {"summary": "Cancel a job", "parameters": [_JOB_ID],
                           "responses": {"200": _resp("The cancelled record", _REC), **_errors(404, 409)}},
            },
            "/v1/jobs/{job_id}/result": {"get": {
                "summary": "A job's raw output bytes, or with ?artifact=NAME one of its artifacts",
                "parameters": [_JOB_ID, _WAIT, {
                    "name": "artifact", "in": "query", "schema": {"type": "string"},
                    "description": "A name from the result's `artifacts`: that file's bytes instead of stdout "
                                   "(header X-Artifact-Sha256). 404 for another name, listing the job's artifacts."}],
                "responses": {"200": _resp("stdout bytes, or the artifact's", {"type": "string", "format": "binary"},
                                           "application/octet-stream"), **_errors(404, 409)}}},
            "/v1/jobs/{job_id}/output": {"get": {
                "summary": "A job's output from an offset, while it runs and after; ?wait= waits for more",
                "description": "Up to 1 MiB of one stream from `offset`. Headers: X-Output-Next (the offset to ask "
                               "for next), X-Output-Complete (true once the job has ended and nothing follows), "
                               "X-Output-Attempt (offsets count within one attempt; a job run again starts anew), "
                               "X-Job-State, and X-Output-Note when nothing can be served yet and why.",
                "parameters": [
                    _JOB_ID, _WAIT,
                    {"name": "stream", "in": "query", "schema": {"type": "string", "enum": ["stdout", "stderr"],
                                                                 "default": "stdout"}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                                                                   "default": 0}},
                ],
                "responses": {"200": _resp("bytes of the stream from offset", {"type": "string", "format": "binary"},
                                           "application/octet-stream"), **_errors(400, 404)}}},
            "/v1/peers": {"get": {"summary": "Cluster members", "responses": {
                "200": _resp("Members, by node_id", {"type": "object", "required": ["peers"], "properties": {
                    "peers": {"type": "array", "items": {"$ref": "#/components/schemas/Member"}}}}),
                **_errors()}}},
            "/v1/cluster": {"get": {"summary": "Members by state and resources", "responses": {
                "200": _resp("Totals", {"$ref": "#/components/schemas/Cluster"}), **_errors()}}},
            "/v1/drain": {"post": {
                "summary": "Drain this agent: no new jobs, queued ones to peers, then leave once running ones end",
                "description": "Admin tenants only (403 for another).",
                "responses": {"200": _resp("Drain started (or already under way)", {
                    "type": "object", "required": ["node_id", "draining", "queued", "running"], "properties": {
                        "node_id": {"type": "string"}, "draining": {"const": True},
                        "queued": {"type": "integer"}, "running": {"type": "integer"}}}), **_errors()}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {
                "200": _resp("Serving (a runtime may be impaired: its jobs go to peers)", health),
                "503": _resp("Draining, or its job store cannot be written", health)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": _resp("Text format", {"type": "string"}, "text/plain")}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": _resp("OpenAPI 3.1", {"type": "object", "required": ["openapi", "info", "paths", "components"],
                                             "additionalProperties": True})}}},
        },
        "components": {"schemas": schemas},
    }
