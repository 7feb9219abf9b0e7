"""Device access on cgroup v2: a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program per job.

cgroup v2 has no ``devices`` controller. The kernel instead runs the eBPF
programs attached to a cgroup (attach type ``BPF_CGROUP_DEVICE``) whenever one
of its processes opens a device node or creates one with ``mknod``, and refuses
with EPERM unless every program returns 1. This module turns an allow-list into such a
program, with the same semantics as runc's and crun's device filter, loads it
with ``bpf(BPF_PROG_LOAD)`` and attaches it with ``bpf(BPF_PROG_ATTACH)``.

The program reads ``struct bpf_cgroup_dev_ctx { u32 access_type; u32 major;
u32 minor; }``: the low 16 bits of ``access_type`` are the node's type
(``BPF_DEVCG_DEV_BLOCK`` = 1, ``_CHAR`` = 2), the high 16 bits the access asked
for (``BPF_DEVCG_ACC_MKNOD`` = 1, ``_READ`` = 2, ``_WRITE`` = 4). Each rule is a
block of compares that jumps to the next rule on a mismatch and returns 1 when
all match; after the last rule the program returns 0.

The syscall is made through ctypes: Python has no binding for bpf(2), and the
PyPI packages that touch BPF either assemble classic BPF (``bpf-asm``) or load
compiled ELF objects through a bundled libbpf (``pylibbpf``, alpha). Two
commands and a dozen instructions do not justify a compiled dependency.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from pathlib import Path
from typing import NamedTuple

#: bpf(2)'s number; the kernel has no generic one. Other architectures: unsupported.
SYSCALL_NR = {"x86_64": 321, "aarch64": 280}

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2

DEV_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR
DEV_ACCESS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE

# eBPF opcodes (linux/bpf_common.h, linux/bpf.h): class | operation | source
_LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: dst32 &= imm
_ALU_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: dst32 >>= imm
_ALU_MOV_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K: dst32 = imm
_ALU_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X: dst32 = src32
_JMP_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm: pc += off
_JMP_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X: if dst != src: pc += off
_JMP_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0

#: A verifier log this size holds the log of any program built here many times over.
LOG_BYTES = 1 << 20


class Rule(NamedTuple):
    """One allowed device: ``kind`` "c" or "b", ``major`` and ``minor`` (-1: any),
    ``access`` a subset of "rwm" (read, write, mknod), as in cgroup v1's devices.allow."""

    kind: str
    major: int
    minor: int
    access: str = "rwm"


class DeviceFilterError(OSError):
    """Loading or attaching the program failed. ``not_permitted``: the host does not
    allow it (capabilities, a container's seccomp filter, the kernel's configuration,
    an exclusive program above the cgroup), as opposed to a program the verifier rejects."""

    def __init__(self, err: int, message: str, *, not_permitted: bool) -> None:
        super().__init__(err, message)
        self.not_permitted = not_permitted

    def __str__(self) -> str:
        return str(self.strerror)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    # struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }, little-endian
    # (both supported architectures): dst_reg is the low nibble
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def assemble(rules: list[Rule]) -> bytes:
    """The program's instructions for ``rules``: allow a request if any rule matches it."""
    # r2 = device type, r3 = access asked for, r4 = major, r5 = minor (r1 is the context)
    prog = [
        _insn(_LDX_MEM_W, dst=2, src=1, off=0),
        _insn(_ALU_AND_K, dst=2, imm=0xFFFF),
        _insn(_LDX_MEM_W, dst=3, src=1, off=0),
        _insn(_ALU_RSH_K, dst=3, imm=16),
        _insn(_LDX_MEM_W, dst=4, src=1, off=4),
        _insn(_LDX_MEM_W, dst=5, src=1, off=8),
    ]
    for rule in rules:
        if rule.kind not in DEV_TYPE:
            raise ValueError(f"device rule {rule}: kind must be 'c' (character) or 'b' (block)")
        if not rule.access or set(rule.access) - set(DEV_ACCESS):
            raise ValueError(f"device rule {rule}: access must be a non-empty subset of 'rwm'")
        # each check is (opcode, dst, src, imm); a mismatch jumps past the block
        checks: list[tuple[int, int, int, int]] = [(_JMP_JNE_K, 2, 0, DEV_TYPE[rule.kind])]
        allowed = sum(DEV_ACCESS[a] for a in set(rule.access))
        if allowed != 7:
            # every access bit asked for must be allowed: (asked & allowed) == asked
            checks += [(_ALU_MOV_X, 1, 3, 0), (_ALU_AND_K, 1, 0, allowed), (_JMP_JNE_X, 1, 3, 0)]
        if rule.major >= 0:
            checks.append((_JMP_JNE_K, 4, 0, rule.major))
        if rule.minor >= 0:
            checks.append((_JMP_JNE_K, 5, 0, rule.minor))
        block_len = len(checks) + 2  # then r0 = 1; exit
        for i, (code, dst, src, imm) in enumerate(checks):
            off = block_len - i - 1 if code in (_JMP_JNE_K, _JMP_JNE_X) else 0
            prog.append(_insn(code, dst=dst, src=src, off=off, imm=imm))
        prog += [_insn(_ALU_MOV_K, dst=0, imm=1), _insn(_JMP_EXIT)]
    prog += [_insn(_ALU_MOV_K, dst=0, imm=0), _insn(_JMP_EXIT)]
    return b"".join(prog)


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD part of ``union bpf_attr`` up to ``expected_attach_type``."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


