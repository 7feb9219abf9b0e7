"""The agent's worker threads: blocking calls off the trio thread, results back on it."""

from __future__ import annotations

import logging
import threading

import pytest
import trio

from p2psched.agent.threads import WorkerThreads


async def test_run_returns_the_value_computed_on_a_worker_thread() -> None:
    workers = WorkerThreads(2, "t")
    try:
        trio_thread = threading.get_ident()
        tid = await workers.run(threading.get_ident)
        assert tid != trio_thread
        assert await workers.run(pow, 2, 10) == 1024
    finally:
        workers.close()


async def test_run_raises_the_calls_error_in_the_caller() -> None:
    workers = WorkerThreads(1, "t")
    try:
        with pytest.raises(ZeroDivisionError):
            await workers.run(lambda: 1 / 0)
    finally:
        workers.close()


async def test_submit_calls_done_on_the_trio_thread_with_each_value_or_error() -> None:
    workers = WorkerThreads(2, "t")
    trio_thread = threading.get_ident()
    got: dict[int, tuple[object, BaseException | None, int]] = {}
    all_done = trio.Event()

    def done_for(i: int):  # noqa: ANN202
        def done(value: object, error: BaseException | None) -> None:
            got[i] = (value, error, threading.get_ident())
            if len(got) == 200:
                all_done.set()
        return done

    try:
        for i in range(200):
            if i % 10 == 0:
                workers.submit(lambda: 1 / 0, done=done_for(i))
            else:
                workers.submit(lambda i=i: i * i, done=done_for(i))
        with trio.fail_after(30):
            await all_done.wait()
    finally:
        workers.close()
    for i, (value, error, tid) in got.items():
        assert tid == trio_thread
        if i % 10 == 0:
            assert isinstance(error, ZeroDivisionError)
        else:
            assert error is None and value == i * i


async def test_a_failing_done_callback_is_logged_and_does_not_lose_the_others(caplog: pytest.LogCaptureFixture) -> None:
    workers = WorkerThreads(1, "t")
    delivered: list[int] = []
    last = trio.Event()

    def bad(value: object, error: BaseException | None) -> None:
        raise RuntimeError("bug in a callback")

    def good(value: object, error: BaseException | None) -> None:
        delivered.append(value)  # type: ignore[arg-type]
        if value == 9:
            last.set()

    gate = threading.Event()
    try:
        # Hold the only worker so that every call ends in the same delivery batch.
        workers.submit(gate.wait, done=lambda v, e: None)
        for i in range(10):
            workers.submit(lambda i=i: i, done=bad if i == 3 else good)
        gate.set()
        with caplog.at_level(logging.ERROR, logger="p2psched.agent"), trio.fail_after(30):
            await last.wait()
    finally:
        workers.close()
    assert delivered == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert any("completion callback failed" in r.getMessage() for r in caplog.records)
