"""Inputs a JSON generator rarely makes, against a real agent and real hypercorn: each
gets a 4xx that names what is wrong, and the agent goes on serving and storing jobs."""

import json
import logging

import pytest

from agents import running_agent, wasm_spec

JSON = {"content-type": "application/json"}


async def _still_serving(http):
    """The agent answers, writes its store, and runs a job to the end."""
    assert (await http.get("/healthz")).status_code == 200
    r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))
    assert r.status_code == 202, r.text
    done = (await http.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 30})).json()
    assert done["state"] == "succeeded"


@pytest.mark.parametrize("body", [
    # once enough to stop the agent: the store could not bind the label key, and its
    # transaction stayed open
    '{"runtime":"process","command":["/bin/true"],"labels":{"\\ud800":"x"}}',
    '{"runtime":"process","command":["/bin/echo","\\udfff"]}',
    '{"runtime":"process","command":["/bin/true"],"env":{"A\\ud800":"x"}}',
])
async def test_a_lone_surrogate_is_malformed_json_and_the_agent_keeps_serving(tmp_path, body):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", content=body.encode(), headers=JSON)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["reason"] == "malformed_json" and "surrogate" in error["message"]
        await _still_serving(http)
        assert agent.store.write_error is None


async def test_a_batch_that_holds_a_lone_surrogate_leaves_no_job_behind(tmp_path):
    # The batch used to be answered 500 while its first job stayed stored and queued,
    # never to run until the agent restarted.
    good = json.dumps({"id": "first", "runtime": "process", "command": ["/bin/true"]})
    body = '{"jobs":[' + good + ',{"runtime":"process","command":["/bin/echo","\\ud800"]}]}'
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs:batch", content=body.encode(), headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "malformed_json"
        assert (await http.get("/v1/jobs/first")).status_code == 404
        r = await http.post("/v1/jobs:wait", content=b'{"ids":["\\ud800"]}', headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "malformed_json"
        await _still_serving(http)


@pytest.mark.parametrize(("body", "words"), [
    (b"[" * 1000, "nested more than 200"),
    (b'{"ids":["a"],"wait":' + b"1" * 4301 + b"}", "number out of range"),
    (b'{"ids":["a"],"wait":NaN}', "expected value"),
])
async def test_deep_nesting_long_numbers_and_nan_are_malformed_json(tmp_path, body, words):
    async with running_agent(tmp_path) as (agent, http):
        for path in ("/v1/jobs", "/v1/jobs:batch", "/v1/jobs:wait", "/v1/jobs:cancel"):
            r = await http.post(path, content=body, headers=JSON)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["reason"] == "malformed_json" and words in r.json()["error"]["message"]
        await _still_serving(http)


async def test_a_cursor_or_offset_past_sqlite_integers_is_refused_by_name(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.get("/v1/jobs", params={"cursor": str(2**63)})
        assert r.status_code == 400 and "cursor 0 to 9223372036854775807" in r.json()["error"]["message"]
        assert (await http.get("/v1/jobs", params={"cursor": str(2**63 - 1)})).status_code == 200
        job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        r = await http.get(f"/v1/jobs/{job}/output", params={"offset": str(2**64)})
        assert r.status_code == 400 and "offset=18446744073709551616 must be 0 to" in r.json()["error"]["message"]
        await _still_serving(http)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/v1/jobs", "GET, HEAD, POST"),
    ("PATCH", "/v1/jobs/some-job", "DELETE, GET, HEAD"),
    ("GET", "/v1/jobs:batch", "POST"),
])
async def test_405_names_every_method_the_path_takes(tmp_path, method, path, allow):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.request(method, path)
        assert r.status_code == 405
        assert r.headers["allow"] == allow
        assert r.json()["error"]["reason"] == "method_not_allowed" and f"use {allow}" in r.json()["error"]["message"]


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"command": ["/bin/echo", "a\0b"]}, "command", "item 1 holds a NUL"),
    ({"command": ["/bin/true"], "env": {"A=B": "x"}}, "env", "variable name 'A=B'"),
    ({"command": ["/bin/true"], "env": {"": "x"}}, "env", "must be non-empty"),
    ({"command": ["/bin/true"], "env": {"A": "x\0"}}, "env", "value of A holds a NUL"),
    # a 20 MB PATH was accepted, and looking the program up in it held the agent 5.5 s
    ({"command": ["nothere"], "env": {"PATH": "/x:" * 50_000}}, "env", "PATH= is over 131,072 bytes"),
    ({"command": ["/bin/echo", "a" * 200_000]}, "command", "item 1 is 200,000 bytes"),
    ({"command": ["/bin/true"], "args": ["a" * 100_000] * 25}, "(body)", "come to 2,500,035 bytes"),
    # ./train.sh was looked for in the executor's working directory
    ({"command": ["./train.sh"]}, "command", "the program './train.sh' is a relative path"),
    ({"command": ["jobs/train.sh", "x"]}, "command", "give its absolute path on the executor"),
])
async def test_argv_and_env_no_process_could_take_are_refused_by_field(tmp_path, spec, field, words):
    # They used to be accepted, then fail at run time with a traceback in the job's stderr.
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json={"runtime": "process", **spec})
        assert r.status_code == 400
        [error] = r.json()["error"]["fields"]
        assert error["field"] == field and words in error["message"]


