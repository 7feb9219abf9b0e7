"""The OpenAPI description served at /openapi.json.

Paths are listed by hand (they are few and stable); the schemas come from the same
pydantic models that validate requests, so the document cannot drift from them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from p2psched import __version__
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState

_ERR = {"$ref": "#/components/schemas/Error"}
_REC = {"$ref": "#/components/schemas/JobRecord"}


def _resp(desc: str, schema: dict[str, Any] | None = None, ctype: str = "application/json") -> dict[str, Any]:
    r: dict[str, Any] = {"description": desc}
    if schema is not None:
        r["content"] = {ctype: {"schema": schema}}
    return r


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Invalid input; `error.fields` names each bad field.", 404: "Unknown job.",
            409: "Conflict with the job's state.", 413: "Body too large.", 429: "Queue full; see Retry-After.",
            503: "Agent shutting down."}
    return {str(c): _resp(text[c], _ERR) for c in codes}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_WAIT = {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 300},
         "description": "Long-poll: wait up to this many seconds for the job to end."}
_LABEL = {"name": "label", "in": "query", "schema": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
          "style": "form", "explode": True,
          "description": "KEY=VALUE, repeatable: only jobs carrying every one of these labels."}


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = spec_schema.pop("$defs", {})
    schemas: dict[str, Any] = {**defs, "JobSpec": spec_schema}
    schemas["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "object", "properties": {
            "status": {"type": "integer"}, "reason": {"type": "string"}, "message": {"type": "string"},
            "fields": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "message": {"type": "string"}}}}}}},
    }
    schemas["JobRecord"] = {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "state": {"type": "string", "enum": [s.value for s in JobState]},
            "tenant": {"type": "string"}, "runtime": {"type": "string"}, "origin": {"type": "string"},
            "executor": {"type": ["string", "null"]}, "route": {"type": "array", "items": {"type": "string"}},
            "cost": {"type": "number"}, "hops": {"type": "integer"}, "attempts": {"type": "integer"},
            "timeline": {"type": "array", "items": {"type": "object", "properties": {
                "state": {"type": "string"}, "at": {"type": "number"}, "node": {"type": "string"},
                "detail": {"type": "string"}}}},
            "result": {"type": ["object", "null"], "properties": {
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
                "limit_hit": {"type": ["string", "null"]}, "signal": {"type": ["integer", "null"]},
                "warnings": {"type": "array", "items": {"type": "string"}},
                "attestation": {"type": ["object", "null"]},
                "artifacts": {"type": "object", "description": "name -> {size, sha256} of each file collected; "
                              "the bytes at /v1/jobs/{id}/result?artifact=NAME",
                              "additionalProperties": {"type": "object", "properties": {
                                  "size": {"type": "integer"}, "sha256": {"type": "string"}}}}}},
            "wait_reason": {"type": ["string", "null"]},
            "priority": {"type": "integer"}, "created_at": {"type": "number"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "the spec's labels; absent when it has none"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "p2psched agent API", "version": __version__},
        "paths": {
            "/v1/jobs": {
                "post": {"summary": "Submit a job", "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}},
                    "responses": {"202": _resp("Accepted", _REC), "200": _resp("Same id: the existing job", _REC),
                                  **_errors(400, 413, 429, 503)}},
                "get": {"summary": "List jobs", "parameters": [
                    {"name": "state", "in": "query", "schema": {"type": "string"}},
                    {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                    _LABEL,
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["oldest", "newest"]},
                     "description": "oldest (default): from cursor on; newest: newest first, below cursor"}],
                    "responses": {"200": _resp("Jobs", {"type": "object", "properties": {
                        "jobs": {"type": "array", "items": _REC}, "next_cursor": {"type": ["integer", "null"]}}}),
                        **_errors(400)}},
            },
            "/v1/jobs:counts": {"get": {"summary": "Stored jobs by state", "parameters": [
                {"name": "tenant", "in": "query", "schema": {"type": "string"}}, _LABEL],
                "responses": {"200": _resp("Counts", {"type": "object", "properties": {
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "tenant": {"type": ["string", "null"]},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"},
                               "description": "the label filters, when given"}}}), **_errors(400)}}},
            "/v1/jobs:batch": {"post": {"summary": "Submit many jobs", "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobSpec"}}}}}}},
                "responses": {"202": _resp("One record or error per spec, in order"),
                              "207": _resp("Some specs failed; see each result. A spec refused for now (a full "
                                           "queue: error.status 429) has error.retry_after, in seconds"),
                              **_errors(400, 413)}}},
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
                "responses": {"200": _resp("One record per id, in order"),
                              "207": _resp("Some ids have an error in place of a record"),
                              **_errors(400, 413)}}},
            "/v1/jobs:cancel": {"post": {
                "summary": "Cancel many jobs: named by id, or every unfinished job with the given labels",
                "description": "Access as for DELETE /v1/jobs/{job_id}. Jobs that have not started are cancelled "
                               "first, all at once; running ones are stopped and waited for (up to 30 s each). "
                               "By labels, at most `limit` jobs a request (waiting ones first, oldest first) of "
                               "the caller's tenant (an admin's: `tenant`, or every tenant); `more` says whether "
                               "others match: ask again. A job that is unknown, not the caller's, or already "
                               "ended has an error in its place (and the answer is 207).",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "ids": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                                "maxItems": 10000},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1,
                                   "maxProperties": 8},
                        "tenant": {"type": "string"},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}}}}}},
                "responses": {"200": _resp("One record per job, in order, with `cancelled` (how many are now "
                                           "cancelled) and `more`"),
                              "207": _resp("Some jobs have an error in place of a record"),
                              **_errors(400, 413)}}},
            "/v1/jobs/{job_id}": {
                "get": {"summary": "A job's record", "parameters": [_JOB_ID, _WAIT],
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
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                ],
                "responses": {"200": _resp("bytes of the stream from offset", {"type": "string", "format": "binary"},
                                           "application/octet-stream"), **_errors(400, 404)}}},
            "/v1/peers": {"get": {"summary": "Cluster members", "responses": {"200": _resp("Members")}}},
            "/v1/cluster": {"get": {"summary": "Members by state and resources", "responses": {"200": _resp("Totals")}}},
            "/v1/drain": {"post": {"summary": "Drain this agent", "responses": {"200": _resp("Drain started")}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _resp("Serving"),
                                                                        "503": _resp("Draining or stopping")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": _resp("Text format")}}},
        },
        "components": {"schemas": schemas},
    }
