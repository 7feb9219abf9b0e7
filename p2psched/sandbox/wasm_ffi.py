"""The few wasmtime C-API calls that wasmtime-py does not wrap, in one place.

wasmtime-py exposes the C API it binds as ``wasmtime._ffi``. We call a few of
its functions that have no Python wrapper yet, and some wrapped ones directly
for speed. This module is the only place that touches ``_ffi``, so an upgrade
of wasmtime has one file to check (tests/sandbox/test_wasm.py exercises each):

- ``wasmtime_store_epoch_deadline_callback``: lets a run decide, at each epoch
  tick, whether to go on or stop. Without it an epoch deadline can only trap,
  so a running guest could not be cancelled from another thread.
- ``wasi_config_set_stdin_bytes``: stdin straight from memory, without a
  temporary file per job.
- ``wasi_config_set_stdout_custom`` / ``stderr``, with a callback that copies
  only the bytes kept (:class:`OutputSink`).
- ``wasmtime_config_async_stack_size_set``: wasmtime refuses (by aborting the
  process) a ``max_wasm_stack`` above the async stack size, 2 MiB by default,
  so a larger stack limit must raise it too.
- the store, instantiation, export lookup and nullary calls, done directly
  (:class:`RawStore`): wasmtime-py's wrappers cost more than a noop job.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi  # noqa: PLC2701 - see the module docstring

#: What an epoch callback decides: go on for ``int`` more ticks, or stop with a message.
EpochDecision = int | str

_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_FINALIZER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
#: No finalizers: wasmtime may drop an output stream on one of its tokio
#: threads after the store is gone, and a Python callback there while the
#: interpreter exits makes CPython end that thread with a forced unwind through
#: Rust frames, which aborts the process. Handles are freed by the clear_*
#: functions instead.
_NO_FINALIZER = ctypes.cast(0, _FINALIZER_TYPE)
_UPDATE_DEADLINE_CONTINUE = 0

#: Deciders by handle. The handle, not the Python object, crosses into C, so
#: nothing needs pinning; one C callback serves every store.
_deciders: dict[int, Callable[[], EpochDecision]] = {}


def _on_deadline(_ctx: Any, data: int | None, delta: Any, kind: Any) -> int:
    try:
        decide = _deciders.get(data or 0)
        verdict: EpochDecision = decide() if decide is not None else 1
    except Exception as e:  # an exception must never unwind through C frames
        verdict = f"epoch callback failed: {e!r}"
    if isinstance(verdict, str):
        err = ffi.wasmtime_error_new(verdict.encode())
        return ctypes.cast(err, ctypes.c_void_p).value or 0
    delta[0] = verdict
    kind[0] = _UPDATE_DEADLINE_CONTINUE
    return 0


# Module-level so it lives as long as any store that points at it.
_C_CALLBACK = _CALLBACK_TYPE(_on_deadline)


def clear_epoch_decider(handle: int) -> None:
    _deciders.pop(handle, None)


class OutputSink:
    """A guest's stdout or stderr, kept up to ``cap`` bytes; the rest is counted, not copied."""

    __slots__ = ("cap", "data", "truncated", "closed")

    def __init__(self, cap: int, data: bytearray | None = None) -> None:
        self.cap = cap
        self.data = data if data is not None else bytearray()  # a LiveOutput's, for readers while it runs
        self.truncated = False
        self.closed = False  # the run was stopped: what the guest writes after is dropped

    def add(self, data: bytes) -> None:
        """Host-produced output (a function's printed result), under the same cap."""
        if self.closed:
            return
        room = max(self.cap - len(self.data), 0)
        if len(data) > room:
            self.truncated = True
        self.data += data[:room]

    def take(self, ptr: Any, size: int) -> None:
        if self.closed:
            return
        room = self.cap - len(self.data)
        if size > room:
            self.truncated = True
            size = max(room, 0)
        if size:
            self.data += ctypes.string_at(ptr, size)


_sinks: dict[int, OutputSink] = {}


def _on_output(data: int | None, ptr: Any, size: int) -> int:
    sink = _sinks.get(data or 0)
    try:
        if sink is not None:
            sink.take(ptr, size)
    except Exception:  # never unwind through C; the bytes are dropped
        pass
    # Claim all of it was written: a guest that retries short writes would
    # otherwise spin on a full buffer instead of running into its limits.
    return size


# wasmtime-py's own stdout_custom callback builds a ctypes array type and a
# copy of every write, which makes an output flood cost ~100 us per 64 KiB
# block; this one copies only the bytes that are kept.
_C_OUTPUT = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t)(
    _on_output
)


def set_outputs(config: wasmtime.WasiConfig, handle: int, stdout: OutputSink, stderr: OutputSink) -> None:
    """Capture the guest's stdout and stderr into the sinks. Call
    :func:`clear_outputs` with the same handle after the store is closed."""
    _sinks[2 * handle] = stdout
    _sinks[2 * handle + 1] = stderr
    ffi.wasi_config_set_stdout_custom(config.ptr(), _C_OUTPUT, 2 * handle, _NO_FINALIZER)
    ffi.wasi_config_set_stderr_custom(config.ptr(), _C_OUTPUT, 2 * handle + 1, _NO_FINALIZER)


