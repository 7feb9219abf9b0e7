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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

MARKER = b"[masked]"


def compiled(pattern: str) -> re.Pattern[bytes] | None:
    """``pattern`` as a regex over bytes, or None when it is not one (then it masks literally only)."""
    try:
        return re.compile(pattern.encode())
    except re.error:
        return None


def _spans(data: bytes, patterns: Iterable[str]) -> Iterator[tuple[int, int]]:
    for p in patterns:
        literal = p.encode()
        if literal:
            at = data.find(literal)
            while at >= 0:
                yield at, at + len(literal)
                at = data.find(literal, at + 1)
        regex = compiled(p)
        if regex is not None:
            for m in regex.finditer(data):
                if m.end() > m.start():
                    yield m.span()


def mask(data: bytes, patterns: Iterable[str]) -> bytes:
    """``data`` with every literal occurrence and every regex match of ``patterns`` replaced by ``[masked]``."""
    spans = sorted(_spans(data, patterns))
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