class _ProgAttachAttr(ctypes.Structure):
    """The BPF_PROG_ATTACH part of ``union bpf_attr`` up to ``replace_bpf_fd``."""

    _fields_ = [
        ("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
        ("replace_bpf_fd", ctypes.c_uint32),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(cmd, &attr, sizeof attr); the result, or -errno."""
    nr = SYSCALL_NR.get(platform.machine())
    if nr is None:
        return -errno.ENOSYS
    ret = _libc().syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr),
                          ctypes.c_uint(ctypes.sizeof(attr)))
    return int(ret) if ret >= 0 else -ctypes.get_errno()


#: errnos of a load or attach the host refuses, rather than a program the verifier rejects
_NOT_PERMITTED = (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)


def load(insns: bytes) -> int:
    """Load a cgroup device program; returns its fd.

    Loads without a verifier log first (a log that overflows its buffer fails the
    load on older kernels); on a rejection, loads again with one and puts the log
    in the error.
    """
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(code), license=ctypes.addressof(license_),
        prog_name=b"p2psched_dev", expected_attach_type=BPF_CGROUP_DEVICE,
    )
    fd = _bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:
        return fd
    err = -fd
    if err in _NOT_PERMITTED:
        raise DeviceFilterError(err, f"bpf(BPF_PROG_LOAD) of the device program: {os.strerror(err)}",
                                not_permitted=True)
    log = ctypes.create_string_buffer(LOG_BYTES)
    attr.log_level, attr.log_size, attr.log_buf = 1, LOG_BYTES, ctypes.addressof(log)
    fd = _bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:  # accepted the second time: keep it, the first refusal was transient
        return fd
    text = log.value.decode(errors="replace").strip()
    raise DeviceFilterError(err, f"the kernel's verifier rejected the device program ({os.strerror(err)}): "
                                 f"{text or 'no verifier log'}", not_permitted=False)


def attach(cgroup_dir: Path, rules: list[Rule]) -> None:
    """Load the program for ``rules`` and attach it to the cgroup v2 directory ``cgroup_dir``.

    Attached with ``BPF_F_ALLOW_MULTI``, as runc, crun and systemd attach theirs:
    the kernel then runs every program on the path from the root to the cgroup and
    allows an access only if all of them do, so a program attached above (the
    container or systemd unit the agent runs in) keeps applying and none attached
    below can widen this one. Flags 0 (exclusive) would add no safety on top of
    that and would refuse any further program below the job's cgroup;
    ``BPF_F_ALLOW_OVERRIDE`` would let a program below replace this one.

    The cgroup holds the program from then on; it is freed with the cgroup.
    """
    prog_fd = load(assemble(rules))
    try:
        cg_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attr = _ProgAttachAttr(target_fd=cg_fd, attach_bpf_fd=prog_fd, attach_type=BPF_CGROUP_DEVICE,
                                   attach_flags=BPF_F_ALLOW_MULTI)
            ret = _bpf(BPF_PROG_ATTACH, attr)
        finally:
            os.close(cg_fd)
    finally:
        os.close(prog_fd)
    if ret < 0:
        # EPERM: no CAP_SYS_ADMIN/CAP_NET_ADMIN, or an ancestor holds an exclusive
        # program; EINVAL: a kernel without CONFIG_CGROUP_BPF; EBADF: not a v2 cgroup
        raise DeviceFilterError(-ret, f"bpf(BPF_PROG_ATTACH) of the device program to {cgroup_dir}: "
                                      f"{os.strerror(-ret)}", not_permitted=True)