@pytest.mark.parametrize(("labels", "words"), [
    # 8 MiB labels stalled the agent for seconds and grew its store 7x their size
    ({"blob": "x" * 300}, "label blob: its value must be at most 256 printable characters (this one is 300)"),
    ({"k" * 64: "v"}, "must be 1 to 63 printable characters"),
    ({"": "v"}, "label key '' must be"),
    ({"a=b": "c"}, "without '=' (a filter is label=KEY=VALUE)"),  # label=a=b=c could never find it
    ({"sweep": "lr\n"}, "printable"),
])
async def test_labels_are_short_findable_text(tmp_path, labels, words):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels=labels))
        assert r.status_code == 400, r.text
        [error] = r.json()["error"]["fields"]
        assert error["field"] == "labels" and words in error["message"], error
        ok = await http.post("/v1/jobs", json=wasm_spec("hello.wasm", labels={"k" * 63: "v" * 256, "node.zone": ""}))
        assert ok.status_code == 202, ok.text


@pytest.mark.parametrize(("spec", "field", "words"), [
    # 1 GiB each was allowed: one job flooding both grew the agent by 4 GB
    ({"limits": {"stdout_bytes": (64 << 20) + 1}}, "limits.stdout_bytes", "less than or equal to 67108864"),
    ({"resources": {"mem_mb": 2}, "limits": {"stdout_bytes": 2 << 20, "stderr_bytes": 1}}, "(body)",
     "come to 2,097,153 bytes, more than the job's memory reservation resources.mem_mb (2 MiB"),
    ({"resources": {"mem_mb": 1}, "limits": {"stdout_bytes": 2 << 20}}, "(body)", "(1 MiB, 1,048,576 bytes)"),
    ({"limits": {"mem_bytes": 64 << 20, "stdout_bytes": 64 << 20}}, "(body)",
     "the agent holds kept output in memory, so it counts within the reservation; raise mem_mb"),
])
async def test_output_a_job_keeps_is_bounded_and_counted_in_its_reservation(tmp_path, spec, field, words):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/true"], **spec})
        assert r.status_code == 400, r.text
        [error] = r.json()["error"]["fields"]
        assert error["field"] == field and words in error["message"], error
        big = {"resources": {"mem_mb": 256}, "limits": {"stdout_bytes": 64 << 20, "stderr_bytes": 64 << 20}}
        small = {"resources": {"mem_mb": 1}}  # the default caps (1.25 MiB) fit whatever is reserved
        for fits in (big, small):
            ok = await http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/true"], **fits})
            assert ok.status_code == 202, ok.text


