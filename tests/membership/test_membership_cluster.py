"""Eight and more real agent processes on loopback, with real sockets and sealing."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from membership_cluster import Cluster, wait_for
from p2psched.cli.keys import keygen  # noqa: F401  (the key file comes from the real command)
from p2psched.membership import codec
from p2psched.membership.keyring import Keyring
from p2psched.membership.messages import Alive

pytestmark = pytest.mark.cluster

N = 9


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from click.testing import CliRunner

    d = tmp_path_factory.mktemp("membership-cluster")
    key = d / "gossip.key"
    r = CliRunner().invoke(keygen, ["--gossip", "-o", str(key)])
    assert r.exit_code == 0, r.output
    c = Cluster(d, key)
    try:
        c.start(N)
        yield c
    finally:
        c.close()


def states(agent, node_id):
    return agent.view().get(node_id, {}).get("state")


def test_join_through_one_seed_converges(cluster):
    def all_see_all():
        for a in cluster.running():
            v = a.view()
            if len(v) != N or any(m["state"] != "alive" for m in v.values()):
                return False
        return True

    wait_for(all_see_all, f"all {N} agents see {N} alive members")
    # node state travels too: every agent learns every other agent's cpu count
    wait_for(lambda: all(m["resources"] and m["resources"]["cpu_total"] >= 1
                         for a in cluster.running() for m in a.view().values()),
             "every agent knows every agent's resource vector")


def test_kill_9_is_marked_dead_by_every_other_agent(cluster):
    victim = cluster.agents["m3"]
    victim.signal(signal.SIGKILL)
    victim.proc.wait()
    wait_for(lambda: all(states(a, "m3") == "dead" for a in cluster.running()), "every agent marks m3 dead")


def test_sigstop_beyond_suspicion_then_sigcont_refutes(cluster):
    victim = cluster.agents["m4"]
    others = cluster.running(exclude={"m4"})
    victim.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: all(states(a, "m4") == "dead" for a in others), "the stopped m4 is declared dead")
    finally:
        victim.signal(signal.SIGCONT)
    wait_for(lambda: all(states(a, "m4") == "alive" for a in others), "m4 refutes its death and is alive again")
    # The victim writes its status file periodically: wait for the write after it resumed.
    wait_for(lambda: victim.status()["incarnation"] >= 1, "m4's own status shows the refuting incarnation", 10)
    assert all(a.view()["m4"]["incarnation"] == victim.status()["incarnation"] for a in others)


def test_graceful_leave_is_marked_left(cluster):
    leaver = cluster.agents["m5"]
    leaver.signal(signal.SIGTERM)
    assert leaver.proc.wait(timeout=20) == 0
    wait_for(lambda: all(states(a, "m5") == "left" for a in cluster.running()), "every agent marks m5 left", 10)


def test_restart_with_same_id_comes_back_with_higher_incarnation(cluster):
    old = cluster.agents["m6"]
    wait_for(lambda: all(states(a, "m6") == "alive" for a in cluster.running(exclude={"m6"})), "m6 alive")
    before = max(a.view()["m6"]["incarnation"] for a in cluster.running(exclude={"m6"}))
    old.signal(signal.SIGKILL)
    old.proc.wait()
    wait_for(lambda: all(states(a, "m6") == "dead" for a in cluster.running()), "m6 is dead")
    fresh = cluster.restart("m6")
    wait_for(lambda: all(states(a, "m6") == "alive" for a in cluster.running(exclude={"m6"})),
             "the restarted m6 is alive everywhere")
    # The status file is written periodically: wait for the one after the refutation.
    wait_for(lambda: fresh.status()["incarnation"] > before, "m6's own status shows a higher incarnation", 10)
    wait_for(lambda: all(a.view()["m6"]["incarnation"] == fresh.status()["incarnation"]
                         for a in cluster.running(exclude={"m6"})), "every view has m6's new incarnation", 10)


def test_packet_under_wrong_cluster_key_is_ignored_and_counted(cluster):
    target = cluster.agents["m1"]
    before = target.status()["dropped"].get("auth", 0)
    forged = codec.assemble("intruder", [codec.pack_part(Alive(0, "intruder", ("127.0.0.1", 9)))])
    wrong = Keyring([bytes(32)], cluster.name).seal(time.time(), forged)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(3):
            s.sendto(wrong, ("127.0.0.1", target.port))
    wait_for(lambda: target.status()["dropped"].get("auth", 0) >= before + 3, "m1 counts 3 auth drops", 10)
    assert "intruder" not in target.view()
    assert "intruder" not in cluster.agents["m0"].view()


def test_node_state_change_reaches_every_agent(cluster):
    source = cluster.agents["m2"]
    source.signal(signal.SIGUSR1)
    wait_for(lambda: source.view()["m2"]["resources"]["queue_len"] == 1, "m2 publishes queue_len 1", 10)
    wait_for(lambda: all(a.view()["m2"]["resources"]["queue_len"] == 1 for a in cluster.running()),
             "every agent sees m2's queue_len 1", 10)


def test_second_agent_claiming_a_live_id_is_refused_and_logged(cluster):
    from membership_cluster import Agent

    owner = cluster.agents["m7"]
    wait_for(lambda: all(states(a, "m7") == "alive" for a in cluster.running(exclude={"m7"})), "m7 alive")
    impostor = Agent(cluster, "m7", join=[cluster.agents["m0"].addr], files="m7-impostor")
    try:
        wait_for(lambda: "uses our node id 'm7'" in impostor.log_file.read_text()
                 and "claiming node id 'm7'" in cluster.agents["m0"].log_file.read_text(),
                 "the seed refuses the impostor and the impostor hears its id is taken", 20)
        time.sleep(1.0)
        for a in cluster.running(exclude={"m7"}):
            assert a.view()["m7"]["addr"] == owner.addr and a.view()["m7"]["state"] == "alive"
    finally:
        impostor.stop()
