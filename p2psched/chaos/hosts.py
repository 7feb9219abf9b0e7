"""Hosts for a chaos run: each agent in its own network namespace, on one bridge.

Layout (one run, ``TAG`` a few random hex digits so parallel or aborted runs never
collide)::

    root namespace: bridge pcbTAG 10.77.K.1/24  <- the harness talks to agents here
        |- veth pcvTAG01 ==== eth0 10.77.K.11 in namespace pcTAG-1 (agent n1)
        |- veth pcvTAG02 ==== eth0 10.77.K.12 in namespace pcTAG-2 (agent n2)
        ...

``K`` is the first third octet with no address or route in use (0 when free). Choosing
``K`` and putting its address on the bridge happen under an exclusive ``flock`` on
``/run/p2psched-chaos/subnet.lock``, so two runs started at the same moment (in
separate processes or threads) never pick the same subnet.

A partition takes the root end of a node's veth down: the node keeps its address and
its sockets, but nothing reaches it and nothing leaves it, as when a switch port
dies. Healing brings the link back up.

Everything a run creates is written to ``/run/p2psched-chaos/TAG.json`` first, so
:func:`sweep_stale` can remove what a killed run left behind (it runs at the start
of every run, and only touches runs whose harness process is gone).

:class:`LoopbackNetwork` is the explicit ``--no-netns`` choice: agents on 127.0.0.1
with their own ports, where partitions cannot be made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("p2psched.chaos")

STATE_DIR = Path("/run/p2psched-chaos")
#: Held (flock) while a run picks its subnet and claims it; never removed, so every run
#: locks the same inode.
SUBNET_LOCK = "subnet.lock"
#: The first host address in the subnet; .1 is the bridge (the harness's side).
FIRST_HOST = 11
API_PORT, GOSSIP_PORT, TRANSFER_PORT = 7700, 7701, 7702


class HostSetupError(RuntimeError):
    """The hosts could not be built; the message says why and what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise HostSetupError(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()}")
    return proc


def _iptables(*args: str, check: bool = True) -> bool:
    if shutil.which("iptables") is None:
        if check:
            raise HostSetupError("iptables is not installed; install the Debian package 'iptables'")
        return False
    proc = subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise HostSetupError(f"'iptables {' '.join(args)}' failed: {proc.stderr.strip()}")
    return proc.returncode == 0


