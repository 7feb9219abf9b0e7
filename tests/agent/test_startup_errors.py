"""An agent that cannot start says which flag is wrong and what to do, in one line,
with no traceback: real `p2psched agent` processes, real ports and files."""

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from p2psched.agent.datadir import data_dir_error

from agents import free_port


def start(tmp_path, *flags, env=None, data_dir=None):
    """Run `p2psched agent` with ``flags`` until it exits; (exit status, stderr)."""
    args = {"--api": f"127.0.0.1:{free_port()}", "--gossip": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
            "--transfer": f"127.0.0.1:{free_port()}", "--data-dir": str(data_dir or tmp_path / "data")}
    rest = list(flags)
    for i in range(0, len(rest) - 1):
        if rest[i] in args:
            args[rest[i]] = rest[i + 1]
            rest[i] = rest[i + 1] = ""
    argv = [sys.executable, "-m", "p2psched", "agent", "--node-id", "s1", "--insecure", "--no-mdns",
            *[x for pair in args.items() for x in pair], *[x for x in rest if x]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    [said] = [line for line in proc.stderr.splitlines() if line.startswith("p2psched agent: ")]
    return proc.returncode, said


def test_a_data_dir_that_is_a_file_is_named_with_the_fix(tmp_path):
    (tmp_path / "afile").write_text("")
    for data_dir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        rc, said = start(tmp_path, data_dir=data_dir)
        assert rc == 2
        assert said.startswith(f"p2psched agent: --data-dir {data_dir}: cannot use it: ")
        assert "a file is in the way of the directory; give --data-dir a directory path" in said


def test_a_data_dir_this_user_cannot_write_is_named_with_the_fix():
    # As root (CI) no mode bits refuse a write, so the error is made here.
    err = data_dir_error(Path("/srv/d"), PermissionError(errno.EACCES, "Permission denied", "/srv/d/nonces.db"))
    assert str(err) == ("--data-dir /srv/d: cannot use it (/srv/d/nonces.db): Permission denied; give --data-dir "
                        "a directory this user can write, or change its owner or mode")


@pytest.mark.parametrize(("content", "words"), [
    (None, "does not exist; create it with 'p2psched tenant add"),
    ("[tenants.a\n", "--tenants: "),
])
def test_a_tenants_file_that_cannot_be_used_is_a_startup_error(tmp_path, content, words):
    path = tmp_path / "tenants.toml"
    if content is not None:
        path.write_text(content)
    rc, said = start(tmp_path, "--tenants", str(path))
    assert rc == 2 and said.startswith("p2psched agent: --tenants: ") and words in said


@pytest.mark.parametrize("flag", ["--api", "--transfer", "--gossip"])
def test_a_taken_port_names_its_flag(tmp_path, flag):
    kind = socket.SOCK_DGRAM if flag == "--gossip" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        rc, said = start(tmp_path, flag, address)
    assert rc == 2
    assert said == (f"p2psched agent: {flag} {address}: cannot listen there (Address already in use); another "
                    "program listens there (`p2psched doctor` names it); stop it, or choose another port")


def test_an_address_this_host_lacks_is_named_with_the_fix(tmp_path):
    rc, said = start(tmp_path, "--api", "192.0.2.1:7700")  # TEST-NET-1: documentation only, on no host
    assert rc == 2
    assert said.startswith("p2psched agent: --api 192.0.2.1:7700: cannot listen there (Cannot assign requested")
    assert said.endswith("this host has no such address; give one of its own addresses, or 0.0.0.0 for all")


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path):
    rc, said = start(tmp_path, env={"P2PSCHED_CPUS": "abc"})
    assert rc == 2 and said.startswith("p2psched agent: configuration: cpus (from P2PSCHED_CPUS): ")


def test_a_config_file_that_is_not_toml_says_where_and_how_to_fix_it(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("cpus = 4\napi = 0.0.0.0:7700\n")
    rc, said = start(tmp_path, "--config", str(config))
    assert rc == 2 and f"config file {config}: " in said and "(at line 2, column 10)" in said
    assert "fix the TOML there" in said
    config.write_text("cpus = -4\n")
    rc, said = start(tmp_path, "--config", str(config))
    assert rc == 2 and f"cpus (from config file {config}): Input should be greater than 0" in said


def test_a_new_data_dir_and_its_stores_are_this_users_only(tmp_path):
    # They were 0755 and 0644: any local user could read every job's spec (its env),
    # input and output.
    import stat

    from p2psched.jobs.store import Store
    from p2psched.security.nonces import SQLiteNonceStore

    data = tmp_path / "new" / "data"
    store = Store(data)
    store._writer.execute("INSERT INTO deliveries (id) VALUES ('x')")  # a write: the -wal appears
    nonces = SQLiteNonceStore(data / "nonces.db")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm", "nonces.db"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    store.close()
    nonces.close()
