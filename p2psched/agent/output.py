# The methods here run on the Agent they are mixed into, and say so (``self: Agent``);
# mypy reports each such self type as not a supertype of JobOutputs ([misc]).
# mypy: disable-error-code="misc"
"""A job's output while it runs, and after: ``GET /v1/jobs/{id}/output``.

A reader asks for one stream (stdout or stderr) from an offset and gets the bytes
from there, where to ask next, and whether that was all. It may wait for news:
more output, or the job's end. ``p2psched logs --follow`` is such a reader.

Where the bytes come from:

* a finished job: its stored output (stdout is the raw bytes of ``/result``;
  stderr the record's text, or the raw bytes kept beside it when the record's
  64 KiB could not hold it all);
* a job running on this agent: what the sandbox has captured so far
  (``LiveOutput``), the same bytes the result will hold, so offsets carry over. A
  process job's comes as it is written; a wasm job's from its worker process every
  200 ms once it has run that long (``wasm_worker.LIVE_EVERY_S``), so a shorter
  one shows nothing until its end;
* a job running on a peer: that executor, asked over the transfer service by the
  job's origin (the agent a client submitted to, and so asks);
* otherwise nothing yet: a queued job, or a job whose ``mask_patterns`` must scrub
  the whole output before anyone sees it (``note`` says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from p2psched.jobs.record import JobRecord
from p2psched.jobs.state import JobState
from p2psched.sandbox.base import LiveOutput
from p2psched.transfer import messages as m
from p2psched.transfer.service import TransferError

if TYPE_CHECKING:
    from p2psched.agent.agent import Agent, Running

log = logging.getLogger("p2psched.output")

#: Bytes per answer at most; a reader asks again from ``next``.
MAX_CHUNK = 1024 * 1024
#: How long an origin lets its executor hold a request for news.
REMOTE_WAIT_S = 10.0
STREAMS = ("stdout", "stderr")


@dataclass(slots=True)
class OutputChunk:
    data: bytes
    next: int  # the offset to ask for next
    complete: bool  # the job has ended and nothing follows ``next``
    state: str
    attempt: int  # offsets count within one attempt: a job run again writes its output anew
    note: str = ""  # why there is nothing yet, when that is not plain

    def to_wire(self) -> dict[str, Any]:
        return {"data": self.data, "next": self.next, "complete": self.complete, "state": self.state,
                "attempt": self.attempt, "note": self.note}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> OutputChunk:
        data, nxt = d.get("data"), d.get("next")
        if not isinstance(data, bytes) or not isinstance(nxt, int) or nxt < 0 or len(data) > MAX_CHUNK:
            raise ValueError("an output reply needs bytes 'data' (at most 1 MiB) and an offset 'next'")
        attempt = d.get("attempt", 0)
        return cls(data, nxt, bool(d.get("complete")), str(d.get("state", ""))[:32],
                   attempt if isinstance(attempt, int) else 0, str(d.get("note", ""))[:300])


def _slice(data: bytes | bytearray, offset: int) -> tuple[bytes, int]:
    piece = bytes(data[offset:offset + MAX_CHUNK])
    return piece, offset + len(piece)


class JobOutputs:
    """Mixed into Agent: reading a job's output while it runs."""

    def _live_output(self: Agent, run: Running) -> LiveOutput | None:
        """Where a running job's output goes for readers, or None when nobody may
        see it before it ends (its mask patterns apply to the whole)."""
        if run.record.spec.mask_patterns:
            return None
        job_id = run.record.id

        def changed() -> None:
            ev = self._output_waiters.pop(job_id, None)
            if ev is not None:
                ev.set()

        return LiveOutput(changed=changed)

    def _on_wasm_output(self: Agent, job_id: str, stream: int, at: int, data: bytes) -> None:
        """A wasm worker sent what a running job has written from byte ``at`` on."""
        run = self.running.get(job_id)
        if run is None:
            return
        if run.live is None:
            run.live = self._live_output(run)  # made on the first output: a short job never needs one
            if run.live is None:
                return
        buf = run.live.stdout if stream == 0 else run.live.stderr
        if at <= len(buf) < at + len(data):
            buf += data[len(buf) - at:]
            if run.live.changed is not None:
                run.live.changed()

    async def read_output(self: Agent, job_id: str, stream: str, offset: int, wait: float) -> OutputChunk:
        """Up to MAX_CHUNK bytes of ``stream`` from ``offset``; with ``wait``, for up
        to that many seconds until there is some, or the job has ended."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
        deadline = trio.current_time() + wait
        while True:
            rec = self.get(job_id)
            chunk = await self._output_chunk(rec, stream, offset, max(0.0, deadline - trio.current_time()))
            if chunk.data or chunk.complete or trio.current_time() >= deadline:
                return chunk
            if rec.executor not in (None, self.node_id) and rec.state in (JobState.PLACED, JobState.RUNNING):
                # The executor held the request for its wait already, or answered at
                # once (the job ended there, its result not yet here): ask again after
                # a pause, longer if it did not answer.
                await trio.sleep(min(0.5 if chunk.note else 0.1, max(0.0, deadline - trio.current_time())))
                continue
            if rec.id in self.running or self.node_id == rec.executor:
                await self._wait_news(job_id, deadline)  # its sandbox, or its end, wakes us
            else:
                # Queued, or being offered to a peer: nothing here says when it starts there.
                await self._wait_news(job_id, min(deadline, trio.current_time() + 0.5))

    async def _output_chunk(self: Agent, rec: JobRecord, stream: str, offset: int, wait: float) -> OutputChunk:
        state = rec.state.value
        if rec.state.final:
            if stream == "stdout":
                await self.store.sync()
                data: bytes = self.store.output(rec.id) or b""
            else:  # kept whole when the record could not hold it all
                data = self.store.stderr(rec.id) or (rec.result.stderr.encode() if rec.result is not None else b"")
            piece, nxt = _slice(data, offset)
            return OutputChunk(piece, nxt, nxt >= len(data), state, rec.attempts)
        run = self.running.get(rec.id)
        if run is not None:
            live = run.live
            if live is not None:
                piece, nxt = _slice(live.stdout if stream == "stdout" else live.stderr, offset)
                return OutputChunk(piece, nxt, False, state, rec.attempts)
            note = "withheld while it runs: the job's mask_patterns apply to its whole output" \
                if rec.spec.mask_patterns else ""
            return OutputChunk(b"", offset, False, state, rec.attempts, note)
        executor = rec.executor
        if executor not in (None, self.node_id) and rec.state in (JobState.PLACED, JobState.RUNNING):
            return await self._remote_output(rec, executor, stream, offset, wait)
        return OutputChunk(b"", offset, False, state, rec.attempts)

    async def _remote_output(self: Agent, rec: JobRecord, executor: str, stream: str, offset: int,
                             wait: float) -> OutputChunk:
        peer = self.cluster.state_of(executor) if self.cluster is not None else None
        if peer is None or not peer.transfer or self.transfer is None:
            return OutputChunk(b"", offset, False, rec.state.value, rec.attempts,
                               f"its executor {executor} is not reachable now")
        wait = min(wait, REMOTE_WAIT_S)
        msg = {"t": m.OUTPUT, "id": rec.id, "stream": stream, "offset": offset, "wait": wait}
        try:
            reply = await self.transfer.request(executor, peer.transfer, msg, timeout=wait + 10)
            if reply.get("t") != m.OUTPUT_DATA:
                raise TransferError(str(reply.get("message", reply.get("t"))))
            chunk = OutputChunk.from_wire(reply)
        except (TransferError, ValueError) as e:
            return OutputChunk(b"", offset, False, rec.state.value, rec.attempts,
                               f"its executor {executor} did not answer: {e}")
        # The origin's record decides when the job has ended: its result may still be
        # on its way here.
        return OutputChunk(chunk.data, chunk.next, False, rec.state.value, chunk.attempt or rec.attempts, chunk.note)

    async def _on_output(self: Agent, peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        """Executor side: the origin of a job running here asks for its output."""
        job_id, stream, offset, wait = msg["id"], msg.get("stream"), msg.get("offset"), msg.get("wait", 0)
        if stream not in STREAMS or not isinstance(offset, int) or offset < 0 or not isinstance(wait, (int, float)):
            raise ValueError("output message: stream must be stdout or stderr, offset an int >= 0, wait a number")
        rec = self.active.get(job_id) or self.store.get(job_id)
        if rec is None:
            return m.error(f"agent {self.node_id} holds no job {job_id}")
        if peer is not None and rec.origin != peer:
            return m.error(f"job {job_id} belongs to origin {rec.origin}, not {peer}")
        deadline = trio.current_time() + min(max(0.0, float(wait)), REMOTE_WAIT_S)
        while True:
            rec = self.active.get(job_id) or self.store.get(job_id) or rec
            if rec.executor not in (None, self.node_id):
                return {"t": m.OUTPUT_DATA, "id": job_id,
                        **OutputChunk(b"", offset, False, rec.state.value, rec.attempts).to_wire()}
            chunk = await self._output_chunk(rec, stream, offset, 0.0)
            if chunk.data or chunk.complete or trio.current_time() >= deadline:
                return {"t": m.OUTPUT_DATA, "id": job_id, **chunk.to_wire()}
            await self._wait_news(job_id, deadline)

    async def _wait_news(self: Agent, job_id: str, deadline: float) -> None:
        """Until more output of ``job_id``, its end, or ``deadline``."""
        ended = self._waiters.setdefault(job_id, trio.Event())
        more = self._output_waiters.setdefault(job_id, trio.Event())
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                async def first(ev: trio.Event) -> None:
                    await ev.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(first, ended)
                nursery.start_soon(first, more)
