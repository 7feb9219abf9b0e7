"""Forwarding over mutual TLS with cluster certificates; a foreign certificate is refused."""

import ssl
import subprocess
import sys
import time

import pytest
import trio

from agents import ROOT, start_cluster, stop_all, wasm_spec

pytestmark = pytest.mark.cluster


def p2p(*args):
    subprocess.run([sys.executable, "-m", "p2psched", *map(str, args)], check=True, cwd=ROOT, capture_output=True)


def test_jobs_cross_agents_over_mtls_and_a_foreign_cert_is_refused(tmp_path):
    ca, rogue_ca = tmp_path / "ca", tmp_path / "rogue-ca"
    p2p("ca", "init", "--out", ca)
    p2p("ca", "init", "--out", rogue_ca)
    for node in ("t0", "t1"):
        p2p("cert", "issue", node, "--ca", ca, "--out", tmp_path / "tls" / node)
    p2p("cert", "issue", "t9", "--ca", rogue_ca, "--out", tmp_path / "tls" / "t9")
    p2p("keygen", "--gossip", "-o", tmp_path / "gossip.key")

    agents = []
    try:
        from agents import FAST_MEMBERSHIP, new_agent, wait_converged
        import json

        for node in ("t0", "t1"):
            a = new_agent(tmp_path, node, "--cpus", "1", "--tls-dir", str(tmp_path / "tls" / node),
                          "--gossip-key", str(tmp_path / "gossip.key"))
            a.extra.remove("--insecure")
            a.env["P2PSCHED_MEMBERSHIP"] = json.dumps(FAST_MEMBERSHIP)
            if agents:
                a.extra += ["--join", agents[0].gossip]
            agents.append(a.start())
        wait_converged(agents)
        t0, t1 = agents
        with t0.client() as http:
            busy = http.post("/v1/jobs", json=wasm_spec("loop.wasm", limits={"wall_ms": 30000})).json()["id"]
            while http.get(f"/v1/jobs/{busy}").json()["state"] != "running":
                time.sleep(0.05)
            time.sleep(0.5)
            job = http.post("/v1/jobs", json=wasm_spec("hello.wasm")).json()["id"]
            rec = http.get(f"/v1/jobs/{job}", params={"wait": 30}).json()
            assert rec["state"] == "succeeded" and rec["executor"] == "t1", rec
            http.delete(f"/v1/jobs/{busy}")

        from p2psched.security.tls import NodeTLS, client_context, connect_peer

        async def rogue_connect(expected: str) -> None:
            ctx = client_context(NodeTLS.from_dir(tmp_path / "tls" / "t9", "t9"))
            stream = await connect_peer("127.0.0.1", t1.transfer_port, expected, ctx)
            await stream.send_all(b"\x00\x00\x00\x01\x80")
            await stream.receive_some(10)

        with pytest.raises((ssl.SSLError, trio.BrokenResourceError, OSError)):
            trio.run(rogue_connect, "t1")
        deadline = time.monotonic() + 10
        while "refused a connection without a valid cluster certificate" not in t1.log():
            assert time.monotonic() < deadline, t1.log()
            time.sleep(0.1)
    finally:
        stop_all(agents)
