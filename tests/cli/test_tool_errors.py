"""The tools beside the agent refuse what they cannot do in a sentence that names the
flag or the file and the fix, with their documented exit status, and no traceback:
dashboard, keygen, ca/cert, topology, sim, verify and batch spec files."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agents import ROOT, WASM, free_port, new_agent
from p2psched.cli.main import cli
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.spec_file import SpecFileError, load
from p2psched.sandbox.base import SandboxResult
from p2psched.security.attestation import report_from_result
from p2psched.security.keys import generate

TOPOLOGY = ROOT / "topologies" / "small.yaml"


def run(*args: str) -> Any:
    """``p2psched ARGS`` in this process; an exception the command lets out fails the test."""
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


# -- dashboard -------------------------------------------------------------------------


@pytest.mark.cluster
def test_dashboard_on_a_taken_port_says_so_and_which_flag_to_change(tmp_path: Path) -> None:
    agent = new_agent(tmp_path, "d1").start()
    try:
        port = free_port()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            p = subprocess.run([sys.executable, "-m", "p2psched", "dashboard", "--agent", agent.url,
                                "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        agent.stop()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "ExceptionGroup" not in p.stderr, p.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; pass --listen 127.0.0.1:OTHERPORT" \
        in p.stderr, p.stderr


# -- files that cannot be written or read ------------------------------------------------


def test_keygen_into_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "gossip.key"
    r = run("keygen", "--gossip", "-o", str(out))
    assert r.exit_code == 1
    assert f"cannot write the gossip key to {out}: No such file or directory; pass -o" in r.output
    assert not out.exists()


def test_ca_init_into_a_directory_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = run("ca", "init", "--out", str(tmp_path / "file" / "ca"))
    assert r.exit_code == 1
    assert f"cannot write the CA to {tmp_path / 'file' / 'ca'}: Not a directory; pass --out" in r.output


@pytest.mark.parametrize("junk, named, what", [("ca.pem", "ca.pem", "a PEM certificate"),
                                               ("ca.key", "ca.key", "an unencrypted PEM private key")])
def test_cert_issue_names_the_ca_file_that_is_not_pem(tmp_path: Path, junk: str, named: str, what: str) -> None:
    assert run("ca", "init", "--out", str(tmp_path / "ca")).exit_code == 0
    (tmp_path / "ca" / junk).write_text("junk\n")
    r = run("cert", "issue", "n1", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "n1"))
    assert r.exit_code == 1
    assert f"{tmp_path / 'ca' / named} is not {what} (Unable to load PEM file); give --ca the directory" in r.output


def test_cert_issue_into_a_directory_it_cannot_create(tmp_path: Path) -> None:
    assert run("ca", "init", "--out", str(tmp_path / "ca")).exit_code == 0
    (tmp_path / "file").write_text("x")
    r = run("cert", "issue", "n1", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "file" / "tls"))
    assert r.exit_code == 1
    assert "Not a directory; pass --out with a directory you can create and write to" in r.output


# -- topology generate -------------------------------------------------------------------


def test_topology_generate_into_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "t.yaml"
    r = run("topology", "generate", "--spines", "1", "--leaves", "1", "--hosts-per-leaf", "1", "-o", str(out))
    assert r.exit_code == 1
    assert f"cannot write {out}: No such file or directory; pass -o with a file in an existing directory" in r.output


def test_topology_generate_refuses_a_fabric_beyond_its_limits_at_once(tmp_path: Path) -> None:
    r = run("topology", "generate", "--spines", "100000", "--leaves", "100000", "--hosts-per-leaf", "1",
            "-o", str(tmp_path / "t.yaml"))
    assert r.exit_code == 2
    assert "make 100,000 hosts; generate writes at most 20,000" in r.output
    r = run("topology", "generate", "--spines", "1500", "--leaves", "1000", "--hosts-per-leaf", "1",
            "-o", str(tmp_path / "t.yaml"))
    assert r.exit_code == 2 and "2,500 switches (spines + leaves); generate writes at most 2,000" in r.output
    r = run("topology", "generate", "--spines", "100", "--leaves", "1000", "--hosts-per-leaf", "1",
            "-o", str(tmp_path / "t.yaml"))
    assert r.exit_code == 2 and "101,000 links (leaves x spines + hosts); generate writes at most 60,000" in r.output
    assert not (tmp_path / "t.yaml").exists()
    assert "At most 20,000 hosts" in run("topology", "generate", "--help").output


@pytest.mark.parametrize("flag, value", [("--host-gbps", "nan"), ("--host-gbps", "inf"), ("--host-gbps", "0"),
                                         ("--oversubscription", "nan"), ("--oversubscription", "-1")])
def test_topology_generate_names_a_flag_that_is_not_a_finite_positive_number(flag: str, value: str) -> None:
    r = run("topology", "generate", "--spines", "1", "--leaves", "1", "--hosts-per-leaf", "1", flag, value, "-o", "-")
    assert r.exit_code == 2
    assert f"Invalid value for '{flag}'" in r.output, r.output


def test_topology_generate_refuses_bandwidths_that_come_to_infinity() -> None:
    r = run("topology", "generate", "--spines", "1", "--leaves", "1", "--hosts-per-leaf", "1",
            "--oversubscription", "1e-310", "-o", "-")
    assert r.exit_code == 2 and "the leaf-spine links come to inf Gb/s" in r.output


# -- sim -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value", [("--probe-interval", "0"), ("--probe-interval", "-1"),
                                         ("--probe-interval", "nan"), ("--suspicion-mult", "-1"),
                                         ("--suspicion-mult", "inf"), ("--loss", "nan"), ("--duration", "nan")])
def test_sim_membership_names_a_flag_out_of_range(flag: str, value: str) -> None:
    r = run("sim", "membership", "--nodes", "5", "--duration", "1", flag, value)
    assert r.exit_code == 2
    assert f"Invalid value for '{flag}'" in r.output, r.output


@pytest.mark.parametrize("flag, value", [("--mean-duration", "0"), ("--mean-duration", "nan"),
                                         ("--cpus-per-host", "0"), ("--gossip-interval", "0"),
                                         ("--gossip-interval", "-0.5"), ("--fanout", "0"),
                                         ("--same-leaf-fraction", "nan")])
def test_sim_placement_names_a_flag_out_of_range(flag: str, value: str) -> None:
    r = run("sim", "placement", "--topology", str(TOPOLOGY), "--jobs", "10", "--gossip", flag, value)
    assert r.exit_code == 2
    assert f"Invalid value for '{flag}'" in r.output, r.output


def test_simulate_refuses_what_would_divide_by_zero_or_never_end() -> None:
    from p2psched.sim.placement import simulate
    from p2psched.topology import Topology

    topo = Topology.load(TOPOLOGY)
    for bad in ({"mean_duration": 0.0}, {"cpus_per_host": 0}, {"gossip_interval": 0.0}):
        with pytest.raises(ValueError, match="must be at least 1 and mean_duration and gossip_interval finite"):
            simulate(topo, load=0.5, jobs=10, **bad)  # type: ignore[arg-type]


def test_sim_placement_runs_on_a_one_host_topology(tmp_path: Path) -> None:
    # power-of-two probed two distinct hosts: a ValueError traceback on one host
    topo = tmp_path / "one.yaml"
    assert run("topology", "generate", "--spines", "1", "--leaves", "1", "--hosts-per-leaf", "1",
               "-o", str(topo)).exit_code == 0
    r = run("sim", "placement", "--topology", str(topo), "--jobs", "20", "--json")
    assert r.exit_code == 0, r.output
    rows = {x["scheduler"]: x for x in json.loads(r.output)["results"]}
    assert rows["power-of-two"]["jobs"] == 18 and rows["power-of-two"]["hops_per_job"] == 0


@pytest.mark.parametrize("args, needs", [
    (["membership", "--same-leaf", "0.5"], "--same-leaf needs --topology"),
    (["placement", "--fit-sample", "0"], "--fit-sample needs --gpu-mix"),
    (["placement", "--gpus-per-host", "4"], "--gpus-per-host needs --gpu-mix"),
    (["placement", "--gpu-mix", "1,2", "--fit-sample", "0", "--policy", "random"], "--fit-sample needs --policy p2p"),
    (["placement", "--same-leaf-fraction", "0.5"], "--same-leaf-fraction needs --gossip"),
    (["placement", "--fanout", "5"], "--fanout needs --gossip"),
])
def test_sim_refuses_a_flag_it_would_ignore(args: list[str], needs: str) -> None:
    extra = ["--topology", str(TOPOLOGY), "--jobs", "10"] if args[0] == "placement" else ["--nodes", "5"]
    r = run("sim", *args, *extra)
    assert r.exit_code == 2 and needs in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["--nodes", "3", "--crash", "3"], "at least one node must stay up"),
    (["--duration", "1e9"], "1<=x<=3600"),
    (["--nodes", "20000"], "2<=x<=5000"),
])
def test_sim_membership_refuses_what_would_never_end_or_not_be_done(args: list[str], message: str) -> None:
    r = run("sim", "membership", *args)
    assert r.exit_code == 2 and message in r.output, r.output


# -- verify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["zz", "ab" * 31, "g" * 64, "ab" * 33])
def test_verify_calls_a_malformed_node_key_a_usage_error(tmp_path: Path, key: str) -> None:
    node = generate()
    report = report_from_result(node, node_id="h0-1", measurement="c" * 64, job_id="h0-0:j1",
                                spec=JobSpec(tenant="alice", module=(WASM / "hello.wasm").read_bytes()),
                                result=SandboxResult(exit_code=0, reason="exit 0", stdout=b"42\n"),
                                sandbox_kind="wasm", started_at=1.0, ended_at=2.0)
    path = tmp_path / "done1.json"
    path.write_text(json.dumps(report))
    r = run("verify", str(path), "--node-pubkey", key)
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--node-pubkey'" in r.output and "it must be 64 hex digits" in r.output
    assert "FAILED" not in r.output and "forged" not in r.output


# -- batch spec files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, message", [
    ("empty.yaml", "", "empty.yaml: is empty; write one spec (a mapping of spec fields), a list of specs"),
    ("nums.yaml", "[1, 2]\n", "nums.yaml: jobs[0] is a number (1), not a mapping of spec fields"),
    ("lists.yaml", "- [a]\n", "lists.yaml: jobs[0] is a list, not a mapping"),
    ("text.yaml", "hello\n", "text.yaml: holds text ('hello'), not specs"),
    ("flag.json", "true", "flag.json: holds true (a boolean), not specs"),
    ("spec.toml", 'module_file = "hello.wasm"\n',
     "spec.toml: is a TOML file, and spec files are YAML or JSON (.yaml, .yml, .json) or JSON Lines (.jsonl, .ndjson)"),
    ("defaults.yaml", "defaults: {module_file: HELLO, cpu: 2}\njobs: [{args: [a]}]\n",
     "defaults.yaml: defaults.cpu: unknown field"),
    ("deflimits.yaml", "defaults: {module_file: HELLO, limits: {wall_ms: -5}}\njobs: [{args: [a]}]\n",
     "deflimits.yaml: defaults.limits.wall_ms: Input should be"),
    ("ownlimits.yaml", "defaults: {module_file: HELLO, limits: {wall_ms: 5}}\njobs: [{limits: {wall_ms: -5}}]\n",
     "ownlimits.yaml: jobs[0].limits.wall_ms: Input should be"),
    ("defmodule.yaml", "defaults: {module_file: nowhere.wasm}\njobs: [{args: [a]}]\n",
     "defmodule.yaml: defaults.module_file: cannot read"),
    ("deftext.yaml", "defaults: {module_file: HELLO, input_text: [1]}\njobs: [{args: [a]}]\n",
     "deftext.yaml: defaults.input_text: must be text"),
])
def test_spec_file_errors_use_words_and_name_the_place(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text.replace("HELLO", str(WASM / "hello.wasm")))
    with pytest.raises(SpecFileError) as e:
        load(path)
    assert str(e.value).startswith(str(tmp_path)) and message in str(e.value), str(e.value)
    assert not re.search(r"NoneType|\ba (int|str|bool|float|dict)\b", str(e.value)), str(e.value)  # Python's words
