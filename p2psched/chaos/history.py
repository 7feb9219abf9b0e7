"""The history of a chaos run: one JSON object per line, in the order things happened.

Each operation a client or the nemesis performs is logged as Jepsen does: an
``invoke`` when it starts, then exactly one of ``ok`` (it definitely happened),
``fail`` (it definitely did not) or ``info`` (unknown: the connection broke, the
agent did not answer in time). The checker reads nothing else but this file and
the final records, so a run can be judged again later from its files alone.

An operation is a dict with these keys:

* ``type``: ``invoke`` | ``ok`` | ``fail`` | ``info``;
* ``f``: ``submit`` | ``cancel`` | ``fault`` | ``heal`` | ``converge`` | ``final``;
* ``time``: wall-clock seconds (``time.time()``, comparable with job timelines);
* ``process``: who did it (``client-3``, ``nemesis``, ``harness``);
* ``agent``: the agent addressed, by node id, where there is one;
* ``job``: the job id, for submits and cancels;
* ``value``: what the operation carried or returned (expected outputs, states, faults).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

Op = dict[str, Any]

OP_TYPES = ("invoke", "ok", "fail", "info")


class History:
    """Appends operations to a JSONL file (and keeps them in memory for the checker).

    Every line is flushed as it is written, so a run that is killed still leaves a
    history that can be checked up to that point.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ops: list[Op] = []
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115

    def log(self, type: str, f: str, process: str, *, agent: str | None = None, job: str | None = None,
            value: Any = None, at: float | None = None) -> Op:
        if type not in OP_TYPES:
            raise ValueError(f"operation type {type!r} is not one of {OP_TYPES}")
        op: Op = {"type": type, "f": f, "time": time.time() if at is None else at, "process": process}
        if agent is not None:
            op["agent"] = agent
        if job is not None:
            op["job"] = job
        if value is not None:
            op["value"] = value
        self.ops.append(op)
        if self._file is not None:
            self._file.write(json.dumps(op, separators=(",", ":")) + "\n")
            self._file.flush()
        return op

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_history(path: Path) -> list[Op]:
    """Read a history file; a torn last line (the run was killed mid-write) is dropped."""
    ops = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path} line {n} is not JSON ({e}); the history is damaged") from None
    return ops
