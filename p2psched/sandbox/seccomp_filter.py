"""The seccomp filter every process job runs under, built with libseccomp.

The filter is an allow-list's opposite: a process job may make any system call a
normal unprivileged program makes, and is refused (``EPERM``, not a kill, so the
guest sees a clean error it can report) the calls that reach past its sandbox:
debugging other processes, mounting, kernel keyrings, eBPF, perf, new user
namespaces, loading kernel code, rebooting. The list follows Docker's and
systemd's ``@system-service`` exclusions, trimmed to what a batch job never needs.

The filter is compiled to classic BPF once per agent (libseccomp's
``seccomp_export_bpf``) and handed to bubblewrap on a file descriptor
(``bwrap --seccomp FD``), which loads it after ``no_new_privs`` and just before it
executes the job's command.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

from p2psched.sandbox import leftovers

#: Refused with EPERM. Grouped by why a batch job must not have them.
DENIED_SYSCALLS: tuple[str, ...] = (
    # inspecting or steering other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # the filesystem tree: the sandbox root is fixed before the job starts
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "name_to_handle_at", "open_by_handle_at",
    # namespaces: entering or making new ones (clone flags are checked below)
    "unshare", "setns",
    # kernel keyrings are shared across the host's user ids
    "keyctl", "add_key", "request_key",
    # eBPF, perf and io_uring: large kernel attack surface, and io_uring requests
    # are not checked by seccomp at all
    "bpf", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "userfaultfd",
    # loading kernel code, rebooting, swap, accounting, clocks, the kernel log
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "syslog", "quotactl", "lookup_dcookie",
    "sethostname", "setdomainname", "vhangup", "iopl", "ioperm", "uselib",
    "personality",
)

# <linux/sched.h>
CLONE_NEWUSER = 0x10000000


@functools.cache
def filter_bpf() -> bytes:
    """The filter as classic BPF, ready for ``bwrap --seccomp``. Built once."""
    import pyseccomp as seccomp  # type: ignore[import-untyped]  # libseccomp via ctypes, loaded on first use

    f = seccomp.SyscallFilter(seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(eperm, name)
        except OSError:
            # A call this architecture does not have cannot be made either.
            continue
    # A new user namespace would hand the job every capability inside it, the
    # starting point of most container escapes. clone's first argument is flags.
    f.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    # clone3 passes flags in memory that seccomp cannot read; ENOSYS makes libc fall
    # back to clone, where the flags are checked (Docker does the same).
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def bpf_fd() -> int:
    """A fresh readable fd holding the filter (a memfd; the caller closes it)."""
    data = filter_bpf()
    fd = os.memfd_create(leftovers.SECCOMP_MEMFD, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
