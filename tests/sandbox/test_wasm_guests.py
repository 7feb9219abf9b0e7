"""Every example guest, run through the real sandbox: what it prints and how it ends."""

from __future__ import annotations

import hashlib
import importlib.util
import struct
from pathlib import Path
from types import ModuleType

import pytest

from p2psched.jobs.spec import Limits, Resources
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.sandbox.wasm import WasmEngine, run_wasm

GUESTS = Path(__file__).resolve().parents[2] / "examples" / "wasm"


def _guest_io() -> ModuleType:
    spec = importlib.util.spec_from_file_location("guest_io", GUESTS / "guest_io.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guest_io = _guest_io()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    with WasmEngine(tmp_path_factory.mktemp("modules")) as e:
        yield e


def run(engine: WasmEngine, guest: str, *, limits: Limits | None = None, **fields) -> SandboxResult:
    request = SandboxRequest(
        job_id=fields.pop("job_id", f"job-{guest}"),
        runtime="wasm",
        limits=limits or Limits(),
        resources=Resources(),
        module_path=GUESTS / f"{guest}.wasm",
        **fields,
    )
    return run_wasm(request, engine)


def test_hello_prints_its_greeting(engine):
    result = run(engine, "hello")
    assert result.stdout == b"hello from p2psched\n"
    assert (result.exit_code, result.reason, result.succeeded) == (0, "exit 0", True)
    assert result.stderr == b"" and not result.stdout_truncated
    assert result.peak_mem_bytes == 65536  # its one page of linear memory


def test_vecadd_sums_the_committed_input_exactly(engine):
    data = (GUESTS / "vecadd.in.bin").read_bytes()
    result = run(engine, "vecadd", stdin=data)
    assert result.succeeded
    assert result.stdout == guest_io.vecadd_reference(data)
    a, b = data[:4], data[len(data) // 2 : len(data) // 2 + 4]
    assert struct.unpack("<f", result.stdout[:4])[0] == guest_io.f32(
        struct.unpack("<f", a)[0] + struct.unpack("<f", b)[0]
    )


def test_vecadd_handles_input_larger_than_its_initial_memory(engine):
    data = guest_io.make_vecadd_input(n=300_000, seed=7)  # 2.4 MB in, 1.2 MB out
    result = run(engine, "vecadd", stdin=data, limits=Limits(stdout_bytes=4 << 20))
    assert result.succeeded
    assert result.stdout == guest_io.vecadd_reference(data)
    assert result.peak_mem_bytes >= len(data)


def test_vecadd_refuses_input_of_odd_length(engine):
    result = run(engine, "vecadd", stdin=b"\0" * 12)
    assert (result.exit_code, result.reason) == (1, "exit 1")
    assert b"multiple of 8 bytes" in result.stderr
    assert result.stdout == b""


def test_mlp_logits_match_the_reference_bit_for_bit(engine):
    data = (GUESTS / "mlp.in.bin").read_bytes()
    result = run(engine, "mlp", stdin=data)
    assert result.succeeded, result.stderr
    assert result.stdout == guest_io.mlp_reference(data)
    assert len(result.stdout) == 8 * 4 * 4  # batch 8 x 4 logits x float32


def test_mlp_with_other_shapes(engine):
    data = guest_io.make_mlp_input(n_in=3, n_hidden=5, n_out=2, batch=1, seed=11)
    result = run(engine, "mlp", stdin=data)
    assert result.stdout == guest_io.mlp_reference(data)
    assert len(guest_io.floats(result.stdout)) == 2


def test_mlp_refuses_a_truncated_model(engine):
    data = guest_io.make_mlp_input()[:100]
    result = run(engine, "mlp", stdin=data)
    assert result.reason == "exit 1"
    assert b"mlp: input must be" in result.stderr


@pytest.mark.parametrize("size", [0, 3, 55, 56, 63, 64, 65, 1000, 200_003])
def test_sha256_matches_hashlib(engine, size):
    data = bytes((i * 131 + 7) % 256 for i in range(size))
    result = run(engine, "sha256", stdin=data)
    assert result.succeeded
    assert result.stdout == hashlib.sha256(data).hexdigest().encode() + b"\n"


def test_exit_code_travels_through_proc_exit(engine):
    result = run(engine, "exit3")
    assert (result.exit_code, result.reason, result.limit_hit) == (3, "exit 3", None)
    assert not result.succeeded


@pytest.mark.parametrize("entry", ["_start", "noop"])
def test_noop_runs_as_command_and_as_function(engine, entry):
    result = run(engine, "noop", entry=entry)
    assert (result.exit_code, result.reason, result.stdout) == (0, "exit 0", b"")
    assert result.peak_mem_bytes == 0  # it has no memory at all


def test_function_export_gets_converted_args_and_prints_its_result(engine):
    # add.wasm has no _start: the default entry picks its only function.
    result = run(engine, "add", args=["2", "40"])
    assert (result.reason, result.stdout) == ("exit 0", b"42\n")
    result = run(engine, "add", entry="add", args=["-5", "0x10"])
    assert result.stdout == b"11\n"


def test_printed_result_respects_the_stdout_cap(engine):
    result = run(engine, "add", args=["123456", "0"], limits=Limits(stdout_bytes=3))
    assert (result.stdout, result.stdout_truncated, result.reason) == (b"123", True, "exit 0")


def test_function_export_with_wrong_arguments_says_what_it_takes(engine):
    result = run(engine, "add", args=["1"])
    assert result.reason == "trap: function 'add' takes 2 argument(s) (i64, i64) but the job gives 1"
    result = run(engine, "add", args=["one", "2"])
    assert result.reason == "trap: argument 0 of 'add' is 'one', which is not a i64 number"
    assert result.exit_code is None and not result.succeeded


def test_unknown_entry_lists_the_exports(engine):
    result = run(engine, "noop", entry="main")
    assert result.reason.startswith("trap: the module exports no function 'main'")
    assert "_start, noop" in result.reason


def test_guest_sees_only_the_args_and_env_of_its_job(engine, monkeypatch):
    monkeypatch.setenv("P2PSCHED_AGENT_SECRET", "must-not-leak")
    result = run(engine, "printenv", args=["one", "two words"], env={"MODEL": "tiny", "SEED": "3"})
    assert result.succeeded
    assert result.stdout.decode().splitlines() == [
        "arg: guest.wasm",
        "arg: one",
        "arg: two words",
        "env: MODEL=tiny",
        "env: SEED=3",
    ]
    assert b"must-not-leak" not in result.stdout


def test_guest_with_no_env_sees_an_empty_environment(engine, monkeypatch):
    monkeypatch.setenv("P2PSCHED_AGENT_SECRET", "must-not-leak")
    result = run(engine, "printenv")
    assert result.stdout == b"arg: guest.wasm\n"


def test_openfile_cannot_open_host_files(engine):
    result = run(engine, "openfile")
    assert result.stdout.startswith(b"preopens: none\nopen /etc/passwd: denied, errno ")
    assert result.reason == "exit 0"  # it exits 1 only if the open succeeded


def test_every_example_guest_has_its_grows_recorded(engine):
    # What tells the memory limit from a crash (wasm_binary.watch_grows): a guest the
    # rewrite could not follow would be judged by its peak memory alone.
    for path in sorted(GUESTS.glob("*.wasm")):
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        assert engine._prepared(sha256, path, 1 << 20).records is not None, path.name
