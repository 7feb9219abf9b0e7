"""Job spec files (p2psched batch): shapes, file-relative keys, and errors that say where."""

import base64
import hashlib
import json
from pathlib import Path

import pytest

from agents import ROOT, WASM
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.spec_file import Batch, SpecFileError, load

HELLO = (WASM / "hello.wasm").read_bytes()
ADD = (WASM / "add.wasm").read_bytes()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sent(batch: Batch) -> list[JobSpec]:
    """The specs one request of the whole file carries, as the agent parses them."""
    return [JobSpec.model_validate(s, strict=False) for s in batch.request_body(batch.jobs)]


def test_defaults_merge_into_each_job_and_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "prompt.bin").write_bytes(b"\x00\x01raw")
    (tmp_path / "add.wasm").write_bytes(ADD)
    spec_file = write(tmp_path / "sub" / "suite.yaml", f"""
defaults:
  module_file: {WASM / 'hello.wasm'}
  limits: {{wall_ms: 5000, mem_bytes: 1048576}}
  labels: {{suite: s}}
  args: [a]
jobs:
  - labels: {{n: "1"}}
  - limits: {{wall_ms: 9000}}
    args: [b, c]
    input_text: "héllo"
  - module_file: ../add.wasm
    input_file: prompt.bin
""")
    batch = load(spec_file)
    one, two, three = sent(batch)
    assert one.labels == {"suite": "s", "n": "1"} and one.limits.wall_ms == 5000 and one.args == ["a"]
    assert two.limits.wall_ms == 9000 and two.limits.mem_bytes == 1048576  # maps merge key by key
    assert two.args == ["b", "c"] and two.input == "héllo".encode()  # lists: the job's own wins
    assert three.input == b"\x00\x01raw" and three.module == ADD
    assert one.module == HELLO and two.module is None and two.module_sha256 == hashlib.sha256(HELLO).hexdigest()


def test_each_module_goes_once_per_request(tmp_path):
    lines = [json.dumps({"module_file": str(WASM / "add.wasm"), "entry": "add", "args": [str(i), "1"]})
             for i in range(5)]
    batch = load(write(tmp_path / "sweep.jsonl", "\n".join(lines) + "\n\n"))
    assert len(batch.jobs) == 5 and len(batch.modules) == 1
    first = batch.request_body(batch.jobs[:3])
    assert "module" in first[0] and all("module" not in s and "module_sha256" in s for s in first[1:])
    again = batch.request_body(batch.jobs[3:])  # a later request carries the bytes again
    assert base64.b64decode(again[0]["module"]) == ADD


def test_id_prefix_names_jobs_by_place_and_keeps_given_ids(tmp_path):
    batch = load(write(tmp_path / "j.yaml", f"- {{module_file: {WASM / 'hello.wasm'}}}\n"
                       f"- {{module_file: {WASM / 'hello.wasm'}, id: mine}}\n"
                       f"- {{module_file: {WASM / 'hello.wasm'}}}\n"), id_prefix="run7")
    assert [j.spec["id"] for j in batch.jobs] == ["run7-1", "mine", "run7-3"]


def test_run_labels_go_on_every_job_over_the_files_value(tmp_path):
    batch = load(write(tmp_path / "j.yaml", f"- {{module_file: {WASM / 'hello.wasm'}}}\n"
                       f"- {{module_file: {WASM / 'hello.wasm'}, labels: {{run: old, n: '2'}}}}\n"),
                 labels={"run": "7"})
    assert [s.labels for s in sent(batch)] == [{"run": "7"}, {"run": "7", "n": "2"}]
    with pytest.raises(SpecFileError, match=r"jobs\[0\]\.labels"):  # still checked as the file gave it
        load(write(tmp_path / "bad.yaml", f"- {{module_file: {WASM / 'hello.wasm'}, labels: [a]}}\n"),
             labels={"run": "7"})


def test_a_single_spec_is_one_job(tmp_path):
    batch = load(write(tmp_path / "one.json", json.dumps({"module_file": str(WASM / "hello.wasm")})))
    assert len(batch.jobs) == 1


@pytest.mark.parametrize("text, message", [
    ("[]", "holds no jobs"),
    ("42", "holds a number (42), not specs"),
    ("defaults: {priority: 1}\n", "no 'jobs' list"),
    ("jobs: [{runtime: wasm}]\nextra: 1\n", "move ['extra'] into 'defaults'"),
    ("jobs: {a: 1}\n", "'jobs' must be a list"),
    ("- module_file: nowhere.wasm\n", "jobs[0].module_file: cannot read"),
    ("- {module_file: HELLO}\n- {module_file: HELLO, limits: {wall_ms: -5}}\n", "jobs[1].limits.wall_ms: Input should be"),
    ("- {module_file: HELLO, limit: {wall_ms: 5}}\n", "jobs[0].limit: unknown field; a spec file takes"),
    ("- {module_file: HELLO, module_sha256: " + "0" * 64 + "}\n", "not both"),
    ("- {module_file: HELLO, input_text: a, input_file: b}\n", "give one of 'input'"),
    ("- {module_file: HELLO, input_text: [1]}\n", "input_text: must be text"),
    ("- {module_file: HELLO, id: x}\n- {module_file: HELLO, id: x}\n", "id 'x' is given to more than one job"),
    ("- {runtime: wasm}\n", "jobs[0]: a wasm job needs 'module'"),
    ("- {module_file: HELLO\n  oops: [\n", "spec.yaml:"),
])
def test_errors_name_the_file_the_job_and_the_field(tmp_path, text, message):
    path = write(tmp_path / "spec.yaml", text.replace("HELLO", str(WASM / "hello.wasm")))
    with pytest.raises(SpecFileError) as e:
        load(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_bad_json_lines_name_the_line(tmp_path):
    path = write(tmp_path / "s.jsonl", '{"runtime": "wasm"}\n{oops\n')
    with pytest.raises(SpecFileError, match=r"s\.jsonl:2: not a JSON spec"):
        load(path)


def test_the_examples_load():
    files = sorted((ROOT / "examples" / "jobs").glob("*.y*ml")) + sorted((ROOT / "examples" / "jobs").glob("*.jsonl"))
    assert len(files) >= 3
    for path in files:
        assert sent(load(path))
