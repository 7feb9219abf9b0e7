"""Long-lived worker threads for blocking sandbox calls, bridged into trio explicitly.

``trio.to_thread.run_sync`` costs a thread hand-off and a trio wake-up per call,
which is more than a noop WebAssembly job itself. Here a fixed set of threads (one
per CPU slot) takes calls from a queue, and finished calls are handed back to trio
in batches: a worker schedules one ``run_sync_soon`` callback, and that callback
wakes every caller whose call finished since. Under load one trio wake-up serves
many jobs; idle, the threads block on the queue and cost nothing.

Two ways in: ``await run(fn, ...)`` for a caller that waits, and ``submit(fn, ...,
done=callback)`` for one that does not: the callback runs on the trio thread when
the call ends, without a task or an Event per call. The agent starts its
WebAssembly jobs that way; under load the per-job task cost more than the job.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import trio


log = logging.getLogger("p2psched.agent")

#: ``done(value, error)``: exactly one of them is meaningful (error is None on success).
Done = Callable[[Any, "BaseException | None"], None]


class _Call:
    __slots__ = ("fn", "args", "event", "done", "value", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Done | None = None) -> None:
        self.fn = fn
        self.args = args
        self.event = trio.Event() if done is None else None
        self.done = done
        self.value: Any = None
        self.error: BaseException | None = None


class WorkerThreads:
    def __init__(self, n: int, name: str = "p2psched-worker") -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._done: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a worker thread; wait (uncancellably) for its result.

        Uncancellable because a thread cannot be interrupted: callers stop a running
        call through its own means (the wasm engine's cancel), then keep waiting.
        """
        call = _Call(fn, args)
        self._calls.put(call)
        assert call.event is not None
        with trio.CancelScope(shield=True):
            await call.event.wait()
        if call.error is not None:
            raise call.error
        return call.value

    def submit(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Run ``fn(*args)`` on a worker thread; call ``done(value, error)`` on the trio
        thread once it ends. ``done`` must not raise: an error in it is logged, and the
        other calls that ended with it are still delivered."""
        self._calls.put(_Call(fn, args, done))

    def close(self) -> None:
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                call.value = call.fn(*call.args)
            except BaseException as e:  # handed to the caller, who re-raises it in trio
                call.error = e
            with self._lock:
                self._done.append(call)
                if self._wake_scheduled:
                    continue
                self._wake_scheduled = True
            try:
                self._token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:
                return

    def _deliver(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            done = list(self._done)
            self._done.clear()
        for call in done:
            if call.event is not None:
                call.event.set()
                continue
            assert call.done is not None
            try:
                call.done(call.value, call.error)
            except Exception:  # a bug in one callback must not lose the others' results
                log.exception("a worker-thread completion callback failed")
