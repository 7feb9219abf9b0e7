"""Logging set-up: human text by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    _second = -1
    _hms = ""

    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STD)
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._hms = second, time.strftime("%H:%M:%S", time.localtime(second))
        ts = f"{self._hms}.{int(record.msecs):03d}"
        line = f"{ts} {record.levelname[0]} {record.name}: {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line at once but flushes the stream in batches.

    A flush per line was a tenth of the agent's time per noop job. Lines at
    WARNING and above flush at once; the rest when :func:`flush` is called (the
    agent does so within 50 ms of job activity, and at least once a second), so a
    kill -9 can lose at most that much info text.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except Exception:
            self.handleError(record)


def flush() -> None:
    for h in logging.getLogger().handlers:
        h.flush()


def _buffered_stderr() -> Any:
    """A block-buffered text stream on the standard error file.

    ``sys.stderr`` is line-buffered, so each log line was its own write(2): a
    tenth of the agent's time per noop job. A stream that is not a file (one a
    test put in place) is used as it is.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr
    return open(fd, "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115


def configure(fmt: str = "text", level: str = "info") -> None:
    # Neither format shows the caller's file and line, the thread or the process, so
    # the logging module need not look them up for each record (the optimisations the
    # logging HOWTO lists): with a line per job transition, findCaller's stack walk
    # alone was a tenth of a noop job.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchedStreamHandler(_buffered_stderr())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn's access log is one line per request: too loud at the batch API's rates.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
