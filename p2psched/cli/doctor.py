"""``p2psched doctor``: what works on this host, and how to fix what doesn't.

Each check prints ok/warn/FAIL, what it found and, when it is not ok, the fix.
Exit status 1 when any check FAILs (warnings are fine: they mean a fallback).
Whether a check that is not ok warns or fails is decided per check (:func:`judge`),
never from the words of its detail.
"""

from __future__ import annotations

import errno
import importlib
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import click

Check = tuple[str, bool, str, str]  # name, ok, detail, fix: what every check returns
Outcome = Literal["ok", "warn", "fail"]


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return ("python", ok, sys.version.split()[0], "install Python 3.11 or newer")


def check_wasmtime() -> Check:
    try:
        import wasmtime

        engine = wasmtime.Engine()
        store = wasmtime.Store(engine)
        module = wasmtime.Module(engine, '(module (func (export "add") (param i32 i32) (result i32) '
                                         "local.get 0 local.get 1 i32.add))")
        add = wasmtime.Instance(store, module, []).exports(store)["add"]
        got = add(store, 2, 3)  # type: ignore[operator]
        ok = got == 5
        from importlib.metadata import version as dist_version

        version = dist_version("wasmtime")
        return ("wasmtime", ok, f"wasmtime {version}: trial run 2+3={got}", "pip install --upgrade wasmtime")
    except Exception as e:  # any failure here is the finding
        return ("wasmtime", False, f"trial run failed: {e}", "pip install --upgrade wasmtime (needs x86-64 or arm64)")


def check_data_dir(path: Path) -> Check:
    """Whether the agent could use ``path``, leaving nothing behind that was not there:
    a directory it had to create is removed, and no agent.lock is created or written."""
    from p2psched.agent.datadir import DataDirLock

    missing = [d for d in (path, *path.parents) if not d.exists()]  # deepest first: removed in this order
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".doctor-probe-", dir=path)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
        holder = DataDirLock.holder(path)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # an agent there refuses jobs (503 store_unwritable) until there is room
            return ("data dir", False, f"{path}: {e.strerror}", f"free space on the file system of {path}")
        return ("data dir", False, f"{path}: {e.strerror}", f"choose a writable --data-dir, or fix permissions on {path}")
    finally:
        for d in missing:
            try:
                d.rmdir()
            except OSError:
                break  # not created here after all, or no longer empty: leave it and those above
    if holder is not None:
        return ("data dir", False, f"data dir {path} is in use by another agent ({holder})",
                "stop that agent, or give the new one another --data-dir")
    if missing:
        return ("data dir", True, f"{path} can be created and written, and no agent uses it", "")
    return ("data dir", True, f"{path} is writable and no agent uses it", "")


def default_data_dir(node_id: str | None) -> Path:
    """The data dir `p2psched agent` uses when given none: its config file's or
    $P2PSCHED_DATA_DIR, else ./data/<node id> (the node id: --node-id,
    $P2PSCHED_NODE_ID, the config file's, else the hostname)."""
    from p2psched.config import ConfigError, load_settings

    try:
        return load_settings(node_id=node_id).resolved_data_dir
    except ConfigError:  # the agent would say so at start; the doctor still checks the default place
        return Path("data") / (node_id or socket.gethostname())


_PROTOCOLS: dict[int, str] = {socket.SOCK_STREAM: "TCP", socket.SOCK_DGRAM: "UDP"}


def check_port(name: str, hostport: str, *kinds: int) -> Check:
    """Whether the agent could bind ``hostport`` for each of ``kinds``: the gossip port
    takes UDP for SWIM and TCP for push-pull, and either one taken stops the agent."""
    from p2psched.config import parse_hostport

    protocols = " and ".join(_PROTOCOLS[k] for k in kinds)
    try:
        host, port = parse_hostport(hostport, what=f"--{name}")  # as the agent reads it
    except ValueError as e:
        return (f"port {name}", False, str(e), f"use HOST:PORT for --{name}, e.g. --{name} 0.0.0.0:{_EXAMPLE[name]}")
    for kind in kinds:
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds: TIME_WAIT is no conflict
            s.bind((host, port))
        except OSError as e:
            return (f"port {name}", False, f"{hostport} ({_PROTOCOLS[kind]}): {e.strerror or e}",
                    _bind_fix(name, host, port, kind, protocols, e))
        finally:
            s.close()
    return (f"port {name}", True, f"{hostport} is free ({protocols})", "")


#: The agent's default ports, for the examples in fixes.
_EXAMPLE = {"api": 7700, "gossip": 7701, "transfer": 7702}


def _bind_fix(name: str, host: str, port: int, kind: int, protocols: str, e: OSError) -> str:
    """The fix for a failed bind: only a port in use is fixed by freeing the port."""
    if isinstance(e, socket.gaierror):
        return f"{host!r} is not an address or a name this host resolves; pass --{name} with an IP address of " \
               f"this host, or 0.0.0.0:{port} for all of them"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this host (see `ip -brief address`); pass --{name} with one of " \
               f"its addresses, or 0.0.0.0:{port} for all of them"
    if e.errno == errno.EACCES:
        return f"ports below 1024 need root (or CAP_NET_BIND_SERVICE); pass --{name} {host}:OTHERPORT " \
               "with a port of 1024 or above"
    ss = "-lntp" if kind == socket.SOCK_STREAM else "-lnup"
    return (f"stop whatever uses {_PROTOCOLS[kind]} port {port} (`ss {ss} | grep :{port}`), "
            f"or pass --{name} HOST:OTHERPORT with a port free for {protocols}")


