"""``p2psched up --nodes N``: a local cluster of real agent processes on loopback.

For development and the demo. Agent i listens on base+10i (API), +1 (gossip),
+2 (transfer), keeps its data under DATA_ROOT/<node-id>, and joins agent 0. Ctrl-C
(or SIGTERM) stops them all, each draining its running jobs first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx


def agent_ports(base: int, i: int) -> tuple[int, int, int]:
    return base + 10 * i, base + 10 * i + 1, base + 10 * i + 2


def start_agents(n: int, base: int, data_root: Path, extra: list[str], node_ids: list[str] | None = None,
                 log_dir: Path | None = None) -> list[tuple[str, str, subprocess.Popen[bytes]]]:
    procs = []
    ids = node_ids or [f"n{i}" for i in range(n)]
    seed = None
    for i, node_id in enumerate(ids[:n]):
        api, gossip, transfer = agent_ports(base, i)
        cmd = [sys.executable, "-m", "p2psched", "agent", "--node-id", node_id,
               "--api", f"127.0.0.1:{api}", "--gossip", f"127.0.0.1:{gossip}", "--transfer", f"127.0.0.1:{transfer}",
               "--data-dir", str(data_root / node_id), *(x.replace("{node_id}", node_id) for x in extra)]
        if seed is not None:
            cmd += ["--join", seed]
        seed = seed or f"127.0.0.1:{gossip}"
        out = open(log_dir / f"{node_id}.log", "ab") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        procs.append((node_id, f"http://127.0.0.1:{api}",
                      subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)))
    return procs


def wait_healthy(procs: list[tuple[str, str, subprocess.Popen[bytes]]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = {url for _, url, _ in procs}
    while pending:
        for node_id, url, p in procs:
            if p.poll() is not None:
                raise click.ClickException(f"agent {node_id} exited with status {p.returncode}; see its log")
        for url in list(pending):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise click.ClickException(f"agents at {sorted(pending)} did not become healthy in {timeout:.0f}s")
        time.sleep(0.1)


def stop_agents(procs: list[tuple[str, str, subprocess.Popen[bytes]]], timeout: float = 30.0) -> None:
    for _, _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for _, _, p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _secure_material(data_root: Path, node_ids: list[str]) -> list[str]:
    """A gossip key, a cluster CA and one certificate per agent, made once under DATA_ROOT."""
    from p2psched.membership.keyring import new_key_file_text
    from p2psched.security.tls import init_ca, issue_node_cert

    key = data_root / "gossip.key"
    if not key.exists():
        key.write_text(new_key_file_text())
        key.chmod(0o600)
    ca = data_root / "ca"
    if not (ca / "ca.pem").exists():
        init_ca(ca)
    for node_id in node_ids:
        if not (data_root / "tls" / node_id / f"{node_id}.pem").exists():
            issue_node_cert(node_id, ca, data_root / "tls" / node_id)
    return ["--gossip-key", str(key), "--tls-dir", str(data_root / "tls" / "{node_id}")]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nodes", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 60000), default=7700, show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), default=Path("data/up"), show_default=True)
@click.option("--topology", type=click.Path(exists=True, path_type=Path),
              help="Topology file; agents take its first N host ids as node ids.")
@click.option("--cpus", type=float, help="Advertised CPU slots per agent.")
@click.option("--log-dir", type=click.Path(path_type=Path), help="Write each agent's log here (default: discard).")
@click.option("--secure", is_flag=True, help="Encrypt gossip and use TLS (generates keys under DATA_ROOT).")
def up(nodes: int, base_port: int, data_root: Path, topology: Path | None, cpus: float | None,
       log_dir: Path | None, secure: bool) -> None:
    """Start N agents on loopback; Ctrl-C stops them all."""
    extra: list[str] = ["--no-mdns"]
    node_ids = None
    if topology is not None:
        from p2psched.topology import Topology

        topo = Topology.load(topology)
        node_ids = list(topo.hosts)[:nodes]
        extra += ["--topology", str(topology)]
    if cpus is not None:
        extra += ["--cpus", str(cpus)]
    data_root.mkdir(parents=True, exist_ok=True)
    if secure:
        extra += _secure_material(data_root, node_ids or [f"n{i}" for i in range(nodes)])
    else:
        extra.append("--insecure")
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    data_root.mkdir(parents=True, exist_ok=True)
    procs = start_agents(nodes, base_port, data_root, extra, node_ids, log_dir)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        wait_healthy(procs)
        for node_id, url, _ in procs:
            click.echo(f"{node_id}  {url}")
        click.echo(f"{nodes} agents up; export P2PSCHED_URL={procs[0][1]}; dashboard: {procs[0][1]}/ui/; "
                   "Ctrl-C stops them", err=True)
        sys.stdout.flush()
        while not stop:
            for node_id, _, p in procs:
                if p.poll() is not None:
                    click.echo(f"agent {node_id} exited with status {p.returncode}", err=True)
                    procs = [x for x in procs if x[2] is not p]
            time.sleep(0.2)
    finally:
        click.echo("stopping agents...", err=True)
        stop_agents(procs)
        click.echo("all agents stopped", err=True)
    os._exit(0)
