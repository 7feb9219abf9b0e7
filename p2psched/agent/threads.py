"""Long-lived worker threads for blocking sandbox calls, bridged into trio explicitly.

``trio.to_thread.run_sync`` costs a thread hand-off and a trio wake-up per call,
which is more than a noop WebAssembly job itself. Here a fixed set of threads (one
per CPU slot) takes calls from a queue, and finished calls are handed back to trio
in batches: a worker schedules one ``run_sync_soon`` callback, and that callback
wakes every caller whose call finished since. Under load one trio wake-up serves
many jobs; idle, the threads block on the queue and cost nothing.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import trio


class _Call:
    __slots__ = ("fn", "args", "event", "value", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.event = trio.Event()
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
        with trio.CancelScope(shield=True):
            await call.event.wait()
        if call.error is not None:
            raise call.error
        return call.value

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
            call.event.set()