def check_cgroups() -> Check:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        ctrls = (root / "cgroup.controllers").read_text().split()
        writable = os.access(root, os.W_OK)
        return ("cgroups", writable, f"v2 (unified), controllers: {' '.join(ctrls)}; "
                f"{'writable' if writable else 'read-only'}",
                "run the agent as root or delegate a cgroup subtree to it (systemd Delegate=yes); "
                "in a container use --cgroupns=private with a writable /sys/fs/cgroup")
    v1 = sorted(p.name for p in root.iterdir() if (p / "tasks").exists()) if root.exists() else []
    if v1:
        writable = all(os.access(root / c, os.W_OK) for c in ("memory", "pids", "cpu") if (root / c).exists())
        return ("cgroups", writable, f"v1, controllers: {' '.join(v1)}; {'writable' if writable else 'read-only'}",
                "run the agent as root so it can create job cgroups; without them limits fall back to rlimits")
    return ("cgroups", False, "no cgroup hierarchy found at /sys/fs/cgroup",
            "mount cgroup2 at /sys/fs/cgroup; until then process jobs get rlimits only")


def check_userns() -> Check:
    path = Path("/proc/sys/user/max_user_namespaces")
    try:
        n = int(path.read_text())
    except (OSError, ValueError):
        return ("user namespaces", False, "cannot read max_user_namespaces", "use a kernel with CONFIG_USER_NS")
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    extra = f", unprivileged_userns_clone={clone.read_text().strip()}" if clone.exists() else ""
    return ("user namespaces", n > 0, f"max_user_namespaces={n}{extra}",
            "sysctl -w user.max_user_namespaces=15000 (process jobs still run as root-owned namespaces without it)")


def check_leftovers() -> Check:
    """What a killed agent left of its process jobs: the next agent start removes it,
    so this only warns; until then it holds memory, mounts or running processes."""
    from p2psched.sandbox import cgroups, leftovers

    found = [
        (len(cgroups.stale_names(cgroups.detect())), "job cgroup"),
        (len(leftovers.stale_mounts()), "scratch mount"),
        (len(leftovers.stale_dirs()), "scratch directory"),
    ]
    orphans = leftovers.orphaned_sandboxes()
    parts = [f"{n} {noun}{'s' if n != 1 else ''}" for n, noun in found if n]
    if orphans:
        parts.append(f"{len(orphans)} half-built sandbox{'es' if len(orphans) != 1 else ''} still running "
                     f"(pid {', '.join(map(str, orphans[:10]))}{', ...' if len(orphans) > 10 else ''})")
    if not parts:
        return "leftovers", True, "nothing left by a killed agent", ""
    fix = "start the agent: it removes them before it serves"
    if orphans:
        fix += f" (or end the sandboxes now: kill -9 {' '.join(map(str, orphans[:10]))})"
    return "leftovers", False, "left by a killed agent: " + ", ".join(parts), fix


#: Checks whose failure is a warning: something works less well, or the agent mends it.
#: Every other check that is not ok fails, unless :func:`judge` says otherwise.
WARN_ONLY = {"leftovers"}


def judge(check: Check, gpus_declared: bool) -> Outcome:
    """ok, warn or fail for one row: a warning is a state the agent runs in (a fallback, or
    something it mends itself); a failure is one it would refuse, or run jobs wrongly in."""
    name, ok, detail, _ = check
    if ok:
        return "ok"
    if name in WARN_ONLY:
        return "warn"
    if name == "device control" and detail.startswith("fallback:"):
        # probe_device_control's two answers: a job cgroup it could not restrict fails
        # jobs too; "fallback:" means the mount namespace alone keeps devices out.
        return "warn"
    if name.startswith("gpu") and not gpus_declared:
        return "warn"  # a GPU this host lacks or cannot read: it still takes CPU and wasm jobs
    return "fail"


def _module_checks(module: str) -> Iterable[Check]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return []
    fn: Callable[[], list[Check]] | None = getattr(mod, "doctor_checks", None)
    return fn() if fn else []


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="The agent's data directory [as the agent: ./data/<node-id>].")
@click.option("--node-id", help="The agent's node id, for the default --data-dir [as the agent: hostname].")
@click.option("--api", default="0.0.0.0:7700", show_default=True)
@click.option("--gossip", default="0.0.0.0:7701", show_default=True)
@click.option("--transfer", default="0.0.0.0:7702", show_default=True)
@click.option("--gpus", envvar="P2PSCHED_GPUS", help="Check this --gpus declaration, as the agent would read it.")
def doctor(data_dir: Path | None, node_id: str | None, api: str, gossip: str, transfer: str,
           gpus: str | None) -> None:
    """Check what works on this host, and how to fix what doesn't."""
    if data_dir is None:
        data_dir = default_data_dir(node_id)
    checks: list[Check] = [
        check_python(), check_wasmtime(), check_data_dir(data_dir),
        check_port("api", api, socket.SOCK_STREAM),
        check_port("gossip", gossip, socket.SOCK_DGRAM, socket.SOCK_STREAM),
        check_port("transfer", transfer, socket.SOCK_STREAM), check_cgroups(), check_userns(), check_leftovers(),
    ]
    checks += _module_checks("p2psched.sandbox.process")
    from p2psched.gpu.discovery import doctor_checks as gpu_checks

    checks += gpu_checks(gpus)
    failed = 0
    marks = {"ok": click.style(" ok ", fg="green"), "warn": click.style("warn", fg="yellow"),
             "fail": click.style("FAIL", fg="red")}
    for check in checks:
        name, ok, detail, fix = check
        outcome = judge(check, gpus_declared=bool(gpus and gpus.strip()))
        failed += outcome == "fail"
        click.echo(f"[{marks[outcome]}] {name:<18} {detail}")
        if outcome != "ok" and fix:
            click.echo(f"       fix: {fix}")
    sys.exit(1 if failed else 0)
