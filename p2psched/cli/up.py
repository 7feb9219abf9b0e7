"""``p2psched up --nodes N``: a local cluster of real agent processes on loopback.

For development and the demo. Agent i listens on base+10i (API), +1 (gossip),
+2 (transfer), keeps its data under DATA_ROOT/<node-id>, and joins agent 0. Ctrl-C
(or SIGTERM) stops them all, each draining its running jobs first. An agent that
fails or is killed takes the rest down with it: ``up`` stops them and exits 1 with
that agent's last lines, so a cluster it reports as up is the one asked for.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import click
import httpx

from p2psched.cli.numbers import POSITIVE

#: Lines of an agent's output shown when it exits: its reason is in its last lines
#: (a refused flag is one line; a crash's traceback ends with the exception).
TAIL_LINES = 12


def agent_ports(base: int, i: int) -> tuple[int, int, int]:
    return base + 10 * i, base + 10 * i + 1, base + 10 * i + 2


@dataclass
class Started:
    """One agent this command started: its output goes to ``log`` (--log-dir) or, without
    one, through a pipe whose last lines are kept in ``tail`` for when it exits."""

    node_id: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None

    def last_lines(self) -> list[str]:
        if self.log is not None:
            try:
                with open(self.log, "rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
                    return [ln.decode(errors="replace").rstrip() for ln in f.read().splitlines()][-TAIL_LINES:]
            except OSError:
                return []
        if self.reader is not None:
            self.reader.join(2.0)  # it has exited: the rest of its output is in the pipe
        return list(self.tail)

    def exit_reason(self) -> str:
        """Why it ended, in a sentence, with the last lines it wrote."""
        rc = self.proc.returncode
        how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        lines = [ln for ln in self.last_lines() if ln.strip()]
        where = f" (its log: {self.log})" if self.log is not None else ""
        said = (":\n" + "\n".join(f"  | {ln}" for ln in lines)) if lines else f"; it wrote nothing{where}"
        return f"agent {self.node_id} {how}{where if lines else ''}{said}"


def _keep_tail(stream: IO[bytes], tail: deque[str]) -> None:
    with stream:
        for line in iter(lambda: stream.readline(4096), b""):
            tail.append(line.decode(errors="replace").rstrip())


def start_agents(n: int, base: int, data_root: Path, extra: list[str], node_ids: list[str] | None = None,
                 log_dir: Path | None = None) -> list[Started]:
    procs: list[Started] = []
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
        url = f"http://127.0.0.1:{api}"
        if log_dir is not None:
            log = log_dir / f"{node_id}.log"
            try:
                with open(log, "ab") as out:  # the agent keeps its own copy of the descriptor
                    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                stop_agents(procs)
                raise click.ClickException(f"cannot write {log}: {e.strerror or e}; give a --log-dir you can "
                                           "write to") from None
            procs.append(Started(node_id, url, proc, log))
            continue
        # No log dir: the output is read and dropped but for its last lines, the reason when it exits.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        started = Started(node_id, url, proc)
        assert proc.stdout is not None
        started.reader = threading.Thread(target=_keep_tail, args=(proc.stdout, started.tail), daemon=True,
                                          name=f"log-{node_id}")
        started.reader.start()
        procs.append(started)
    return procs


def busy_port(n: int, base: int, node_ids: list[str]) -> str | None:
    """Which port the agents would take is already taken, in a sentence; None when all are free.

    Checked before starting: an agent that finds its port taken exits, but another agent
    answering there would look like it (the reason ``wait_healthy`` checks node ids too)."""
    for i, node_id in enumerate(node_ids[:n]):
        api, gossip, transfer = agent_ports(base, i)
        for port, role, kind in ((api, "API", socket.SOCK_STREAM), (gossip, "gossip", socket.SOCK_DGRAM),
                                 (gossip, "gossip", socket.SOCK_STREAM), (transfer, "transfer", socket.SOCK_STREAM)):
            with socket.socket(socket.AF_INET, kind) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds
                try:
                    s.bind(("127.0.0.1", port))
                    continue
                except OSError as e:
                    reason = e.strerror or str(e)
            holder = _answering(f"http://127.0.0.1:{port}") if role == "API" else None
            by = f" by agent {holder} (http://127.0.0.1:{port})" if holder else ""
            proto = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
            return (f"port {port} ({proto}), the {role} port of agent {node_id}, is taken{by}: {reason}; "
                    f"stop what uses it, or pass a --base-port whose next {10 * n} ports are free "
                    f"(agent i takes BASE+10i, +1 and +2)")
    return None


def _answering(url: str) -> str | None:
    """The node id of the agent answering at ``url``, if one does."""
    try:
        node = httpx.get(url + "/healthz", timeout=1).json().get("node_id")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return str(node) if node else None


def wait_healthy(procs: list[Started], timeout: float = 30.0, stopping: Callable[[], bool] = lambda: False) -> bool:
    """Wait until each agent this started answers /healthz as itself; False when ``stopping``
    became true first. Raises ClickException when one exits, or another agent answers in its place."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending and not stopping():
        for a in procs:
            if a.proc.poll() is not None:
                raise click.ClickException(a.exit_reason())
        for a in list(pending):
            try:
                r = httpx.get(a.url + "/healthz", timeout=1)
                node = r.json().get("node_id")
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if node != a.node_id:
                who = f"agent {node}" if node else "something that is not a p2psched agent"
                raise click.ClickException(f"{a.url} answers as {who}, not as agent {a.node_id} that this "
                                           "started: another process holds its port; stop it, or pass another "
                                           "--base-port")
            if r.status_code == 200:
                pending.remove(a)
        if time.monotonic() > deadline:
            raise click.ClickException(f"agents {', '.join(a.node_id for a in pending)} did not become healthy in "
                                       f"{timeout:.0f}s; see their logs (--log-dir)")
        time.sleep(0.1)
    for a in procs:  # one that answered and then exited is not up either
        if a.proc.poll() is not None:
            raise click.ClickException(a.exit_reason())
    return not pending