def clear_outputs(handle: int) -> None:
    _sinks.pop(2 * handle, None)
    _sinks.pop(2 * handle + 1, None)


def set_stdin_bytes(config: wasmtime.WasiConfig, data: bytes) -> None:
    """Give the guest ``data`` as its stdin. The C side takes ownership of a copy."""
    vec = ffi.wasm_byte_vec_t()
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), ctypes.cast(buf, ctypes.POINTER(ffi.wasm_byte_t)))
    ffi.wasi_config_set_stdin_bytes(config.ptr(), ctypes.byref(vec))


def set_async_stack_size(config: wasmtime.Config, size: int) -> None:
    ffi.wasmtime_config_async_stack_size_set(config.ptr(), size)


#: Tables were unbounded: table.grow took 7.4 GB in 10 s at mem_bytes 1 MiB. They
#: are held to the memory limit, counting each element as a pointer, with a floor
#: that any compiler's function table stays under.
TABLE_ELEMENT_BYTES = 8
MIN_TABLE_ELEMENTS = 100_000


class RawStore:
    """A store driven through the C API directly.

    ``wasmtime.Store`` and ``InstancePre.instantiate`` cost tens of microseconds
    of Python wrapping per run, as much as the noop job itself; this keeps a
    run's fixed cost near the C calls it makes. It has ``_context()``, so
    wasmtime-py's own ``Func.__call__`` accepts it where arguments need
    converting. Close it exactly once, from the thread that used it.
    """

    __slots__ = ("ptr", "context")

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.ptr = ffi.wasmtime_store_new(engine.ptr(), None, _NO_FINALIZER)
        self.context = ffi.wasmtime_store_context(self.ptr)

    def _context(self) -> Any:
        return self.context

    def close(self) -> None:
        ffi.wasmtime_store_delete(self.ptr)

    def limit(self, fuel: int, memory_bytes: int, handle: int, decide: Callable[[], EpochDecision]) -> None:
        """Fuel, the linear-memory limit, a table limit of the same bytes (a table
        element is a pointer), and an epoch decider checked at every tick."""
        err = ffi.wasmtime_context_set_fuel(self.context, fuel)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        table_elements = max(MIN_TABLE_ELEMENTS, memory_bytes // TABLE_ELEMENT_BYTES)
        ffi.wasmtime_store_limiter(self.ptr, memory_bytes, table_elements, -1, -1, -1)
        ffi.wasmtime_context_set_epoch_deadline(self.context, 1)
        _deciders[handle] = decide
        ffi.wasmtime_store_epoch_deadline_callback(self.ptr, _C_CALLBACK, handle, _NO_FINALIZER)

    def set_wasi(self, config: wasmtime.WasiConfig) -> None:
        err = ffi.wasmtime_context_set_wasi(self.context, config._consume())
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)

    def instantiate(self, pre: wasmtime.InstancePre) -> Any:
        """Instantiate; the raw ``wasmtime_instance_t``. Raises like wasmtime-py does."""
        instance = ffi.wasmtime_instance_t()
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        err = ffi.wasmtime_instance_pre_instantiate(pre.ptr(), self.context, ctypes.byref(instance), ctypes.byref(trap))
        _raise(err, trap)
        return instance

    def export(self, instance: Any, name: bytes) -> Any:
        """The raw extern exported as ``name``, or None."""
        item = ffi.wasmtime_extern_t()
        if ffi.wasmtime_instance_export_get(self.context, ctypes.byref(instance), name, len(name), ctypes.byref(item)):
            return item
        return None

    def export_func(self, instance: Any, name: bytes) -> Any:
        """The raw ``wasmtime_func_t`` exported as ``name``; KeyError if there is none."""
        item = self.export(instance, name)
        if item is None or item.kind != _EXTERN_FUNC:
            raise KeyError(name)
        return item.of.func

    def call_nullary(self, func: Any) -> None:
        """Call a ``() -> ()`` function (a command's ``_start``, a noop)."""
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        err = ffi.wasmtime_func_call(self.context, ctypes.byref(func), None, 0, None, 0, ctypes.byref(trap))
        _raise(err, trap)

    def call(self, func: Any, params: list[int | float]) -> Any:
        """Call any function through wasmtime-py, which converts the values."""
        return wasmtime.Func._from_raw(func)(self, *params)  # type: ignore[arg-type]  # duck-typed: has _context()

    def memory_bytes(self, instance: Any, names: tuple[bytes, ...]) -> int:
        """Total size in bytes of the named exported memories."""
        total = 0
        for name in names:
            item = self.export(instance, name)
            if item is not None and item.kind == _EXTERN_MEMORY:
                total += ffi.wasmtime_memory_data_size(self.context, ctypes.byref(item.of.memory))
        return total


def _raise(err: Any, trap: Any) -> None:
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)
    if trap:
        raise wasmtime.Trap._from_ptr(trap)


_EXTERN_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value
