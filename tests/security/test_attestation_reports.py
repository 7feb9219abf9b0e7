"""Node identity, measurement, and attestation reports that anyone can check."""

from __future__ import annotations

import copy
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from p2psched.sandbox.base import SandboxResult
from p2psched.security.attestation import (
    AttestationError,
    NodeKeyError,
    issue_report,
    load_allow_list,
    load_or_create_node_key,
    measure,
    open_node_key,
    measure_code,
    peer_allowed,
    report_from_result,
    verify_report,
)
from p2psched.security.keys import generate, public_hex
from security_helpers import WASM, wasm_spec

CONFIG = {"sandbox": {"wasm_fuel_default": 10**9}, "gossip": {"interval_ms": 200}}


def test_node_key_is_created_once_private_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = load_or_create_node_key(data)
    path = data / "node.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_hex(load_or_create_node_key(data)) == public_hex(key)  # the same identity on restart


# Both ways in: loading the key to sign, and the agent opening it at start (which
# reads only node.pub when it can, yet must still refuse an unusable key there).
KEY_OPENERS = pytest.mark.parametrize("open_key", [load_or_create_node_key, open_node_key],
                                      ids=["load", "open-at-start"])


@KEY_OPENERS
def test_a_node_key_others_can_read_is_refused(tmp_path: Path, open_key: Any) -> None:
    load_or_create_node_key(tmp_path)
    os.chmod(tmp_path / "node.key", 0o644)
    with pytest.raises(NodeKeyError, match="chmod 600"):
        open_key(tmp_path)


@KEY_OPENERS
def test_a_corrupt_node_key_says_what_to_do(tmp_path: Path, open_key: Any) -> None:
    p = tmp_path / "node.key"
    p.write_text("garbage")
    os.chmod(p, 0o600)
    with pytest.raises(NodeKeyError, match="delete it"):
        open_key(tmp_path)


def test_the_public_key_is_kept_in_node_pub_next_to_the_key(tmp_path: Path) -> None:
    key = open_node_key(tmp_path / "data")  # created in a child process
    assert (tmp_path / "data" / "node.pub").read_text() == key.public_hex + "\n"
    assert not key.loaded
    assert public_hex(key.private()) == key.public_hex
    assert open_node_key(tmp_path / "data").public_hex == key.public_hex  # the same identity on restart
    assert stat.S_IMODE((tmp_path / "data" / "node.key").stat().st_mode) == 0o600


def test_an_existing_key_without_node_pub_gets_one(tmp_path: Path) -> None:
    key = load_or_create_node_key(tmp_path)
    (tmp_path / "node.pub").unlink()
    assert open_node_key(tmp_path).public_hex == public_hex(key)
    assert (tmp_path / "node.pub").read_text().strip() == public_hex(key)


def test_a_node_pub_older_than_the_key_is_derived_again(tmp_path: Path) -> None:
    key = load_or_create_node_key(tmp_path)
    (tmp_path / "node.pub").write_text("ab" * 32 + "\n")
    os.utime(tmp_path / "node.pub", ns=(0, 0))
    assert open_node_key(tmp_path).public_hex == public_hex(key)


def test_a_node_pub_that_does_not_match_is_corrected_at_the_first_signature(tmp_path: Path) -> None:
    key = load_or_create_node_key(tmp_path)
    (tmp_path / "node.pub").write_text("ab" * 32 + "\n")  # newer than the key, yet wrong
    node_key = open_node_key(tmp_path)
    assert node_key.public_hex == "ab" * 32
    report, _ = make_report(node_key.private())
    assert node_key.public_hex == public_hex(key) == report["node_pubkey"]
    assert (tmp_path / "node.pub").read_text().strip() == public_hex(key)
    verify_report(report, node_key.public_hex)