def stop_agents(procs: list[Started], timeout: float = 30.0) -> None:
    for a in procs:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for a in procs:
        try:
            a.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()


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


def _directory(path: Path, flag: str) -> None:
    """Create ``path`` for --data-root or --log-dir, or fail naming the flag and the fix."""
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{path} is a file, not a directory; give a directory (it is created if missing)",
                                 param_hint=flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot create {path}: {e.strerror or e}; give a directory you can write to",
                                 param_hint=flag) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nodes", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 60000), default=7700, show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), default=Path("data/up"), show_default=True)
@click.option("--topology", type=click.Path(exists=True, path_type=Path),
              help="Topology file; agents take its first N host ids as node ids.")
@click.option("--cpus", type=POSITIVE, help="Advertised CPU slots per agent (more than 0).")
@click.option("--log-dir", type=click.Path(path_type=Path),
              help="Write each agent's log here (default: discard, but for the last lines of one that exits).")
@click.option("--secure", is_flag=True, help="Encrypt gossip and use TLS (generates keys under DATA_ROOT).")
def up(nodes: int, base_port: int, data_root: Path, topology: Path | None, cpus: float | None,
       log_dir: Path | None, secure: bool) -> None:
    """Start N agents on loopback; Ctrl-C stops them all.

    Exits 0 after Ctrl-C (or SIGTERM) has stopped them, and 1 when the cluster could not
    start or an agent ended by itself (the others are stopped then), with its reason.
    """
    extra: list[str] = ["--no-mdns"]
    node_ids = [f"n{i}" for i in range(nodes)]
    if topology is not None:
        from p2psched.topology import Topology, TopologyError

        try:
            topo = Topology.load(topology)
        except TopologyError as e:
            raise click.ClickException(str(e)) from None
        if len(topo.hosts) < nodes:
            raise click.BadParameter(f"is {nodes}, but {topology} has {len(topo.hosts)} hosts to name agents "
                                     f"after; pass --nodes {len(topo.hosts)} or fewer", param_hint="--nodes")
        node_ids = list(topo.hosts)[:nodes]
        extra += ["--topology", str(topology)]
    if cpus is not None:
        extra += ["--cpus", str(cpus)]
    _directory(data_root, "--data-root")
    if log_dir:
        _directory(log_dir, "--log-dir")
    busy = busy_port(nodes, base_port, node_ids)
    if busy is not None:
        raise click.ClickException(busy)
    if secure:
        from p2psched.security.tls import TLSSetupError

        try:
            extra += _secure_material(data_root, node_ids)
        except (TLSSetupError, OSError) as e:
            raise click.ClickException(f"cannot make the cluster's keys under {data_root}: {e}; remove "
                                       f"{data_root / 'ca'} and {data_root / 'tls'} to make new ones, or give "
                                       "another --data-root") from None
    else:
        extra.append("--insecure")
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    procs = start_agents(nodes, base_port, data_root, extra, node_ids, log_dir)
    running = list(procs)
    failure = None
    try:
        if wait_healthy(procs, stopping=lambda: stop):
            for a in procs:
                click.echo(f"{a.node_id}  {a.url}")
            click.echo(f"{nodes} agents up; export P2PSCHED_URL={procs[0].url}; dashboard: {procs[0].url}/ui/; "
                       "Ctrl-C stops them", err=True)
            sys.stdout.flush()
        while not stop and failure is None and running:
            for a in list(running):
                if a.proc.poll() is None:
                    continue
                running.remove(a)
                if a.proc.returncode != 0:  # a crash, a kill, a refused start: the cluster is not what was asked
                    failure = a.exit_reason()
                    break
                click.echo(f"agent {a.node_id} left the cluster (status 0); {len(running)} still running", err=True)
            time.sleep(0.2)
    except click.ClickException as e:
        failure = e.message
    finally:
        if failure is not None:
            click.echo(f"Error: {failure}", err=True)
        click.echo("stopping agents...", err=True)
        stop_agents(procs)
        click.echo("all agents stopped", err=True)
    if failure is None and not running:
        failure = "every agent has exited, so no cluster is left; start it again with `p2psched up`"
        click.echo(f"Error: {failure}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if failure is None else 1)  # at once: the agents are gone, and nothing else needs an orderly end
