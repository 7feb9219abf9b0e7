"""The tenant, verify, ca and cert commands, through click's runner and a real HTTP server."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from p2psched.cli.main import cli
from p2psched.sandbox.base import SandboxResult
from p2psched.security.attestation import report_from_result
from p2psched.security.keys import generate, key_id, load_private_key, public_hex
from p2psched.security.tenants import TenantRegistry
from p2psched.security.tls import NodeTLS
from security_helpers import wasm_spec


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_keygen_writes_a_private_and_a_public_key(tmp_path: Path) -> None:
    r = run("tenant", "keygen", "alice", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    key = load_private_key(tmp_path / "alice.key")
    assert stat.S_IMODE((tmp_path / "alice.key").stat().st_mode) == 0o600
    assert (tmp_path / "alice.pub").read_text().strip() == public_hex(key)
    assert key_id(public_hex(key)) in r.output and "p2psched tenant add alice" in r.output
    again = run("tenant", "keygen", "alice", "--out", str(tmp_path))
    assert again.exit_code == 1 and "already exists" in again.output
    assert load_private_key(tmp_path / "alice.key").private_bytes_raw() == key.private_bytes_raw()
    assert run("tenant", "keygen", "bad name", "--out", str(tmp_path)).exit_code == 2


def test_tenant_add_creates_and_updates_the_file_keeping_comments(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    for name in ("alice", "alice2", "bob"):
        run("tenant", "keygen", name, "--out", str(tmp_path))
    r = run("tenant", "add", "alice", "--pubkey", str(tmp_path / "alice.pub"), "--cap", "wasm", "--cap", "gpu",
            "--tenants", str(tenants), "--max-jobs", "8", "--max-gpu", "2", "--rate", "5", "--burst", "10",
            "--label", "team=ml,vision", "--label", "zone=*", "--max-priority", "200")
    assert r.exit_code == 0, r.output
    assert "added tenant alice" in r.output
    tenants.write_text("# operators: keep this file in git\n" + tenants.read_text())
    r = run("tenant", "add", "bob", "--pubkey", str(tmp_path / "bob.pub"), "--tenants", str(tenants), "--admin")
    assert r.exit_code == 0, r.output
    # A second key for alice (rotation) and new capabilities replace the old ones.
    r = run("tenant", "add", "alice", "--pubkey", str(tmp_path / "alice2.pub"), "--cap", "wasm,process",
            "--tenants", str(tenants))
    assert r.exit_code == 0 and "updated tenant alice" in r.output and "2 key(s)" in r.output

    text = tenants.read_text()
    assert text.startswith("# operators: keep this file in git\n")
    reg = TenantRegistry.load(tenants)
    alice, bob = reg.get("alice"), reg.get("bob")
    assert alice is not None and bob is not None
    assert alice.keys == ((tmp_path / "alice.pub").read_text().strip(), (tmp_path / "alice2.pub").read_text().strip())
    assert alice.capabilities == {"wasm", "process"} and alice.max_priority == 200
    assert alice.quota.concurrent_jobs == 8 and alice.quota.gpu_slots == 2
    assert (alice.rate.per_second, alice.rate.burst) == (5.0, 10)
    assert alice.label_allowed("team", "vision") and alice.label_allowed("zone", "x")
    assert bob.admin and bob.capabilities == {"wasm"}


def test_tenant_add_refuses_what_would_break_the_file(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    run("tenant", "keygen", "alice", "--out", str(tmp_path))
    r = run("tenant", "add", "alice", "--pubkey", str(tmp_path / "alice.pub"), "--cap", "fly", "--tenants", str(tenants))
    assert r.exit_code == 2 and "choose from wasm, process, gpu, network" in r.output
    assert not tenants.exists()
    run("tenant", "add", "alice", "--pubkey", str(tmp_path / "alice.pub"), "--tenants", str(tenants))
    before = tenants.read_text()
    # The same key for a second tenant would make the file unloadable: nothing is written.
    r = run("tenant", "add", "mallory", "--pubkey", str(tmp_path / "alice.pub"), "--tenants", str(tenants))
    assert r.exit_code == 1 and "not written" in r.output and "'alice' also holds" in r.output
    assert tenants.read_text() == before
    (tmp_path / "junk.pub").write_text("not a key\n")
    r = run("tenant", "add", "bob", "--pubkey", str(tmp_path / "junk.pub"), "--tenants", str(tenants))
    assert r.exit_code == 2 and "64 hex digits" in r.output


def _report(tmp_path: Path) -> tuple[Path, str, dict[str, Any]]:
    node = generate()
    result = SandboxResult(exit_code=0, reason="exit 0", stdout=b"42\n")
    report = report_from_result(node, node_id="h0-1", measurement="c" * 64, job_id="h0-0:j1", spec=wasm_spec(),
                                result=result, sandbox_kind="wasm", started_at=1.0, ended_at=2.0)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return path, public_hex(node), report


def test_verify_a_report_file(tmp_path: Path) -> None:
    path, pub, report = _report(tmp_path)
    (tmp_path / "out.txt").write_bytes(b"42\n")
    r = run("verify", str(path), "--node-pubkey", pub, "--output", str(tmp_path / "out.txt"))
    assert r.exit_code == 0, r.output
    assert "OK: job h0-0:j1 of tenant alice ran on node h0-1" in r.output and "output" in r.output
    r = run("verify", str(path))
    assert r.exit_code == 0 and "node key NOT checked" in r.output
    # A saved job record holding the report under result.attestation works too.
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"id": "h0-0:j1", "result": {"attestation": report}}))
    assert run("verify", str(record), "--node-pubkey", pub).exit_code == 0


@pytest.mark.parametrize("change", ["exit_code", "output_sha256", "node_id"])
def test_verify_a_tampered_report_fails_clearly(tmp_path: Path, change: str) -> None:
    path, pub, report = _report(tmp_path)
    report[change] = {"exit_code": 1, "output_sha256": "0" * 64, "node_id": "h9-9"}[change]
    path.write_text(json.dumps(report))
    r = run("verify", str(path), "--node-pubkey", pub)
    assert r.exit_code == 1
    assert "verification FAILED for job 'h0-0:j1'" in r.output and "changed after" in r.output


def test_verify_rejects_the_wrong_node_key_and_wrong_output(tmp_path: Path) -> None:
    path, _, _ = _report(tmp_path)
    r = run("verify", str(path), "--node-pubkey", public_hex(generate()))
    assert r.exit_code == 1 and "forged or re-signed" in r.output
    (tmp_path / "out.txt").write_bytes(b"41\n")
    r = run("verify", str(path), "--output", str(tmp_path / "out.txt"))
    assert r.exit_code == 1 and "the output given hashes to" in r.output
    assert run("verify", "h0-0:j1").exit_code == 2  # a job id needs --agent


class _Agent(BaseHTTPRequestHandler):
    """The three API routes verify reads, served from fixed data."""

    routes: dict[str, tuple[int, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        status, body = self.routes.get(self.path, (404, b'{"error": {"reason": "no_such_job"}}'))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def agent() -> Iterator[type[_Agent]]:
    handler = type("Agent", (_Agent,), {"routes": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_verify_a_job_by_id_through_an_agent(tmp_path: Path, agent: Any) -> None:
    _, pub, report = _report(tmp_path)
    agent.routes.update({
        "/v1/jobs/h0-0:j1": (200, json.dumps({"id": "h0-0:j1", "result": {"attestation": report}}).encode()),
        "/v1/jobs/h0-0:j1/result": (200, b"42\n"),
        "/v1/peers": (200, json.dumps({"peers": [{"node_id": "h0-1", "node_pubkey": pub}]}).encode()),
    })
    r = run("verify", "h0-0:j1", "--agent", agent.url)
    assert r.exit_code == 0, r.output
    assert f"node key (from agent {agent.url})" in r.output and "output" in r.output

    # The agent returns other output than the executor attested: verification fails.
    agent.routes["/v1/jobs/h0-0:j1/result"] = (200, b"41\n")
    r = run("verify", "h0-0:j1", "--agent", agent.url)
    assert r.exit_code == 1 and "the output given hashes to" in r.output

    # The gossiped key of h0-1 differs from the key that signed: a forged report.
    agent.routes["/v1/jobs/h0-0:j1/result"] = (200, b"42\n")
    agent.routes["/v1/peers"] = (200, json.dumps({"peers": [{"node_id": "h0-1",
                                                              "node_pubkey": public_hex(generate())}]}).encode())
    r = run("verify", "h0-0:j1", "--agent", agent.url)
    assert r.exit_code == 1 and "forged or re-signed" in r.output

    r = run("verify", "nope", "--agent", agent.url)
    assert r.exit_code == 3 and "404" in r.output


def test_verify_reports_an_unreachable_agent(tmp_path: Path) -> None:
    r = run("verify", "j1", "--agent", "http://127.0.0.1:9")
    assert r.exit_code == 3 and "cannot reach the agent" in r.output


def test_ca_init_and_cert_issue(tmp_path: Path) -> None:
    r = run("ca", "init", "--out", str(tmp_path / "ca"))
    assert r.exit_code == 0 and "p2psched cert issue NODE_ID" in r.output
    assert run("ca", "init", "--out", str(tmp_path / "ca")).exit_code == 1
    r = run("cert", "issue", "h0-0", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "h0-0"), "--host", "127.0.0.1")
    assert r.exit_code == 0, r.output
    files = NodeTLS.from_dir(tmp_path / "h0-0", "h0-0")
    assert files.cert.exists() and files.key.exists() and files.ca.read_bytes() == (tmp_path / "ca" / "ca.pem").read_bytes()
    r = run("cert", "issue", "h0-1", "--ca", str(tmp_path), "--out", str(tmp_path / "x"))
    assert r.exit_code == 1 and "p2psched ca init" in r.output
