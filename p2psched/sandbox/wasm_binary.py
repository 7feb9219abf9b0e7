"""Reading and amending a WebAssembly module's binary: its memories and refused grows made visible to the host.

The sandbox measures a guest's linear memory through the module's exports
(``peak_mem_bytes``). A module that keeps its memory to itself, as a hand-written
one that exports only a function may, would report 0 bytes. So before compiling,
:func:`export_memories` adds an export for each memory the module does not export
already.

wasmtime's store limiter makes a ``memory.grow`` or ``table.grow`` past the job's
limit return -1 rather than trap, and says nothing of it (its C API has neither a
limiter callback nor ``trap_on_grow_failure``); the guest then fails its own way,
or copes. So :func:`watch_grows` makes each grow a call to an added function that
grows all the same and, when refused, records the size asked for in a global
exported to the host: the evidence for ``memory_limit``.

Exports and the added functions are seen only by the host: the guest's code
computes the same, and its module hash (the job's ``module_sha256``, what
attestation names) is that of the bytes submitted. Anything this does not
understand leaves the module as it was, for wasmtime to judge. No maintained
Python library edits wasm binaries; this follows the spec's binary format:
https://webassembly.github.io/spec/core/binary/modules.html
"""

from __future__ import annotations

__all__ = ["MEMORY_EXPORT_PREFIX", "REFUSED_MEMORY_EXPORT", "REFUSED_TABLE_EXPORT", "export_memories",
           "function_exports", "refused_exports", "watch_grows"]

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


# ---------------------------------------------------------------------------
# Refused grows, seen by the host

#: The globals :func:`watch_grows` adds are exported to the host as these names, then
#: ":" and a tag, the module's sha256: the largest memory size in pages, and table size
#: in elements, that a refused ``memory.grow`` or ``table.grow`` asked for (0: none;
#: 2**64-1: more than 64 bits hold). A module cannot hold its own sha256, so it cannot
#: export these names itself and pose as the record (or make the host read a v128
#: global as one, which aborts the process).
REFUSED_MEMORY_EXPORT = "p2psched:refused_memory_pages"
REFUSED_TABLE_EXPORT = "p2psched:refused_table_elements"


def refused_exports(tag: str) -> tuple[str, str]:
    """The names of the records :func:`watch_grows` adds to a module with this tag."""
    return f"{REFUSED_MEMORY_EXPORT}:{tag}", f"{REFUSED_TABLE_EXPORT}:{tag}"


_TYPE, _FUNCTION, _TABLE, _GLOBAL, _CODE, _CUSTOM = 1, 3, 4, 6, 10, 0
_KIND_GLOBAL = 3
#: The order sections must come in (tags, 13, sit between memories and globals).
_ORDER = {section: rank for rank, section in enumerate((1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11))}
_I32, _I64 = 0x7F, 0x7E
#: Reference types a table may hold, in their one-byte forms (typed function references are off).
_TABLE_TYPES = frozenset({0x70, 0x6F, 0x69})

# What follows each one-byte opcode (https://webassembly.github.io/spec/core/binary/instructions.html):
(_NONE, _BLOCK, _INDEX, _TWO_INDICES, _BR_TABLE, _SELECT_T, _TRY_TABLE, _MEMARG, _GROW, _LEB, _BYTES4, _BYTES8,
 _HEAP_TYPE, _END, _DELEGATE, _PREFIX_FC, _PREFIX_FD) = range(17)
_UNKNOWN = 255


def _opcodes() -> bytes:
    table = bytearray([_UNKNOWN]) * 256
    spans = {
        _NONE: [0x00, 0x01, 0x05, 0x0A, 0x0F, 0x19, 0x1A, 0x1B, 0xD1, 0xD3, 0xD5, *range(0x45, 0xC5)],
        _BLOCK: [0x02, 0x03, 0x04, 0x06],  # block, loop, if, try (legacy exceptions)
        # catch, throw, rethrow, br, br_if, call, return_call, call_ref, return_call_ref, local.* and
        # global.*, table.get and .set, memory.size, ref.func, br_on_null, br_on_non_null
        _INDEX: [0x07, 0x08, 0x09, 0x0C, 0x0D, 0x10, 0x12, 0x14, 0x15, *range(0x20, 0x27), 0x3F, 0xD2, 0xD4, 0xD6],
        _TWO_INDICES: [0x11, 0x13],  # call_indirect, return_call_indirect: type, table
        _BR_TABLE: [0x0E],
        _SELECT_T: [0x1C],
        _TRY_TABLE: [0x1F],
        _MEMARG: list(range(0x28, 0x3F)),  # loads and stores
        _GROW: [0x40],
        _LEB: [0x41, 0x42],  # i32.const, i64.const
        _BYTES4: [0x43],
        _BYTES8: [0x44],
        _HEAP_TYPE: [0xD0],  # ref.null
        _END: [0x0B],
        _DELEGATE: [0x18],  # ends a legacy try block, naming a label
        _PREFIX_FC: [0xFC],
        _PREFIX_FD: [0xFD],
    }
    for kind, opcodes in spans.items():
        for opcode in opcodes:
            table[opcode] = kind
    return bytes(table)


