"""Each limit of a wasm job ends it with its own reason, and cancellation stops a running guest."""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from pathlib import Path

import pytest
import trio
import wasmtime

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox import wasm
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.sandbox.wasm import (
    FUEL_PER_CPU_MS,
    MAX_CAUSE_CHARS,
    MAX_REASON_CHARS,
    WasmEngine,
    _trap_message,
    run_wasm,
    validate_module,
)

GUESTS = Path(__file__).resolve().parents[2] / "examples" / "wasm"


@pytest.fixture(scope="module")
def engine():
    with WasmEngine(None) as e:
        yield e


def request(guest: str | Path, *, limits: Limits | None = None, job_id: str = "job", **fields) -> SandboxRequest:
    path = guest if isinstance(guest, Path) else GUESTS / f"{guest}.wasm"
    return SandboxRequest(
        job_id=job_id, runtime="wasm", limits=limits or Limits(), resources=Resources(), module_path=path, **fields
    )


def wat_module(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(wasmtime.wat2wasm(source))
    return path


def test_infinite_loop_hits_the_wall_clock_limit(engine):
    result = run_wasm(request("loop", limits=Limits(wall_ms=100)), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("wall_timeout", "wall_timeout", None)
    assert not result.succeeded


def test_infinite_loop_runs_out_of_fuel(engine):
    result = run_wasm(request("loop", limits=Limits(fuel=2_000_000)), engine)
    assert (result.reason, result.limit_hit) == ("out_of_fuel", "out_of_fuel")
    assert result.sandbox["fuel"] == 2_000_000


def test_cpu_ms_becomes_fuel_at_the_documented_rate(engine):
    result = run_wasm(request("loop", limits=Limits(cpu_ms=5)), engine)
    assert result.reason == "out_of_fuel"
    assert result.sandbox["fuel"] == 5 * FUEL_PER_CPU_MS
    assert result.cpu_ms > 0


def test_memory_bomb_hits_the_memory_limit(engine):
    limit = 4 << 20
    result = run_wasm(request("membomb", limits=Limits(mem_bytes=limit)), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("memory_limit", "memory_limit", None)
    assert limit - 65536 < result.peak_mem_bytes <= limit


def test_initial_memory_over_the_limit_is_a_memory_limit(engine, tmp_path):
    big = wat_module(tmp_path, "big", '(module (memory (export "memory") 64) (func (export "_start")))')
    result = run_wasm(request(big, limits=Limits(mem_bytes=1 << 20)), engine)
    assert (result.reason, result.limit_hit) == ("memory_limit", "memory_limit")


def test_deep_recursion_is_a_stack_overflow_not_a_crash(engine):
    for stack in (64 * 1024, 1 << 20):
        result = run_wasm(request("recurse", limits=Limits(stack_bytes=stack)), engine)
        assert (result.reason, result.limit_hit) == ("stack_overflow", "stack_overflow")
        assert result.sandbox["stack_bytes"] == stack


def test_a_stack_limit_beyond_the_threads_is_lowered_with_a_warning():
    with WasmEngine(None, max_stack_bytes=256 * 1024) as small:
        result = run_wasm(request("recurse", limits=Limits(stack_bytes=4 << 20)), small)
    assert result.reason == "stack_overflow"
    assert result.sandbox["stack_bytes"] == 256 * 1024
    assert result.warnings == [
        "stack limit lowered from 4194304 to 262144 bytes, what this agent's worker threads can hold"
    ]


def test_stdout_flood_is_truncated_and_stopped(engine):
    limits = Limits(wall_ms=150, stdout_bytes=1000)
    result = run_wasm(request("stdout_flood", limits=limits), engine)
    assert result.reason == "wall_timeout"
    assert result.stdout == b"y" * 1000
    assert result.stdout_truncated and not result.stderr_truncated


def test_stdout_flood_can_also_be_stopped_by_fuel(engine):
    # Fuel meters wasm instructions, not the host's work in fd_write, so a
    # flood burns little fuel per 64 KiB block (filling the block costs ~65k).
    limits = Limits(fuel=70_000, stdout_bytes=10, wall_ms=30_000)
    result = run_wasm(request("stdout_flood", limits=limits), engine)
    assert result.reason == "out_of_fuel"
    assert result.stdout_truncated and len(result.stdout) == 10


def test_other_traps_carry_their_message(engine, tmp_path):
    unreachable = wat_module(tmp_path, "u", '(module (func (export "_start") unreachable))')
    result = run_wasm(request(unreachable), engine)
    assert result.reason == "trap: wasm `unreachable` instruction executed"
    assert (result.exit_code, result.limit_hit) == (None, None)

    div = wat_module(
        tmp_path, "d", '(module (func (export "div") (param i32 i32) (result i32) (i32.div_s (local.get 0) (local.get 1))))'
    )
    result = run_wasm(request(div, args=["1", "0"]), engine)
    assert result.reason == "trap: integer divide by zero"
    result = run_wasm(request(div, args=["7", "2"]), engine)
    assert result.stdout == b"3\n"


def test_float_functions_take_and_print_floats(engine, tmp_path):
    mod = wat_module(
        tmp_path,
        "f",
        """(module
             (func (export "half") (param f32) (result f32) (f32.mul (local.get 0) (f32.const 0.5)))
             (func (export "pair") (param f64) (result f64 i32) (local.get 0) (i32.const 7)))""",
    )
    assert run_wasm(request(mod, entry="half", args=["0.2"]), engine).stdout == b"0.1\n"
    assert run_wasm(request(mod, entry="pair", args=["2.5"]), engine).stdout == b"2.5 7\n"


def test_unknown_imports_fail_to_link_with_a_clear_reason(engine, tmp_path):
    mod = wat_module(tmp_path, "imp", '(module (import "env" "gpu_matmul" (func)) (func (export "_start")))')
    result = run_wasm(request(mod), engine)
    assert result.reason.startswith("trap: cannot link: ")
    assert "env::gpu_matmul" in result.reason


def test_cancel_from_another_thread_stops_a_running_guest(engine):
    results: list[SandboxResult] = []
    worker = threading.Thread(
        target=lambda: results.append(run_wasm(request("loop", job_id="spin", limits=Limits(wall_ms=60_000)), engine))
    )
    worker.start()
    while "spin" not in engine.running():
        time.sleep(0.005)
    assert engine.cancel("spin") is True
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert (results[0].reason, results[0].exit_code, results[0].limit_hit) == ("cancelled", None, None)
    assert engine.running() == []


def test_cancel_before_the_run_starts_refuses_to_start_it(engine):
    assert engine.cancel("early") is False
    result = run_wasm(request("hello", job_id="early"), engine)
    assert result.reason == "cancelled" and result.stdout == b""
    # Only that one run: the same id runs normally afterwards.
    assert run_wasm(request("hello", job_id="early"), engine).succeeded


async def test_agent_style_cancel_from_a_trio_task(engine):
    # The agent's pattern: the run in a worker thread, cancel() from the trio thread.
    results: list[SandboxResult] = []

    async def job() -> None:
        results.append(await trio.to_thread.run_sync(run_wasm, request("loop", job_id="t1", limits=Limits(wall_ms=60_000)), engine))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(job)
        while "t1" not in engine.running():
            await trio.sleep(0.005)
        engine.cancel("t1")
    assert results[0].reason == "cancelled"


async def test_concurrent_runs_in_worker_threads_stay_separate(engine):
    inputs = [bytes([i]) * (1000 + i) for i in range(8)]
    results: dict[int, SandboxResult] = {}

    async def one(i: int) -> None:
        results[i] = await trio.to_thread.run_sync(run_wasm, request("sha256", job_id=f"c{i}", stdin=inputs[i]), engine)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    for i, data in enumerate(inputs):
        assert results[i].stdout == hashlib.sha256(data).hexdigest().encode() + b"\n"


def _in_thread(fn) -> SandboxResult:
    # A broken sandbox would sleep for an hour; fail the test instead of hanging.
    results: list[SandboxResult] = []
    worker = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert results, "the guest was still sleeping after 60 s"
    return results[0]


def test_sleeping_guest_is_stopped_at_the_wall_clock_limit(engine):
    result = _in_thread(lambda: run_wasm(request("sleep", limits=Limits(wall_ms=100)), engine))
    assert (result.reason, result.limit_hit) == ("wall_timeout", "wall_timeout")
    # Its sleep was cut short at the limit; what it did after (print "woke") is not its
    # output: it wrote it past its deadline.
    assert result.stdout == b""


def test_sleeping_guest_can_be_cancelled(engine):
    def cancel_when_running() -> None:
        while "sleeper" not in engine.running():
            time.sleep(0.005)
        engine.cancel("sleeper")

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    result = _in_thread(lambda: run_wasm(request("sleep", job_id="sleeper"), engine))
    canceller.join()
    assert result.reason == "cancelled"
    assert result.stdout == b""  # "woke" came after the cancel


POLL_WAT = """
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; subscription 0 at 0: userdata 7, tag TAG, clock id 1 / fd 0 at 16, relative timeout 20 ms at 24
    (i64.store (i32.const 0) (i64.const 7))
    (i32.store8 (i32.const 8) (i32.const TAG))
    (i32.store (i32.const 16) (i32.const FD_OR_CLOCK))
    (i64.store (i32.const 24) (i64.const 20000000))
    ;; errno at 300, nevents at 304, event (32 bytes) at 64; print 300..312 and the event
    (i32.store (i32.const 300) (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 304)))
    (i32.store (i32.const 400) (i32.const 300)) (i32.store (i32.const 404) (i32.const 8))
    (i32.store (i32.const 408) (i32.const 64)) (i32.store (i32.const 412) (i32.const 32))
    ;; one iovec per call: WASI may write only the first of several
    (drop (call $fd_write (i32.const 1) (i32.const 400) (i32.const 1) (i32.const 420)))
    (drop (call $fd_write (i32.const 1) (i32.const 408) (i32.const 1) (i32.const 420)))))
"""


@pytest.mark.parametrize(("tag", "fd_or_clock"), [(0, 1), (1, 0)])
def test_poll_oneoff_reports_the_event_that_fired(engine, tmp_path, tag, fd_or_clock):
    # A short clock sleep completes; an fd subscription (stdin) is ready at once.
    source = POLL_WAT.replace("TAG", str(tag)).replace("FD_OR_CLOCK", str(fd_or_clock))
    result = run_wasm(request(wat_module(tmp_path, "poll", source)), engine)
    assert result.succeeded
    errno, nevents = struct.unpack_from("<II", result.stdout)
    userdata, error, kind = struct.unpack_from("<QHB", result.stdout, 8)
    assert (errno, nevents, userdata, error, kind) == (0, 1, 7, 0, tag)


def test_close_cancels_runs_in_flight_and_refuses_new_ones():
    engine = WasmEngine(None)
    results: list[SandboxResult] = []
    worker = threading.Thread(target=lambda: results.append(run_wasm(request("loop", job_id="last"), engine)))
    worker.start()
    while "last" not in engine.running():
        time.sleep(0.005)
    engine.close()  # returns once the run has returned
    worker.join(timeout=30)
    assert results[0].reason == "cancelled"
    assert run_wasm(request("hello", job_id="late"), engine).reason == "cancelled"


async def test_largest_allowed_stack_overflows_cleanly_in_a_worker_thread(engine):
    # A guest stack larger than the worker thread's would crash the agent;
    # the engine lowers the request to what the thread holds and says so.
    limits = Limits(stack_bytes=256 << 20)
    result = await trio.to_thread.run_sync(run_wasm, request("recurse", limits=limits), engine)
    assert result.reason == "stack_overflow"
    assert result.sandbox["stack_bytes"] == engine.max_stack_bytes < 256 << 20
    assert result.warnings and "stack limit lowered" in result.warnings[0]


async def test_a_batch_in_one_thread_keeps_each_jobs_limits_and_cancellation(engine):
    from p2psched.sandbox.wasm import run_wasm_many

    engine.cancel("b2")  # not started yet: only this one is refused
    batch = [
        request("hello", job_id="b1"),
        request("hello", job_id="b2"),
        request("loop", job_id="b3", limits=Limits(wall_ms=50)),
        request("exit3", job_id="b4"),
    ]
    results = await trio.to_thread.run_sync(run_wasm_many, batch, engine)
    assert [r.reason for r in results] == ["exit 0", "cancelled", "wall_timeout", "exit 3"]
    assert results[0].stdout == b"hello from p2psched\n"


def test_the_ticker_ticks_through_a_burst_and_sleeps_once_guests_stop():
    """The epoch ticker goes on a few ticks past the last guest (a burst of short
    guests does not wake it once per guest), then sleeps: an idle engine ticks no more."""
    from p2psched.sandbox.wasm import TICKER_LINGER_TICKS

    ticks: list[float] = []
    with WasmEngine(None, tick_ms=5) as engine:
        tick = engine.tick
        engine.tick = lambda: (ticks.append(time.monotonic()), tick())  # type: ignore[method-assign]
        time.sleep(0.2)
        assert ticks == [] and engine._ticker_waiting  # no guest yet: asleep
        for i in range(20):
            assert run_wasm(request("noop", entry="noop", job_id=f"j{i}"), engine).reason == "exit 0"
        time.sleep(0.5)
        assert engine._ticker_waiting
        lingered = len(ticks)
        assert 1 <= lingered <= TICKER_LINGER_TICKS + 2, lingered
        time.sleep(0.2)
        assert len(ticks) == lingered  # asleep until the next guest
        result = run_wasm(request("loop", limits=Limits(wall_ms=100)), engine)
        assert result.reason == "wall_timeout"  # woken by the run: its deadline was checked


def test_a_memory_bomb_that_keeps_its_memory_to_itself_hits_the_memory_limit(engine, tmp_path):
    # It exports only its function: the sandbox measures the memory all the same.
    bomb = wat_module(tmp_path, "hidden_bomb", """
(module
  (memory 1)
  (func (export "grow") (result i32)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))""")
    limit = 4 << 20
    result = run_wasm(request(bomb, entry="grow", limits=Limits(mem_bytes=limit)), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("memory_limit", "memory_limit", None)
    assert limit - 65536 < result.peak_mem_bytes <= limit


def test_a_module_that_keeps_its_memory_to_itself_reports_its_peak(engine, tmp_path):
    quiet = wat_module(tmp_path, "quiet", '(module (memory 3) (func (export "f") (result i32) (i32.const 1)))')
    result = run_wasm(request(quiet, entry="f"), engine)
    assert result.succeeded and result.stdout == b"1\n"
    assert result.peak_mem_bytes == 3 * 65536


# -- what a hostile tenant tried (an audit through a real agent) ------------------------


@pytest.mark.parametrize(("result", "value"), [("v128", "(v128.const i32x4 1 2 3 4)"),
                                                ("funcref", "(ref.null func)"),
                                                ("externref", "(ref.null extern)")])
def test_a_function_returning_what_output_cannot_show_is_refused_not_called(engine, tmp_path, result, value):
    # A v128 result aborted the whole worker process, which counted as a host failure:
    # three such jobs marked the node's wasm runtime impaired for every tenant.
    path = wat_module(tmp_path, result, f'(module (func (export "f") (result {result}) {value}))')
    out = run_wasm(request(path, entry="f"), engine)
    assert out.exit_code is None and not out.succeeded
    assert out.reason.startswith(f"trap: function 'f' returns a {result}, which a job's output cannot show")
    assert run_wasm(request("hello"), engine).succeeded  # the same engine goes on


def test_tables_are_held_to_the_memory_limit(engine, tmp_path):
    # table.grow was unbounded: 7.4 GB in 10 s with mem_bytes at 1 MiB.
    grow = wat_module(tmp_path, "grow", """
      (module (table 0 funcref)
        (func (export "f") (result i32)
          (loop (br_if 0 (i32.ne (table.grow 0 (ref.null func) (i32.const 10000000)) (i32.const -1))))
          (table.size 0)))""")
    out = run_wasm(request(grow, entry="f", limits=Limits(mem_bytes=1 << 20, wall_ms=10_000)), engine)
    assert out.succeeded and int(out.stdout) < 10_000_000  # every grow past the limit failed
    big = wat_module(tmp_path, "big", '(module (table 50000000 funcref) (func (export "_start")))')
    out = run_wasm(request(big, limits=Limits(mem_bytes=1 << 20)), engine)
    assert (out.reason, out.limit_hit) == ("memory_limit", "memory_limit")


@pytest.mark.parametrize(("source", "says"), [
    # ten memories of 16 MiB each ran at mem_bytes 16 MiB
    ("(module (memory 1) (memory 1))", "multiple memories"),
    # the GC heap is outside mem_bytes
    ("(module (type (array (mut i32))) (func (export \"f\") (result i32) (i32.const 0)))", "gc"),
])
def test_proposals_the_memory_limit_cannot_bound_are_refused_as_not_valid(source, says):
    with pytest.raises(ValueError, match="module is not valid WebAssembly") as refused:
        validate_module(wasmtime.wat2wasm(source))
    assert says in str(refused.value).lower()


def test_a_reason_made_of_the_modules_own_names_is_capped(engine, tmp_path):
    # 100 imports of 20 KB names made a 2 MB reason in the job's record.
    imports = "".join(f'(import "env" "{"B" * 20_000}{i}" (func))' for i in range(100))
    path = wat_module(tmp_path, "names", f'(module {imports} (func (export "_start")))')
    out = run_wasm(request(path), engine)
    assert out.reason.startswith("trap: cannot link") and len(out.reason) <= MAX_REASON_CHARS
    assert out.reason.endswith("characters in all)")


# -- a refused grow is the memory limit, whatever the guest does next --------------------

GROW_IN_STEPS = """
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const %d)) (i32.const -1))))
    unreachable))"""


def test_a_grow_refused_far_from_the_limit_is_still_a_memory_limit(engine, tmp_path):
    # Reported as a trap: a 1 MiB step stopped 1.06 MiB short of 16 MiB, beyond the 256 KiB
    # slack; a single 300 MiB grow left the memory at 64 KiB of 256 MiB.
    steps = wat_module(tmp_path, "steps", GROW_IN_STEPS % 16)
    result = run_wasm(request(steps, limits=Limits(mem_bytes=16 << 20)), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("memory_limit", "memory_limit", None)
    assert result.peak_mem_bytes == 241 * 65536  # 15,794,176: the next step would pass the limit
    once = wat_module(tmp_path, "once", GROW_IN_STEPS % 4800)  # 300 MiB
    result = run_wasm(request(once), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("memory_limit", "memory_limit", None)
    assert result.peak_mem_bytes == 65536


def test_a_guest_that_exits_after_a_refused_grow_hit_the_memory_limit(engine, tmp_path):
    exits = wat_module(tmp_path, "exits", """
      (module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func (export "_start")
          (if (i32.eq (memory.grow (i32.const 4800)) (i32.const -1)) (then (call $exit (i32.const 12))))))""")
    result = run_wasm(request(exits), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("memory_limit", "memory_limit", None)


def test_a_refused_table_grow_is_a_memory_limit(engine, tmp_path):
    table = wat_module(tmp_path, "table", """
      (module (table $t 1 externref)
        (func (export "f") (result i32)
          (drop (table.grow $t (ref.null extern) (i32.const 1000)))
          (if (i32.eq (table.grow $t (ref.null extern) (i32.const 200000)) (i32.const -1)) (then unreachable))
          (table.size $t)))""")
    result = run_wasm(request(table, entry="f", limits=Limits(mem_bytes=1 << 20)), engine)
    assert (result.reason, result.limit_hit, result.exit_code) == ("memory_limit", "memory_limit", None)


def test_a_guest_that_handles_a_refused_grow_goes_on(engine, tmp_path):
    handles = wat_module(tmp_path, "handles", """
      (module (memory 1) (table 0 funcref)
        (func (export "f") (result i32 i32 i32)
          (memory.grow (i32.const 10000))
          (table.grow 0 (ref.null func) (i32.const 100000000))
          (memory.grow (i32.const 1))))""")
    result = run_wasm(request(handles, entry="f", limits=Limits(mem_bytes=1 << 20)), engine)
    assert (result.reason, result.exit_code, result.limit_hit) == ("exit 0", 0, None)
    assert result.stdout == b"-1 -1 1\n"


def test_only_the_jobs_limit_makes_a_refused_grow_a_memory_limit(engine, tmp_path):
    # Refused by the module's own maximum, far below the job's limit: its own trap.
    own_max = wat_module(tmp_path, "own_max", """
      (module (memory 1 2)
        (func (export "_start") (if (i32.eq (memory.grow (i32.const 5)) (i32.const -1)) (then unreachable))))""")
    result = run_wasm(request(own_max), engine)
    assert (result.reason, result.limit_hit) == ("trap: wasm `unreachable` instruction executed", None)
    # Right at the limit, but never refused: its own trap too (this was memory_limit).
    full = wat_module(tmp_path, "full", """
      (module (memory 1)
        (func (export "f") (param i32) (result i32)
          (drop (memory.grow (i32.const 15)))
          (i32.div_u (i32.const 1) (local.get 0))))""")
    result = run_wasm(request(full, entry="f", args=["0"], limits=Limits(mem_bytes=1 << 20)), engine)
    assert (result.reason, result.limit_hit) == ("trap: integer divide by zero", None)
    assert result.peak_mem_bytes == 1 << 20


def test_a_64_bit_memory_refused_a_grow_hits_the_memory_limit(engine, tmp_path):
    wide = wat_module(tmp_path, "wide", """
      (module (memory i64 1)
        (func (export "f") (param i64) (result i64)
          (if (i64.eq (memory.grow (local.get 0)) (i64.const -1)) (then unreachable))
          (memory.size)))""")
    result = run_wasm(request(wide, entry="f", args=["3"], limits=Limits(mem_bytes=1 << 20)), engine)
    assert result.stdout == b"4\n"
    for pages in ("17", "0xffffffffffffffff"):  # past the limit; past what 64 bits count
        result = run_wasm(request(wide, entry="f", args=[pages], limits=Limits(mem_bytes=1 << 20)), engine)
        assert (result.reason, result.limit_hit) == ("memory_limit", "memory_limit")


def test_grows_are_recorded_among_every_kind_of_instruction(engine, tmp_path):
    # The rewrite follows each instruction's immediates; a slip would fail to compile,
    # and the run would fall back to judging by the peak, which says trap here.
    mixed = wat_module(tmp_path, "mixed", """
      (module
        (type $unary (func (param i32) (result i32)))
        (tag $oops (param i32))
        (memory 2)
        (table $funcs 2 funcref)
        (table $refs 1 externref)
        (elem (table $funcs) (i32.const 0) func $twice $grow)
        (data $bytes "\\01\\02\\03\\04")
        (global $g (mut i64) (i64.const 5))
        (func $twice (param i32) (result i32) (i32.mul (local.get 0) (i32.const 2)))
        (func $tail (param i32) (result i32) (return_call $twice (local.get 0)))
        (func $grow (param i32) (result i32) (memory.grow (local.get 0)))
        (func (export "f") (param $n i32) (result i32)
          (local $v v128) (local $x i64) (local $r externref)
          (memory.init $bytes (i32.const 8) (i32.const 0) (i32.const 4))
          (memory.copy (i32.const 16) (i32.const 8) (i32.const 4))
          (memory.fill (i32.const 32) (i32.const 7) (i32.const 4))
          (local.set $v (v128.load offset=8 align=4 (i32.const 0)))
          (local.set $v (i8x16.shuffle 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 (local.get $v) (v128.const i32x4 1 2 3 4)))
          (local.set $v (i32x4.replace_lane 1 (local.get $v) (i32.const 9)))
          (v128.store32_lane offset=40 1 (i32.const 0) (local.get $v))
          (local.set $x (i64.add (i64.load32_u offset=40 (i32.const 0)) (global.get $g)))
          (local.set $x (i64.add (local.get $x) (i64.trunc_sat_f64_s (f64.const 2.5))))
          (i64.add128 (local.get $x) (i64.const 0) (i64.const 1) (i64.const 0)) (drop) (drop)
          (local.set $r (table.get $refs (i32.const 0)))
          (table.set $refs (i32.const 0) (select (result externref) (local.get $r) (ref.null extern) (i32.const 1)))
          (drop (table.grow $refs (ref.null extern) (i32.const 2)))
          (block $out (result i32)
            (try_table (catch $oops $out)
              (block $a (block $b (br_table $a $b $a (local.get $n))))
              (throw $oops (call_indirect $funcs (type $unary) (i32.const 100) (i32.const 1))))
            (i32.const -2))
          (if (result i32) (i32.eq (i32.const -1))
            (then (unreachable))
            (else (call $tail (i32.wrap_i64 (local.get $x)))))
          (drop (ref.is_null (ref.func $twice)))
          (f32.const 1.5) (f64.const 2.5) (drop) (drop)
          (i32.add (memory.size))
          (i32.add (table.size $funcs))))""")
    result = run_wasm(request(mixed, entry="f", args=["1"], limits=Limits(mem_bytes=4 << 20)), engine)
    assert (result.reason, result.limit_hit) == ("memory_limit", "memory_limit")
    assert result.peak_mem_bytes == 2 * 65536  # far from the limit: it is the record that counts
    result = run_wasm(request(mixed, entry="f", args=["1"], limits=Limits(mem_bytes=256 << 20)), engine)
    assert result.succeeded, result.reason
    assert result.stdout == b"%d\n" % ((9 + 5 + 2) * 2 + 102 + 2)  # $x twice, then pages and table size


@pytest.mark.parametrize("broken", [False, True], ids=["cannot-follow", "does-not-compile"])
def test_without_a_record_of_its_grows_a_module_is_judged_by_its_peak(tmp_path, monkeypatch, caplog, broken):
    # A module the rewrite cannot follow is left as it was; a rewrite that does not compile
    # (a slip in it) is dropped, with a warning.
    monkeypatch.setattr(wasm, "watch_grows", lambda data, tag: data[:-1] if broken else data)
    slow = wat_module(tmp_path, "slow", GROW_IN_STEPS % 1)
    fast = wat_module(tmp_path, "fast", GROW_IN_STEPS % 16)
    with WasmEngine(None) as fresh, caplog.at_level(logging.WARNING, logger="p2psched.sandbox"):
        result = run_wasm(request(slow, limits=Limits(mem_bytes=4 << 20)), fresh)
        assert (result.reason, result.limit_hit) == ("memory_limit", "memory_limit")  # within 1/64 of the limit
        result = run_wasm(request(fast, limits=Limits(mem_bytes=16 << 20)), fresh)
        assert (result.reason, result.limit_hit) == ("trap: wasm `unreachable` instruction executed", None)
    assert ("its grows cannot be recorded" in caplog.text) == broken


def test_a_module_cannot_pose_as_the_record_of_its_grows(engine, tmp_path):
    # The record is named after the module's sha256, which no module can hold; under the
    # bare prefix a v128 global would have aborted the worker when read.
    fake = '(global (export "p2psched:refused_memory_pages") (mut v128) (v128.const i64x2 -1 -1))'
    posing = wat_module(tmp_path, "posing", GROW_IN_STEPS.replace("(memory ", fake + " (memory ") % 16)
    result = run_wasm(request(posing, limits=Limits(mem_bytes=16 << 20)), engine)
    assert (result.reason, result.limit_hit) == ("memory_limit", "memory_limit")


# -- a trap says why ----------------------------------------------------------------------


def test_a_trap_keeps_every_cause_it_was_given(engine, tmp_path):
    # Only the first was kept: "trap: failed to call `get-random-bytes`".
    random = wat_module(tmp_path, "random", """
      (module
        (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "_start") (drop (call $random (i32.const 0) (i32.const -1)))))""")
    result = run_wasm(request(random), engine)
    assert result.reason == "trap: failed to call `get-random-bytes`: requested len 4294967295 exceeds limit 67108864"


def test_a_traps_causes_are_bounded():
    many = "error\n\nCaused by:\n" + "".join(f"    {i}: cause {i} {'x' * 100}\n" for i in range(20))
    text = _trap_message(many)
    assert text.startswith("cause 0 x") and len(text) <= MAX_CAUSE_CHARS and text.endswith("...")
    few = _trap_message("error\n\nCaused by:\n    0: outer\n    1: outer\n    2: wasm trap: inner\n")
    assert few == "outer: inner"


@pytest.mark.parametrize("source", [
    '(module (memory 1 1 shared))',
    '(module (memory 1 1 shared) (func (export "_start")'
    ' (drop (memory.atomic.wait32 (i32.const 0) (i32.const 0) (i64.const 10)))))',
    '(module (memory 1) (func (export "f") (result i32) (i32.atomic.load (i32.const 0))))',
])
def test_threads_are_refused_at_submission(source):
    # A shared memory was accepted, then every run failed with "trap: shared memory
    # support is disabled for this engine".
    with pytest.raises(ValueError, match="^module is not valid WebAssembly: threads ") as refused:
        validate_module(wasmtime.wat2wasm(source))
    assert "single-threaded" in str(refused.value) and "\n" not in str(refused.value)


def test_a_module_that_does_not_compile_says_why(engine, tmp_path):
    # One stored before threads were refused at submission: the cause was cut off, leaving
    # "trap: module does not compile: failed to parse WebAssembly module".
    shared = wat_module(tmp_path, "shared", '(module (memory 1 1 shared) (func (export "_start")))')
    result = run_wasm(request(shared), engine)
    assert result.reason.startswith("trap: module does not compile: failed to parse WebAssembly module: "
                                    "threads must be enabled for shared memories")


def many_functions(tmp_path: Path, n: int) -> Path:
    """A module that takes a while to compile (50,000 functions: about a second here)."""
    body = "".join(f"(func (result i32) i32.const {i} i32.const 3 i32.mul)" for i in range(n))
    return wat_module(tmp_path, f"many{n}", f'(module {body} (func (export "_start")))')


def test_a_module_still_compiling_at_the_wall_limit_ends_its_job_and_compiles_on(tmp_path):
    """Compiling cannot be interrupted: a job whose module took 15 s to compile ran
    15 s past a 1 s wall limit. It now ends at its limit, and the compile goes on
    into the caches for the module's next job."""
    path = many_functions(tmp_path, 50_000)
    with WasmEngine(tmp_path / "cache") as engine:
        r = run_wasm(request(path, limits=Limits(wall_ms=1), job_id="first"), engine)
        assert (r.reason, r.limit_hit) == ("wall_timeout", "wall_timeout")
        assert any("still compiling" in w for w in r.warnings), r.warnings
        for _ in range(1200):
            if engine.stats.compiled:
                break
            time.sleep(0.05)
        assert engine.stats.compiled == 1
        r = run_wasm(request(path, limits=Limits(wall_ms=5_000), job_id="next"), engine)
        assert r.reason == "exit 0" and engine.stats.compiled == 1  # compiled once


def test_a_job_cancelled_while_its_module_compiles_ends_then(tmp_path):
    """A cancel used to wait for the compile to end (8.65 s for DELETE to answer)."""
    path = many_functions(tmp_path, 50_000)
    with WasmEngine(None) as engine:
        results: list[SandboxResult] = []
        runner = threading.Thread(target=lambda: results.append(
            run_wasm(request(path, limits=Limits(wall_ms=600_000), job_id="c"), engine)))
        runner.start()
        for _ in range(1200):
            if engine.cancel("c"):  # True once the run has begun: it is compiling
                break
            time.sleep(0.005)
        runner.join(60)
        assert [r.reason for r in results] == ["cancelled"]
        assert engine.stats.compiled == 0 or results[0].warnings  # it ended before the compile did
