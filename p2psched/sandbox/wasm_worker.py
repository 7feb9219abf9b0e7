"""One wasm worker process: ``python -m p2psched.sandbox.wasm_worker``, started and
fed by the agent's pool (``wasm_workers.py``, which says why jobs run in processes).

It imports only what running a guest and signing its report take: wasmtime,
msgpack, the job spec, not trio nor the agent, so that a worker the first job
after an idle minute needs starts sooner and holds less.

Its main thread reads jobs from stdin, one after another, and writes results to its
original stdout; a second thread waits for cancels on a pipe of their own, so that
a job's arrival wakes no other thread. Its stderr is the agent's.
  - Agent -> worker: frames of a 4-byte big-endian length and a pickle. On stdin
    ``("init", settings)`` then ``("run", run, job_id, spec_json, input, module_path)``
    (the spec as JSON without its module and input: a pickled pydantic model costs
    each side two to three times as much); on the cancel pipe
    ``("cancel", run, job_id)``. Pickle goes this way only: the agent trusts itself.
    ``run`` numbers each hand-over: a job taken back and given again is a new run,
    so a cancel that reaches a worker after the run it was sent for has ended there
    cannot stop the next one.
  - Worker -> agent: a msgpack stream of ``{"run", "id", "result"}`` or
    ``{"run", "id", "error"}`` maps. The agent never unpickles what a worker sends
    (a worker runs untrusted guests), and decodes it under size limits.
    Before its result, a job that has run for LIVE_EVERY_S has its new output
    sent every LIVE_EVERY_S as ``{"out": run, "id", "s": 0 (stdout) or 1, "at":
    offset, "data"}``, by a third thread that shares the pipe with the results
    under a lock; a job shorter than that sends none.
  - The end of the cancel pipe (the agent stopped or died: the kernel closes its
    pipes) cancels the guests within a tick; the end of stdin ends the worker.
    (Not PR_SET_PDEATHSIG: it fires when the thread that started the worker
    exits, and trio starts processes from its thread cache.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgpack  # type: ignore[import-untyped]

from p2psched.sandbox.base import SandboxResult

#: Each agent -> worker frame: this length, then a pickle.
FRAME_LEN = struct.Struct(">I")
#: The fields of a result a worker sends: SandboxResult's.
RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(SandboxResult))
#: A guest that runs this long has its output so far sent to the agent, and again
#: this often while it runs, for readers of /v1/jobs/{id}/output.
LIVE_EVERY_S = 0.2


def read_frame(stream: BinaryIO) -> Any:
    """The next frame from a buffered pipe (frames that come together take one read), or None at its end."""
    head = stream.read(FRAME_LEN.size)
    if len(head) < FRAME_LEN.size:
        return None
    size = FRAME_LEN.unpack(head)[0]
    body = stream.read(size)
    return None if len(body) < size else pickle.loads(body)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main() -> None:
    from p2psched.jobs.spec import ACCEPTED, JobSpec
    from p2psched.sandbox.base import LiveOutput, SandboxRequest
    from p2psched.security.attestation import report_from_result
    from p2psched.security.node_key import NodeKey
    from p2psched.sandbox.wasm import WasmEngine, run_wasm

    # Results go to the original stdout only; a stray print goes to stderr (the agent's log).
    out = os.dup(1)
    # Guests are batch work: under SCHED_BATCH a worker that wakes for its next job
    # does not preempt the agent's event loop (the API, dispatch, heartbeats) on that
    # CPU; it still gets its fair share. In the noop benchmark the loop was preempted
    # half as often.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    os.dup2(2, 1)
    runs = os.fdopen(0, "rb", buffering=1 << 16)
    first = read_frame(runs)
    if first is None:
        return  # the agent stopped before it needed this worker
    if first[0] != "init":
        sys.exit("p2psched wasm worker: expected an init frame from the agent on stdin")
    cfg = first[1]
    engine = WasmEngine(cfg["cache_dir"])
    key = NodeKey(Path(cfg["key_dir"]), cfg["node_pubkey"])

    def read_cancels(fd: int) -> None:
        try:
            with os.fdopen(fd, "rb") as cancels:
                while (frame := read_frame(cancels)) is not None:
                    engine.cancel(f"{frame[2]}#{frame[1]}")
        finally:
            engine.close()  # the agent stopped or died: stop what runs; later runs return at once

    # Runs come on stdin, read by this thread between jobs; cancels on their own
    # pipe, to a thread that waits on it, so that a job's arrival wakes no thread.
    threading.Thread(target=read_cancels, args=(cfg["cancel_fd"],), name="p2psched-wasm-cancels",
                     daemon=True).start()
    # The job running now, for the thread that sends its output while it runs:
    # [run, job_id, LiveOutput, monotonic start, bytes sent of stdout, of stderr].
    writing = threading.Lock()  # results and output frames share the pipe
    current: list[Any] = []

    def send_output() -> None:
        packer = msgpack.Packer(use_bin_type=True)
        while True:
            time.sleep(LIVE_EVERY_S)
            with writing:
                if not current or time.monotonic() - current[3] < LIVE_EVERY_S:
                    continue
                run, job_id, live = current[0], current[1], current[2]
                for stream, buf in ((0, live.stdout), (1, live.stderr)):
                    sent, now = current[4 + stream], len(buf)
                    if now > sent:
                        _write_all(out, packer.pack({"out": run, "id": job_id, "s": stream, "at": sent,
                                                     "data": bytes(buf[sent:now])}))
                        current[4 + stream] = now

    threading.Thread(target=send_output, name="p2psched-wasm-output", daemon=True).start()
    packer = msgpack.Packer(use_bin_type=True)
    while (job := read_frame(runs)) is not None:
        _, run, job_id, spec_json, stdin, module_path = job
        try:
            spec = JobSpec.model_validate_json(spec_json, context=ACCEPTED)
            spec.input = stdin
            started = time.time()
            # The engine knows the guest as JOB#RUN, the name its cancel gives.
            request = SandboxRequest.for_job(
                f"{job_id}#{run}", spec, Path(module_path) if module_path is not None else None)
            if not spec.mask_patterns:  # else the agent shows nothing before the end: none of it leaves unmasked
                request.live = LiveOutput()
                current[:] = [run, job_id, request.live, time.monotonic(), 0, 0]
            result = run_wasm(request, engine)
            result.sandbox["attestation"] = report_from_result(
                key.private(), node_id=cfg["node_id"], measurement=cfg["measurement"], job_id=job_id, spec=spec,
                result=result, sandbox_kind=spec.runtime, started_at=started, ended_at=time.time(),
                node_pubkey=key.public_hex,
            )
            message: dict[str, Any] = {"run": run, "id": job_id, "result": {
                name: getattr(result, name) for name in RESULT_FIELDS}}
        except Exception as e:  # noqa: BLE001 - the agent records it as the job's sandbox error
            message = {"run": run, "id": job_id, "error": f"{type(e).__name__}: {e}"}
        with writing:  # no output frame of this run after its result
            current.clear()
            _write_all(out, packer.pack(message))


if __name__ == "__main__":
    main()