_OPS = _opcodes()
#: After 0xFC: how many indices follow each sub-opcode (saturating truncations 0-7 and wide
#: arithmetic 19-22 take none; memory.init to table.fill, 8-17, take one or two).
_FC_INDICES = {**dict.fromkeys(range(8), 0), 8: 2, 9: 1, 10: 2, 11: 1, 12: 2, 13: 1, 14: 2, 15: 1, 16: 1, 17: 1,
               **dict.fromkeys(range(19, 23), 0)}
_TABLE_GROW = 15
#: After 0xFD (SIMD): loads and stores take a memory argument, lane loads and stores one and a
#: lane, v128.const and i8x16.shuffle 16 bytes, lane extracts and replaces a lane; the rest
#: (up to relaxed SIMD's last, 0x113) nothing.
_FD_MEMARG = frozenset({*range(0, 12), 92, 93})
_FD_MEMARG_LANE = frozenset(range(84, 92))
_FD_BYTES16 = frozenset({12, 13})
_FD_LANE = frozenset(range(21, 35))
_FD_LAST = 0x113


def _skip_value_type(r: _Reader) -> None:
    if r.byte() in (0x63, 0x64):  # (ref null? heaptype)
        r.uleb()


def _skip_block_type(r: _Reader) -> None:
    b = r.byte()
    if b in (0x63, 0x64):
        r.uleb()
    elif b & 0x80:  # a type index of more than one byte
        r.pos -= 1
        r.uleb()


def _skip_memarg(r: _Reader) -> None:
    if r.uleb() & 0x40:  # a memory index follows the alignment
        r.uleb()
    r.uleb()


def _scan_body(r: _Reader, grows: list[tuple[int, int, int]]) -> None:
    """Follow one function body, from its locals to its final ``end``, noting each
    ``memory.grow`` and ``table.grow`` as (start, end, -1 or the table's index).
    Raises _Malformed for anything it does not know."""
    for _ in range(r.uleb()):
        r.uleb()
        _skip_value_type(r)
    data, end, ops = r.data, r.end, _OPS
    pos = r.pos
    depth = 1
    while depth:
        # The common instructions here, in local variables: twice as fast as through the reader.
        if pos >= end:
            raise _Malformed
        kind = ops[data[pos]]
        pos += 1
        if kind == _NONE:
            continue
        if kind == _INDEX or kind == _LEB:
            while pos < end and data[pos] & 0x80:
                pos += 1
            pos += 1
            continue
        if kind == _END:
            depth -= 1
            continue
        start, r.pos = pos - 1, pos
        if kind == _MEMARG:
            _skip_memarg(r)
        elif kind == _BLOCK:
            _skip_block_type(r)
            depth += 1
        elif kind == _GROW:
            if r.uleb() != 0:
                raise _Malformed  # multi-memory is off: a valid module grows memory 0
            grows.append((start, r.pos, -1))
        elif kind == _PREFIX_FC:
            sub = r.uleb()
            if sub not in _FC_INDICES:
                raise _Malformed
            if sub == _TABLE_GROW:
                table = r.uleb()
                grows.append((start, r.pos, table))
            else:
                for _ in range(_FC_INDICES[sub]):
                    r.uleb()
        elif kind == _PREFIX_FD:
            sub = r.uleb()
            if sub in _FD_MEMARG:
                _skip_memarg(r)
            elif sub in _FD_MEMARG_LANE:
                _skip_memarg(r)
                r.skip(1)
            elif sub in _FD_BYTES16:
                r.skip(16)
            elif sub in _FD_LANE:
                r.skip(1)
            elif sub > _FD_LAST:
                raise _Malformed
        elif kind == _TWO_INDICES:
            r.uleb()
            r.uleb()
        elif kind == _BYTES4 or kind == _BYTES8:
            r.skip(4 if kind == _BYTES4 else 8)
        elif kind == _BR_TABLE:
            for _ in range(r.uleb() + 1):
                r.uleb()
        elif kind == _HEAP_TYPE:
            r.uleb()
        elif kind == _SELECT_T:
            for _ in range(r.uleb()):
                _skip_value_type(r)
        elif kind == _TRY_TABLE:
            _skip_block_type(r)
            for _ in range(r.uleb()):
                clause = r.byte()
                if clause > 3:
                    raise _Malformed
                if clause < 2:  # catch and catch_ref name a tag, then a label
                    r.uleb()
                r.uleb()
            depth += 1
        elif kind == _DELEGATE:
            r.uleb()
            depth -= 1
        else:
            raise _Malformed
        pos = r.pos
    if pos != end:
        raise _Malformed


