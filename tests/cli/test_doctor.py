"""`p2psched doctor` run as a user runs it: every check the issue names has a row, and a
failure says what is wrong and how to fix it."""

import socket
import subprocess
import sys

import pytest

from p2psched.agent.datadir import DataDirLock

from agents import free_port
from disks import fill, small_disk


def doctor(tmp_path, data_dir, api_port, gossip_port=None, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "p2psched", "doctor", "--data-dir", str(data_dir), "--api", f"127.0.0.1:{api_port}",
         "--gossip", f"127.0.0.1:{gossip_port or free_port()}", "--transfer", f"127.0.0.1:{free_port()}", *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    rows = {}
    for line in out.stdout.splitlines():
        if line.startswith("["):
            mark, rest = line[1:5], line[7:]
            rows[rest[:18].strip()] = (mark.strip(), rest[18:].strip())
    return out, rows


def test_doctor_checks_each_thing_and_passes_on_this_host(tmp_path):
    out, rows = doctor(tmp_path, tmp_path / "data", free_port())
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("python", "wasmtime", "data dir", "port api", "port gossip", "port transfer", "cgroups",
                 "user namespaces", "leftovers", "gpu: devices"):
        assert name in rows, (name, out.stdout)
    assert rows["wasmtime"][1].endswith("trial run 2+3=5")
    assert rows["data dir"] == ("ok", f"{tmp_path / 'data'} can be created and written, and no agent uses it")
    assert not (tmp_path / "data").exists()  # made for the check, and removed
    assert rows["cgroups"][1].startswith(("v1", "v2"))
    assert rows["port gossip"][0] == "ok" and rows["port gossip"][1].endswith("is free (UDP and TCP)")


def test_doctor_fails_a_data_dir_an_agent_holds_and_a_taken_port_with_fixes(tmp_path):
    held = DataDirLock.acquire(tmp_path / "data", "n7")  # as a running agent holds it
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        try:
            out, rows = doctor(tmp_path, tmp_path / "data", port)
        finally:
            held.release()
    assert out.returncode == 1
    assert rows["data dir"][0] == "FAIL" and "in use by another agent" in rows["data dir"][1]
    assert "node n7" in rows["data dir"][1]
    assert rows["port api"][0] == "FAIL"
    assert "fix: stop that agent, or give the new one another --data-dir" in out.stdout


def test_doctor_checks_the_agents_default_data_dir_and_leaves_nothing_behind(tmp_path):
    """It checked ./data while the agent uses ./data/<node-id>, and left an agent.lock
    (and any directory it made) behind."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSCHED_")}
    ports = ["--api", f"127.0.0.1:{free_port()}", "--gossip", f"127.0.0.1:{free_port()}",
             "--transfer", f"127.0.0.1:{free_port()}"]

    def data_dir_row(*flags, **extra_env):
        out = subprocess.run([sys.executable, "-m", "p2psched", "doctor", *ports, *flags], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path, env={**env, **extra_env})
        [row] = [line for line in out.stdout.splitlines() if line.startswith("[") and line[7:].startswith("data dir")]
        return row[7 + 18:].strip()

    assert data_dir_row("--node-id", "n1") == "data/n1 can be created and written, and no agent uses it"
    assert data_dir_row() == f"data/{socket.gethostname()} can be created and written, and no agent uses it"
    assert data_dir_row(P2PSCHED_NODE_ID="n2").startswith("data/n2 can be created")
    assert data_dir_row(P2PSCHED_DATA_DIR=str(tmp_path / "d")).startswith(f"{tmp_path / 'd'} can be created")
    assert list(tmp_path.iterdir()) == []  # no ./data, no ./data/<node-id>

    # A data dir that exists, empty or with a stopped agent's lock file: as it was found.
    (tmp_path / "data" / "n1").mkdir(parents=True)
    assert data_dir_row("--node-id", "n1") == "data/n1 is writable and no agent uses it"
    assert list((tmp_path / "data" / "n1").iterdir()) == []
    DataDirLock.acquire(tmp_path / "data" / "n1", "n1").release()
    before = (tmp_path / "data" / "n1" / "agent.lock").read_text()
    assert data_dir_row("--node-id", "n1") == "data/n1 is writable and no agent uses it"
    assert [p.name for p in (tmp_path / "data" / "n1").iterdir()] == ["agent.lock"]
    assert (tmp_path / "data" / "n1" / "agent.lock").read_text() == before  # not rewritten as the doctor's


def test_doctor_fails_a_gossip_port_taken_for_tcp_only(tmp_path):
    """The agent binds its gossip port for UDP (SWIM) and TCP (push-pull): a TCP
    listener there stops it, though the port is free for UDP."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out, rows = doctor(tmp_path, tmp_path / "data", free_port(), gossip_port=port)
    assert out.returncode == 1, out.stdout
    assert rows["port gossip"] == ("FAIL", f"127.0.0.1:{port} (TCP): Address already in use")
    assert (f"fix: stop whatever uses TCP port {port} (`ss -lntp | grep :{port}`), or pass --gossip "
            "HOST:OTHERPORT with a port free for UDP and TCP") in out.stdout


def test_doctor_checks_a_gpu_declaration_as_the_agent_reads_it(tmp_path):
    out, rows = doctor(tmp_path, tmp_path / "data", free_port(), None, "--gpus", "2xH100-80GB/shared:2")
    assert out.returncode == 0, out.stdout + out.stderr
    mark, detail = rows["gpu: declared GPUs"]
    assert mark == "ok" and "2 declared GPU(s), not discovered" in detail, rows
    # One the agent would refuse to start with is a failure, with the fix.
    out, rows = doctor(tmp_path, tmp_path / "data", free_port(), None, "--gpus", "2xH100")
    assert out.returncode == 1, out.stdout
    mark, detail = rows["gpu: declared GPUs"]
    assert mark == "FAIL" and "must name its memory" in detail, rows
    assert "fix: fix the --gpus value; see docs/gpu.md" in out.stdout


def test_doctor_reports_a_malformed_address_as_a_failed_check(tmp_path):
    for bad in ("bogus", "127.0.0.1:99999"):
        out = subprocess.run([sys.executable, "-m", "p2psched", "doctor", "--data-dir", str(tmp_path / "data"),
                              "--api", bad, "--gossip", f"127.0.0.1:{free_port()}",
                              "--transfer", f"127.0.0.1:{free_port()}"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"[FAIL] port api           --api {bad!r} must be HOST:PORT with a port 0-65535" in out.stdout
        assert "fix: use HOST:PORT for --api, e.g. --api 0.0.0.0:7700" in out.stdout


def test_doctor_fixes_an_address_this_host_lacks_by_naming_one_it_has(tmp_path):
    port = free_port()
    out, rows = doctor(tmp_path, tmp_path / "data", free_port(), None, "--api", f"192.0.2.1:{port}")  # TEST-NET-1
    assert out.returncode == 1, out.stdout
    assert rows["port api"] == ("FAIL", f"192.0.2.1:{port} (TCP): Cannot assign requested address")
    assert (f"fix: 192.0.2.1 is not an address of this host (see `ip -brief address`); pass --api with one of its "
            f"addresses, or 0.0.0.0:{port} for all of them") in out.stdout
    assert "stop whatever uses" not in out.stdout


def test_doctor_fails_a_data_dir_it_cannot_create_whatever_its_name(tmp_path):
    out, rows = doctor(tmp_path, "/proc/nonexistent/d", free_port())  # "none" in its name once made it a warning
    assert out.returncode == 1, out.stdout
    assert rows["data dir"] == ("FAIL", "/proc/nonexistent/d: No such file or directory")


def test_doctor_judges_each_check_by_its_name_not_its_words():
    from p2psched.cli.doctor import judge

    assert judge(("data dir", False, "/srv/none/x: Permission denied", "fix"), gpus_declared=False) == "fail"
    assert judge(("seccomp", False, "fallback to none", "fix"), gpus_declared=False) == "fail"
    assert judge(("leftovers", False, "left by a killed agent: 1 job cgroup", "fix"), gpus_declared=False) == "warn"
    assert judge(("device control", False, "fallback: only the mount namespace", "fix"),
                 gpus_declared=False) == "warn"
    assert judge(("device control", False, "could not restrict a job cgroup's devices", "fix"),
                 gpus_declared=False) == "fail"
    # No GPUs is fine on a CPU host; a declaration the agent would refuse is not.
    assert judge(("gpu: device nodes", False, "missing: /dev/nvidiactl", "fix"), gpus_declared=False) == "warn"
    assert judge(("gpu: declared GPUs", False, "must name its memory", "fix"), gpus_declared=True) == "fail"
    assert judge(("gpu: devices", True, "no GPU slots offered: none found", ""), gpus_declared=False) == "ok"


@pytest.mark.root
def test_doctor_says_to_free_space_on_a_full_data_dir_not_to_fix_permissions(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        (disk / "data").mkdir()
        fill(disk)
        out, rows = doctor(tmp_path, disk / "data", free_port())
    assert out.returncode == 1, out.stdout
    assert rows["data dir"] == ("FAIL", f"{disk / 'data'}: No space left on device")
    assert f"fix: free space on the file system of {disk / 'data'}" in out.stdout
