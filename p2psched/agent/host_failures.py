# The methods here run on the Agent they are mixed into, and say so (``self: Agent``);
# mypy reports each such self type as not a supertype of HostFailures ([misc]).
# mypy: disable-error-code="misc"
"""When this host, not the job, is at fault: retries, the per-runtime breaker, trial jobs.

A job this host could not run (its sandbox would not build, its wasm worker died, a
host limit such as open files was hit) is no fault of the job's:

* ``_retry_later`` queues it again: at once when a peer has room for it (its origin
  then places it there), else after a pause of 1, 4, 16 ... s here; a job of another
  origin goes back to that origin (``RemoteJobs._hand_back``), the only agent that
  may place it elsewhere. Once ``--host-retries`` tries are spent it fails with
  ``sandbox_error``.
* Each such failure counts against the runtime's breaker (``agent/health.py``); a
  breaker that opens makes the runtime *impaired*, gossiped in the vector, so that
  peers send no such jobs here and this agent's own go to peers.
* While a runtime is impaired, ``_health_loop`` runs a trial job of it each second
  (``_probe``), outside the job table; the first that runs ends the impairment.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING

import trio

from p2psched.jobs.record import JobRecord
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState
from p2psched.sandbox.base import SandboxRequest, SandboxResult

if TYPE_CHECKING:
    from p2psched.agent.agent import Agent, Running

log = logging.getLogger("p2psched.agent")

#: A job this host could not run (its sandbox failed to build, its wasm worker died,
#: a host limit) waits this long times 4 per earlier try, at most HOST_RETRY_MAX_S,
#: before it is queued again (``--host-retries`` times, then it fails).
HOST_RETRY_S = 1.0
HOST_RETRY_MAX_S = 60.0
#: While a runtime is impaired, a trial job of it runs this often: when one runs, the
#: runtime is offered again, without a user's job failing to find that out.
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 10.0
#: The trial wasm job: a module whose one export, ``noop``, does nothing.
PROBE_WASM = bytes.fromhex("0061736d0100000001040160000003020100070801046e6f6f7000000a040102000b")


class HostFailures:
    """Mixed into Agent: what it does when its host fails a job."""

    def _host_fault(self: Agent, runtime: str, error: str, *, certain: bool = False) -> None:
        """A job of ``runtime`` could not run on this host: count it against the
        runtime's breaker (agent/health.py), which may leave such jobs to peers."""
        if not self.health.failed(runtime, trio.current_time(), error, certain=certain):
            return
        view = self.health.describe(trio.current_time())[runtime]
        log.warning("%s jobs: this host could not run %d in a row (last: %s); leaving them to peers for %g s, "
                    "then trying here again (run 'p2psched doctor' to see what the host lacks)",
                    runtime, view["failures_in_a_row"], error, view["retry_in_s"])
        self._health_state_changed(runtime)

    def _host_ran(self: Agent, runtime: str) -> None:
        """A job of ``runtime`` ran to its end here: the runtime works."""
        if self.health.ran(runtime):
            log.warning("%s jobs run on this host again", runtime)
            self._health_state_changed(runtime)

    def _health_state_changed(self: Agent, runtime: str) -> None:
        self.metrics.child(self.metrics.runtime_impaired, runtime).set(int(runtime in self.health.impaired))
        self._health_changed.set()
        self._vector_changed.set()  # peers must see it now, not with the next change of slots
        if len(self.queue):
            self._wake.set()  # queued jobs may go elsewhere now, or run here again

    async def _health_loop(self: Agent) -> None:
        """While a runtime is impaired, try it every PROBE_EVERY_S with a trial job
        of our own (no user job need fail to find the host mended), and half-open it
        when its cooldown has passed. Idle (no wake-ups) while none is impaired."""
        while True:
            deadline = self.health.next_deadline()
            if self.health.impaired:
                deadline = min(deadline or math.inf, trio.current_time() + PROBE_EVERY_S)
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._health_changed.wait()
            self._health_changed = trio.Event()
            for runtime in self.health.tick(trio.current_time()):
                log.warning("%s jobs: trying this host again; the next one decides", runtime)
                self._health_state_changed(runtime)
            for runtime in self.health.impaired:
                error = await self._probe(runtime)
                if error is None:
                    log.warning("%s jobs: a trial job ran on this host", runtime)
                    self._host_ran(runtime)
                else:
                    log.debug("%s jobs: the trial job failed: %s", runtime, error)

    async def _probe(self: Agent, runtime: str) -> str | None:
        """Run a trial job of ``runtime`` through this host's sandbox, outside the
        job table: None if it ran, else why not."""
        self._probes += 1
        job_id = f"{self.node_id}:health-probe-{self._probes}"
        try:
            with trio.move_on_after(PROBE_TIMEOUT_S):
                if runtime == "wasm":
                    return await self._probe_wasm(job_id)
                return await self._probe_process(job_id)
            return f"no answer in {PROBE_TIMEOUT_S:g} s"
        except Exception as e:  # the host's fault, as with a job
            return str(e) or type(e).__name__

    async def _probe_wasm(self: Agent, job_id: str) -> str | None:
        sha = hashlib.sha256(PROBE_WASM).hexdigest()
        if not self.store.has_module(sha, check_disk=True):
            self.store.put_module(sha, PROBE_WASM)
        spec = JobSpec.model_validate({"runtime": "wasm", "module_sha256": sha, "entry": "noop",
                                       "limits": {"wall_ms": 5000}})
        ended = trio.Event()
        outcome: list[tuple[SandboxResult | None, str | None]] = []

        def done(result: SandboxResult | None, error: str | None) -> None:
            outcome.append((result, error))
            ended.set()

        self._wasm_workers().submit(job_id, spec, self.store.module_path(sha), done)
        await ended.wait()
        result, error = outcome[0]
        if result is None:
            return error or "unknown error"
        return result.reason if result.reason.startswith("sandbox_error") else None

    async def _probe_process(self: Agent, job_id: str) -> str | None:
        spec = JobSpec.model_validate({"runtime": "process", "command": ["/bin/true"], "limits": {"wall_ms": 5000}})
        sandbox = await self._process_sandbox()
        result = await sandbox.run(SandboxRequest.for_job(job_id, spec, None),
                                   self.data_dir / "work" / job_id.replace(":", "_"))
        return None if result.reason == "exit 0" else result.reason

    def _peer_could_run(self: Agent, rec: JobRecord, *, now: bool = False) -> bool:
        """Whether this agent, the job's origin, knows a peer that could ever run it
        (``now``: that has room for it now) and does not gossip its runtime as impaired."""
        if rec.origin != self.node_id or self.cluster is None:
            return False
        from p2psched.placement.core import DEFAULT_TTL, JobRequest, fits_ever, fits_now

        req = JobRequest.from_spec(rec.id, rec.spec, hops=rec.hops)
        fits = fits_now if now else fits_ever
        return rec.hops < DEFAULT_TTL and any(
            rec.runtime not in p.vector.impaired and fits(req, p) for p in self.cluster.alive_states())

    def _retry_later(self: Agent, run: Running, error: str, *, wait: bool = True) -> bool:
        """A job this host could not run: its sandbox failed to build, its worker
        died, a host limit (open files, processes) was hit. That is no fault of the
        job's, and often passes, so it goes back to the queue after a pause, up to
        ``host_retries`` times; placed again, it goes to a peer with room if there
        is one (``_place``). ``wait`` False: no pause, for a job that a peer should
        take now. False when the tries are spent (or it was cancelled or has ended
        meanwhile): the caller fails it with ``sandbox_error``."""
        rec = run.record
        tries = self._host_failures.get(rec.id, 0)
        if tries >= self.settings.host_retries or run.cancel_reason is not None or rec.state.final:
            self._host_failures.pop(rec.id, None)
            return False
        self._host_failures[rec.id] = tries + 1
        pause = min(HOST_RETRY_MAX_S, HOST_RETRY_S * 4**tries)
        # Only its origin may place a job elsewhere: one of another origin goes back
        # there at once. Our own pauses only to try this host again; a peer with room
        # takes it now.
        give_back = rec.origin != self.node_id and self.transfer is not None and self._nursery is not None
        wait = wait and not give_back and not self._peer_could_run(rec, now=True)
        if give_back:
            then = f"giving it back to its origin {rec.origin}"
        else:
            then = f"trying again in {pause:g} s" if wait else "placing it on a peer"
        log.warning("job %s: this host could not run it (%s); %s (%d of %d)",
                    rec.id, error, then, tries + 1, self.settings.host_retries)
        self.metrics.host_retries.labels(rec.runtime).inc()
        self._release(run)
        self._advance(rec, JobState.QUEUED, time.time(), f"this host could not run it: {error}; {then}")
        rec.wait_reason = f"this host could not run it ({error}); {then}"
        if give_back:
            assert self._nursery is not None
            self._handing_back.add(rec.id)
            self._nursery.start_soon(self._hand_back, rec, error, pause)  # ``pause``: if the origin does not answer
        else:
            self._requeue_later(rec, pause if wait else 0.0)
        return True
