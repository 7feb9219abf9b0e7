"""Whatever a client sends, a real agent answers with a success or a 4xx that says what
was wrong, never a 500, and it keeps serving. Hypothesis draws the requests: specs
with fields replaced by arbitrary JSON, unknown and missing fields, batches of them,
signed-shape submissions with arbitrary auth blocks, bodies that are not JSON, and odd
ids and query parameters."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents import WASM, AgentProcess, new_agent

HELLO = (WASM / "hello.wasm").read_bytes()
HELLO_SHA = hashlib.sha256(HELLO).hexdigest()

#: Any JSON value, nested a little.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10,
)
TOP = ["id", "tenant", "runtime", "module", "module_sha256", "command", "entry", "args", "env", "input",
       "resources", "limits", "priority", "capabilities", "labels", "mask_patterns", "artifacts"]
NESTED = {"resources": ["cpu", "mem_mb", "gpu", "gpu_type"],
          "limits": ["wall_ms", "cpu_ms", "fuel", "mem_bytes", "stack_bytes", "stdout_bytes", "stderr_bytes",
                     "pids", "nofile", "violation", "grace_ms"]}


@st.composite
def specs(draw: st.DrawFn) -> Any:
    """A valid hello spec with one to three things changed, or now and then any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    spec: dict[str, Any] = {"module_sha256": HELLO_SHA, "limits": {"wall_ms": 5000}}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "nested", "unknown", "drop"]))
        if kind == "field":
            spec[draw(st.sampled_from(TOP))] = draw(JSON)
        elif kind == "nested":
            group = draw(st.sampled_from(sorted(NESTED)))
            inner = spec[group] if isinstance(spec.get(group), dict) else {}
            inner[draw(st.sampled_from(NESTED[group]))] = draw(JSON)
            spec[group] = inner
        elif kind == "unknown":
            spec[draw(st.text(min_size=1, max_size=12))] = draw(JSON)
        elif spec:
            spec.pop(draw(st.sampled_from(sorted(spec))))
    return spec


#: A submission: a bare spec, or one in the signed shape with an arbitrary auth block.
SUBMISSIONS = specs() | st.fixed_dictionaries({"spec": specs(), "auth": JSON})
IDS = st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and s not in (".", ".."))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = new_agent(tmp_path_factory.mktemp("fuzz"), "fz").start()
    with a.client() as http:
        r = http.post("/v1/jobs", json={"module": base64.b64encode(HELLO).decode(), "limits": {"wall_ms": 5000}})
        assert r.status_code == 202, r.text
    yield a
    assert a.stop() == 0


def answered(r: httpx.Response) -> None:
    """A success, or a client error whose body names the problem; never a server error."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["reason"], str) and error["reason"]
        assert isinstance(error["message"], str) and len(error["message"]) > 10, error


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(spec=SUBMISSIONS)
def test_a_submission_of_anything_gets_a_record_or_a_named_error(agent: AgentProcess, spec: Any) -> None:
    with agent.client() as http:
        r = http.post("/v1/jobs", json=spec)
        answered(r)
        if r.status_code >= 400:
            assert r.status_code in (400, 401, 403, 404, 409, 413, 422, 429), r.text
            if isinstance(spec, dict) and r.json()["error"]["reason"] == "invalid_spec":
                assert r.json()["error"].get("fields"), r.text  # it says which fields
        else:
            assert r.json()["state"] in ("queued", "placed", "running", "succeeded", "failed", "timed_out",
                                         "cancelled", "rejected")
        assert http.get("/healthz").status_code == 200


@FUZZ
@given(jobs=st.lists(SUBMISSIONS, max_size=5) | JSON)
def test_a_batch_of_anything_gets_one_answer_per_item(agent: AgentProcess, jobs: Any) -> None:
    with agent.client() as http:
        r = http.post("/v1/jobs:batch", json={"jobs": jobs})
        answered(r)
        if isinstance(jobs, list):
            results = r.json()["results"]
            assert len(results) == len(jobs)
            for item in results:
                assert ("job" in item) != ("error" in item), item
                if "error" in item:
                    assert item["error"]["status"] < 500 and item["error"]["message"], item
        else:
            assert r.status_code == 400


@FUZZ
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_a_body_that_is_not_json_is_refused_by_name(agent: AgentProcess, body: bytes) -> None:
    try:
        json.loads(body)
    except ValueError:
        pass
    else:
        return  # that one is JSON after all; the tests above cover JSON
    with agent.client() as http:
        for path in ("/v1/jobs", "/v1/jobs:batch", "/v1/jobs:wait", "/v1/jobs:cancel"):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            answered(r)
            assert r.status_code == 400, (path, r.text)


@FUZZ
@given(job_id=IDS, params=st.dictionaries(st.sampled_from(["state", "tenant", "limit", "cursor", "wait", "label",
                                                            "spec", "offset"]),
                                          st.text(max_size=20), max_size=3))
def test_odd_ids_and_query_parameters_get_named_errors(agent: AgentProcess, job_id: str,
                                                        params: dict[str, str]) -> None:
    with agent.client() as http:
        answered(http.get("/v1/jobs", params=params))
        safe = f"/v1/jobs/{quote(job_id, safe='')}"
        for method, path in (("GET", safe), ("GET", f"{safe}/result"), ("DELETE", safe)):
            query = {k: v for k, v in params.items() if k in ("wait", "spec", "offset")}
            if "wait" in query:
                query["wait"] = query["wait"][:4]  # a long poll of an unknown job still answers at once
            answered(http.request(method, path, params=query))
        assert http.get("/healthz").status_code == 200


BODIES = st.fixed_dictionaries({}, optional={"ids": st.lists(IDS, max_size=3) | JSON, "wait": JSON,
                                             "labels": st.dictionaries(st.text(max_size=8), JSON, max_size=2) | JSON,
                                             "tenant": JSON, "state": JSON}) | JSON


@FUZZ
@given(body=BODIES)
def test_waits_and_cancels_of_anything_get_answers_or_named_errors(agent: AgentProcess, body: Any) -> None:
    with agent.client() as http:
        for path in ("/v1/jobs:wait", "/v1/jobs:cancel"):
            r = http.post(path, json=body)
            answered(r)
            if r.status_code < 400:
                assert isinstance(r.json()["results"], list), r.text
        params = {k: str(v) for k, v in body.items()} if isinstance(body, dict) else {}
        answered(http.get("/v1/jobs:counts", params=params))
        assert http.get("/healthz").status_code == 200
