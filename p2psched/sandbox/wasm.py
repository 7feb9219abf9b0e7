"""The WebAssembly sandbox: run one job's module under wasmtime, within its limits.

Public interface (all the agent needs; the agent calls it in its wasm worker
processes, see ``wasm_workers.py``):

``WasmEngine(cache_dir, *, tick_ms=10.0, modules_in_memory=256, max_stack_bytes=None)``
    One per agent, made at start-up and closed at shutdown (or used as a context
    manager). It owns the wasmtime engines, the compiled-module caches and the
    epoch ticker thread, and is safe to share between worker threads.
    ``cache_dir`` is where compiled modules are kept, e.g. ``<data_dir>/modules``.

``run_wasm(request, engine) -> SandboxResult``
    Blocking: call it from a worker thread,
    ``await trio.to_thread.run_sync(run_wasm, request, engine)``, with as many
    threads at once as the agent has CPU slots. It never raises for anything the
    guest does; every outcome is a :class:`SandboxResult` with a precise
    ``reason``. It reads ``request.module_path`` only when the module is in
    neither cache.

``run_wasm_many(requests, engine) -> list[SandboxResult]``
    The same for several jobs in one worker thread, one after another. A
    ``trio.to_thread.run_sync`` round trip costs several times a noop job, so
    an agent with a deep queue of short jobs should hand a thread a batch;
    each job keeps its own limits, deadline and cancellation.

``WasmEngine.cancel(job_id) -> bool``
    From any thread (the trio thread included; it does not block). Stops that
    job's guest within one tick with reason ``cancelled``. True if the job was
    running; if it had not started yet, its run returns ``cancelled`` at once
    when it does start. A trio task awaiting ``to_thread.run_sync`` cannot
    interrupt a thread, so on cancellation the agent calls this and then keeps
    awaiting the thread, which returns promptly.

``WasmEngine.close()``
    At shutdown, after the grace period: cancels what still runs, waits for
    those runs to return, stops the ticker; later runs return ``cancelled``.
    Call it before the process exits: a guest still writing output while the
    interpreter shuts down can abort the process from a wasmtime thread.

``WasmEngine.running() -> list[str]``, ``WasmEngine.stats``
    Job ids in flight; compiled / from_disk / from_memory counters (metrics).

``WasmEngine.warm(sha256, module_path)``
    Optional, blocking: compile a newly stored module before its first run.

``validate_module(data: bytes) -> None``
    Cheap check at submission: raises ``ValueError("module is not valid
    WebAssembly: ...")`` with the reason and a fix.

``FUEL_PER_CPU_MS``
    How a ``cpu_ms`` limit becomes fuel when the job gives no ``fuel``.

What a guest can do, and how each limit is enforced
- WASI command modules (export ``_start``): ``args`` become argv after
  ``argv[0] = "guest.wasm"``, ``env`` is the whole environment (nothing is
  inherited from the agent), ``stdin`` is readable once, stdout and stderr are
  captured up to ``limits.stdout_bytes`` / ``stderr_bytes`` (the rest is
  dropped and flagged), then scrubbed of ``mask_patterns`` (``masking.py``, as
  for process jobs). ``proc_exit(n)`` ends it with ``exit n``.
- Modules that export a function: ``entry`` names it (or, when ``entry`` is
  ``_start`` and there is no ``_start``, the module's only exported function);
  ``args`` are converted to its parameter types and its results are printed to
  stdout as text, space separated, with a newline; ``exit 0``.
- No preopened directories and no sockets: every path_open fails.
- Fuel (``limits.fuel``, else ``cpu_ms * FUEL_PER_CPU_MS``, else unlimited) ->
  ``out_of_fuel``. Wall time (``limits.wall_ms``, checked at each epoch tick)
  -> ``wall_timeout``. Linear memory and tables (``limits.mem_bytes``, a store
  limit: a grow past it returns -1) -> ``memory_limit`` when a grow was refused for
  asking more than the limit and the guest then failed (any trap or ``exit n``,
  n != 0); a guest that copes with the -1 and succeeds just succeeds.
  ``wasm_binary.py`` rewrites each grow to record a refusal, and exports every
  memory, so that one the module keeps to itself is measured all the same. Stack
  (``limits.stack_bytes``) -> ``stack_overflow``. Any other trap -> ``trap:
  <causes>``, wasmtime's chain of causes joined with ": ".
- Threads (shared memory, atomics), multiple memories, GC and typed function
  references are off: ``validate_module`` refuses such a module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from p2psched.sandbox import wasm_ffi, wasm_poll
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.sandbox.wasm_binary import export_memories, function_exports, refused_exports, watch_grows
from p2psched.sandbox.wasm_ffi import MIN_TABLE_ELEMENTS, TABLE_ELEMENT_BYTES
from p2psched.sandbox.masking import mask

log = logging.getLogger("p2psched.sandbox")

__all__ = ["FUEL_PER_CPU_MS", "WasmEngine", "run_wasm", "run_wasm_many", "validate_module"]

#: Fuel is about one unit per executed wasm instruction. A tight loop here burns
#: 0.44 M fuel per CPU millisecond (wasmtime 50, x86-64, fuel metering on) and
#: straight-line arithmetic somewhat more, so 500k/ms makes a ``cpu_ms`` limit
#: roughly right for branchy code and a little generous for arithmetic. Give
#: ``fuel`` explicitly when the bound must be exact and portable.
FUEL_PER_CPU_MS = 500_000

#: Fuel for a job with neither ``fuel`` nor ``cpu_ms``: wall time bounds it.
UNLIMITED_FUEL = (1 << 63) - 1

#: 10 ms, like the Linux CFS scheduling period and wasmtime's own examples: the
#: wall deadline and cancellation are checked this often, and a busy guest pays
#: one Python callback per tick. Smaller reacts faster and costs more GIL time.
DEFAULT_TICK_MS = 10.0
#: Ticks the ticker goes on with after the last guest ends before it sleeps until
#: the next begins: 100 ms of 10 ms ticks, about 10 cheap wake-ups, so that a burst
#: of short guests does not wake it once per guest.
TICKER_LINGER_TICKS = 10

#: Compiled modules kept in memory. A compiled module costs roughly its code
#: size (kilobytes for the examples); 256 covers a busy agent's working set.
DEFAULT_MODULES_IN_MEMORY = 256

#: Host stack the worker thread keeps free above the guest's stack: the Python
#: frames of the thread pool and of ``run_wasm`` itself, with a wide margin.
_HOST_STACK_RESERVE = 1 << 20

#: wasmtime's store limiter makes ``memory.grow`` and ``table.grow`` return -1
#: instead of trapping, and guests then fail in their own way (an ``unreachable``,
#: a non-zero exit). The module's grows are made to record what a refused one asked
#: for (``wasm_binary.watch_grows``); only for a module that rewrite cannot follow is
#: nearness to the limit the evidence: a guest that fails with its memory within
#: this much of ``mem_bytes`` is then reported as ``memory_limit``. 1/64 of the
#: limit (4 MiB of the default 256 MiB) covers allocators that grow in chunks.
def _memory_slack(mem_bytes: int) -> int:
    return max(65536, mem_bytes // 64)


#: Bytes in a page of linear memory (custom page sizes are off in the engine).
_WASM_PAGE = 65536
#: A refused grow's size as recorded in 64 bits: too large to hold.
_U64 = (1 << 64) - 1

_WASI_MODULES = frozenset({"wasi_snapshot_preview1", "wasi_unstable"})
_ARGV0 = "guest.wasm"
_F32 = struct.Struct("<f")


# ---------------------------------------------------------------------------
# Validation at submission


_validation_engine: wasmtime.Engine | None = None
_validation_lock = threading.Lock()


def _engine_config(stack_bytes: int | None) -> wasmtime.Config:
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    # Off: proposals whose memory the store limiter does not bound. A second memory
    # has a mem_bytes of its own (ten of them ran 8x over the limit), and the GC heap
    # has none. A module that uses one is refused at submission, as not valid.
    config.wasm_multi_memory = False
    config.wasm_gc = False
    config.wasm_function_references = False
    # Off: threads. Its shared memories are refused at instantiation (wasmtime-py turns
    # shared memory support off), so every such job would fail after being accepted;
    # without threads they are refused at submission instead, atomics with them.
    config.wasm_threads = False
    if stack_bytes is not None:
        # wasmtime aborts the whole process if max_wasm_stack exceeds the async
        # stack size, even though no async call is ever made here.
        wasm_ffi.set_async_stack_size(config, stack_bytes + (1 << 20))
        config.max_wasm_stack = stack_bytes
    return config


def validate_module(data: bytes) -> None:
    """Raise ``ValueError`` naming what is wrong if ``data`` is not a valid core
    WebAssembly module. Validation does not compile, so it is cheap."""
    if len(data) < 8 or data[:4] != b"\0asm":
        raise ValueError(
            "module is not valid WebAssembly: it does not start with the '\\0asm' magic bytes; "
            "send the binary .wasm file (a .wat text module must be built first, as scripts/build-guests.sh does)"
        )
    if data[4:8] != b"\x01\x00\x00\x00":
        raise ValueError(
            "module is not valid WebAssembly: it is a WebAssembly component or an unknown binary version; "
            "p2psched runs core modules (wasm32-wasip1 / wasm32-wasi targets), not components"
        )
    global _validation_engine
    with _validation_lock:
        if _validation_engine is None:
            _validation_engine = wasmtime.Engine(_engine_config(None))
        engine = _validation_engine
    try:
        wasmtime.Module.validate(engine, data)
    except wasmtime.WasmtimeError as e:
        why = _first_line(str(e))
        if "threads" in why:
            why += ("; p2psched runs single-threaded guests, without shared memory or atomics: "
                    "build for wasm32-wasip1, not wasm32-wasip1-threads, and without the atomics feature")
        elif "multiple memories" in why:
            why += ("; p2psched refuses a second memory on purpose (mem_bytes bounds each memory alone, "
                    "not their total): build the module with one memory, without the multi-memory feature "
                    "(no `-C target-feature=+multimemory` in Rust, no `-mmultimemory` in clang)")
        elif "gc feature" in why or "function references" in why:
            why += ("; p2psched refuses the GC and typed function references proposals on purpose (a GC heap is "
                    "outside the memory limit): build the module without them")
        raise ValueError(f"module is not valid WebAssembly: {why}") from None


# ---------------------------------------------------------------------------
# The engine: wasmtime engines per stack size, caches, ticker


@dataclass(slots=True)
class CacheStats:
    """Counters for tests and metrics: how each module load was served."""

    compiled: int = 0  # compiled from the module's bytes
    from_disk: int = 0  # deserialized from the disk cache
    from_memory: int = 0  # found in the in-memory cache


@dataclass(slots=True)
class _Entry:
    """How to call one exported function."""

    name: bytes
    params: tuple[str, ...]  # "i32" | "i64" | "f32" | "f64" | other
    results: tuple[str, ...]
    command: bool  # a WASI command's _start: no arguments, no results printed


@dataclass(slots=True)
class _Prepared:
    """A compiled module, linked and ready to instantiate in a fresh store."""

    module: wasmtime.Module
    pre: wasmtime.InstancePre | None
    link_error: str | None
    needs_wasi: bool
    functions: dict[str, _Entry]
    memories: tuple[bytes, ...]
    records: tuple[bytes, bytes] | None  # where its refused grows are recorded (wasm_binary.watch_grows)


@dataclass(slots=True)
class _Slot:
    """One wasmtime engine (one stack limit) and its linkers."""

    stack_bytes: int
    engine: wasmtime.Engine
    wasi_linker: wasmtime.Linker
    plain_linker: wasmtime.Linker


@dataclass(slots=True)
class _Run:
    job_id: str
    deadline: float
    tick_seconds: float
    cancelled: bool = False
    stop: str | None = None  # why the guest was stopped: at an epoch check, or in a host call
    outputs: tuple[wasm_ffi.OutputSink, ...] = ()

    def halt(self, reason: str) -> None:
        """Stop the run for ``reason``. From a host call (a cut-short sleep) the guest goes
        on to its next epoch check, and may write before it: that is past its end, not output."""
        self.stop = reason
        for sink in self.outputs:
            sink.closed = True

    def decide(self) -> int | str:
        """At each epoch tick: go on for one more tick, or stop the guest."""
        if self.cancelled:
            self.halt("cancelled")
            return "p2psched: job cancelled"
        if time.monotonic() >= self.deadline:
            self.halt("wall_timeout")
            return "p2psched: wall-clock limit reached"
        return 1


class WasmEngine:
    """Shared state for running wasm jobs; see the module docstring."""

    def __init__(
        self,
        cache_dir: Path | str | None,
        *,
        tick_ms: float = DEFAULT_TICK_MS,
        modules_in_memory: int = DEFAULT_MODULES_IN_MEMORY,
        max_stack_bytes: int | None = None,
        start_ticker: bool = True,
    ) -> None:
        """``cache_dir``: compiled modules are kept here across restarts (None:
        memory only). ``tick_ms``: how often deadlines and cancellation are
        checked. ``max_stack_bytes``: the largest guest stack allowed; by default
        what the worker threads' stacks hold minus 1 MiB for the host (larger
        requests are lowered to it, with a warning in the result).
        ``start_ticker=False`` leaves ticking to the caller, through :meth:`tick`."""
        if tick_ms <= 0:
            raise ValueError(f"tick_ms must be positive, got {tick_ms}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.tick_seconds = tick_ms / 1000.0
        self.max_stack_bytes = max_stack_bytes or max(64 * 1024, _thread_stack_bytes() - _HOST_STACK_RESERVE)
        self.stats = CacheStats()
        self.wasmtime_version = _wasmtime_version()
        # Deserialization checks the wasmtime version and compile settings
        # itself; the key also carries them so that versions never overwrite
        # each other's files. The stack limit is a runtime setting: one
        # compiled file serves every stack size.
        # "-mem": compiled with its memories exported; older copies lack the exports.
        # "-grow": with its grows recorded (and no threads); older copies lack both.
        self._fingerprint = f"wasmtime{self.wasmtime_version}-fuel-epoch-mem-grow"

        self._cond = threading.Condition()  # guards everything below
        self._slots: dict[int, _Slot] = {}
        self._modules: OrderedDict[tuple[str, int], _Prepared] = OrderedDict()
        self._modules_cap = modules_in_memory
        self._runs: dict[str, _Run] = {}
        self._precancelled: OrderedDict[str, None] = OrderedDict()
        self._active = 0
        self._closed = False
        self._compile_lock = threading.Lock()  # one compile at a time: never the same module twice
        self._handles = itertools.count(1)
        self._ticker: threading.Thread | None = None
        self._ticker_waiting = False  # the ticker sleeps until a run begins
        if start_ticker:
            self._ticker = threading.Thread(target=self._tick_loop, name="p2psched-wasm-ticker", daemon=True)
            self._ticker.start()

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Shut down: refuse new runs, cancel the ones in flight, wait for them
        to return, stop the ticker. For a grace period, wait for the runs to
        finish before calling this."""
        with self._cond:
            self._closed = True
            for run in self._runs.values():
                run.cancelled = True
            self._cond.notify_all()
        if self._ticker is not None:
            self._ticker.join()

    def __enter__(self) -> WasmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- cancellation and time --------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Stop job ``job_id``'s guest with reason ``cancelled``; see the module docstring."""
        with self._cond:
            run = self._runs.get(job_id)
            if run is not None:
                run.cancelled = True
                return True
            # Not started yet: remember it, boundedly, so the run refuses to start.
            self._precancelled[job_id] = None
            while len(self._precancelled) > 10_000:
                self._precancelled.popitem(last=False)
            return False

    def tick(self) -> None:
        """Advance every engine's epoch by one: running guests check their
        deadline and cancellation. The ticker thread calls this every tick."""
        with self._cond:
            slots = list(self._slots.values())
        for slot in slots:
            slot.engine.increment_epoch()

    def running(self) -> list[str]:
        """Job ids whose guests are running now."""
        with self._cond:
            return list(self._runs)

    def _tick_loop(self) -> None:
        # Ticks while guests run, and TICKER_LINGER_TICKS more after the last one
        # ends, then sleeps until a run begins, so an idle agent spends no CPU
        # here. The lingering keeps a burst of short guests from waking this thread
        # (and handing the GIL over to it) over and over: in benchmarks/noop_throughput
        # the wasm workers' context switches fell from 0.72 to 0.48 a job. After
        # close() it ticks on until the cancelled runs have returned.
        idle_ticks = TICKER_LINGER_TICKS  # asleep until the first run
        while True:
            with self._cond:
                if self._active:
                    idle_ticks = 0
                elif self._closed:
                    return
                else:
                    idle_ticks += 1
                    if idle_ticks > TICKER_LINGER_TICKS:
                        self._ticker_waiting = True
                        while self._active == 0 and not self._closed:
                            self._cond.wait()
                        self._ticker_waiting = False
                        idle_ticks = 0
                        if self._closed and self._active == 0:
                            return
            time.sleep(self.tick_seconds)
            self.tick()

    def _begin(self, job_id: str, deadline: float) -> _Run | None:
        with self._cond:
            if self._closed:
                return None
            if job_id in self._precancelled:
                del self._precancelled[job_id]
                return None
            run = _Run(job_id, deadline, self.tick_seconds)
            self._runs[job_id] = run
            self._active += 1
            if self._ticker_waiting:
                self._cond.notify_all()
            return run

    def _end(self, run: _Run) -> None:
        with self._cond:
            if self._runs.get(run.job_id) is run:
                del self._runs[run.job_id]
            self._active -= 1

    # -- engines and modules ----------------------------------------------

    def _slot(self, stack_bytes: int) -> _Slot:
        with self._cond:
            slot = self._slots.get(stack_bytes)
            if slot is not None:
                return slot
        engine = wasmtime.Engine(_engine_config(stack_bytes))
        wasi_linker = wasmtime.Linker(engine)
        wasi_linker.define_wasi()
        wasm_poll.define(wasi_linker)
        slot = _Slot(stack_bytes, engine, wasi_linker, wasmtime.Linker(engine))
        with self._cond:
            return self._slots.setdefault(stack_bytes, slot)

    def _stack_bucket(self, requested: int) -> int:
        # wasmtime's stack limit is per engine, so requests share an engine per
        # power of two (at most a dozen engines), rounded up: a guest gets at
        # least what it asked for, never more than the host can hold.
        bucket = 1 << max(16, (requested - 1).bit_length())
        return min(bucket, self.max_stack_bytes)

    def _in_memory(self, key: tuple[str, int]) -> _Prepared | None:
        """The module ready to run if the in-memory LRU holds it (counted, and kept there longer)."""
        with self._cond:
            hit = self._modules.get(key)
            if hit is not None:
                self._modules.move_to_end(key)
                self.stats.from_memory += 1
            return hit

    def _prepared(self, sha256: str, module_path: Path | None, stack_bytes: int) -> _Prepared:
        """The module ready to run: from memory, else from the disk cache, else compiled."""
        key = (sha256, stack_bytes)
        hit = self._in_memory(key)
        if hit is not None:
            return hit
        slot = self._slot(stack_bytes)
        with self._compile_lock:
            with self._cond:
                hit = self._modules.get(key)
            if hit is not None:
                return hit
            module = self._load(slot.engine, sha256, module_path)
            signatures = None
            if module_path is not None:
                with contextlib.suppress(OSError):
                    signatures = function_exports(Path(module_path).read_bytes())
            prepared = _prepare(slot, module, sha256, signatures)
            with self._cond:
                self._modules[key] = prepared
                while len(self._modules) > self._modules_cap:
                    self._modules.popitem(last=False)
            return prepared

    def _prepared_for(self, run: _Run, sha256: str, module_path: Path | None, stack_bytes: int) -> _Prepared | str:
        """The module ready for ``run``, or why the run ended first: "cancelled", or
        "wall_timeout" past its deadline.

        Compiling cannot be interrupted, and a module of 100,000 small functions took
        20 s: a job whose wall limit was 1 s ran for 15, and a cancel waited for it. So a
        module not in memory is loaded or compiled on a thread of its own while the run
        waits, a tick at a time; a run that gives up leaves the compile going, into the
        caches, so the module's next job finds it compiled."""
        hit = self._in_memory((sha256, stack_bytes))
        if hit is not None:
            return hit
        done = threading.Event()
        outcome: list[_Prepared | BaseException] = []

        def load() -> None:
            try:
                outcome.append(self._prepared(sha256, module_path, stack_bytes))
            except BaseException as e:  # noqa: BLE001 - handed to the run, or logged if it gave up
                outcome.append(e)
                if run.cancelled or time.monotonic() >= run.deadline:
                    log.warning("module %s: loading it failed after its job gave up: %s", sha256[:16], e)
            finally:
                done.set()

        threading.Thread(target=load, name="p2psched-wasm-compile", daemon=True).start()
        while not done.wait(self.tick_seconds):
            if run.cancelled:
                return "cancelled"
            if time.monotonic() >= run.deadline:
                return "wall_timeout"
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def warm(self, sha256: str, module_path: Path, stack_bytes: int = 1 << 20) -> None:
        """Compile a module into the caches ahead of its first run (blocking;
        optional). Raises ``wasmtime.WasmtimeError`` if it does not compile."""
        self._prepared(sha256, module_path, self._stack_bucket(stack_bytes))

    def _cache_path(self, sha256: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{sha256}.{self._fingerprint}.cwasm"

    def _load(self, engine: wasmtime.Engine, sha256: str, module_path: Path | None) -> wasmtime.Module:
        cached = self._cache_path(sha256)
        if cached is None:
            return self._compile(engine, sha256, module_path, None)
        module = self._from_disk(engine, cached)
        if module is not None:
            return module
        # The agent's wasm workers are processes: the first jobs of a new module, on
        # several of them at once, would each compile it. One compiles; the others
        # wait on the module's lock file and load its copy.
        with _file_lock(cached.with_suffix(".lock")):
            module = self._from_disk(engine, cached)
            if module is not None:
                return module
            return self._compile(engine, sha256, module_path, cached)

    def _from_disk(self, engine: wasmtime.Engine, cached: Path) -> wasmtime.Module | None:
        if not cached.exists():
            return None
        try:
            module = wasmtime.Module.deserialize_file(engine, str(cached))
        except wasmtime.WasmtimeError:
            return None  # stale or damaged: compile again and overwrite it
        self.stats.from_disk += 1
        return module

    def _compile(self, engine: wasmtime.Engine, sha256: str, module_path: Path | None,
                 cached: Path | None) -> wasmtime.Module:
        if module_path is None:
            raise FileNotFoundError(f"module {sha256} is not cached here and the request names no module_path")
        data = Path(module_path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            # Never file a compiled module under another module's name.
            raise ValueError(f"module file {module_path} hashes to {digest}, not the job's module_sha256 {sha256}")
        # Its memories exported, so that the run can measure them, and its refused
        # grows recorded, so that it can tell the memory limit from a crash (wasm_binary.py).
        exported = export_memories(data)
        watched = watch_grows(exported, sha256)
        try:
            module = wasmtime.Module(engine, watched)
        except wasmtime.WasmtimeError as e:
            if watched is exported:
                raise
            module = wasmtime.Module(engine, exported)  # raises if the module itself does not compile
            log.warning("module %s: its grows cannot be recorded (%s); memory_limit is judged by its peak",
                        sha256[:16], _first_line(str(e)))
        self.stats.compiled += 1
        if cached is not None:
            tmp = cached.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            try:
                tmp.write_bytes(module.serialize())
                os.replace(tmp, cached)
            except OSError as e:
                # The cache only saves a compile: a full disk must not fail the job.
                tmp.unlink(missing_ok=True)
                log.warning("module %s compiled but not cached in %s: %s", sha256[:16], self.cache_dir, e)
        return module


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on ``path`` (created if need be); none
    where it cannot be made (a read-only cache): then a module may be compiled twice."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare(slot: _Slot, module: wasmtime.Module, sha256: str,
             signatures: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None) -> _Prepared:
    """``sha256``: the module's, which names the records of its refused grows.
    ``signatures``: the exported functions' types as read from the binary
    (wasm_binary.function_exports); without them, wasmtime is asked, which aborts
    the process for a v128."""
    imports = module.imports
    needs_wasi = any(imp.module in _WASI_MODULES for imp in imports)
    linker = slot.wasi_linker if needs_wasi else slot.plain_linker
    pre: wasmtime.InstancePre | None = None
    link_error: str | None = None
    try:
        pre = linker.instantiate_pre(module)
    except wasmtime.WasmtimeError as e:
        wanted = ", ".join(f"{imp.module}::{imp.name}" for imp in imports if imp.module not in _WASI_MODULES)
        link_error = f"cannot link: {_first_line(str(e))} (p2psched provides only WASI preview 1; the module also imports {wanted or 'nothing else'})"
    functions: dict[str, _Entry] = {}
    memories: list[bytes] = []
    records = refused_exports(sha256)
    recorded = 0
    for export in module.exports:
        ty = export.type
        if isinstance(ty, wasmtime.FuncType):
            if signatures is not None and export.name in signatures:
                params, results = signatures[export.name]
            else:
                params, results = tuple(_kind(p) for p in ty.params), tuple(_kind(r) for r in ty.results)
            command = export.name == "_start" and not params and not results
            functions[export.name] = _Entry(export.name.encode(), params, results, command)
        elif isinstance(ty, wasmtime.MemoryType):
            memories.append(export.name.encode())
        elif export.name in records:  # a global watch_grows added: no module can name it so itself
            recorded += 1
    watched = (records[0].encode(), records[1].encode()) if recorded == 2 else None
    return _Prepared(module, pre, link_error, needs_wasi, functions, tuple(memories), watched)


def _kind(ty: wasmtime.ValType) -> str:
    return str(ty)


# ---------------------------------------------------------------------------
# One run


def run_wasm_many(requests: list[SandboxRequest], engine: WasmEngine) -> list[SandboxResult]:
    """Run several jobs one after another in this thread (see the module docstring)."""
    return [run_wasm(request, engine) for request in requests]


def run_wasm(request: SandboxRequest, engine: WasmEngine) -> SandboxResult:
    """Run one wasm job to the end and say how it ended. Blocking; see the module docstring."""
    limits = request.limits
    started = time.monotonic()
    run = engine._begin(request.job_id, started + limits.wall_ms / 1000.0)
    if run is None:
        return SandboxResult(exit_code=None, reason="cancelled")
    warnings: list[str] = []
    cpu_ms = 0.0
    try:
        stack = engine._stack_bucket(limits.stack_bytes)
        if stack < limits.stack_bytes:
            warnings.append(
                f"stack limit lowered from {limits.stack_bytes} to {stack} bytes, what this agent's worker threads can hold"
            )
        sha256 = request.module_sha256
        if sha256 is None:
            if request.module_path is None:
                raise ValueError("a wasm request needs module_sha256 or module_path")
            sha256 = hashlib.sha256(Path(request.module_path).read_bytes()).hexdigest()
        prepared = engine._prepared_for(run, sha256, request.module_path, stack)
        if isinstance(prepared, str):  # it ended while its module compiled
            result = SandboxResult(exit_code=None, reason=prepared, limit_hit=prepared if prepared in _LIMIT_HITS
                                   else None, warnings=["the module was still compiling when the job ended; the "
                                                        "compile goes on, so its next job starts compiled"])
        else:
            # The job's CPU time, not the agent's: compiling a module is excluded.
            cpu_start = time.thread_time()
            wasm_poll.current.run = run
            try:
                result = _execute(request, engine, run, prepared, stack)
            finally:
                wasm_poll.current.run = None
            cpu_ms = (time.thread_time() - cpu_start) * 1000.0
    except (OSError, ValueError) as e:
        # The agent's own files are missing or wrong: say so; the job did not run.
        result = SandboxResult(exit_code=None, reason=f"trap: module unavailable: {e}")
    except wasmtime.WasmtimeError as e:
        why = _trap_message(str(e), head=True)
        result = SandboxResult(exit_code=None, reason=f"trap: module does not compile: {why}")
    finally:
        engine._end(run)
    result.cpu_ms = cpu_ms
    result.reason = _capped(result.reason)  # a trap's text can hold the module's own names
    if warnings:
        result.warnings.extend(warnings)
    if request.mask_patterns:
        result.stdout = mask(result.stdout, request.mask_patterns)
        result.stderr = mask(result.stderr, request.mask_patterns)
    return result


def _execute(request: SandboxRequest, engine: WasmEngine, run: _Run, prepared: _Prepared, stack: int) -> SandboxResult:
    limits = request.limits
    if prepared.pre is None:
        return SandboxResult(exit_code=None, reason=f"trap: {prepared.link_error}")
    entry = _pick_entry(request.entry, prepared)
    if isinstance(entry, str):
        return SandboxResult(exit_code=None, reason=f"trap: {entry}")
    odd = next((kind for kind in entry.results if kind not in _NUMBERS), None)
    if odd is not None:
        # wasmtime-py aborts the whole worker on a v128 result (and prints a host address
        # for a funcref): the guest's fault, not the host's, so it never reaches a call.
        return SandboxResult(exit_code=None, reason=f"trap: function {entry.name.decode()!r} returns a {odd}, which "
                             "a job's output cannot show; call one that returns i32, i64, f32 or f64 values, or none")
    params: list[int | float] = []
    if not entry.command:
        converted = _convert_args(entry, request.args)
        if isinstance(converted, str):
            return SandboxResult(exit_code=None, reason=f"trap: {converted}")
        params = converted

    slot = engine._slot(stack)
    fuel = limits.fuel or (limits.cpu_ms * FUEL_PER_CPU_MS if limits.cpu_ms else UNLIMITED_FUEL)
    live = request.live
    stdout = wasm_ffi.OutputSink(limits.stdout_bytes, live.stdout if live is not None else None)
    stderr = wasm_ffi.OutputSink(limits.stderr_bytes, live.stderr if live is not None else None)
    run.outputs = (stdout, stderr)
    handle = next(engine._handles)
    store = wasm_ffi.RawStore(slot.engine)
    instance = None
    exit_code: int | None = None
    reason: str
    peak = 0
    refused = False  # a grow was refused for asking more than the limit
    try:
        store.limit(fuel, limits.mem_bytes, handle, run.decide)
        if prepared.needs_wasi:
            wasi = wasmtime.WasiConfig()
            wasi.argv = [_ARGV0, *request.args] if entry.command else [_ARGV0]
            if request.env:
                wasi.env = list(request.env.items())
            if request.stdin:
                wasm_ffi.set_stdin_bytes(wasi, request.stdin)
            wasm_ffi.set_outputs(wasi, handle, stdout, stderr)
            store.set_wasi(wasi)
        try:
            instance = store.instantiate(prepared.pre)
            func = store.export_func(instance, entry.name)
            if entry.params or entry.results:
                stdout.add(_format_results(store.call(func, params), entry.results).encode())
            else:
                store.call_nullary(func)
            exit_code, reason = 0, "exit 0"
        except wasmtime.ExitTrap as e:
            exit_code, reason = e.code, f"exit {e.code}"
        except wasmtime.Trap as e:
            code = e.trap_code
            if run.stop is not None:
                reason = run.stop
            elif code == wasmtime.TrapCode.OUT_OF_FUEL:
                reason = "out_of_fuel"
            elif code == wasmtime.TrapCode.STACK_OVERFLOW:
                reason = "stack_overflow"
            elif code == wasmtime.TrapCode.INTERRUPT:
                reason = "wall_timeout"
            else:
                reason = f"trap: {_trap_message(e.message)}"
        except wasmtime.WasmtimeError as e:
            message = str(e)
            if run.stop is not None:
                reason = run.stop
            elif instance is None and ("memory" in message or "table" in message) and "limit" in message:
                reason = "memory_limit"  # its initial memory or table alone is over the limit
            else:
                reason = f"trap: {_trap_message(message)}"
        if run.stop is not None:  # stopped during a host call, whatever the guest did next
            exit_code, reason = None, run.stop
        peak = store.memory_bytes(instance, prepared.memories) if instance is not None and prepared.memories else 0
        if exit_code != 0 and instance is not None and prepared.records is not None:
            refused = _refused_over_limit(store, instance, prepared.records, limits.mem_bytes)
    finally:
        store.close()
        wasm_ffi.clear_epoch_decider(handle)
        wasm_ffi.clear_outputs(handle)

    if prepared.records is not None:
        over = refused
    else:  # no record of its grows: nearness to the limit is the evidence
        over = peak + _memory_slack(limits.mem_bytes) > limits.mem_bytes
    if exit_code != 0 and reason.startswith(("trap:", "exit ")) and over:
        reason, exit_code = "memory_limit", None
    limit_hit = reason if reason in _LIMIT_HITS else None
    return SandboxResult(
        exit_code=exit_code,
        reason=reason,
        stdout=bytes(stdout.data),
        stderr=bytes(stderr.data),
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        peak_mem_bytes=peak,
        limit_hit=limit_hit,
        sandbox={
            "runtime": "wasmtime",
            "wasmtime": engine.wasmtime_version,
            "preopens": 0,
            "network": False,
            "fuel": fuel,
            "stack_bytes": stack,
            "mem_bytes": limits.mem_bytes,
        },
    )


def _refused_over_limit(store: wasm_ffi.RawStore, instance: object, records: tuple[bytes, bytes],
                        mem_bytes: int) -> bool:
    """Whether the guest's memory or a table was refused a grow for asking more than the
    store limiter allows (``wasm_ffi.RawStore.limit``): more than ``mem_bytes`` of memory,
    or more table elements than those bytes hold. A grow refused for another reason (the
    module's own maximum, the 4 GiB of a 32-bit memory) asks for less and does not count."""
    pages, elements = (_exported_u64(store, instance, name) for name in records)
    return pages * _WASM_PAGE > mem_bytes or elements > max(MIN_TABLE_ELEMENTS, mem_bytes // TABLE_ELEMENT_BYTES)


def _exported_u64(store: wasm_ffi.RawStore, instance: object, name: bytes) -> int:
    item = store.export(instance, name)
    if item is None:
        return 0
    value = wasmtime.Global._from_raw(item.of.global_).value(store)  # type: ignore[arg-type]  # has _context()
    return value & _U64 if isinstance(value, int) else 0


_LIMIT_HITS = frozenset({"out_of_fuel", "wall_timeout", "memory_limit", "stack_overflow"})
#: The value types a job's text arguments and output can carry.
_NUMBERS = frozenset({"i32", "i64", "f32", "f64"})
#: A reason is one line of a record: a module's own names (its imports, a trap's
#: message) can make it megabytes.
MAX_REASON_CHARS = 1024


def _capped(reason: str) -> str:
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return reason[:MAX_REASON_CHARS - 40] + f"... ({len(reason):,} characters in all)"


def _pick_entry(name: str, prepared: _Prepared) -> _Entry | str:
    """The function to call, or a sentence saying why there is none."""
    entry = prepared.functions.get(name)
    if entry is not None:
        return entry
    exported = sorted(prepared.functions)
    if name == "_start" and len(exported) == 1:
        return prepared.functions[exported[0]]
    listing = ", ".join(exported[:20]) or "none"
    return f"the module exports no function {name!r}; its exported functions are: {listing}. Choose one with the job's 'entry'"


def _convert_args(entry: _Entry, args: list[str]) -> list[int | float] | str:
    name = entry.name.decode()
    if len(args) != len(entry.params):
        return f"function {name!r} takes {len(entry.params)} argument(s) ({', '.join(entry.params)}) but the job gives {len(args)}"
    values: list[int | float] = []
    for i, (arg, kind) in enumerate(zip(args, entry.params, strict=True)):
        try:
            if kind in ("i32", "i64"):
                v = int(arg, 0)
                bits = 32 if kind == "i32" else 64
                if not -(1 << (bits - 1)) <= v < (1 << bits):
                    return f"argument {i} of {name!r} is {arg!r}, out of range for {kind}"
                if v >= 1 << (bits - 1):
                    v -= 1 << bits  # accept unsigned spellings such as 0xffffffff
                values.append(v)
            elif kind in ("f32", "f64"):
                values.append(float(arg))
            else:
                return f"function {name!r} takes a {kind} parameter, which a job's text arguments cannot express"
        except ValueError:
            return f"argument {i} of {name!r} is {arg!r}, which is not a {kind} number"
    return values


def _format_results(out: object, kinds: tuple[str, ...]) -> str:
    if not kinds:
        return ""
    values = out if isinstance(out, list) else [out]
    return " ".join(_format_value(v, k) for v, k in zip(values, kinds, strict=True)) + "\n"


def _format_value(value: object, kind: str) -> str:
    if kind == "f32" and isinstance(value, float):
        # The shortest decimal that reads back as the same float32.
        for digits in range(6, 10):
            text = f"{value:.{digits}g}"
            if _F32.unpack(_F32.pack(float(text)))[0] == value:
                return text
    return repr(value) if isinstance(value, float) else str(value)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


#: The causes a trap's reason keeps, and their characters: wasmtime's chain is short,
#: but a host function's message can quote the guest.
MAX_CAUSES = 8
MAX_CAUSE_CHARS = 512
_NUMBERED = re.compile(r"^\d+: ")


def _trap_message(message: str, *, head: bool = False) -> str:
    """The causes of a wasmtime error, outermost first, joined with ": ", without its
    backtrace: "failed to call `get-random-bytes`: requested len 4294967295 exceeds
    limit 67108864", not the first alone, which says nothing of why. ``head``: the
    line before the causes is one too (a trap's is only "error while executing at
    wasm backtrace:", a compile error's "failed to parse WebAssembly module")."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if "Caused by:" in lines:
        causes = [line for line in lines[lines.index("Caused by:") + 1 :] if line]
        if causes and causes[0].startswith("0: "):  # several causes are numbered from 0
            causes = [_NUMBERED.sub("", c) for c in causes]
        lines = lines[:1] + causes if head else causes or lines[:1]
    else:
        lines = lines[:1]
    kept: list[str] = []
    for cause in lines[:MAX_CAUSES]:
        cause = cause.removeprefix("wasm trap: ")
        if cause and (not kept or kept[-1] != cause):
            kept.append(cause)
    text = ": ".join(kept) or "unknown error"
    if len(lines) > MAX_CAUSES:
        text += f" (and {len(lines) - MAX_CAUSES} more causes)"
    if len(text) > MAX_CAUSE_CHARS:
        text = text[:MAX_CAUSE_CHARS - 3] + "..."
    return text


def _thread_stack_bytes() -> int:
    """The stack size of threads this process creates from now on."""
    size = threading.stack_size()
    if size:
        return size
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    except (ImportError, OSError, ValueError):
        soft = -1
    # glibc gives new threads RLIMIT_STACK; when that is unlimited, 2 MiB.
    return soft if 0 < soft < (1 << 40) else 2 << 20


def _wasmtime_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wasmtime")
    except PackageNotFoundError:
        return "unknown"