async def test_an_unexpected_error_is_a_logged_json_500_and_the_agent_serves_on(tmp_path, monkeypatch, caplog):
    async with running_agent(tmp_path) as (agent, http):
        async def broken(**kw):
            raise RuntimeError("a bug in listing")

        monkeypatch.setattr(agent, "list_jobs", broken)
        with caplog.at_level(logging.ERROR, logger="p2psched.api"):
            r = await http.get("/v1/jobs")
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["reason"] == "internal_error" and "RuntimeError" in error["message"]
        assert "its log holds the traceback" in error["message"]
        [logged] = [rec for rec in caplog.records if rec.name == "p2psched.api"]
        assert logged.exc_info and "a bug in listing" in str(logged.exc_info[1])
        await _still_serving(http)


async def test_a_bug_met_by_one_job_of_a_batch_leaves_the_others_running(tmp_path, monkeypatch):
    async with running_agent(tmp_path) as (agent, http):
        accept = agent._accept

        def flaky(spec, now, auth=None):
            if spec.id == "bad":
                raise RuntimeError("a bug met by this spec only")
            return accept(spec, now, auth)

        monkeypatch.setattr(agent, "_accept", flaky)
        specs = [wasm_spec("hello.wasm", id=job_id) for job_id in ("before", "bad", "after")]
        r = await http.post("/v1/jobs:batch", json={"jobs": specs})
        assert r.status_code == 207
        before, bad, after = r.json()["results"]
        assert bad["error"]["status"] == 500 and bad["error"]["reason"] == "internal_error"
        for job_id in ("before", "after"):
            done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
            assert done["state"] == "succeeded", done
        assert (await http.get("/v1/jobs/bad")).status_code == 404


@pytest.mark.parametrize(("query", "says"), [
    ("limit=\u0665", "limit and cursor must be integers"),  # an Arabic-Indic five: int() takes it
    ("limit=10_0", "limit and cursor must be integers"),
    ("limit=%205", "limit and cursor must be integers"),
    ("limit=5&limit=7", "query parameter(s) ['limit'] given more than once"),
    ("cursor=-1", "limit and cursor must be integers"),
])
async def test_a_query_number_is_plain_digits_given_once(tmp_path, query, says):
    async with running_agent(tmp_path) as (agent, http):
        r = await http.get(f"/v1/jobs?{query}")
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_query", r.text
        assert says in r.json()["error"]["message"]
        job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        for wait in ("1_0", "%205", "nan", "\u0665"):
            r = await http.get(f"/v1/jobs/{job}?wait={wait}")
            assert r.status_code == 400 and "must be a number of seconds" in r.json()["error"]["message"], wait
        assert (await http.get("/v1/jobs?limit=5&label=a=b&label=c=d")).status_code == 200  # label= is a list


@pytest.mark.parametrize(("path", "params", "says"), [
    ("/v1/jobs/{id}", {"wiat": "5"}, "unknown query parameter(s) ['wiat']; use wait, spec"),
    ("/v1/jobs/{id}", {"spec": "yes"}, "spec='yes': use spec=1"),
    ("/v1/jobs/{id}/result", {"artefact": "x"}, "unknown query parameter(s) ['artefact']; use wait, artifact"),
])
async def test_a_misspelt_query_parameter_is_refused_not_ignored(tmp_path, path, params, says):
    async with running_agent(tmp_path) as (agent, http):
        job = (await http.post("/v1/jobs", json=wasm_spec("hello.wasm"))).json()["id"]
        r = await http.get(path.format(id=job), params=params)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_query"
        assert says in r.json()["error"]["message"]
        assert (await http.get(path.format(id=job), params={"wait": "10"})).status_code == 200
        assert (await http.get(f"/v1/jobs/{job}", params={"spec": "1"})).json()["spec"]["runtime"] == "wasm"


async def test_a_process_job_leaves_no_directory_behind(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        for _ in range(4):  # the first cold, then from the warm pool
            job = (await http.post("/v1/jobs", json={"runtime": "process", "command": ["/bin/true"]})).json()["id"]
            done = (await http.get(f"/v1/jobs/{job}", params={"wait": 30})).json()
            assert done["state"] == "succeeded", done
            assert done["timeline"][-1]["detail"] == "exit 0"
        work = agent.data_dir / "work"
        assert not work.exists() or list(work.iterdir()) == []