def test_a_node_key_in_hex_form_is_read_and_given_a_node_pub(tmp_path: Path) -> None:
    key = generate()
    raw = key.private_bytes_raw().hex()
    p = tmp_path / "node.key"
    p.write_text(raw)
    os.chmod(p, 0o600)
    node_key = open_node_key(tmp_path)
    assert node_key.public_hex == public_hex(key) == (tmp_path / "node.pub").read_text().strip()


def test_measurement_covers_code_and_config(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    code = measure_code(str(pkg))
    (pkg / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"cache")
    measure_code.cache_clear()
    assert measure_code(str(pkg)) == code  # bytecode caches are not code we shipped
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    measure_code.cache_clear()
    assert measure_code(str(pkg)) != code
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "sub" / "b.py").rename(pkg / "b.py")
    measure_code.cache_clear()
    assert measure_code(str(pkg)) != code  # paths count, not only contents

    m1 = measure(CONFIG, code=code)
    assert measure(dict(reversed(list(CONFIG.items()))), code=code) == m1  # canonical: key order is irrelevant
    assert measure({**CONFIG, "gossip": {"interval_ms": 300}}, code=code).value != m1.value
    assert measure(CONFIG, code="0" * 64).value != m1.value
    assert len(measure(CONFIG).code) == 64  # the installed package itself


def test_allow_list(tmp_path: Path) -> None:
    good, other = "a" * 64, "b" * 64
    f = tmp_path / "allow.txt"
    f.write_text(f"# approved builds\n{good}  # v0.1.0\n\n")
    allow = load_allow_list(f)
    assert peer_allowed(good, allow) and not peer_allowed(other, allow)
    assert peer_allowed(other, None)  # no allow-list configured
    assert not peer_allowed(good, frozenset())  # an empty list allows nobody
    f.write_text(f"{good}\nnot-a-hash\n")
    with pytest.raises(ValueError, match="line 2"):
        load_allow_list(f)


def make_report(node_key: Any = None) -> tuple[dict[str, Any], Any]:
    key = node_key or generate()
    spec = wasm_spec()
    result = SandboxResult(exit_code=0, reason="exit 0", stdout=b"42\n", stderr=b"", artifacts={"out.bin": b"\1"},
                           sandbox={"fuel": 10**9, "epoch_deadline": True})
    report = report_from_result(key, node_id="h0-1", measurement="c" * 64, job_id="h0-0:j1", spec=spec,
                                result=result, sandbox_kind="wasm", started_at=1_800_000_000.25,
                                ended_at=1_800_000_001.5)
    return report, key


