"""`p2psched agent` refuses a node key it must not use in one line, exit 2, no traceback,
as it does every other start-up error: a real agent process on a real data dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from agents import free_port
from p2psched.security.node_key import NODE_KEY_FILE, load_or_create_private_key


def start_agent(data_dir: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "p2psched", "agent", "--node-id", "s1", "--insecure", "--no-mdns",
            "--data-dir", str(data_dir), "--api", f"127.0.0.1:{free_port()}",
            "--gossip", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "--transfer", f"127.0.0.1:{free_port()}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_a_node_key_others_can_read_is_one_line_with_the_fix_and_exit_2(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    load_or_create_private_key(data_dir)
    key = data_dir / NODE_KEY_FILE
    key.chmod(0o644)
    p = start_agent(data_dir)
    assert "Traceback" not in p.stderr and "NodeKeyError" not in p.stderr, p.stderr
    assert p.returncode == 2, p.stderr
    [said] = [line for line in p.stderr.splitlines() if line.startswith("p2psched agent: ")]
    assert said == (f"p2psched agent: node key {key} is accessible by other users (mode 644); anyone who reads it "
                    f"can sign attestation reports as this node. Run 'chmod 600 {key}' (or delete it to create a "
                    "new identity)")


def test_a_node_key_file_that_is_not_a_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    key = data_dir / NODE_KEY_FILE
    key.write_text("not a key\n")
    key.chmod(0o600)
    p = start_agent(data_dir)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 2, p.stderr
    [said] = [line for line in p.stderr.splitlines() if line.startswith("p2psched agent: ")]
    assert said.startswith(f"p2psched agent: node key {key} is unusable: ") and "delete it" in said, said
