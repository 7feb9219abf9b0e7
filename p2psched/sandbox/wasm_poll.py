"""A WASI ``poll_oneoff`` that a deadline or a cancel can interrupt.

wasmtime's own ``poll_oneoff`` sleeps inside the host call, where neither fuel
nor epoch interruption reaches, so a guest calling ``sleep(3600)`` would outlive
its wall-clock limit and ignore cancellation. This replacement, defined over
the WASI one in each engine's linker, sleeps in slices of one tick and returns
early once the job's run is cancelled or past its deadline. The run is stopped
then: the guest goes on only to its next epoch check, where it traps, and what it
writes meanwhile is dropped (straight-line code after the sleep has no check).

What it implements (WASI preview 1): clock subscriptions, relative or absolute
on the realtime clock, wait for the earliest; an absolute time on another clock
(monotonic, CPU-time) cannot be related to the host's and counts as due now.
fd subscriptions are always ready, because a job's stdin is in memory and its
stdout/stderr never block, so a poll with any fd subscription does not sleep.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Protocol

import wasmtime

_SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")  # userdata, tag, clock id / fd, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags
assert _SUBSCRIPTION.size == 48 and _EVENT.size == 32

_EVENTTYPE_CLOCK = 0
_EVENTTYPE_FD_READ = 1
_EVENTTYPE_FD_WRITE = 2
_CLOCK_REALTIME = 0
_SUBCLOCKFLAG_ABSTIME = 1
_ERRNO_SUCCESS = 0
_ERRNO_FAULT = 21
_ERRNO_INVAL = 28

#: The run on this thread: set by ``run_wasm`` around each guest call.
current = threading.local()


class Stoppable(Protocol):
    cancelled: bool
    deadline: float
    tick_seconds: float

    def halt(self, reason: str) -> None: ...


def define(linker: wasmtime.Linker) -> None:
    """Shadow WASI's ``poll_oneoff`` in ``linker`` (after ``define_wasi``)."""
    i32 = wasmtime.ValType.i32()
    linker.allow_shadowing = True
    linker.define_func(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        wasmtime.FuncType([i32, i32, i32, i32], [i32]),
        poll_oneoff,
        access_caller=True,
    )


def poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubscriptions: int, nevents_ptr: int) -> int:
    # Never raise: wasmtime-py keeps a host exception in a process-wide slot
    # that a later call on another thread would re-raise.
    try:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return _ERRNO_FAULT
        if nsubscriptions == 0:
            return _ERRNO_INVAL
        raw = memory.read(caller, in_ptr, in_ptr + _SUBSCRIPTION.size * nsubscriptions)
        ready: list[bytes] = []
        clocks: list[tuple[int, int]] = []  # (nanoseconds to wait, userdata)
        now_realtime = time.time_ns()
        for i in range(nsubscriptions):
            userdata, tag, clock_or_fd, timeout, _precision, flags = _SUBSCRIPTION.unpack_from(raw, i * _SUBSCRIPTION.size)
            if tag == _EVENTTYPE_CLOCK:
                if flags & _SUBCLOCKFLAG_ABSTIME:
                    wait = timeout - now_realtime if clock_or_fd == _CLOCK_REALTIME else 0
                else:
                    wait = timeout
                clocks.append((max(0, wait), userdata))
            elif tag in (_EVENTTYPE_FD_READ, _EVENTTYPE_FD_WRITE):
                ready.append(_EVENT.pack(userdata, _ERRNO_SUCCESS, tag, 1, 0))
            else:
                ready.append(_EVENT.pack(userdata, _ERRNO_INVAL, tag, 0, 0))
        if not ready:
            wait = min(w for w, _ in clocks)
            _sleep(wait)
            ready = [_EVENT.pack(u, _ERRNO_SUCCESS, _EVENTTYPE_CLOCK, 0, 0) for w, u in clocks if w <= wait]
        memory.write(caller, b"".join(ready), out_ptr)
        memory.write(caller, struct.pack("<I", len(ready)), nevents_ptr)
        return _ERRNO_SUCCESS
    except Exception:
        return _ERRNO_FAULT


def _sleep(nanoseconds: int) -> None:
    run: Stoppable | None = getattr(current, "run", None)
    end = time.monotonic() + nanoseconds / 1e9
    step = run.tick_seconds if run is not None else 0.01
    while True:
        now = time.monotonic()
        if now >= end:
            return
        if run is not None and (run.cancelled or now >= run.deadline):
            # The job ends with this reason even if the guest returns before
            # its next epoch check, where the callback would stop it.
            run.halt("cancelled" if run.cancelled else "wall_timeout")
            return
        time.sleep(min(end - now, step))
