"""A 3-agent compose cluster, as `scripts/cluster.sh up 3` gives an operator.

The tests run in file order against one cluster: the later ones break it on purpose
(stop, partition, kill), and the last one takes it down.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from cluster_env import PROJECT, ROOT, ComposeCluster, get_json, wait_for
from p2psched.chaos import docker_faults

pytestmark = pytest.mark.cluster


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)


def alive_count(cluster: ComposeCluster) -> int:
    return sum(1 for p in cluster.peers() if p["state"] == "alive")


def test_up_returns_with_all_agents_alive_in_the_entry_view(compose_cluster: ComposeCluster) -> None:
    assert compose_cluster.up.returncode == 0, compose_cluster.up.stdout + compose_cluster.up.stderr
    assert "3 agents alive" in compose_cluster.up.stderr
    assert alive_count(compose_cluster) == 3


def test_image_runs_the_agent_under_tini_with_a_healthcheck(compose_cluster: ComposeCluster) -> None:
    image = json.loads(docker("image", "inspect", compose_cluster.env.get("P2PSCHED_IMAGE", "p2psched:dev")).stdout)[0]
    assert image["Config"]["Entrypoint"][0] == "tini"
    assert "healthcheck" in image["Config"]["Healthcheck"]["Test"][-1]
    assert image["Config"]["Labels"]["p2psched.source-hash"]
    for name in compose_cluster.containers():
        wait_for(f"{name} reporting healthy",
                 lambda n=name: docker("inspect", "-f", "{{.State.Health.Status}}", n).stdout.strip() == "healthy",
                 timeout=180)


def test_replicas_take_distinct_hosts_of_the_shared_topology(compose_cluster: ComposeCluster) -> None:
    names = compose_cluster.containers()
    assert len(names) == 3
    ids = [compose_cluster.node_id(n) for n in names]
    topo = docker("exec", names[0], "cat", "/shared/topology.yaml")
    hosts = [str(h) for h in yaml.safe_load(topo.stdout)["hosts"]]
    # the entry is position 0; replica k takes position k
    assert ids == hosts[:3]


def test_a_job_submitted_to_the_entry_succeeds(compose_cluster: ComposeCluster) -> None:
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "p2psched"), "submit", str(ROOT / "examples" / "wasm" / "hello.wasm"),
         "--wait", "--agent", compose_cluster.entry_url],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "hello from p2psched" in out.stdout


def test_a_broken_sandbox_kills_the_containers_wasm_workers_and_the_next_job_still_runs(
        compose_cluster: ComposeCluster) -> None:
    """The chaos `sandbox` fault against containers: the workers of the job above
    (kept a while for the next job) die, and a new job starts new ones."""
    def workers(name: str) -> list[str]:
        top = docker("top", name, "-eo", "pid,args").stdout.splitlines()[1:]
        return [line for line in top if "p2psched.sandbox.wasm_worker" in line]

    names = [n for n in compose_cluster.containers() if workers(n)]
    assert names, "the job above left no wasm worker running in any container"
    killed = sum(docker_faults.break_sandbox(n) for n in names)
    assert killed >= len(names)
    wait_for("the killed workers gone", lambda: not any(workers(n) for n in names), timeout=30)
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "p2psched"), "submit", str(ROOT / "examples" / "wasm" / "hello.wasm"),
         "--wait", "--agent", compose_cluster.entry_url],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0 and "hello from p2psched" in out.stdout, out.stderr


def test_the_image_serves_the_dashboard_on_the_published_port(compose_cluster: ComposeCluster) -> None:
    import httpx

    page = httpx.get(compose_cluster.entry_url + "/", follow_redirects=True, timeout=30)
    assert page.status_code == 200 and "<title>p2psched</title>" in page.text  # the wheel carries its files
    assert httpx.get(compose_cluster.entry_url + "/ui/app.js", timeout=30).headers["content-type"].startswith(
        "text/javascript")
    counts = httpx.get(compose_cluster.entry_url + "/v1/jobs:counts", timeout=30).json()["counts"]
    assert counts["succeeded"] >= 1  # the job above


def test_docker_stop_drains_the_agent_and_it_exits_zero(compose_cluster: ComposeCluster) -> None:
    name = compose_cluster.containers()[-1]
    assert docker("stop", name).returncode == 0
    assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    logs = docker("logs", name)
    assert "state flushed" in logs.stdout + logs.stderr
    assert docker("start", name).returncode == 0
    wait_for(f"{name} healthy again",
             lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy",
             timeout=120)


def test_partition_and_heal_keep_the_address_and_dns_aliases(compose_cluster: ComposeCluster) -> None:
    name = compose_cluster.containers()[-1]
    before = docker_faults.address(name)
    docker_faults.partition(name)
    try:
        assert docker_faults.address(name) == ""
        # cut off: it cannot reach the entry by name or address
        probe = docker("exec", name, "python3", "-c",
                       "import socket; socket.create_connection(('entry', 7700), timeout=3)")
        assert probe.returncode != 0
    finally:
        docker_faults.heal(name)
    assert docker_faults.address(name) == before
    aliases = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout)
    assert "peers" in next(iter(aliases.values()))["Aliases"]
    probe = docker("exec", compose_cluster.containers()[0], "getent", "hosts", "peers")
    assert before in probe.stdout


def test_pause_freezes_and_unpause_resumes(compose_cluster: ComposeCluster) -> None:
    name = compose_cluster.containers()[-1]
    docker_faults.pause(name)
    try:
        assert docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip() == "paused"
    finally:
        docker_faults.unpause(name)
    assert docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip() == "running"


def test_loss_fault_is_installed_and_cleared(compose_cluster: ComposeCluster) -> None:
    name = compose_cluster.containers()[-1]
    docker_faults.netem(name, 25, 0)
    try:
        if docker_faults.netem_available(name):
            assert "netem" in docker("exec", name, "tc", "qdisc", "show").stdout
        else:
            assert "--probability 0.25" in docker("exec", name, "iptables", "-S").stdout
    finally:
        docker_faults.clear_netem(name)
    assert "netem" not in docker("exec", name, "tc", "qdisc", "show").stdout
    assert docker_faults.LOSS_CHAIN not in docker("exec", name, "iptables", "-S").stdout


def test_scale_leaves_running_agents_alone_and_will_not_shrink_a_replica_with_unfinished_jobs(
        compose_cluster: ComposeCluster) -> None:
    import base64
    import urllib.request

    def container_ids() -> dict[str, str]:
        return {n: docker("inspect", "-f", "{{.Id}}", n).stdout.strip() for n in compose_cluster.containers()}

    before = container_ids()
    out = compose_cluster.script("scale", "4")
    assert out.returncode == 0, out.stderr
    after = container_ids()
    assert len(after) == 4
    # growing neither rebuilt nor recreated the agents that were running
    assert {n: after[n] for n in before} == before
    added = next(n for n in after if n not in before)
    sleep = base64.b64encode((ROOT / "examples" / "wasm" / "sleep.wasm").read_bytes()).decode()
    body = json.dumps({"runtime": "wasm", "module": sleep, "limits": {"wall_ms": 120000}}).encode()
    url = f"http://{docker_faults.address(added)}:7700/v1/jobs"
    # `scale` returns once the entry sees the new agent alive; its API opens a moment later
    wait_for(f"{added}'s API", lambda: get_json(url.replace("/v1/jobs", "/healthz"))["status"] == "ok", timeout=60)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    job = json.load(urllib.request.urlopen(req, timeout=30))["id"]
    mounts = '{{range .Mounts}}{{if eq .Destination "/var/lib/p2psched"}}{{.Name}}{{end}}{{end}}'
    volume = docker("inspect", "-f", mounts, added).stdout.strip()

    refused = compose_cluster.script("scale", "3")
    assert refused.returncode == 1
    assert f"not shrinking to 3: removing {added}" in refused.stderr
    assert len(compose_cluster.containers()) == 4

    cancel = urllib.request.Request(f"{url}/{job}", method="DELETE")
    urllib.request.urlopen(cancel, timeout=30).read()
    wait_for(f"{job} cancelled", lambda: get_json(f"{url}/{job}")["state"] == "cancelled", timeout=60)
    out = compose_cluster.script("scale", "3")
    assert out.returncode == 0, out.stderr
    assert sorted(compose_cluster.containers()) == sorted(before)
    # the removed replica's data volume went with it
    assert docker("volume", "inspect", volume).returncode != 0


def test_a_killed_agent_is_marked_dead_by_the_others(compose_cluster: ComposeCluster) -> None:
    names = compose_cluster.containers()
    victim = names[1]
    victim_id = compose_cluster.node_id(victim)
    wait_for("all 3 agents alive before the kill", lambda: alive_count(compose_cluster) == 3, timeout=120)
    docker_faults.kill(victim)
    wait_for(f"the entry marking {victim_id} dead",
             lambda: compose_cluster.states().get(victim_id) == "dead", timeout=120)

    def seen_dead_by_other_replica() -> bool:
        code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7700/v1/peers', timeout=5).read().decode())"
        out = docker("exec", names[2], "python3", "-c", code)
        peers = json.loads(out.stdout)["peers"]
        return any(p["node_id"] == victim_id and p["state"] == "dead" for p in peers)

    wait_for(f"{names[2]} marking {victim_id} dead", seen_dead_by_other_replica, timeout=120)


def test_down_removes_containers_network_and_volumes(compose_cluster: ComposeCluster) -> None:
    out = compose_cluster.script("down")
    assert out.returncode == 0, out.stderr
    label = f"label=com.docker.compose.project={PROJECT}"
    assert docker("ps", "-aq", "--filter", label).stdout.strip() == ""
    assert docker("volume", "ls", "-q", "--filter", label).stdout.strip() == ""
    assert docker("network", "ls", "-q", "--filter", label).stdout.strip() == ""
    with pytest.raises(OSError):
        get_json(compose_cluster.entry_url + "/healthz", timeout=2)