def _limits_index_type(r: _Reader) -> int:
    """Read a memory's or table's limits; the type of its sizes, i32 or i64."""
    flags = r.byte()
    if flags & ~0x07:  # custom page sizes (off in the engine) or unknown flags
        raise _Malformed
    r.uleb()
    if flags & 1:
        r.uleb()
    return _I64 if flags & 4 else _I32


def _grow_wrapper(index_type: int, grow: bytes, size: bytes, params: int, refused: int) -> bytes:
    """A function body: ``grow`` with the function's parameters (its last one the
    number of pages or elements) and, when the grow returns -1, the size asked for
    (``size`` + that number, in 64 bits, saturated) kept in global ``refused`` if larger."""
    n, r, d = params - 1, params, params + 1  # the count, the grow's result, the size asked for
    widen = b"\xad" if index_type == _I32 else b""  # i64.extend_i32_u
    eq = b"\x46" if index_type == _I32 else b"\x51"
    count = bytes([0x20, n]) + widen
    g = _uleb(refused)
    minus_one = bytes([0x41 if index_type == _I32 else 0x42, 0x7F])
    code = (b"".join(bytes([0x20, i]) for i in range(params)) + grow + bytes([0x22, r]) + minus_one + eq
            + b"\x04\x40"  # if the grow was refused
            + size + widen + count + b"\x7c" + bytes([0x22, d]) + count + b"\x54"  # d = size + n; d < n: overflowed
            + b"\x04\x40\x42\x7f" + bytes([0x21, d]) + b"\x0b"
            + bytes([0x20, d]) + b"\x23" + g + b"\x56\x04\x40" + bytes([0x20, d]) + b"\x24" + g + b"\x0b"
            + b"\x0b" + bytes([0x20, r]) + b"\x0b")
    body = bytes([2, 1, index_type, 1, _I64]) + code
    return _uleb(len(body)) + body


def watch_grows(data: bytes, tag: str) -> bytes:
    """``data`` with each ``memory.grow`` and ``table.grow`` made a call to an added
    function that grows all the same and, when the grow is refused (-1), records the
    size it asked for in a global exported as ``refused_exports(tag)``. wasmtime's
    store limiter refuses a grow without a trace, and the guest may fail in any way
    after; these say whether the job's limit did it. Both exports are added to every
    module this reader follows, grows or not; ``data`` itself is returned for one it
    does not (the host then has no record).

    It follows every instruction's immediates (the spec's binary format, with the
    proposals the engine enables) and gives up on any it does not know: 5-10 MB of
    code a second on the development VM, once per module, before compiling it."""
    if data[:4] != _MAGIC or len(data) < 8:
        return data
    try:
        return _watch_grows(data, [name.encode() for name in refused_exports(tag)])
    except (_Malformed, IndexError):
        return data


