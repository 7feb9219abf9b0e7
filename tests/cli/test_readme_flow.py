"""Drive a subprocess agent through the CLI exactly as the README shows."""

import json
import os
import struct
import subprocess
import sys

import pytest

from agents import ROOT, WASM, cli, new_agent

pytestmark = pytest.mark.cluster


def test_readme_commands(tmp_path):
    agent = new_agent(tmp_path, "n1").start()
    try:
        p = cli("submit", "examples/wasm/hello.wasm", "--wait", agent=agent, check=True)
        assert p.stdout == b"hello from p2psched\n"

        a = [1.0, 2.0, 3.5]
        b = [10.0, 20.0, 30.5]
        inp = tmp_path / "in.bin"
        inp.write_bytes(struct.pack("<3f", *a) + struct.pack("<3f", *b))
        p = cli("submit", "examples/wasm/vecadd.wasm", "--input", str(inp), "--json", agent=agent, check=True)
        rec = json.loads(p.stdout)
        assert rec["state"] in ("queued", "placed", "running", "succeeded") and rec["id"]

        p = cli("status", rec["id"], "--wait", "10", "--json", agent=agent, check=True)
        assert json.loads(p.stdout)["state"] == "succeeded"
        out = cli("result", rec["id"], agent=agent, check=True).stdout
        assert list(struct.unpack("<3f", out)) == [11.0, 22.0, 34.0]

        p = cli("submit", "examples/wasm/exit3.wasm", "--wait", agent=agent)
        assert p.returncode == 1 and b"exit 3" in p.stderr

        p = cli("submit", "examples/wasm/loop.wasm", agent=agent, check=True)
        loop_id = p.stdout.decode().strip()
        p = cli("cancel", loop_id, "--json", agent=agent, check=True)
        assert json.loads(p.stdout)["state"] == "cancelled"
        p = cli("cancel", loop_id, agent=agent)
        assert p.returncode == 3 and b"nothing to cancel" in p.stderr

        listing = json.loads(cli("jobs", "--state", "succeeded", "--json", agent=agent, check=True).stdout)
        assert len(listing["jobs"]) == 2

        p = cli("status", "no-such-job", agent=agent)
        assert p.returncode == 3 and b"404" in p.stderr

        p = cli("submit", "examples/wasm/hello.wasm", "--wall-ms", "-5", agent=agent)
        assert p.returncode == 3 and b"limits.wall_ms" in p.stderr

        # Piped, the peers table keeps one line per row, however wide it is.
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        p = subprocess.run([sys.executable, "-m", "p2psched", "peers", "--agent", agent.url], capture_output=True,
                           env=env, cwd=ROOT, timeout=120, check=True)
        lines = p.stdout.decode().splitlines()
        assert len(lines) == 5, p.stdout.decode()  # top border, header, rule, one member, bottom border
        assert "n1 *" in lines[3] and "GPU slots free" in lines[1]
        # ... unless COLUMNS asks for a width.
        p = subprocess.run([sys.executable, "-m", "p2psched", "peers", "--agent", agent.url], capture_output=True,
                           env={**env, "COLUMNS": "60"}, cwd=ROOT, timeout=120, check=True)
        narrow = p.stdout.decode().splitlines()
        assert len(narrow) > 5 and max(len(line) for line in narrow) <= 60, p.stdout.decode()
    finally:
        assert agent.stop() == 0


def test_unknown_flags_and_bad_config_are_errors(tmp_path):
    p = cli("agent", "--no-such-flag")
    assert p.returncode == 2 and b"No such option" in p.stderr
    p = cli("agent", "--queue-limit", "0", "--data-dir", str(tmp_path))
    assert p.returncode == 2 and b"queue_limit" in p.stderr and b"allowed: 1 to 10000000" in p.stderr
    cfg = tmp_path / "agent.toml"
    cfg.write_text('queue_limit = 5\nnode_id = "from-file"\nbogus_key = 1\n')
    p = cli("agent", "--config", str(cfg))
    assert p.returncode == 2 and f"bogus_key (from config file {cfg}): unknown key".encode() in p.stderr


def test_submit_cannot_reach_agent_says_how_to_fix():
    p = subprocess.run([sys.executable, "-m", "p2psched", "submit", str(WASM / "hello.wasm"),
                        "--agent", "http://127.0.0.1:9"], capture_output=True, timeout=60)
    assert p.returncode == 3 and b"is `p2psched agent` running there?" in p.stderr
