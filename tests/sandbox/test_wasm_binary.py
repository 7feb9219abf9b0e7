"""export_memories: each memory a module keeps to itself is exported to the host, and nothing else changes."""

from __future__ import annotations

import pytest
import wasmtime

from p2psched.sandbox.wasm_binary import MEMORY_EXPORT_PREFIX, export_memories

ENGINE = wasmtime.Engine()


def exports(data: bytes) -> dict[str, str]:
    module = wasmtime.Module(ENGINE, data)
    return {e.name: type(e.type).__name__ for e in module.exports}


def test_a_memory_kept_inside_is_exported_and_the_function_exports_stay():
    data = wasmtime.wat2wasm('(module (memory 1) (func (export "f") (result i32) (i32.const 7)))')
    out = export_memories(data)
    assert exports(out) == {"f": "FuncType", f"{MEMORY_EXPORT_PREFIX}0": "MemoryType"}
    # The guest's code is the same: the function returns what it did.
    store = wasmtime.Store(ENGINE)
    instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, out), [])
    assert instance.exports(store)["f"](store) == 7


def test_a_module_without_an_export_section_gets_one_in_its_place():
    # A data segment and a start function: sections that must follow the exports.
    data = wasmtime.wat2wasm('(module (memory 1) (data (i32.const 0) "hi") (func $s) (start $s))')
    out = export_memories(data)
    assert exports(out) == {f"{MEMORY_EXPORT_PREFIX}0": "MemoryType"}
    store = wasmtime.Store(ENGINE)
    instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, out), [])
    memory = instance.exports(store)[f"{MEMORY_EXPORT_PREFIX}0"]
    assert memory.read(store, 0, 2) == b"hi"


def test_an_imported_memory_counts_before_the_defined_ones():
    data = wasmtime.wat2wasm(
        '(module (import "env" "f" (func)) (import "env" "m" (memory 1)) (memory 2)'
        ' (export "own" (memory 1)) (func (export "g")))'
    )
    # Index 1 (its own) is exported already; index 0 (the imported one) is added.
    assert exports(export_memories(data)) == {
        "own": "MemoryType", "g": "FuncType", f"{MEMORY_EXPORT_PREFIX}0": "MemoryType"}


@pytest.mark.parametrize("source", [
    '(module (memory (export "memory") 1) (func (export "_start")))',  # exported already
    '(module (func (export "_start")))',  # no memory
    f'(module (memory 1) (func (export "{MEMORY_EXPORT_PREFIX}0")))',  # the name is taken
])
def test_modules_with_nothing_to_add_are_returned_as_they_are(source):
    data = wasmtime.wat2wasm(source)
    assert export_memories(data) is data


@pytest.mark.parametrize("data", [b"", b"not wasm", b"\0asm\1\0\0\0\5\x05\x01", b"\0asm\1\0\0\0\7\x80"])
def test_binaries_it_cannot_follow_are_left_to_wasmtime(data):
    assert export_memories(data) is data


def test_large_sections_keep_their_length_encoding():
    # Over 127 exports: counts and sizes take more than one LEB128 byte.
    funcs = " ".join(f'(func (export "f{i}"))' for i in range(300))
    data = wasmtime.wat2wasm(f"(module (memory 1) {funcs})")
    names = exports(export_memories(data))
    assert len(names) == 301 and names[f"{MEMORY_EXPORT_PREFIX}0"] == "MemoryType"
