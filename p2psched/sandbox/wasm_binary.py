"""Reading and amending a WebAssembly module's binary: its memories made visible to the host.

The sandbox measures a guest's linear memory through the module's exports
(``peak_mem_bytes``, and the evidence for ``memory_limit``: wasmtime's store
limiter makes ``memory.grow`` fail rather than trap, so nearness to the limit is
what tells a memory bomb from any other crash). A module that keeps its memory to
itself, as a hand-written one that exports only a function may, would report 0
bytes and a plain ``trap``. So before compiling, :func:`export_memories` adds an
export for each memory the module does not export already. Exports are seen only
by the host: the guest runs the same code, and its module hash (the job's
``module_sha256``, what attestation names) is that of the bytes submitted.

Only the framing of the binary format is read (sections, the import, memory and
export vectors); anything it does not understand leaves the module as it was,
for wasmtime to judge. No maintained Python library edits wasm binaries, and this
needs ~100 lines of the spec's section layout:
https://webassembly.github.io/spec/core/binary/modules.html
"""

from __future__ import annotations

__all__ = ["MEMORY_EXPORT_PREFIX", "export_memories"]

#: Exports added here are named this, then the memory's index. Wasm export names
#: are any UTF-8; a name with a colon cannot clash with a C or Rust symbol.
MEMORY_EXPORT_PREFIX = "p2psched:memory"

_MAGIC = b"\0asm"
_IMPORT, _MEMORY, _EXPORT = 2, 5, 7
#: Sections that follow the export section (start, element, data count, code, data).
_AFTER_EXPORT = frozenset({8, 9, 12, 10, 11})
_KIND_MEMORY = 2


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise _Malformed
        self.pos += 1
        return self.data[self.pos - 1]

    def uleb(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise _Malformed

    def skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise _Malformed
        self.pos += n

    def name(self) -> bytes:
        n = self.uleb()
        self.skip(n)
        return bytes(self.data[self.pos - n:self.pos])

    def limits(self) -> None:
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _import_memories(r: _Reader) -> int:
    """How many of the import section's entries are memories."""
    memories = 0
    for _ in range(r.uleb()):
        r.name()
        r.name()
        kind = r.byte()
        if kind == 0:  # function: type index
            r.uleb()
        elif kind == 1:  # table: reference type, limits
            r.byte()
            r.limits()
        elif kind == _KIND_MEMORY:
            r.limits()
            memories += 1
        elif kind == 3:  # global: value type, mutability
            r.byte()
            r.byte()
        elif kind == 4:  # tag (exception handling): attribute, type index
            r.byte()
            r.uleb()
        else:
            raise _Malformed
    return memories


def _exported_memories(r: _Reader) -> tuple[int, set[int], set[bytes]]:
    """The export section's entry count, the memory indices it exports, and its names."""
    count = r.uleb()
    memories: set[int] = set()
    names: set[bytes] = set()
    for _ in range(count):
        names.add(r.name())
        kind = r.byte()
        index = r.uleb()
        if kind == _KIND_MEMORY:
            memories.add(index)
    return count, memories, names


def export_memories(data: bytes) -> bytes:
    """``data`` with every memory it does not export exported as
    ``MEMORY_EXPORT_PREFIX + str(index)``; ``data`` itself when there is none to
    add, or when the binary is not one this reader follows."""
    if data[:4] != _MAGIC or len(data) < 8:
        return data
    try:
        sections: list[tuple[int, int, int, int]] = []  # (id, start, content start, end)
        r = _Reader(data, 8)
        while r.pos < len(data):
            start = r.pos
            section_id = r.byte()
            size = r.uleb()
            content = r.pos
            r.skip(size)
            sections.append((section_id, start, content, r.pos))
        memories = 0
        export: tuple[int, int, int, int] | None = None
        exported: set[int] = set()
        names: set[bytes] = set()
        count = 0
        for section_id, start, content, end in sections:
            if section_id == _IMPORT:
                memories += _import_memories(_Reader(data, content, end))
            elif section_id == _MEMORY:
                memories += _Reader(data, content, end).uleb()
            elif section_id == _EXPORT:
                export = (section_id, start, content, end)
                count, exported, names = _exported_memories(_Reader(data, content, end))
        missing = [i for i in range(memories) if i not in exported]
        if not missing:
            return data
        added = b""
        for index in missing:
            name = f"{MEMORY_EXPORT_PREFIX}{index}".encode()
            if name in names:
                return data  # the module chose our name itself: leave it be
            added += _uleb(len(name)) + name + bytes([_KIND_MEMORY]) + _uleb(index)
        if export is not None:
            _, start, content, end = export
            body_start = _Reader(data, content, end)
            body_start.uleb()  # the old count
            body = _uleb(count + len(missing)) + data[body_start.pos:end] + added
            return data[:start] + bytes([_EXPORT]) + _uleb(len(body)) + body + data[end:]
        body = _uleb(len(missing)) + added
        at = next((start for section_id, start, _, _ in sections if section_id in _AFTER_EXPORT), len(data))
        return data[:at] + bytes([_EXPORT]) + _uleb(len(body)) + body + data[at:]
    except _Malformed:
        return data


#: Value types by their one-byte encoding (GC's and typed function references'
#: longer ones are off in the engine, so a valid module has none).
_VALUE_TYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref",
                0x6F: "externref", 0x69: "exnref"}


def _value_type(r: _Reader) -> str:
    b = r.byte()
    return _VALUE_TYPES.get(b, f"type 0x{b:02x}")


def function_exports(data: bytes) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None:
    """Each exported function's parameter and result types ("i32", "v128", ...) by its
    name, read from the binary; None for a module this cannot read. wasmtime's C API
    aborts the whole process when asked the kind of a v128, so the runner asks here."""
    types: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    funcs: list[int] = []
    exports: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    try:
        r = _Reader(data, 8)
        while r.pos < r.end:
            section, size = r.byte(), r.uleb()
            s = _Reader(data, r.pos, r.pos + size)
            r.skip(size)
            if section == 1:  # types
                for _ in range(s.uleb()):
                    if s.byte() != 0x60:
                        return None
                    params = tuple(_value_type(s) for _ in range(s.uleb()))
                    types.append((params, tuple(_value_type(s) for _ in range(s.uleb()))))
            elif section == 2:  # imports: imported functions come first in the index space
                for _ in range(s.uleb()):
                    s.name(), s.name()
                    kind = s.byte()
                    if kind == 0:
                        funcs.append(s.uleb())
                    elif kind == 1:  # a table: its element type, then its limits
                        s.byte()
                        s.limits()
                    elif kind == 2:
                        s.limits()
                    elif kind == 3:  # a global: its type and mutability
                        s.skip(2)
                    elif kind == 4:  # a tag: its attribute and type
                        s.byte()
                        s.uleb()
                    else:
                        return None
            elif section == 3:  # functions
                funcs += [s.uleb() for _ in range(s.uleb())]
            elif section == 7:  # exports
                for _ in range(s.uleb()):
                    name = s.name().decode("utf-8", "replace")
                    kind, index = s.byte(), s.uleb()
                    if kind == 0:
                        exports[name] = types[funcs[index]]
    except (_Malformed, IndexError):
        return None
    return exports
