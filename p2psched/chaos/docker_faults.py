"""Container-level faults for chaos runs against the compose cluster (``compose.yaml``).

The Jepsen-style nemesis calls these to break agents that run as containers; the same
checker then judges the history. Every function takes a container name as
:func:`list_agents` returns it, runs the ``docker`` CLI, and raises
:class:`DockerFaultError` (a sentence saying what failed and how to fix it) when Docker
refuses.

Public interface:

* ``list_agents(project=None, *, include_entry=True) -> list[str]``: the agent
  containers of the compose project (running or not), entry first, then replicas by
  number. ``project`` defaults to ``$P2PSCHED_PROJECT`` or ``p2psched``, as in
  ``scripts/cluster.sh``.
* ``kill(name)``: SIGKILL the container (``docker kill``); ``start(name)`` brings it
  back with the same data dir, address and node id.
* ``pause(name)`` / ``unpause(name)``: freeze every process of the container (cgroup
  freezer): the agent stops answering without its sockets closing, like a long GC
  pause or a hung host.
* ``partition(name)`` / ``heal(name)``: disconnect the container from every network,
  then reconnect it with the same aliases and IP address, so peers see the same member
  come back. What ``heal`` needs is saved under the system temp directory, so a
  nemesis in another process (or restarted) can still heal.
* ``netem(name, loss_pct, delay_ms)`` / ``clear_netem(name)``: packet loss and delay
  on every interface of the container with ``tc netem`` (needs ``cap_add: NET_ADMIN``,
  which compose.yaml gives the agents). Where the kernel lacks netem, loss comes from
  an iptables rule and delay raises; ``netem_available(name)`` tells which.
* ``split(groups)`` / ``heal_split(names)``: a partition between groups of agents
  (e.g. a majority and a minority) with iptables inside each container; unlike
  ``partition`` each group keeps talking within itself.
* ``start(name)``, ``address(name)``: restart a killed agent; its current IPv4 address.
* ``restart(name, grace_s=30)``: a graceful restart (``docker restart``): SIGTERM, so
  the agent drains, then SIGKILL after ``grace_s`` if it has not exited.
* ``break_sandbox(name) -> int``: SIGKILL every wasm worker process of the agent in
  the container, and say how many there were (the nemesis repeats it through the
  fault's hold, so every job the host takes meanwhile fails for the host's fault).
  It reaches them through this host's ``/proc``, from the container's first process
  down, so the harness runs as root on the Docker host itself.

Faults are idempotent where Docker allows: healing a connected container, clearing
netem where none is set, or unpausing a running container does nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

#: Seconds one docker CLI call may take. Pausing or killing is quick; 60 s covers an
#: engine that is slow under a loaded host without letting a hung engine stall a run.
DOCKER_TIMEOUT_S = 60.0
#: The compose label that marks agent containers (compose.yaml sets it).
ROLE_LABEL = "p2psched.role=agent"
STATE_DIR = Path(tempfile.gettempdir()) / "p2psched-chaos"
#: Attempts at `docker pause` before giving up (see :func:`pause`).
PAUSE_TRIES = 5


class DockerFaultError(RuntimeError):
    """A fault could not be applied; the message says what Docker said and what to do."""


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S)
    except FileNotFoundError:
        raise DockerFaultError("the docker CLI is not installed; install Docker Engine to run container faults") from None
    except subprocess.TimeoutExpired:
        raise DockerFaultError(
            f"'docker {' '.join(args)}' took over {DOCKER_TIMEOUT_S:.0f}s; is the Docker engine overloaded or hung?"
        ) from None
    if check and proc.returncode != 0:
        raise DockerFaultError(f"'docker {' '.join(args)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _inspect(name: str) -> dict[str, Any]:
    proc = _docker("inspect", "--type", "container", name, check=False)
    if proc.returncode != 0:
        raise DockerFaultError(f"no container named {name!r}; list_agents() names the agents of the cluster")
    data = json.loads(proc.stdout)
    assert isinstance(data, list) and data, data
    result: dict[str, Any] = data[0]
    return result


def _number(name: str) -> int:
    m = re.search(r"[-_](\d+)$", name)
    return int(m.group(1)) if m else 0


def list_agents(project: str | None = None, *, include_entry: bool = True) -> list[str]:
    project = project or os.environ.get("P2PSCHED_PROJECT", "p2psched")
    proc = _docker(
        "ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "--filter", f"label={ROLE_LABEL}",
        "--format", '{{.Names}}\t{{.Label "com.docker.compose.service"}}',
    )
    rows = [line.split("\t") for line in proc.stdout.splitlines() if line.strip()]
    entries = sorted(n for n, svc in rows if svc == "entry")
    replicas = sorted((n for n, svc in rows if svc != "entry"), key=_number)
    return (entries if include_entry else []) + replicas


def kill(name: str) -> None:
    if _inspect(name)["State"]["Running"]:
        _docker("kill", "--signal", "KILL", name)


def start(name: str) -> None:
    state = _inspect(name)["State"]
    if state["Paused"]:
        _docker("unpause", name)
    elif not state["Running"]:
        _docker("start", name)


def restart(name: str, grace_s: float = 30.0) -> None:
    _docker("restart", "--time", str(int(grace_s)), name)


def pause(name: str) -> None:
    state = _inspect(name)["State"]
    if not state["Running"]:
        raise DockerFaultError(f"cannot pause {name}: it is not running (start it first)")
    if state["Paused"]:
        return
    # The cgroup v1 freezer gives up ("unable to freeze") when a task is mid-fork or
    # in an uninterruptible sleep at that instant; a later try usually succeeds.
    for attempt in range(PAUSE_TRIES):
        try:
            _docker("pause", name)
            return
        except DockerFaultError as e:
            if "unable to freeze" not in str(e) or attempt == PAUSE_TRIES - 1:
                raise
            time.sleep(0.2)


def unpause(name: str) -> None:
    if _inspect(name)["State"]["Paused"]:
        _docker("unpause", name)


def _state_file(container_id: str) -> Path:
    return STATE_DIR / f"{container_id}.json"


def partition(name: str) -> None:
    """Cut the container off every network; :func:`heal` puts it back as it was."""
    info = _inspect(name)
    networks: dict[str, Any] = info["NetworkSettings"]["Networks"] or {}
    if not networks:
        return  # already cut off
    saved = {
        net: {
            "ip": (cfg.get("IPAMConfig") or {}).get("IPv4Address") or cfg.get("IPAddress") or "",
            # Docker adds the short container id itself on connect; the rest (the
            # service name, `peers`) must be given again or DNS discovery loses it.
            "aliases": [a for a in (cfg.get("Aliases") or []) if not info["Id"].startswith(a)],
        }
        for net, cfg in networks.items()
    }
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = _state_file(info["Id"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved))
    tmp.replace(path)
    for net in networks:
        _docker("network", "disconnect", "--force", net, name)


def heal(name: str) -> None:
    info = _inspect(name)
    path = _state_file(info["Id"])
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return  # never partitioned by us: nothing to undo
    connected = info["NetworkSettings"]["Networks"] or {}
    for net, cfg in saved.items():
        if net in connected:
            continue
        args = ["network", "connect"]
        for alias in cfg["aliases"]:
            args += ["--alias", alias]
        if cfg["ip"]:
            args += ["--ip", cfg["ip"]]
        try:
            _docker(*args, net, name)
        except DockerFaultError as e:
            if cfg["ip"] and "user configured subnets" in str(e):
                raise DockerFaultError(
                    f"cannot reconnect {name} to {net} with its old address {cfg['ip']}: the network has no "
                    "configured subnet (compose.yaml sets one under networks.default.ipam; keep it)"
                ) from None
            raise
    path.unlink(missing_ok=True)


def _interfaces(name: str) -> list[str]:
    proc = _docker("exec", name, "ls", "/sys/class/net")
    return [i for i in proc.stdout.split() if i != "lo"]


def _exec(name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = _docker("exec", name, *argv, check=False)
    if check and proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip()
        if "not permitted" in err or "Permission denied" in err:
            raise DockerFaultError(
                f"'{' '.join(argv)}' in {name} was refused ({err}); the container needs the NET_ADMIN "
                "capability (cap_add: [NET_ADMIN] in compose.yaml)"
            )
        raise DockerFaultError(f"'{' '.join(argv)}' in {name} failed: {err}")
    return proc


def netem_available(name: str) -> bool:
    """Whether the kernel has the netem qdisc (CONFIG_NET_SCH_NETEM); delay needs it."""
    proc = _exec(name, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms", check=False)
    if proc.returncode == 0:
        _exec(name, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return True
    if "not permitted" in proc.stderr:
        _exec(name, "tc", "qdisc", "add", "dev", "lo", "root", "netem")  # raises the NET_ADMIN advice
    return False


def netem(name: str, loss_pct: float, delay_ms: float) -> None:
    """Drop ``loss_pct`` percent of outgoing packets and delay the rest by ``delay_ms``.

    With netem in the kernel, both come from one ``tc netem`` qdisc per interface.
    Kernels built without it (some VM kernels) still get loss, from an iptables rule
    that drops outgoing packets at random; delay then raises, since nothing else in
    the kernel can hold packets back for a fixed time.
    """
    if not 0 <= loss_pct <= 100:
        raise ValueError(f"loss_pct is {loss_pct}; it must be a percentage between 0 and 100")
    if delay_ms < 0:
        raise ValueError(f"delay_ms is {delay_ms}; it must be 0 or more")
    ifaces = _interfaces(name)
    if not ifaces:
        raise DockerFaultError(f"{name} has no network interface to shape (is it partitioned? heal it first)")
    if netem_available(name):
        for iface in ifaces:
            # `replace` works whether or not a root qdisc is set, so repeated faults update it
            _exec(name, "tc", "qdisc", "replace", "dev", iface, "root", "netem",
                  "delay", f"{delay_ms:g}ms", "loss", f"{loss_pct:g}%")
        return
    if delay_ms > 0:
        raise DockerFaultError(
            f"cannot delay packets in {name}: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM); "
            "use a kernel with it for delay faults, or ask for loss only (delay_ms=0)"
        )
    _clear_loss_rule(name)
    if loss_pct > 0:
        _exec(name, "iptables", "-N", LOSS_CHAIN)
        _exec(name, "iptables", "-I", "OUTPUT", "-j", LOSS_CHAIN)
        # `! -o lo`: the container's own healthcheck is not the network under test
        _exec(name, "iptables", "-A", LOSS_CHAIN, "!", "-o", "lo", "-m", "statistic", "--mode", "random",
              "--probability", f"{loss_pct / 100:.6f}", "-j", "DROP")


#: iptables chain holding the loss rule where netem is missing, and the one holding
#: partition rules from :func:`split`; their own chains, so clearing them touches
#: nothing else.
LOSS_CHAIN = "P2PSCHED-LOSS"
SPLIT_CHAIN = "P2PSCHED-SPLIT"


def _clear_chain(name: str, chain: str, hooks: tuple[str, ...]) -> None:
    if _exec(name, "iptables", "-S", chain, check=False).returncode != 0:
        return  # no such chain: nothing set
    for hook in hooks:
        while _exec(name, "iptables", "-D", hook, "-j", chain, check=False).returncode == 0:
            pass
    _exec(name, "iptables", "-F", chain)
    _exec(name, "iptables", "-X", chain)


def _clear_loss_rule(name: str) -> None:
    _clear_chain(name, LOSS_CHAIN, ("OUTPUT",))


def clear_netem(name: str) -> None:
    for iface in _interfaces(name):
        proc = _exec(name, "tc", "qdisc", "del", "dev", iface, "root", check=False)
        # a failure other than "none set" is the missing capability: say so
        if proc.returncode != 0 and "not permitted" in proc.stderr:
            _exec(name, "tc", "qdisc", "del", "dev", iface, "root")
    _clear_loss_rule(name)


def split(groups: list[list[str]]) -> None:
    """Partition the cluster into ``groups``: agents talk within their group only.

    Unlike :func:`partition`, which cuts one container off everything (including DNS),
    this drops packets between groups with iptables inside each container, so a
    majority and a minority can each keep running as a cluster. :func:`heal_split`
    (or :func:`heal` on each) undoes it.
    """
    members = [n for g in groups for n in g]
    if len(set(members)) != len(members):
        raise ValueError("an agent appears in two groups of the split; each must be in exactly one")
    ips = {n: address(n) for n in members}
    missing = [n for n, ip in ips.items() if not ip]
    if missing:
        raise DockerFaultError(f"{', '.join(missing)} has no address (partitioned or stopped); heal or start it first")
    for gi, group in enumerate(groups):
        others = [ips[n] for gj, g in enumerate(groups) if gj != gi for n in g]
        for n in group:
            _clear_chain(n, SPLIT_CHAIN, ("INPUT", "OUTPUT"))
            if not others:
                continue
            _exec(n, "iptables", "-N", SPLIT_CHAIN)
            _exec(n, "iptables", "-I", "INPUT", "-j", SPLIT_CHAIN)
            _exec(n, "iptables", "-I", "OUTPUT", "-j", SPLIT_CHAIN)
            for ip in others:
                _exec(n, "iptables", "-A", SPLIT_CHAIN, "-s", ip, "-j", "DROP")
                _exec(n, "iptables", "-A", SPLIT_CHAIN, "-d", ip, "-j", "DROP")


def heal_split(names: list[str]) -> None:
    for n in names:
        _clear_chain(n, SPLIT_CHAIN, ("INPUT", "OUTPUT"))


def address(name: str) -> str:
    """The container's first IPv4 address ("" while partitioned)."""
    networks = _inspect(name)["NetworkSettings"]["Networks"] or {}
    for cfg in networks.values():
        if cfg.get("IPAddress"):
            return str(cfg["IPAddress"])
    return ""


def break_sandbox(name: str) -> int:
    """SIGKILL the wasm worker processes in container ``name``; returns how many."""
    state = _inspect(name)["State"]
    if not state["Running"] or state["Paused"]:
        return 0
    root = int(state["Pid"])
    if not Path(f"/proc/{root}").exists():
        raise DockerFaultError(
            f"the processes of {name} (pid {root}) are not visible here: the sandbox fault reaches them through "
            "/proc, so run the harness on the Docker host itself, as root")
    killed = 0
    for pid in _descendants(root):
        try:
            if b"p2psched.sandbox.wasm_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
    return killed


def _descendants(root: int) -> list[int]:
    """Every process below ``root``, found through each thread's children list."""
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found
