"""Logging set-up: human text by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from typing import Any, Callable, cast

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _STD}
        if record.exc_info:
            extra["exc"] = self.formatException(record.exc_info)
        return self.line(record.created, record.levelname, record.name, record.getMessage(), extra)

    def line(self, created: float, levelname: str, name: str, message: str, extra: dict[str, Any]) -> str:
        out: dict[str, Any] = {"ts": round(created, 6), "level": levelname.lower(), "logger": name, "msg": message}
        out.update(extra)
        return json.dumps(out, default=str)


#: What text lines show escaped: C0 and C1 controls, DEL and the Unicode line and
#: paragraph separators. Details carry text from clients and peers (a job's node
#: labels, a peer's error), which must not split a line (forging the next one) or
#: send escape sequences to a terminal.
_TEXT_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_TEXT_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _one_line(text: str) -> str:
    """``text`` with :data:`_TEXT_ESCAPES` escaped (isprintable() is the fast check)."""
    return text if text.isprintable() else text.translate(_TEXT_ESCAPES)


class TextFormatter(logging.Formatter):
    _second = -1
    _hms = ""

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record.created, record.levelname, record.name, record.getMessage(),
                         {k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def line(self, created: float, levelname: str, name: str, message: str, extra: dict[str, Any]) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._hms = second, time.strftime("%H:%M:%S", time.localtime(second))
        line = f"{self._hms}.{int((created - second) * 1000):03d} {levelname[0]} {name}: {_one_line(message)}"
        if extra:
            line += " " + " ".join(f"{k}={_one_line(str(v))}" for k, v in extra.items())
        return line

    def job_line(self, created: float, name: str, job_id: str, state: str, detail: str) -> str:
        """:meth:`line` of a JobLog line, the same text built in one step (four a job)."""
        second = int(created)
        if second != self._second:
            self._second, self._hms = second, time.strftime("%H:%M:%S", time.localtime(second))
        return (f"{self._hms}.{int((created - second) * 1000):03d} I {name}: job {job_id} {state} "
                f"job={job_id} state={state} detail={_one_line(detail)}")


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


class JobLog:
    """The agent's one info line per job transition, on the ``p2psched.jobs`` logger:
    ``job ID STATE`` with the fields ``job``, ``state`` and ``detail``.

    Through the logging module a line costs about 10 us (a LogRecord, the logger
    chain, the handler's lock and filters), and a job makes four: a sixth of the
    trio thread's time per noop job. So when the line would reach only the handler
    :func:`configure` installed (no other handler or filter on the way, the usual
    case), it is formatted by that handler's formatter and written here, the same
    text; otherwise (a test's capture handler, a logging set-up of the embedder's)
    it goes through logging as any line does."""

    name = "p2psched.jobs"

    def __init__(self) -> None:
        self.logger = logging.getLogger(self.name)

    def __call__(self, job_id: str, state: str, detail: str, at: float | None = None) -> None:
        """The line of ``job_id``'s move to ``state``, stamped ``at`` (the transition's
        time; now when not given)."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        fields = {"job": job_id, "state": state, "detail": detail}
        handler = self._sole_handler()
        if handler is None:
            logger.info("job %s %s", job_id, state, extra=fields)
            return
        formatter = cast("TextFormatter | JsonFormatter", handler.formatter)
        created = time.time() if at is None else at
        try:
            handler.acquire()  # as logging does: the formatter's cache and the stream are shared
            try:
                if type(formatter) is TextFormatter:
                    line = formatter.job_line(created, self.name, job_id, state, detail)
                else:
                    line = formatter.line(created, "INFO", self.name, f"job {job_id} {state}", fields)
                handler.stream.write(line + handler.terminator)
            finally:
                handler.release()
        except Exception:
            logger.info("job %s %s", job_id, state, extra=fields)  # logging reports the failure its own way

    def _sole_handler(self) -> BatchedStreamHandler | None:
        """The handler a line of this logger reaches, if it is configure()'s and the only one."""
        found = None
        logger: logging.Logger | None = self.logger
        while logger is not None:
            if logger.filters:
                return None
            for h in logger.handlers:
                if found is not None or type(h) is not BatchedStreamHandler or h.filters or h.level > logging.INFO:
                    return None
                if not isinstance(h.formatter, (TextFormatter, JsonFormatter)):
                    return None
                found = h
            logger = logger.parent if logger.propagate else None
        return found


def flush() -> None:
    for h in logging.getLogger().handlers:
        # A full disk or a closed stream: as logging does, never stop the program for a log line.
        with contextlib.suppress(OSError, ValueError):
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


#: RateLimitedLog's one line per kind of trouble per this many seconds; the next line
#: says how many were held back. Long enough that a flood costs a handful of lines a
#: minute, short enough that an operator watching the log sees a problem start.
INTERVAL_S = 10.0


class RateLimitedLog:
    """Log lines about what peers send, rate limited: a flood of bad packets or refused
    connections must not become a flood of log lines (or of disk writes)."""

    def __init__(self, log: logging.Logger, interval: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.interval = interval
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last line at, held back since)

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self.line(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: Any) -> None:
        self.line(logging.ERROR, key, msg, *args)

    def line(self, level: int, key: str, msg: str, *args: Any) -> None:
        """Log ``msg % args`` unless a line with ``key`` was logged within the interval.
        Keys are a small fixed set (reasons), not anything a peer chooses."""
        now = self.clock()
        last, held = self._last.get(key, (-math.inf, 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        if held:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, held, now - last)
        self.log.log(level, msg, *args)
