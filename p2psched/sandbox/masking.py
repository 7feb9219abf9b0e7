"""``mask_patterns``: scrubbing a job's stdout and stderr before they are stored.

Both sandboxes call :func:`mask` on a finished job's whole output, before the
result leaves them (and, for wasm, before its worker signs the attestation), so
no unmasked byte is stored, logged or attested anywhere.

A pattern is two things at once: its literal text, and, where it compiles, a
regex. Secrets are usually pasted in as they are, and ``s3cr3t$1`` or ``a+b`` as
a regex never matches the text itself; ``token=\\w+`` as a literal matches
nothing. Doing both serves either intent without a flag per pattern.

Every match (of every pattern) is found in the original output and each run of
overlapping matches becomes one ``[masked]``, so a later pattern never matches
inside the marker an earlier one left, and a pattern that can match nothing
(``a*``) never inserts a marker between every byte.

The patterns are the tenant's, and a regex can backtrack for hours (``(a|a)+b``
on 40 characters). They run on the ``regex`` engine, not ``re``: it lets go of
the GIL while it matches, so a process job's masking (a thread of the agent)
cannot stall the agent's event loop as ``re`` did (18 s of /healthz for 29
characters), and it gives up after MASK_TIMEOUT_S. Then none of the output is
kept: a secret could be in what no pattern was able to look at.

A pattern can also match at every byte (``\\x00`` on 16 MiB of NUL bytes is 16
million matches). Matches were once collected, a tuple each, and sorted: over
120 bytes of memory per byte of output (a wasm worker, or for a process job the
agent itself, grew by 2 GB), and 9 to 14 s, or 24 s past a process job's wall
limit. So each pattern's matches are merged into runs as they are found, in
order, and a run only marks its bytes in a bytearray as long as the output; the
literal search, the regex's matches and the writing of the masked output all
read the one clock, and MASK_TIMEOUT_S bounds them together, however many
matches there are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import regex

MARKER = b"[masked]"
#: All of one output's patterns together, at most: searching, merging and writing the masked output.
MASK_TIMEOUT_S = 2.0
WITHHELD = (b"[masked: the job's mask_patterns took over %g s on this output, so all of it is withheld; "
            b"write patterns that neither backtrack without end nor match nearly everywhere]\n" % MASK_TIMEOUT_S)
#: Matches (or runs) between two reads of the clock: a read costs about what finding a match does.
_CHECK_EVERY = 1024
#: A pattern with none of these matches, as a regex, only where its literal text does: no need to run it twice.
_META = frozenset(b".^$*+?{}[]\\|()")
#: Copied into the coverage a slice at a time, so a run as long as the output needs no second buffer that long.
_ONES = memoryview(b"\x01" * 65536)


def compiled(pattern: str) -> regex.Pattern[bytes] | None:
    """``pattern`` as a regex over bytes, or None when it is not one (then it masks literally only)."""
    import regex

    try:
        return regex.compile(pattern.encode())
    except regex.error:
        return None


class _Clock:
    """MASK_TIMEOUT_S from its making; :meth:`tick` raises TimeoutError once it is over."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MASK_TIMEOUT_S
        self.ticks = 0

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % _CHECK_EVERY == 0:
            self.left()


def _literal(data: bytes, literal: bytes, clock: _Clock) -> Iterator[tuple[int, int]]:
    at = data.find(literal)
    while at >= 0:
        clock.tick()
        yield at, at + len(literal)
        at = data.find(literal, at + 1)


def _matches(data: bytes, pattern: regex.Pattern[bytes], clock: _Clock) -> Iterator[tuple[int, int]]:
    # The engine's own timeout stops one search that backtracks; the ticks stop a million quick ones.
    for m in pattern.finditer(data, timeout=clock.left(), concurrent=True):
        clock.tick()  # an empty match too: ``z*`` matches between every two bytes
        if m.end() > m.start():
            yield m.span()


def _runs(spans: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Each run of overlapping (or touching) ``spans``, which come in order of their start, as one span."""
    start = end = -1
    for s, e in spans:
        if s <= end:
            end = max(end, e)
            continue
        if start >= 0:
            yield start, end
        start, end = s, e
    if start >= 0:
        yield start, end


def _cover(covered: bytearray, start: int, end: int) -> None:
    while start < end:
        n = min(end - start, len(_ONES))
        covered[start:start + n] = _ONES[:n]
        start += n


def _masked(data: bytes, covered: bytearray, clock: _Clock) -> bytes:
    """``data`` with each run of covered bytes replaced by one marker."""
    out = bytearray()
    done = 0  # data[:done] is in out already
    with memoryview(data) as view:  # slices of it are not copies
        start = covered.find(1)
        while start >= 0:
            clock.tick()
            end = covered.find(0, start)
            if end < 0:
                end = len(data)
            out += view[done:start]
            out += MARKER
            done = end
            start = covered.find(1, end)
        out += view[done:]
    return bytes(out)


def mask(data: bytes, patterns: Iterable[str]) -> bytes:
    """``data`` with every literal occurrence and every regex match of ``patterns``
    replaced by ``[masked]``; WITHHELD in its place when they take too long."""
    clock = _Clock()
    # Which bytes some match covers, one byte each: runs of them, whichever patterns
    # they came from, are one marker, as runs of overlapping matches are.
    covered: bytearray | None = None
    try:
        for p in patterns:
            literal = p.encode()
            searches = []
            if literal:
                searches.append(_literal(data, literal, clock))
            pattern = compiled(p) if not _META.isdisjoint(literal) else None
            if pattern is not None:
                searches.append(_matches(data, pattern, clock))
            for spans in searches:
                for start, end in _runs(spans):
                    if covered is None:
                        covered = bytearray(len(data))
                    _cover(covered, start, end)
        if covered is None:
            return data
        return _masked(data, covered, clock)
    except TimeoutError:
        return WITHHELD
