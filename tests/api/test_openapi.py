"""The OpenAPI document at /openapi.json says what the agent really serves.

Every route of the app is in it with its method, and nothing else is; it is valid
OpenAPI 3.1; and every answer of real agents, driven through each endpoint, fits the
schema the document gives for its path, method and status, with no key the schema
does not name. A key added to a record, a result or an error without a word in
p2psched/api/openapi.py fails here, naming where it was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import trio
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from p2psched import __version__, dashboard
from p2psched.api.openapi import openapi_document
from p2psched.api.server import create_app

from agents import FAST_MEMBERSHIP, await_peers, running_agent, wasm_spec

DOC = openapi_document()
#: The document as a JSON Schema resource, so that a schema's "#/components/..." refs
#: resolve against it wherever in the document the schema sits.
DOC_URI = "urn:p2psched:openapi"
REGISTRY: Registry[Any] = Registry().with_resource(DOC_URI, Resource(contents=DOC, specification=DRAFT202012))
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def _pointer(*parts: str) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def _at(pointer: str) -> Any:
    node: Any = DOC
    for part in pointer.split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def _fits(value: Any, pointer: str) -> bool:
    return Draft202012Validator({"$ref": DOC_URI + "#" + pointer}, registry=REGISTRY).is_valid(value)


def _applicable(pointer: str, value: Any) -> list[str]:
    """The schema at ``pointer`` and those it defers to for ``value``: its $ref, its
    allOf, and the branches of its oneOf/anyOf that ``value`` fits (all of them when
    it fits none: validation says that, and the keys are still looked for)."""
    schema = _at(pointer)
    if not isinstance(schema, dict):
        return [pointer]
    out = [pointer]
    if "$ref" in schema:
        assert schema["$ref"].startswith("#/"), f"{pointer}: only refs inside the document are expected"
        out += _applicable(schema["$ref"][1:], value)
    for i, _ in enumerate(schema.get("allOf", [])):
        out += _applicable(f"{pointer}/allOf/{i}", value)
    for key in ("oneOf", "anyOf"):
        branches = [f"{pointer}/{key}/{i}" for i, _ in enumerate(schema.get(key, []))]
        for branch in [b for b in branches if _fits(value, b)] or branches:
            out += _applicable(branch, value)
    return out


def undocumented(value: Any, pointer: str, where: str = "") -> list[str]:
    """Each key in ``value`` that the schema at ``pointer`` does not name, as a path
    into ``value``. A key is named by ``properties``, or by an ``additionalProperties``
    schema (a map such as labels); ``additionalProperties: true`` or the empty schema
    says on purpose that anything goes below it."""
    schemas = [(p, _at(p)) for p in _applicable(pointer, value)]
    if any(s is True or s == {} for _, s in schemas):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            named = [f"{p}/properties/{_pointer(key)[1:]}" for p, s in schemas
                     if isinstance(s, dict) and key in s.get("properties", {})]
            named += [f"{p}/additionalProperties" for p, s in schemas
                      if isinstance(s, dict) and "additionalProperties" in s and s["additionalProperties"] is not False]
            if not named:
                out.append(f"{where}.{key}")
            elif _at(named[0]) is not True:
                out += undocumented(item, named[0], f"{where}.{key}")
    elif isinstance(value, list):
        items = [f"{p}/items" for p, s in schemas if isinstance(s, dict) and "items" in s]
        for i, item in enumerate(value):
            if items:
                out += undocumented(item, items[0], f"{where}[{i}]")
    return out


@dataclass
class Answers:
    """Checks each answer against the document and remembers which operations and
    statuses were driven; ``problems`` lists every mismatch, so one run names them all."""

    problems: list[str] = field(default_factory=list)
    driven: set[tuple[str, str, str]] = field(default_factory=set)

    def check(self, r: httpx.Response, path: str, status: int) -> Any:
        method = r.request.method.lower()
        what = f"{r.request.method} {r.request.url.raw_path.decode()} -> {r.status_code}"
        assert r.status_code == status, f"{what}, not {status}: {r.text[:500]}"
        self.driven.add((path, method, str(status)))
        ctype = r.headers.get("content-type", "").split(";")[0].strip()
        operation = DOC["paths"].get(path, {}).get(method)
        if operation is None:
            self.problems.append(f"{what}: the document has no {method} {path}")
            return r.json() if ctype == "application/json" else None
        responses = operation["responses"]
        code = str(status) if str(status) in responses else "default"
        if code not in responses:
            self.problems.append(f"{what}: the document lists no {status} (nor a default) for {method} {path}")
            return r.json() if ctype == "application/json" else None
        content = responses[code].get("content")
        if not content or ctype not in content:
            self.problems.append(f"{what}: answered {ctype or 'no content'}; the document says "
                                 f"{sorted(content or {}) or 'nothing'}")
            return r.json() if ctype == "application/json" else None
        if ctype != "application/json":
            return None
        body = r.json()
        pointer = _pointer("paths", path, method, "responses", code, "content", ctype, "schema")
        validator = Draft202012Validator({"$ref": DOC_URI + "#" + pointer}, registry=REGISTRY)
        for e in validator.iter_errors(body):
            self.problems.append(f"{what}: at {'/'.join(map(str, e.absolute_path)) or 'the top'}: {e.message[:300]}")
        self.problems += [f"{what}: key {key} is not in the document" for key in undocumented(body, pointer)]
        return body


def test_every_route_of_the_app_is_documented_with_its_methods_and_nothing_else_is():
    app = create_app(SimpleNamespace(settings=SimpleNamespace(max_request_bytes=1024)))
    pages = {r.path for r in dashboard.routes()}  # the dashboard's HTML, not the API
    served = set()
    for route in app.routes:
        if route.path in pages:
            continue
        methods = {m.lower() for m in route.methods or ()}
        if "get" in methods:
            methods.discard("head")  # Starlette answers HEAD on every GET route
        served |= {(route.path, m) for m in methods}
    documented = {(path, m) for path, ops in DOC["paths"].items() for m in ops if m in METHODS}
    assert not served - documented, f"routes the document does not describe: {sorted(served - documented)}"
    assert not documented - served, f"operations the document describes that no route serves: " \
                                    f"{sorted(documented - served)}"


def test_the_document_is_valid_openapi_3_1_and_each_response_says_what_it_holds():
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
              for e in OpenAPIV31SpecValidator(DOC).iter_errors()]
    assert not errors, "\n".join(errors)
    bare = [f"{m.upper()} {path} {code}" for path, ops in DOC["paths"].items() for m, op in ops.items()
            if m in METHODS for code, resp in op["responses"].items() if not resp.get("content")]
    assert not bare, f"responses with no content or schema: {bare}"


async def test_every_answer_of_an_agent_fits_the_document(tmp_path):
    a = Answers()
    async with running_agent(tmp_path, cpus=1, queue_limit=3) as (agent, http):
        doc = a.check(await http.get("/openapi.json"), "/openapi.json", 200)
        assert doc == DOC
        a.check(await http.get("/healthz"), "/healthz", 200)
        a.check(await http.get("/metrics"), "/metrics", 200)
        a.check(await http.get("/v1/peers"), "/v1/peers", 200)
        a.check(await http.get("/v1/cluster"), "/v1/cluster", 200)

        # Submissions: a new job, the same id again, a bad spec; batches, one with a bad item.
        a.check(await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="hello", labels={"sweep": "a"})),
                "/v1/jobs", 202)
        a.check(await http.post("/v1/jobs", json=wasm_spec("hello.wasm", id="hello", labels={"sweep": "a"})),
                "/v1/jobs", 200)
        a.check(await http.post("/v1/jobs", json={"runtime": "wasm", "colour": "red"}), "/v1/jobs", 400)
        batch = a.check(await http.post("/v1/jobs:batch", json={"jobs": [
            wasm_spec("loop.wasm", limits={"fuel": 10_000}), {"id": "bad", "runtime": "wasm", "limits": {"wall_ms": -1}}]}),
            "/v1/jobs:batch", 207)
        fuel_id = batch["results"][0]["job"]["id"]
        batch = a.check(await http.post("/v1/jobs:batch", json={"jobs": [
            wasm_spec("loop.wasm", limits={"wall_ms": 50})]}), "/v1/jobs:batch", 202)
        wall_id = batch["results"][0]["job"]["id"]
        a.check(await http.post("/v1/jobs:batch", json={"specs": []}), "/v1/jobs:batch", 400)

        # Reads: each job once it ended (one succeeded, one out of fuel, one out of time).
        done = a.check(await http.post("/v1/jobs:wait", json={"ids": ["hello", fuel_id, wall_id], "wait": 30}),
                       "/v1/jobs:wait", 200)
        assert [d["job"]["state"] for d in done["results"]] == ["succeeded", "failed", "timed_out"], done
        assert [d["job"]["result"]["limit_hit"] for d in done["results"]] == [None, "out_of_fuel", "wall_timeout"], done
        a.check(await http.post("/v1/jobs:wait", json={"ids": ["hello", "nope"]}), "/v1/jobs:wait", 207)
        a.check(await http.post("/v1/jobs:wait", json={"ids": []}), "/v1/jobs:wait", 400)
        a.check(await http.get("/v1/jobs/hello", params={"wait": 10}), "/v1/jobs/{job_id}", 200)
        a.check(await http.get("/v1/jobs/hello", params={"spec": "1"}), "/v1/jobs/{job_id}", 200)
        a.check(await http.get("/v1/jobs/nope"), "/v1/jobs/{job_id}", 404)
        a.check(await http.get("/v1/jobs"), "/v1/jobs", 200)
        a.check(await http.get("/v1/jobs", params={"label": "sweep=a", "order": "newest", "limit": 1}), "/v1/jobs", 200)
        a.check(await http.get("/v1/jobs", params={"state": "lost"}), "/v1/jobs", 400)
        a.check(await http.get("/v1/jobs:counts"), "/v1/jobs:counts", 200)
        a.check(await http.get("/v1/jobs:counts", params={"label": "sweep=a"}), "/v1/jobs:counts", 200)
        a.check(await http.get("/v1/jobs:counts", params={"label": "sweep"}), "/v1/jobs:counts", 400)
        a.check(await http.get("/v1/jobs/hello/result"), "/v1/jobs/{job_id}/result", 200)
        a.check(await http.get("/v1/jobs/nope/result"), "/v1/jobs/{job_id}/result", 404)
        a.check(await http.get("/v1/jobs/hello/output", params={"stream": "stderr"}), "/v1/jobs/{job_id}/output", 200)
        a.check(await http.get("/v1/jobs/hello/output", params={"offset": "-1"}), "/v1/jobs/{job_id}/output", 400)
        a.check(await http.get("/v1/jobs/nope/output"), "/v1/jobs/{job_id}/output", 404)

        # A late result from another executor, as a forwarded job's second attempt sends
        # it: recorded beside the first as a duplicate attempt.
        await agent._on_result({"id": "hello", "executor": "elsewhere", "attempt": 2,
                                "result": {"exit_code": 1, "reason": "exit 1"}})
        rec = a.check(await http.get("/v1/jobs/hello"), "/v1/jobs/{job_id}", 200)
        assert rec["duplicate_attempts"], rec

        # With the one slot taken and the queue full: refusals, then cancels.
        blocker = a.check(await http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 60_000})),
                          "/v1/jobs", 202)["id"]
        with trio.fail_after(30):
            while agent.get(blocker).state.value != "running":
                await trio.sleep(0.01)
        a.check(await http.get(f"/v1/jobs/{blocker}/result"), "/v1/jobs/{job_id}/result", 409)
        a.check(await http.get(f"/v1/jobs/{blocker}/output"), "/v1/jobs/{job_id}/output", 200)
        a.check(await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm", labels={"sweep": "c"})] * 2
                                                        + [wasm_spec("hello.wasm", id="third")]}),
                "/v1/jobs:batch", 202)
        a.check(await http.post("/v1/jobs", json=wasm_spec("hello.wasm")), "/v1/jobs", 429)
        full = a.check(await http.post("/v1/jobs:batch", json={"jobs": [wasm_spec("hello.wasm")]}),
                       "/v1/jobs:batch", 207)
        assert full["results"][0]["error"]["retry_after"] >= 1, full
        a.check(await http.delete("/v1/jobs/third"), "/v1/jobs/{job_id}", 200)
        a.check(await http.delete("/v1/jobs/hello"), "/v1/jobs/{job_id}", 409)
        a.check(await http.delete("/v1/jobs/nope"), "/v1/jobs/{job_id}", 404)
        by_label = a.check(await http.post("/v1/jobs:cancel", json={"labels": {"sweep": "c"}, "limit": 1}),
                           "/v1/jobs:cancel", 200)
        assert by_label["cancelled"] == 1 and by_label["more"] is True, by_label
        a.check(await http.post("/v1/jobs:cancel", json={"ids": ["hello", "nope"]}), "/v1/jobs:cancel", 207)
        a.check(await http.post("/v1/jobs:cancel", json={"ids": ["x"], "limit": 1}), "/v1/jobs:cancel", 400)

        # Drain last, with the blocker still running so that the agent stays up to answer.
        a.check(await http.post("/v1/drain"), "/v1/drain", 200)
        a.check(await http.get("/healthz"), "/healthz", 503)
        a.check(await http.post("/v1/jobs", json=wasm_spec("hello.wasm")), "/v1/jobs", 503)
        a.check(await http.get("/v1/peers"), "/v1/peers", 200)
        a.check(await http.delete(f"/v1/jobs/{blocker}"), "/v1/jobs/{job_id}", 200)

    assert not a.problems, "answers the document does not describe:\n" + "\n".join(a.problems)
    documented = {(path, m) for path, ops in DOC["paths"].items() for m in ops if m in METHODS}
    undriven = documented - {(p, m) for p, m, _ in a.driven}
    assert not undriven, f"operations this test never drove; drive each here: {sorted(undriven)}"


async def test_a_forwarded_job_and_a_peer_fit_the_document(tmp_path):
    a = Answers()
    async with running_agent(tmp_path / "e", node_id="exec", cpus=2, membership=FAST_MEMBERSHIP,
                             labels={"rack": "r1"}) as (executor, exec_http):
        async with running_agent(tmp_path / "o", node_id="origin", cpus=1, join=[executor.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (origin, http):
            await await_peers(origin, "exec")
            await await_peers(executor, "origin")
            # Two CPUs: only the executor can run it.
            job = a.check(await http.post("/v1/jobs", json=wasm_spec("hello.wasm", resources={"cpu": 2})),
                          "/v1/jobs", 202)["id"]
            rec = a.check(await http.get(f"/v1/jobs/{job}", params={"wait": 30}), "/v1/jobs/{job_id}", 200)
            assert rec["state"] == "succeeded" and rec["executor"] == "exec" and rec["route"], rec
            a.check(await exec_http.get(f"/v1/jobs/{job}"), "/v1/jobs/{job_id}", 200)
            peers = a.check(await http.get("/v1/peers"), "/v1/peers", 200)
            assert sorted(p["self"] for p in peers["peers"]) == [False, True], peers
            # every row, the answering agent's own too, names its version
            assert [p["agent_version"] for p in peers["peers"]] == [__version__] * 2, peers
            a.check(await http.get("/v1/cluster"), "/v1/cluster", 200)
            a.check(await exec_http.get("/v1/peers"), "/v1/peers", 200)
    assert not a.problems, "answers the document does not describe:\n" + "\n".join(a.problems)


def test_the_bodies_clients_send_fit_the_documented_request_schemas():
    # What `p2psched submit` sends: a bare spec, or one signed by its tenant.
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2psched.jobs.spec import JobSpec
    from p2psched.security.signing import sign_spec

    bare = wasm_spec("hello.wasm")
    signed = sign_spec(JobSpec.model_validate(bare), "alice", Ed25519PrivateKey.generate(), now=time.time()).to_json()
    submit = _pointer("paths", "/v1/jobs", "post", "requestBody", "content", "application/json", "schema")
    batch = _pointer("paths", "/v1/jobs:batch", "post", "requestBody", "content", "application/json", "schema")
    for body in (bare, signed, {"spec": bare}):
        assert _fits(body, submit), body
    assert _fits({"jobs": [bare, signed]}, batch)
    # and what the agent refuses, the document refuses too
    assert not _fits({**signed, "extra": 1}, submit)
    assert not _fits({"spec": bare, "auth": {**signed["auth"], "signature": 5}}, submit)
    assert not _fits({"specs": [bare]}, batch)
