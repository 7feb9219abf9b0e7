"""A module is compiled once, then served from memory or the disk cache; bad modules are refused clearly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox.base import SandboxRequest
from p2psched.sandbox.wasm import WasmEngine, run_wasm, validate_module

GUESTS = Path(__file__).resolve().parents[2] / "examples" / "wasm"
HELLO = GUESTS / "hello.wasm"
HELLO_SHA = hashlib.sha256(HELLO.read_bytes()).hexdigest()


def hello(stack_bytes: int = 1 << 20, *, module_path: Path | None = HELLO, sha: str | None = HELLO_SHA) -> SandboxRequest:
    return SandboxRequest(
        job_id="h",
        runtime="wasm",
        limits=Limits(stack_bytes=stack_bytes),
        resources=Resources(),
        module_sha256=sha,
        module_path=module_path,
    )


def test_second_run_does_not_compile(tmp_path):
    with WasmEngine(tmp_path) as engine:
        assert run_wasm(hello(), engine).succeeded
        assert (engine.stats.compiled, engine.stats.from_memory) == (1, 0)
        assert run_wasm(hello(), engine).succeeded
        assert (engine.stats.compiled, engine.stats.from_memory) == (1, 1)


def test_restarted_agent_loads_compiled_module_from_disk(tmp_path):
    with WasmEngine(tmp_path) as first:
        run_wasm(hello(), first)
    files = list(tmp_path.glob(f"{HELLO_SHA}.*.cwasm"))
    assert len(files) == 1
    assert wasmtime.__name__ and "wasmtime" in files[0].name  # keyed by the wasmtime version too
    mtime = files[0].stat().st_mtime_ns

    with WasmEngine(tmp_path) as second:
        # No module_path: only the cache can provide it, so nothing is compiled.
        result = run_wasm(hello(module_path=None), second)
        assert result.stdout == b"hello from p2psched\n"
        assert (second.stats.compiled, second.stats.from_disk) == (0, 1)
    assert files[0].stat().st_mtime_ns == mtime  # not rewritten


def test_a_second_process_waits_for_the_first_ones_compile_rather_than_compile_again(tmp_path):
    """The agent's wasm workers are processes. While one compiles a new module
    (holding its lock), another that needs it waits and loads the compiled copy."""
    import fcntl
    import os
    import shutil
    import subprocess
    import sys
    import time

    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    with WasmEngine(elsewhere) as engine:
        run_wasm(hello(), engine)
        compiled = engine._cache_path(HELLO_SHA)
    with WasmEngine(shared, start_ticker=False) as other:
        lock_path = other._cache_path(HELLO_SHA).with_suffix(".lock")
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # "the first worker", compiling
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from p2psched.sandbox.wasm import WasmEngine\n"
        "with WasmEngine(Path(sys.argv[1])) as e:\n"
        "    e.warm(sys.argv[2], Path(sys.argv[3]))\n"
        "    print(e.stats.compiled, e.stats.from_disk)"), str(shared), HELLO_SHA, str(HELLO)],
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the second worker reaches the lock and waits there
        assert worker.poll() is None, worker.communicate()
        shutil.copy(compiled, shared / compiled.name)  # the first one's copy lands
    finally:
        os.close(lock)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert out.split() == ["0", "1"]  # compiled nothing, loaded the first one's copy


def test_one_compiled_file_serves_every_stack_limit(tmp_path):
    with WasmEngine(tmp_path) as engine:
        run_wasm(hello(stack_bytes=128 * 1024), engine)
        run_wasm(hello(stack_bytes=2 << 20), engine)
        assert (engine.stats.compiled, engine.stats.from_disk) == (1, 1)


def test_damaged_cache_file_is_recompiled(tmp_path):
    with WasmEngine(tmp_path) as first:
        run_wasm(hello(), first)
    (cached,) = tmp_path.glob("*.cwasm")
    cached.write_bytes(b"not a compiled module")
    with WasmEngine(tmp_path) as second:
        assert run_wasm(hello(), second).succeeded
        assert second.stats.compiled == 1
    with WasmEngine(tmp_path) as third:
        run_wasm(hello(), third)
        assert (third.stats.compiled, third.stats.from_disk) == (0, 1)


def test_module_file_that_does_not_match_its_sha256_is_not_run(tmp_path):
    with WasmEngine(tmp_path) as engine:
        result = run_wasm(hello(sha="0" * 64), engine)
    assert result.reason.startswith("trap: module unavailable: module file ")
    assert "not the job's module_sha256" in result.reason
    assert not list(tmp_path.glob("*.cwasm"))


def test_missing_module_is_reported_not_raised(tmp_path):
    with WasmEngine(tmp_path) as engine:
        result = run_wasm(hello(sha="1" * 64, module_path=None), engine)
    assert result.reason.startswith("trap: module unavailable: module 1111")


def test_example_guests_are_valid():
    for path in GUESTS.glob("*.wasm"):
        validate_module(path.read_bytes())


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "does not start with the '\\0asm' magic bytes"),
        (b"(module)", "does not start with the '\\0asm' magic bytes"),
        (b"\0asm\x0d\x00\x01\x00", "is a WebAssembly component"),
        (HELLO.read_bytes()[:-5], "module is not valid WebAssembly: "),
        (b"\0asm\x01\x00\x00\x00\x01\x05\x01\x60\x00\x01\x99", "module is not valid WebAssembly: "),
    ],
)
def test_invalid_modules_are_refused_with_a_clear_message(data, why):
    with pytest.raises(ValueError, match="^module is not valid WebAssembly: ") as info:
        validate_module(data)
    assert why in str(info.value)
    assert "\n" not in str(info.value)
