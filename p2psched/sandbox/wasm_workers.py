"""WebAssembly jobs in worker processes: each runs guests and signs their reports under its own GIL.

Why processes: a wasm job on a thread of the agent shares the agent's GIL. A noop
guest costs about 25 us and its report about 60 us on their own, but running them
beside the event loop, every hand-off of the GIL between the loop and the workers
costs a context switch and cold caches: in the agent each noop job cost three
times its own CPU on the workers and slowed the loop as much. In a worker process
the guest and the report pay only for themselves, and the agent's loop keeps its
core.

The agent's side (this process): ``WasmWorkers(nursery, n, ...)``; the nursery
(the agent's) owns the worker processes.
  - ``submit(job_id, spec, module_path, done)`` hands a job to the least busy
    worker, or with ``behind=`` to the worker that runs that job (see ``tails``),
    to start when the jobs before it end. ``done(result, error)`` is called on the
    trio thread when it ends; ``on_start(job_id)`` when a job that waited behind
    another starts; ``after_results()`` after each batch of ``done`` calls;
    ``on_output(job_id, stream, offset, data)`` with what a guest that runs for a
    while has written so far (see below).
  - ``cancel(job_id)`` stops its guest within one epoch tick (reason ``cancelled``),
    or ends it at once if it has not started.
  - Workers start with the first job that needs them (one per CPU slot at most) and
    stop after WORKER_IDLE_S without a job, or when the nursery is cancelled. A
    worker that dies ends its jobs with an error; the next job starts a new one.

The worker's side, ``python -m p2psched.sandbox.wasm_worker``, and the frames
between the two are in ``wasm_worker.py``: a worker process imports none of
this module (trio among it), so it starts sooner and holds less.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgpack  # type: ignore[import-untyped]
import trio

from p2psched.jobs.spec import MAX_OUTPUT_BYTES
from p2psched.sandbox.base import SandboxResult
from p2psched.sandbox.wasm_worker import FRAME_LEN, RESULT_FIELDS

if TYPE_CHECKING:
    from p2psched.jobs.spec import JobSpec

__all__ = ["WasmWorkers", "Done"]

log = logging.getLogger("p2psched.agent")

#: ``done(result, error)``: exactly one of them is not None.
Done = Callable[["SandboxResult | None", "str | None"], None]

#: Spec fields a run frame carries beside the spec's JSON (the input, as raw bytes) or not at all.
_NOT_IN_JSON = {"module", "input"}
_NONE = type(None)
#: What each SandboxResult field may hold, as a worker sends it (msgpack: lists, maps).
_RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "exit_code": (int, _NONE), "reason": (str,), "stdout": (bytes,), "stderr": (bytes,),
    "stdout_truncated": (bool,), "stderr_truncated": (bool,), "cpu_ms": (int, float), "peak_mem_bytes": (int,),
    "limit_hit": (str, _NONE), "signal": (int, _NONE), "artifacts": (dict,), "warnings": (list,), "sandbox": (dict,),
}
assert RESULT_FIELDS == set(_RESULT_TYPES), "SandboxResult changed: update _RESULT_TYPES"

#: The largest result a worker may send: the largest stdout and stderr a job may
#: keep (MAX_OUTPUT_BYTES each) with room for the report. A worker that sends more,
#: or anything that is not a result, is stopped.
MAX_RESULT_BYTES = 2 * MAX_OUTPUT_BYTES + (16 << 20)
#: A worker with no job for this long stops; the next job starts a new one (0.3 s).
WORKER_IDLE_S = 60.0

#: How long a stopping worker gets to end its guests and exit before it is killed.
STOP_GRACE_S = 5.0


class _Pipe:
    """Frames to one pipe into a worker: written at once when they fit, else in order by a task."""

    def __init__(self) -> None:
        self.stream: trio.lowlevel.FdStream | None = None
        self.outbox: list[bytes] = []
        self.wake = trio.Event()
        self.fd: int | None = None  # non-blocking, set while the writer task is idle

    def send(self, message: tuple[Any, ...], *, hold: bool = False) -> None:
        """Queue a frame and write it now, or with ``hold`` at the next :meth:`flush`."""
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.outbox.append(FRAME_LEN.pack(len(body)) + body)
        if not hold:
            self.flush()

    def flush(self) -> None:
        """Write the queued frames: straight into the pipe, in one write and without
        a task switch, when the writer task is idle; what does not fit, it writes."""
        if not self.outbox:
            return
        if self.fd is not None:
            data = self.outbox[0] if len(self.outbox) == 1 else b"".join(self.outbox)
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self.outbox.clear()
                return  # the worker is gone; its reader ends its jobs
            if written == len(data):
                self.outbox.clear()
                return
            self.outbox[:] = [data[written:]]
        self.wake.set()

    async def write_loop(self) -> None:
        """Writes what ``send`` could not write at once, in order."""
        assert self.stream is not None
        try:
            while True:
                if not self.outbox:
                    self.fd = self.stream.fileno()
                    await self.wake.wait()
                    self.wake = trio.Event()
                self.fd = None
                data, self.outbox = b"".join(self.outbox), []
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the reader sees the end and says why
        finally:
            self.fd = None


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: trio.Process | None = None
        self.started = False
        self.jobs: dict[str, tuple[int, Done]] = {}  # job -> (run, done), in the order they run in
        self.skipped: set[int] = set()  # runs cancelled before they started: their results are dropped
        self.runs = _Pipe()  # run frames, to the worker's stdin
        self.cancels = _Pipe()  # cancel frames, to a pipe a thread of the worker waits on
        self.last_busy = 0.0  # trio time it last had a job


class WasmWorkers:
    """The agent's wasm worker processes; see the module docstring."""

    def __init__(self, nursery: trio.Nursery, n: int, *, cache_dir: Path, key_dir: Path, node_pubkey: str,
                 node_id: str, measurement: str,
                 after_results: Callable[[], None] | None = None, on_start: Callable[[str], None] | None = None,
                 on_output: Callable[[str, int, int, bytes], None] | None = None,
                 command: list[str] | None = None, idle_s: float = WORKER_IDLE_S) -> None:
        """``nursery`` owns the worker processes: its cancellation stops them. At most
        ``n`` run, each one job at a time. ``after_results`` is called on the trio
        thread after each batch of ``done`` calls, including those of a cancel and
        of a worker's end (the agent dispatches and records from it).
        ``on_start(job_id)`` is called when a job that waited behind another in its
        worker starts, right after that one's ``done``.
        ``command`` starts a worker (tests give their own). A worker with no job for
        ``idle_s`` stops."""
        self._init = {"cache_dir": str(cache_dir), "key_dir": str(key_dir), "node_pubkey": node_pubkey,
                      "node_id": node_id, "measurement": measurement}
        self._workers = [_Worker(i) for i in range(max(1, n))]
        self._where: dict[str, _Worker] = {}
        self._runs = itertools.count(1)
        self._holding = 0
        self._nursery = nursery
        self._after_results = after_results
        self._on_start = on_start
        self._on_output = on_output
        self._idle_s = idle_s
        self._command = command or [sys.executable, "-m", "p2psched.sandbox.wasm_worker"]
        #: The public key the workers signed with, once one has signed (it differs
        #: from ``node_pubkey`` only if node.pub did not match the key).
        self.signing_pubkey: str | None = None

    def submit(self, job_id: str, spec: JobSpec, module_path: Path | None, done: Done, *,
               behind: str | None = None) -> None:
        """Run job ``job_id`` of ``spec`` (its module stored at ``module_path``) on the
        least busy worker, or after job ``behind`` on its worker (one of
        :meth:`tails`)."""
        if behind is not None:
            worker = self._where[behind]
        else:
            worker = min(self._workers, key=lambda w: (len(w.jobs), not w.started))
        run = next(self._runs)
        worker.jobs[job_id] = (run, done)
        self._where[job_id] = worker
        worker.last_busy = trio.current_time()
        path = str(module_path) if module_path is not None else None
        worker.runs.send(("run", run, job_id, spec.model_dump_json(exclude=_NOT_IN_JSON), spec.input, path),
                         hold=self._holding > 0)
        if not worker.started:
            worker.started = True
            self._nursery.start_soon(self._run_worker, worker)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Jobs submitted inside go to their workers when it ends, in one write per
        worker rather than one per job (the agent holds them over a dispatch pass)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                for worker in self._workers:
                    worker.runs.flush()

    def cancel(self, job_id: str) -> None:
        worker = self._where.get(job_id)
        if worker is None:
            return
        run, _ = worker.jobs[job_id]
        worker.cancels.send(("cancel", run, job_id))
        if next(iter(worker.jobs)) != job_id:
            # A worker runs its jobs in the order given, so this one has not started:
            # it ends now rather than after the guests before it; the worker skips it
            # (or has run it already: either way its result is dropped).
            _, done = worker.jobs.pop(job_id)
            del self._where[job_id]
            worker.skipped.add(run)
            self._call(done, job_id, SandboxResult(exit_code=None, reason="cancelled"), None)
            self._after_batch()

    def tails(self, waiting: int) -> list[tuple[str, str]]:
        """(the job it runs, its last job) of each busy worker with fewer than
        ``waiting`` jobs waiting behind the one it runs: a job given ``behind=`` the
        last starts when the jobs before it have ended."""
        return [(next(iter(w.jobs)), next(reversed(w.jobs))) for w in self._workers if 1 <= len(w.jobs) <= waiting]

    def pids(self) -> list[int]:
        """The worker processes running now."""
        return [w.process.pid for w in self._workers if w.process is not None and w.process.returncode is None]

    # -- one worker process ----------------------------------------------------

    async def _run_worker(self, worker: _Worker) -> None:
        why = "it exited"
        cancel_r, cancel_w = os.pipe()
        try:
            init = pickle.dumps(("init", {**self._init, "cancel_fd": cancel_r}), protocol=pickle.HIGHEST_PROTOCOL)
            worker.runs.outbox[:0] = [FRAME_LEN.pack(len(init)) + init]
            # Its own session, as a process job's: Ctrl-C in the agent's terminal stops the
            # agent (its guests may finish within grace), not the guests. A worker ends
            # with the agent all the same: its pipes close.
            worker.process = await trio.lowlevel.open_process(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(cancel_r,),
                start_new_session=True)
            os.close(cancel_r)
            cancel_r = -1
            worker.runs.stream = cast("trio.lowlevel.FdStream", worker.process.stdin)
            worker.cancels.stream = trio.lowlevel.FdStream(cancel_w)  # it owns cancel_w now
            cancel_w = -1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.runs.write_loop)
                nursery.start_soon(worker.cancels.write_loop)
                nursery.start_soon(self._retire_when_idle, worker, nursery.cancel_scope)
                why = await self._read_loop(worker)
                nursery.cancel_scope.cancel()
            if not worker.jobs and self._workers[worker.index] is not worker:
                why = f"idle for {self._idle_s:g}s"
        except OSError as e:
            why = f"it could not start: {e}"
        finally:
            for fd in (cancel_r, cancel_w):
                if fd >= 0:
                    os.close(fd)
            with trio.CancelScope(shield=True):
                await self._stop_process(worker)
            code = worker.process.returncode if worker.process is not None else None
            jobs, worker.jobs = worker.jobs, {}
            worker.skipped.clear()
            worker.started, worker.process, worker.runs, worker.cancels = False, None, _Pipe(), _Pipe()
            self._fail_all(jobs, f"wasm worker process {worker.index} ended ({why}; exit status {code})")

    async def _retire_when_idle(self, worker: _Worker, scope: trio.CancelScope) -> None:
        """Stop a worker that has had no job for ``idle_s``: an agent that ran wasm jobs
        once does not keep their processes (about 60 MB each) for good. A new worker
        takes its place at once and starts with the next job."""
        worker.last_busy = trio.current_time()
        while True:
            await trio.sleep_until(worker.last_busy + self._idle_s)
            if worker.jobs:
                worker.last_busy = trio.current_time()
            elif trio.current_time() >= worker.last_busy + self._idle_s:
                self._workers[worker.index] = _Worker(worker.index)
                scope.cancel()
                return

    async def _read_loop(self, worker: _Worker) -> str:
        assert worker.process is not None and worker.process.stdout is not None
        stdout = worker.process.stdout
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_RESULT_BYTES)
        while True:
            data = await stdout.receive_some(1 << 16)
            if not data:
                return "it exited"
            try:
                unpacker.feed(data)
                for message in unpacker:
                    self._deliver(worker, message)
            except Exception as e:  # noqa: BLE001 - anything unreadable ends this worker
                log.error("wasm worker process %d sent something that is not a result: %s", worker.index, e)
                return f"it sent something that is not a result: {e}"
            finally:
                self._after_batch()

    def _deliver(self, worker: _Worker, message: Any) -> None:
        if isinstance(message, dict) and "out" in message:
            self._live(worker, message)
            return
        run, job_id = (message.get("run"), message.get("id")) if isinstance(message, dict) else (None, None)
        if isinstance(run, int) and run in worker.skipped:
            worker.skipped.discard(run)
            return
        if job_id not in worker.jobs or worker.jobs[job_id][0] != run:
            raise ValueError(f"not a result of a job it runs: {message!r:.100}")
        result: SandboxResult | None = None
        error = message.get("error")
        if error is not None:
            error = error if isinstance(error, str) else repr(error)
        else:
            fields = message.get("result")
            if not (isinstance(fields, dict) and {"exit_code", "reason"} <= set(fields) <= RESULT_FIELDS
                    and all(isinstance(v, _RESULT_TYPES[k]) for k, v in fields.items())):
                raise ValueError(f"result of {job_id} is not a sandbox result: {fields!r:.100}")
            result = SandboxResult(**fields)
            report = result.sandbox.get("attestation")
            if isinstance(report, dict):
                self.signing_pubkey = report.get("node_pubkey")
        _, done = worker.jobs.pop(job_id)
        self._where.pop(job_id, None)
        worker.last_busy = trio.current_time()
        self._call(done, job_id, result, error)
        if worker.jobs and self._on_start is not None:
            following = next(iter(worker.jobs))  # the worker starts it now
            try:
                self._on_start(following)
            except Exception:
                log.exception("job %s: starting it after %s failed", following, job_id)

    def _live(self, worker: _Worker, message: dict[str, Any]) -> None:
        """Output of a job still running; one of a run that has ended (or was taken
        back) is dropped."""
        run, job_id, stream, at, data = (message.get(k) for k in ("out", "id", "s", "at", "data"))
        if not (isinstance(job_id, str) and stream in (0, 1) and isinstance(at, int) and at >= 0
                and isinstance(data, bytes)):
            raise ValueError(f"not a job's output: {message!r:.100}")
        entry = worker.jobs.get(job_id)
        if entry is not None and entry[0] == run and self._on_output is not None:
            self._on_output(job_id, stream, at, data)

    def _fail_all(self, jobs: dict[str, tuple[int, Done]], why: str) -> None:
        for job_id, (_, done) in jobs.items():
            self._where.pop(job_id, None)
            self._call(done, job_id, None, why)
        if jobs:
            self._after_batch()

    def _after_batch(self) -> None:
        if self._after_results is not None:
            try:
                self._after_results()
            except Exception:
                log.exception("handling a batch of wasm results failed")

    @staticmethod
    def _call(done: Done, job_id: str, result: SandboxResult | None, error: str | None) -> None:
        try:
            done(result, error)
        except Exception:
            log.exception("job %s: handling the end of its wasm run failed", job_id)

    async def _stop_process(self, worker: _Worker) -> None:
        if worker.cancels.stream is not None:
            await worker.cancels.stream.aclose()  # the worker cancels its guests
        proc = worker.process
        if proc is None:
            return
        if proc.stdin is not None:
            await proc.stdin.aclose()  # end of input: the worker exits
        with trio.move_on_after(STOP_GRACE_S):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


# ---------------------------------------------------------------------------- worker side


def worker_pids(pid: int) -> list[int]:
    """The wasm worker processes of agent ``pid``, as seen from outside it (tests,
    the chaos nemesis): children of any of its threads, since trio starts processes
    from a worker thread."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"p2psched.sandbox.wasm_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    out.append(int(child))
            except OSError:
                continue
    return out


if __name__ == "__main__":  # an agent started before an upgrade on disk still starts workers by this name
    from p2psched.sandbox.wasm_worker import main

    main()
