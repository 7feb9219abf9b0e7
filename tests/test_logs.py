"""Log lines: one per job transition, written directly when configure()'s handler is
the only one on the way, and exactly as the logging module would write them."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from p2psched import logs

NOW = 1795470139.631659


@pytest.fixture
def configured(monkeypatch):
    """configure()'s set-up, its stream a StringIO; the root logger restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def setup(fmt: str, level: str = "info") -> io.StringIO:
        logs.configure(fmt, level)
        out = io.StringIO()
        root.handlers[0].setStream(out)
        return out

    monkeypatch.setattr(time, "time", lambda: NOW)
    monkeypatch.setattr(time, "time_ns", lambda: int(NOW * 1e9))  # what LogRecord reads on newer Pythons
    yield setup
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_job_line_is_the_line_logging_writes(configured, fmt):
    out = configured(fmt)
    logs.JobLog()("n1:abc", "queued", "accepted")
    direct = out.getvalue()
    out.seek(0), out.truncate()
    extra = {"job": "n1:abc", "state": "queued", "detail": "accepted"}
    logging.getLogger("p2psched.jobs").info("job %s %s", "n1:abc", "queued", extra=extra)
    assert direct == out.getvalue() and direct.endswith("\n") and direct.count("\n") == 1
    if fmt == "json":
        entry = json.loads(direct)
        assert entry == {"ts": NOW, "level": "info", "logger": "p2psched.jobs", "msg": "job n1:abc queued", **extra}
    else:
        assert direct.endswith(" I p2psched.jobs: job n1:abc queued job=n1:abc state=queued detail=accepted\n")
        assert direct.startswith(time.strftime("%H:%M:%S", time.localtime(int(NOW))) + ".631 ")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def on_the_jobs_logger(thing: logging.Handler | logging.Filter) -> Iterator[None]:
    """``thing`` (a handler or a filter) on the ``p2psched.jobs`` logger while inside."""
    jobs = logging.getLogger("p2psched.jobs")
    handler = isinstance(thing, logging.Handler)
    jobs.addHandler(thing) if handler else jobs.addFilter(thing)
    try:
        yield
    finally:
        jobs.removeHandler(thing) if handler else jobs.removeFilter(thing)


def test_another_handler_on_the_way_gets_the_job_line_as_a_record(configured):
    out = configured("text")
    collect = Collect()
    with on_the_jobs_logger(collect):
        logs.JobLog()("n1:abc", "running", "attempt 1")
    [record] = collect.records
    assert (record.job, record.state, record.detail) == ("n1:abc", "running", "attempt 1")
    assert record.getMessage() == "job n1:abc running"
    # and it still reaches configure()'s handler, once
    assert out.getvalue().endswith(" I p2psched.jobs: job n1:abc running job=n1:abc state=running detail=attempt 1\n")
    assert out.getvalue().count("\n") == 1


def test_a_filter_on_the_jobs_logger_is_obeyed(configured):
    out = configured("text")
    with on_the_jobs_logger(logging.Filter("nothing-matches-this")):
        logs.JobLog()("n1:abc", "queued", "accepted")
    assert out.getvalue() == ""
    logs.JobLog()("n1:abc", "queued", "accepted")
    assert "state=queued" in out.getvalue()


def test_level_warning_writes_no_job_line(configured):
    out = configured("json", "warning")
    logs.JobLog()("n1:abc", "queued", "accepted")
    assert out.getvalue() == ""


def test_a_job_line_is_stamped_with_its_transitions_time(configured):
    out = configured("text")
    logs.JobLog()("n1:abc", "placed", "runs here", NOW - 3600.5)
    stamp = time.strftime("%H:%M:%S", time.localtime(int(NOW - 3600.5)))
    assert out.getvalue() == f"{stamp}.131 I p2psched.jobs: job n1:abc placed job=n1:abc state=placed detail=runs here\n"


HOSTILE = ['q"uote', "new\nline\r", "ctl\x01\x1b[31m\x7f\x9b", "sep\u2028\u2029", "back\\slash", "sur\udcff",
           "ünï"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_hostile_text_in_a_line_cannot_forge_lines_or_reach_the_terminal(configured, fmt):
    """A client's node label ends up in a rejected job's detail (and peers' text in
    other lines): each record must stay one line, with no control character in it,
    and a JSON line must parse back to the same text."""
    out = configured(fmt)
    for w in HOSTILE:
        logs.JobLog()("n1:abc", "rejected", f"needs a node labelled z={w}")
        logging.getLogger("p2psched.agent").warning("peer said %s", w, extra={"peer": w})
    lines = out.getvalue().split("\n")
    assert lines.pop() == "" and len(lines) == 2 * len(HOSTILE)
    for line, w in zip(lines, [w for w in HOSTILE for _ in range(2)]):
        assert line.isprintable() or "\udcff" in line, repr(line)
        if fmt == "json":
            entry = json.loads(line)
            assert w in (entry.get("detail") or entry["msg"])
        else:
            assert not any(c in line for c in "\n\r\x01\x1b\x7f\x9b\u2028\u2029"), repr(line)
