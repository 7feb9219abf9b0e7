"""What the host offers for process isolation, and the bubblewrap command line built on it.

The process sandbox does not write its own namespace launcher: it runs
`bubblewrap <https://github.com/containers/bubblewrap>`_ (``bwrap``, the launcher
Flatpak uses), whose only job is to build a private root in fresh namespaces and
execute one command there. This module finds the tools, probes once per agent
which namespaces actually work here (user namespaces are often disabled, and a
container's masked ``/proc`` blocks mounting a new one inside a user namespace),
and builds the argument list as a pure function, so the exact isolation is
visible in one place and unit-tested.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Host directories every job sees read-only. Merged-/usr hosts have symlinks
#: for the rest; they are recreated as symlinks.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: A curated /etc: what the dynamic linker, libc's name service and common
#: runtimes read. Everything else (shadow, gshadow, ssh host keys, sudoers,
#: ssl/private, the agent's own config) is simply absent, which is safer than
#: bind-mounting /etc and hiding a deny-list of secrets.
ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "nsswitch.conf",
    "localtime", "alternatives", "os-release", "protocols", "services", "mime.types",
    "host.conf", "hosts",
)
#: Added for jobs that hold the ``network`` capability.
ETC_NETWORK_FILES = ("resolv.conf", "gai.conf", "ssl/certs", "ca-certificates", "ca-certificates.conf")

#: Where the job's scratch tmpfs appears, and its working directory. /tmp points here.
SCRATCH = "/scratch"
#: Where the directory of a command outside the system directories appears.
JOB_BIN = "/job/bin"

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, slots=True)
class Bind:
    """A read-only (or, for scratch, writable; for a device node, device) bind of a host path."""

    dest: str
    src: str
    writable: bool = False
    device: bool = False


@dataclass(frozen=True, slots=True)
class BwrapPlan:
    command: Sequence[str]
    env: dict[str, str]
    binds: Sequence[Bind]
    user_namespace: bool
    uid: int
    gid: int
    network: bool
    seccomp_fd: int
    info_fd: int
    block_fd: int
    hostname: str = "job"
    etc_files: Sequence[str] = field(default_factory=tuple)


def system_layout() -> list[tuple[str, str]]:
    """(kind, path) for the root's system directories: ("bind", d) or ("symlink:<target>", d)."""
    out: list[tuple[str, str]] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            out.append((f"symlink:{os.readlink(d)}", d))
        elif os.path.isdir(d):
            out.append(("bind", d))
    return out


def bwrap_args(plan: BwrapPlan, layout: Sequence[tuple[str, str]]) -> list[str]:
    """The bwrap options (without the program name and the command) for ``plan``. Pure.

    bwrap reads options from ``--args FD`` but not the command, which follows
    ``--`` on its real command line.
    """
    a: list[str] = [
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", plan.hostname,
        # the parent-death signal: if the agent dies, bwrap dies, and with it the
        # job's PID namespace
        "--die-with-parent",
        # setsid: the job has no controlling terminal to inject input into
        "--new-session",
        "--clearenv",
    ]
    if plan.user_namespace:
        a += ["--unshare-user", "--disable-userns", "--uid", str(plan.uid), "--gid", str(plan.gid)]
    else:
        # bwrap run by root keeps no capability unless told to; say so explicitly
        a += ["--cap-drop", "ALL"]
    if not plan.network:
        a.append("--unshare-net")  # a fresh namespace holds only loopback
    for kind, d in layout:
        if kind == "bind":
            a += ["--ro-bind", d, d]
        else:
            a += ["--symlink", kind.split(":", 1)[1], d]
    for name in plan.etc_files:
        a += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    # No pseudo-terminals: every devpts instance bwrap mounts draws on the host's one
    # kernel.pty.max, unbounded, so one job could open them all and leave none to other
    # jobs and containers. An empty tmpfs over /dev/pts leaves /dev/ptmx pointing nowhere.
    a += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/pts"]
    for b in plan.binds:
        op = "--dev-bind" if b.device else ("--bind" if b.writable else "--ro-bind")
        a += [op, b.src, b.dest]
    a += ["--symlink", SCRATCH, "/tmp"]
    # Only scratch stays writable: the root and /dev (and so /dev/shm) are
    # tmpfs that bwrap made; freeze them once every mount is in place.
    a += ["--remount-ro", "/dev/pts", "--remount-ro", "/dev", "--remount-ro", "/"]
    a += ["--chdir", SCRATCH]
    for k, v in plan.env.items():
        a += ["--setenv", k, v]
    a += ["--seccomp", str(plan.seccomp_fd), "--info-fd", str(plan.info_fd), "--block-fd", str(plan.block_fd)]
    return a


def resolve_command(argv0: str, env: dict[str, str]) -> str | None:
    """The host path of the job's program, looked up in the job's own PATH."""
    if "/" in argv0:
        return argv0 if os.path.isfile(argv0) else None
    return shutil.which(argv0, path=env.get("PATH", DEFAULT_PATH))


def in_system_dirs(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in SYSTEM_DIRS)


@dataclass(frozen=True, slots=True)
class Tools:
    bwrap: str | None
    prlimit: str | None
    setpriv: str | None
    bwrap_version: str = ""


def find_tools() -> Tools:
    bwrap = shutil.which("bwrap")
    prlimit = shutil.which("prlimit")
    setpriv = shutil.which("setpriv")
    version = ""
    if bwrap:
        try:
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            version = ""
    return Tools(bwrap, prlimit, setpriv, version)


def probe_user_namespace(bwrap: str, uid: int | None, gid: int | None) -> tuple[bool, str]:
    """Run one trial sandbox in a user namespace, as the sandbox user. (works, detail)"""
    argv = [
        bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true",
    ]
    kw: dict[str, object] = {}
    if uid is not None and os.geteuid() == 0:
        kw = {"user": uid, "group": gid, "extra_groups": []}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, env={}, **kw)  # type: ignore[call-overload]
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if r.returncode == 0:
        return True, "a trial sandbox in a new user namespace ran"
    return False, r.stderr.strip() or f"bwrap exited {r.returncode}"


def probe_namespace(kind: str) -> tuple[bool, str]:
    """Whether a namespace of ``kind`` can be created here (util-linux ``unshare``)."""
    flag = {"pid": "--pid --fork", "mount": "--mount", "net": "--net", "ipc": "--ipc", "uts": "--uts",
            "cgroup": "--cgroup", "user": "--user"}[kind]
    if not Path(f"/proc/self/ns/{'mnt' if kind == 'mount' else kind}").exists():
        return False, f"the kernel has no {kind} namespaces (/proc/self/ns lacks it)"
    unshare = shutil.which("unshare")
    if unshare is None:
        return False, "util-linux 'unshare' is not installed"
    try:
        r = subprocess.run([unshare, *flag.split(), "/bin/true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if r.returncode == 0:
        return True, "created"
    return False, r.stderr.strip() or f"unshare exited {r.returncode}"