def test_a_report_verifies_and_holds_what_the_issue_asks_for() -> None:
    report, key = make_report()
    verify_report(report, public_hex(key), module=WASM, input=b"hello", output=b"42\n",
                  allowed_measurements={"c" * 64})
    assert report["job_id"] == "h0-0:j1" and report["tenant"] == "alice" and report["node_id"] == "h0-1"
    assert report["module_sha256"] == hashlib.sha256(WASM).hexdigest()
    assert report["input_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert report["output_sha256"] == hashlib.sha256(b"42\n").hexdigest()
    assert report["sandbox"] == {"kind": "wasm", "fuel": 10**9, "epoch_deadline": True}
    assert report["limits"]["wall_ms"] == 60_000 and report["limits"]["mem_bytes"] == 256 * 1024 * 1024
    assert (report["started_at_ms"], report["ended_at_ms"]) == (1_800_000_000_250, 1_800_000_001_500)
    assert (report["exit_code"], report["reason"]) == (0, "exit 0")
    assert report["node_pubkey"] == public_hex(key) and report["measurement"] == "c" * 64


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(d, dict):
        return [p for k, v in d.items() for p in _paths(v, prefix + (k,))] or [prefix]
    return [prefix]


REPORT_PATHS = [p for p in _paths(make_report()[0]) if p != ("signature",)]


@pytest.mark.parametrize("path", REPORT_PATHS, ids=[".".join(map(str, p)) for p in REPORT_PATHS])
def test_any_change_to_a_report_fails(path: tuple[str, ...]) -> None:
    report, key = make_report()
    forged = copy.deepcopy(report)
    holder = forged
    for k in path[:-1]:
        holder = holder[k]
    v = holder[path[-1]]
    holder[path[-1]] = ({} if v else {"x": 1}) if isinstance(v, dict) else (
        v + 1 if isinstance(v, int) and not isinstance(v, bool) else
        (not v) if isinstance(v, bool) else "0" * 64 if v is None else v[:-1] + ("0" if v[-1] != "0" else "1"))
    with pytest.raises(AttestationError):
        verify_report(forged, public_hex(key))


def test_a_report_forged_with_another_key_fails_against_the_nodes_key() -> None:
    report, node_key = make_report()
    attacker = generate()
    # The attacker claims node h0-1 produced other output, and signs the claim with its own key.
    forged = issue_report(
        attacker, node_id=report["node_id"], measurement=report["measurement"], job_id=report["job_id"],
        tenant=report["tenant"], runtime=report["runtime"], module_sha256=report["module_sha256"],
        input_sha256=report["input_sha256"], output_sha256=hashlib.sha256(b"41\n").hexdigest(),
        sandbox=report["sandbox"], limits=report["limits"], started_at=1_800_000_000.25,
        ended_at=1_800_000_001.5, exit_code=0, reason="exit 0",
    )
    # Self-consistent: the attacker's key really did sign it...
    verify_report(forged)
    # ...but it is not the executor's key, which is what a verifier must check against.
    with pytest.raises(AttestationError, match="forged or re-signed"):
        verify_report(forged, public_hex(node_key))
    # Swapping the attacker's signature into the genuine report fails outright.
    with pytest.raises(AttestationError, match="changed after node 'h0-1' signed it"):
        verify_report({**report, "signature": forged["signature"]}, public_hex(node_key))


def test_hash_checks_name_what_differs() -> None:
    report, key = make_report()
    with pytest.raises(AttestationError, match="the output given hashes to"):
        verify_report(report, public_hex(key), output=b"41\n")
    with pytest.raises(AttestationError, match="module"):
        verify_report(report, public_hex(key), module=WASM + b"\0")
    with pytest.raises(AttestationError, match="allow-list"):
        verify_report(report, public_hex(key), allowed_measurements={"d" * 64})


@pytest.mark.parametrize("bad", [[], {"type": "other"}, "missing", "wrong-type"])
def test_malformed_reports(bad: Any) -> None:
    report, _ = make_report()
    if bad == "missing":
        bad = {k: v for k, v in report.items() if k != "node_id"}
    elif bad == "wrong-type":
        bad = {**report, "started_at_ms": "yesterday"}
    with pytest.raises(AttestationError):
        verify_report(bad)


def test_a_report_holds_sandbox_details_as_json_data_whatever_their_python_types() -> None:
    key = generate()
    spec = wasm_spec()
    plain = SandboxResult(exit_code=0, reason="exit 0", sandbox={"fuel": 12, "engine": "wasmtime", "gpu": None})
    odd = SandboxResult(exit_code=0, reason="exit 0", sandbox={"cgroup": Path("/sys/fs/cgroup/x"), "ns": ("pid", "net")})
    reports = [
        report_from_result(key, node_id="n1", measurement="m" * 64, job_id="n1:j", spec=spec, result=r,
                           sandbox_kind="wasm", started_at=1.0, ended_at=2.0, node_pubkey=public_hex(key))
        for r in (plain, odd)
    ]
    for report in reports:
        verify_report(report, public_hex(key))
        assert report["node_pubkey"] == public_hex(key)
    assert reports[0]["sandbox"] == {"kind": "wasm", "fuel": 12, "engine": "wasmtime", "gpu": None}
    assert reports[1]["sandbox"] == {"kind": "wasm", "cgroup": "/sys/fs/cgroup/x", "ns": ["pid", "net"]}
