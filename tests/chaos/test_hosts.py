"""The chaos hosts: real network namespaces on a bridge, partitions, and teardown.

Needs root; fails with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from p2psched.chaos.hosts import STATE_DIR, LoopbackNetwork, NetnsNetwork, netns_problem, sweep_stale

pytestmark = [pytest.mark.chaos, pytest.mark.root]


def namespaces() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                       check=True).stdout.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def connects(ip: str, port: int, tries: int) -> bool:
    for _ in range(tries):
        try:
            with socket.create_connection((ip, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def test_hosts_get_namespaces_links_and_addresses_and_all_go_away() -> None:
    problem = netns_problem()
    assert problem is None, f"this test needs network namespaces: {problem}"
    net = NetnsNetwork(2).setup()
    try:
        assert {h.netns for h in net.hosts} <= namespaces()
        assert link_exists(net.bridge)
        assert [h.ip for h in net.hosts] == [f"{net.subnet}.11", f"{net.subnet}.12"]
        state = json.loads((STATE_DIR / f"{net.tag}.json").read_text())
        assert state["bridge"] == net.bridge and set(state["netns"]) == {h.netns for h in net.hosts}
        host = net.hosts[0]
        listener = ("import socket;s=socket.socket();s.bind(('%s',7799));s.listen()\n"
                    "while True: s.accept()[0].close()" % host.ip)
        server = subprocess.Popen(["ip", "netns", "exec", host.netns or "", sys.executable, "-c", listener])
        try:
            assert connects(host.ip, 7799, tries=50)
            # A partition cuts the host off; healing brings it back.
            net.cut(host)
            assert not connects(host.ip, 7799, tries=1)
            net.restore(host)
            assert connects(host.ip, 7799, tries=50)
        finally:
            server.kill()
            server.wait()
    finally:
        net.close()
    assert not ({h.netns for h in net.hosts} & namespaces())
    assert not link_exists(net.bridge)
    assert not (STATE_DIR / f"{net.tag}.json").exists()


def test_what_a_dead_run_left_behind_is_swept() -> None:
    assert netns_problem() is None
    net = NetnsNetwork(1).setup()
    state = STATE_DIR / f"{net.tag}.json"
    data = json.loads(state.read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()
    data["pid"] = dead.pid  # as if the harness had been killed -9
    state.write_text(json.dumps(data))
    try:
        assert net.tag in sweep_stale()
        assert net.hosts[0].netns not in namespaces()
        assert not link_exists(net.bridge)
        assert not state.exists()
    finally:
        net.close()


# A harness process whose subnet choice is slow: it reads what is in use, then dawdles before
# claiming, so two runs started together both choose before either claims unless choosing and
# claiming are one step. It sets up on "go", prints its subnet, and tears down on the next line.
SLOW_CHOOSER = """
import sys, time
from p2psched.chaos import hosts
real, calls = hosts._used_octets, []
def slow():
    used = real()
    if not calls:
        calls.append(1)
        time.sleep(1.0)
    return used
hosts._used_octets = slow
sys.stdin.readline()
net = hosts.NetnsNetwork(1).setup()
print(net.subnet, flush=True)
sys.stdin.readline()
net.close()
"""


def test_runs_started_together_get_different_subnets() -> None:
    assert netns_problem() is None
    runs = [subprocess.Popen([sys.executable, "-c", SLOW_CHOOSER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for run in runs:
            assert run.stdin is not None
            run.stdin.write("go\n")
            run.stdin.flush()
        subnets = []
        for run in runs:
            assert run.stdout is not None
            line = run.stdout.readline().strip()
            assert line, f"a run failed to set up: {run.stderr.read() if run.poll() is not None else ''}"
            subnets.append(line)
        assert subnets[0] != subnets[1], f"both runs chose {subnets[0]}.0/24"
    finally:
        for run in runs:
            try:
                assert run.stdin is not None
                run.stdin.write("done\n")
                run.stdin.close()
                run.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                run.kill()
                run.wait()
    assert [run.returncode for run in runs] == [0, 0], [run.stderr.read() for run in runs if run.stderr]


def test_loopback_hosts_refuse_partitions_with_the_reason() -> None:
    net = LoopbackNetwork(2).setup()
    assert len({h.api_port for h in net.hosts}) == 2
    from p2psched.chaos.hosts import HostSetupError

    with pytest.raises(HostSetupError, match="--no-netns"):
        net.cut(net.hosts[0])
