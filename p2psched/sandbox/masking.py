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
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import regex

MARKER = b"[masked]"
#: All of one output's patterns together, at most.
MASK_TIMEOUT_S = 2.0
WITHHELD = (b"[masked: the job's mask_patterns took over %g s on this output, so all of it is withheld; "
            b"write patterns that cannot backtrack without end]\n" % MASK_TIMEOUT_S)


def compiled(pattern: str) -> regex.Pattern[bytes] | None:
    """``pattern`` as a regex over bytes, or None when it is not one (then it masks literally only)."""
    import regex

    try:
        return regex.compile(pattern.encode())
    except regex.error:
        return None


def _spans(data: bytes, patterns: Iterable[str], deadline: float) -> Iterator[tuple[int, int]]:
    for p in patterns:
        literal = p.encode()
        if literal:
            at = data.find(literal)
            while at >= 0:
                yield at, at + len(literal)
                at = data.find(literal, at + 1)
        pattern = compiled(p)
        if pattern is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            for m in pattern.finditer(data, timeout=left, concurrent=True):
                if m.end() > m.start():
                    yield m.span()


def mask(data: bytes, patterns: Iterable[str]) -> bytes:
    """``data`` with every literal occurrence and every regex match of ``patterns``
    replaced by ``[masked]``; WITHHELD in its place when they take too long."""
    try:
        spans = sorted(_spans(data, patterns, time.monotonic() + MASK_TIMEOUT_S))
    except TimeoutError:
        return WITHHELD
    if not spans:
        return data
    out = bytearray()
    done = 0  # data[:done] is in out already
    start, end = spans[0]
    for s, e in spans[1:]:
        if s <= end:  # overlaps (or touches) the run: one marker for both
            end = max(end, e)
            continue
        out += data[done:start] + MARKER
        done, start, end = end, s, e
    out += data[done:start] + MARKER + data[end:]
    return bytes(out)