def _watch_grows(data: bytes, names: list[bytes]) -> bytes:
    sections: list[tuple[int, int, int, int]] = []  # (id, start, content start, end)
    r = _Reader(data, 8)
    while r.pos < len(data):
        start, section_id = r.pos, r.byte()
        size = r.uleb()
        content = r.pos
        r.skip(size)
        sections.append((section_id, start, content, r.pos))
    where = {section_id: (content, end) for section_id, _, content, end in sections if section_id != _CUSTOM}

    def reader(section_id: int) -> _Reader | None:
        if section_id not in where:
            return None
        return _Reader(data, *where[section_id])

    functions = globals_ = 0
    memories: list[int] = []  # each memory's index type
    tables: list[tuple[int, int]] = []  # each table's reference type and index type
    if (s := reader(_IMPORT)) is not None:
        for _ in range(s.uleb()):
            s.name()
            s.name()
            kind = s.byte()
            if kind == 0:
                s.uleb()
                functions += 1
            elif kind == 1:
                ref = s.byte()
                tables.append((ref, _limits_index_type(s)))
            elif kind == _KIND_MEMORY:
                memories.append(_limits_index_type(s))
            elif kind == _KIND_GLOBAL:
                _skip_value_type(s)
                s.byte()
                globals_ += 1
            elif kind == 4:
                s.byte()
                s.uleb()
            else:
                raise _Malformed
    s = reader(_FUNCTION)
    defined = s.uleb() if s is not None else 0
    if (s := reader(_TABLE)) is not None:
        for _ in range(s.uleb()):
            ref = s.byte()  # 0x40: a table with an initial value, typed function references' (off)
            tables.append((ref, _limits_index_type(s)))
    if (s := reader(_MEMORY)) is not None:
        memories += [_limits_index_type(s) for _ in range(s.uleb())]
    s = reader(_GLOBAL)
    defined_globals = s.uleb() if s is not None else 0
    old_globals = data[s.pos:s.end] if s is not None else b""
    export_count, old_exports = 0, b""
    if (s := reader(_EXPORT)) is not None:
        export_count = s.uleb()
        old_exports = data[s.pos:s.end]
        for _ in range(export_count):
            if s.name() in names:
                return data  # the module chose our names itself: leave it be
            s.byte()
            s.uleb()

    grows: list[tuple[int, int, int]] = []
    bodies: list[tuple[int, int]] = []
    if (s := reader(_CODE)) is not None:
        for _ in range(s.uleb()):
            size = s.uleb()
            s.skip(size)
            bodies.append((s.pos - size, s.pos))
            _scan_body(_Reader(data, s.pos - size, s.pos), grows)
        if s.pos != s.end:
            raise _Malformed
    if len(bodies) != defined:
        raise _Malformed

    # The added globals come after the module's own, the added functions after its own.
    refused_memory, refused_table = globals_ + defined_globals, globals_ + defined_globals + 1
    targets = sorted({target for _, _, target in grows})
    call: dict[int, bytes] = {}
    types: list[bytes] = []
    wrappers: list[bytes] = []
    for target in targets:
        call[target] = b"\x10" + _uleb(functions + defined + len(wrappers))
        if target < 0:
            if not memories:
                raise _Malformed
            index_type = memories[0]
            types.append(bytes([0x60, 1, index_type, 1, index_type]))
            wrappers.append(_grow_wrapper(index_type, b"\x40\x00", b"\x3f\x00", 1, refused_memory))
        else:
            if target >= len(tables) or tables[target][0] not in _TABLE_TYPES:
                raise _Malformed
            ref, index_type = tables[target]
            t = _uleb(target)
            types.append(bytes([0x60, 2, ref, index_type, 1, index_type]))
            wrappers.append(_grow_wrapper(index_type, b"\xfc\x0f" + t, b"\xfc\x10" + t, 2, refused_table))

    replaced: dict[int, bytes] = {}  # section id -> its new content
    if wrappers:
        type_count = 0
        if (s := reader(_TYPE)) is not None:
            type_count = s.uleb()
            replaced[_TYPE] = _uleb(type_count + len(types)) + data[s.pos:s.end] + b"".join(types)
        else:
            replaced[_TYPE] = _uleb(len(types)) + b"".join(types)
        s = _Reader(data, *where[_FUNCTION])
        s.uleb()
        replaced[_FUNCTION] = (_uleb(defined + len(wrappers)) + data[s.pos:s.end]
                               + b"".join(_uleb(type_count + i) for i in range(len(types))))
        code = bytearray(_uleb(defined + len(wrappers)))
        grow_at = iter(grows)
        pending = next(grow_at, None)
        for start, end in bodies:
            body = bytearray()
            at = start
            while pending is not None and pending[0] < end:
                body += data[at:pending[0]] + call[pending[2]]
                at = pending[1]
                pending = next(grow_at, None)
            body += data[at:end]
            code += _uleb(len(body)) + body
        replaced[_CODE] = bytes(code + b"".join(wrappers))
    zero = bytes([_I64, 1, 0x42, 0x00, 0x0B])  # a mutable i64 that starts at 0
    replaced[_GLOBAL] = _uleb(defined_globals + 2) + old_globals + zero + zero
    added = b"".join(_uleb(len(name)) + name + bytes([_KIND_GLOBAL]) + _uleb(index)
                     for name, index in zip(names, (refused_memory, refused_table), strict=True))
    replaced[_EXPORT] = _uleb(export_count + 2) + old_exports + added

    out = bytearray(data[:8])
    for section_id, start, content, end in sections:
        for new_id in sorted((i for i in replaced if i not in where and _ORDER[i] < _ORDER.get(section_id, -1)),
                             key=_ORDER.__getitem__):
            out += bytes([new_id]) + _uleb(len(replaced[new_id])) + replaced.pop(new_id)
        if section_id == _CUSTOM and wrappers and _Reader(data, content, end).name().startswith(b"metadata.code."):
            continue  # branch hints name code offsets, which have moved
        if section_id in replaced and section_id in where:
            out += bytes([section_id]) + _uleb(len(replaced[section_id])) + replaced.pop(section_id)
        else:
            out += data[start:end]
    for new_id in sorted(replaced, key=_ORDER.__getitem__):
        out += bytes([new_id]) + _uleb(len(replaced[new_id])) + replaced[new_id]
    return bytes(out)