def netns_problem() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root; run the harness as root (sudo), or pass --no-netns for loopback"
    if shutil.which("ip") is None:
        return "the 'ip' command is missing; install the Debian package 'iproute2', or pass --no-netns"
    probe = f"pcprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return (f"'ip netns add' failed ({made.stderr.strip()}); this host cannot make network namespaces "
                "(a container without CAP_SYS_ADMIN?); pass --no-netns to run on loopback without partitions")
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_octets() -> set[int]:
    out = _ip("-4", "-o", "addr", "show", check=False).stdout + _ip("-4", "route", "show", check=False).stdout
    used = set()
    for word in out.split():
        if word.startswith("10.77."):
            parts = word.split("/")[0].split(".")
            if len(parts) == 4 and parts[2].isdigit():
                used.add(int(parts[2]))
    return used


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """Exclusive across processes (and threads: each call opens its own file description)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(STATE_DIR / SUBNET_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@dataclass
class Host:
    """Where one agent lives and how it is reached."""

    node_id: str
    ip: str
    api_port: int
    gossip_port: int
    transfer_port: int
    netns: str | None = None
    veth: str | None = None  # root end of the link; None on loopback

    @property
    def api_url(self) -> str:
        return f"http://{self.ip}:{self.api_port}"

    @property
    def gossip(self) -> str:
        return f"{self.ip}:{self.gossip_port}"


@dataclass
class NetnsNetwork:
    """N namespaces on one bridge; see the module docstring for the layout."""

    n: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    subnet: str = ""
    _state: Path | None = None
    _forward_rule: list[str] | None = None
    partitions = True

    def setup(self) -> NetnsNetwork:
        problem = netns_problem()
        if problem:
            raise HostSetupError(problem)
        if self.n > 200:
            raise HostSetupError(f"{self.n} agents do not fit a /24; use at most 200")
        sweep_stale()
        with contextlib.ExitStack() as claim:
            # Choosing the octet and putting its address on the bridge (which is what makes the
            # choice visible to the next chooser's _used_octets) must be one step across runs.
            claim.enter_context(_subnet_lock())
            used = _used_octets()
            free = [k for k in range(256) if k not in used]
            if not free:
                raise HostSetupError("every 10.77.K.0/24 subnet is in use; remove stale bridges (ip link) and retry")
            octet = free[0]
            self.subnet = f"10.77.{octet}"
            self.bridge = f"pcb{self.tag}"
            self.hosts = [Host(f"n{i}", f"{self.subnet}.{FIRST_HOST + i - 1}", API_PORT, GOSSIP_PORT, TRANSFER_PORT,
                               netns=f"pc{self.tag}-{i}", veth=f"pcv{self.tag}{i:02d}") for i in range(1, self.n + 1)]
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            self._state = STATE_DIR / f"{self.tag}.json"
            # Bridged frames pass the host's FORWARD chain where br_netfilter is loaded
            # (Docker loads it and sets the policy to DROP): let our bridge's own traffic through.
            self._forward_rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            self._save()
            try:
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
                claim.close()  # the bridge's address now marks the octet as taken: let the next run choose
                _ip("link", "set", self.bridge, "up")
                if not _iptables("-I", *self._forward_rule, check=False):
                    log.warning("could not add an iptables FORWARD rule for %s; agents may not reach each other "
                                "if br_netfilter drops bridged traffic", self.bridge)
                    self._forward_rule = None
                    self._save()
                for i, h in enumerate(self.hosts, 1):
                    assert h.netns and h.veth
                    peer = f"pcp{self.tag}{i:02d}"
                    _ip("netns", "add", h.netns)
                    _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
                    _ip("link", "set", peer, "netns", h.netns)
                    _ip("link", "set", h.veth, "master", self.bridge, "up")
                    _ip("-n", h.netns, "link", "set", peer, "name", "eth0")
                    _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
                    _ip("-n", h.netns, "link", "set", "eth0", "up")
                    _ip("-n", h.netns, "link", "set", "lo", "up")
            except BaseException:
                self.close()
                raise
        return self

    def _save(self) -> None:
        assert self._state is not None
        self._state.write_text(json.dumps({
            "pid": os.getpid(), "bridge": self.bridge, "netns": [h.netns for h in self.hosts],
            "forward_rule": self._forward_rule,
        }))

    def wrap(self, host: Host, argv: list[str]) -> list[str]:
        assert host.netns is not None
        return ["ip", "netns", "exec", host.netns, *argv]

    def cut(self, host: Host) -> None:
        assert host.veth is not None
        _ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        assert host.veth is not None
        _ip("link", "set", host.veth, "up")

    def close(self) -> None:
        """Remove the namespaces, the bridge and the rule (processes must be gone first)."""
        _teardown(self.bridge, [h.netns for h in self.hosts if h.netns], self._forward_rule)
        if self._state is not None:
            self._state.unlink(missing_ok=True)


def _teardown(bridge: str, namespaces: list[str], forward_rule: list[str] | None) -> None:
    existing = set(_ip("netns", "list", check=False).stdout.split())
    for ns in namespaces:
        if ns not in existing:
            continue
        # Processes outlive a deleted namespace; anything still inside is ours and must go.
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", ns, check=False)
    if bridge:
        _ip("link", "del", bridge, check=False)
    if forward_rule:
        _iptables("-D", *forward_rule, check=False)


def sweep_stale() -> list[str]:
    """Remove what runs whose harness has died left behind; returns their tags."""
    swept: list[str] = []
    if not STATE_DIR.is_dir():
        return swept
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _pid_alive(int(state.get("pid", 0))):
            continue
        _teardown(state.get("bridge", ""), list(state.get("netns", [])), state.get("forward_rule"))
        path.unlink(missing_ok=True)
        swept.append(path.stem)
    if swept:
        log.warning("removed namespaces and bridges left by aborted chaos runs: %s", ", ".join(swept))
    return swept


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue


@dataclass
class LoopbackNetwork:
    """Agents on 127.0.0.1 with free ports: no root needed, no partitions possible."""

    n: int
    hosts: list[Host] = field(default_factory=list)
    partitions = False

    def setup(self) -> LoopbackNetwork:
        self.hosts = [Host(f"n{i}", "127.0.0.1", _free_port(), _free_port(), _free_port())
                      for i in range(1, self.n + 1)]
        return self

    def wrap(self, host: Host, argv: list[str]) -> list[str]:
        return argv

    def cut(self, host: Host) -> None:
        raise HostSetupError("partitions need network namespaces; this run was started with --no-netns")

    restore = cut

    def close(self) -> None:
        pass


Network = NetnsNetwork | LoopbackNetwork


class AgentProcesses:
    """The agents of a run as subprocesses: start, kill -9, pause, graceful restart.

    Each agent keeps its data dir across restarts, so a restarted agent recovers its
    jobs as after a real crash. Logs go to ``RUN_DIR/NODE.log`` (appended across
    restarts).
    """

    def __init__(self, network: Network, run_dir: Path, *, cpus: float, extra: list[str] | None = None) -> None:
        self.network = network
        self.run_dir = run_dir
        self.cpus = cpus
        self.extra = list(extra or [])
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hosts = {h.node_id: h for h in network.hosts}

    def command(self, host: Host) -> list[str]:
        argv = [sys.executable, "-m", "p2psched", "agent", "--node-id", host.node_id,
                "--api", f"{host.ip}:{host.api_port}", "--gossip", host.gossip,
                "--transfer", f"{host.ip}:{host.transfer_port}", "--data-dir", str(self.run_dir / "data" / host.node_id),
                "--insecure", "--no-mdns", "--cpus", f"{self.cpus:g}", "--log-level", "info", *self.extra]
        # Every other agent is a seed: whichever restarts, it finds the cluster again.
        for other in self.network.hosts:
            if other is not host:
                argv += ["--join", other.gossip]
        return self.network.wrap(host, argv)

    def start(self, node: str) -> None:
        host = self.hosts[node]
        proc = self.procs.get(node)
        if proc is not None and proc.poll() is None:
            return
        with open(self.run_dir / f"{node}.log", "ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.procs[node] = subprocess.Popen(self.command(host), stdout=out, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, cwd=self.run_dir)

    def running(self, node: str) -> bool:
        proc = self.procs.get(node)
        return proc is not None and proc.poll() is None

    def signal(self, node: str, sig: int) -> None:
        proc = self.procs.get(node)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, node: str) -> None:
        """SIGKILL the agent and everything in its session (its sandboxed jobs too)."""
        self.signal(node, signal.SIGCONT)
        self.signal(node, signal.SIGKILL)
        proc = self.procs.get(node)
        if proc is not None:
            proc.wait(30)

    def stop(self, node: str, timeout: float) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit status."""
        proc = self.procs.get(node)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        self.signal(node, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("agent %s did not stop within %.0fs of SIGTERM; killing it", node, timeout)
            self.kill(node)
            return proc.returncode

    def close(self) -> None:
        for node in list(self.procs):
            try:
                self.kill(node)
            except (subprocess.TimeoutExpired, OSError) as e:
                log.warning("could not kill agent %s: %s", node, e)

    def log_tail(self, node: str, size: int = 3000) -> str:
        path = self.run_dir / f"{node}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""


def describe(network: Network) -> dict[str, Any]:
    return {"kind": "netns" if isinstance(network, NetnsNetwork) else "loopback",
            "bridge": getattr(network, "bridge", None), "subnet": getattr(network, "subnet", None),
            "hosts": [vars(h) for h in network.hosts]}
