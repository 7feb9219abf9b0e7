"""The agent: accepts, stores, places, runs and reports jobs.

One trio nursery owns everything the agent does: the HTTP server, the dispatcher,
the store's flusher, and (when configured) membership and transfer. The job state
machine itself is pure (``jobs/state.py``); this module is the I/O around it: it
reads the clock, talks to the store and the sandboxes, and wakes waiters.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import trio
from prometheus_client import CollectorRegistry

from p2psched import __version__, logs
from p2psched.agent.datadir import DataDirLock
from p2psched.agent.gate import Gate
from p2psched.agent.health import COOLDOWN_MAX_S, HostHealth
from p2psched.agent.host_failures import HostFailures
from p2psched.agent.output import JobOutputs
from p2psched.agent.remote import RemoteJobs
from p2psched.agent.errors import AgentError, StartupError, Conflict, NotFound, QueueFull, Unavailable, first_of
from p2psched.config import AgentSettings
from p2psched.jobs.queue import DispatchQueue, DrainRate
from p2psched.jobs.record import JobRecord, JobResult, record_text
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState, state_for_reason
from p2psched.jobs.store import Store, StoreError
from p2psched.metrics.agent import AgentMetrics
from p2psched.config import parse_hostport
from p2psched.resources import NodeState, ResourceVector
from p2psched.sandbox.base import SandboxRequest, SandboxResult
from p2psched.security.admission import TenantUsage

if TYPE_CHECKING:
    from p2psched.sandbox.wasm_workers import WasmWorkers
    from p2psched.security.request_auth import Principal

log = logging.getLogger("p2psched.agent")
job_log = logs.JobLog()

#: The wait reason of a job placed in a wasm worker behind another, before "<job id> ends".
PREFETCHED_WAIT = "runs next in a wasm worker here, when"

#: Jobs that may wait in a wasm worker behind the one it runs. With more, a worker
#: still has a job to start while the agent records a result and sends the next
#: one, and the agent handles more results a wake-up (noop_throughput: about 2,800
#: jobs/s with one, 3,000 with two; on a later host 3,344-3,511 with two and
#: 3,504-3,871 with four, five interleaved pairs, four ahead in each). They wait
#: only behind a job that has just started, and are taken back as PREFETCH_PATIENCE_S says.
WAITING_PER_WORKER = 4

#: A job waits in a wasm worker only behind a job that started less than this long
#: ago, and is taken back after waiting this long when a slot it fits is free (jobs
#: queued behind it take a free slot first). Noop jobs take a tenth of a millisecond.
PREFETCH_PATIENCE_S = 0.02
#: Waiting jobs that a dispatch pass sets aside to reach the jobs queued behind
#: them: jobs of a runtime impaired here, waiting for a peer with room, and jobs of
#: other origins, waiting for room here. Each is popped and put back every pass, so
#: the bound keeps a long queue of them cheap; a job further back waits for its turn
#: as before.
IMPAIRED_LOOKAHEAD = 256
#: While jobs wait in workers with peers up, how often the peers are looked at for room
#: (each look builds every member's state: dispatch passes come far more often).
PEER_ROOM_LOOK_S = 0.05

#: The cyclic collector's thresholds once the agent is up (Python's default is
#: (700, 10, 10)). An agent holds many long-lived objects (each queued job's record,
#: spec and timeline) and makes few cycles, so with the defaults most collecting went
#: to full passes over live jobs that found nothing: in a 20,000-job noop benchmark
#: run 1.1 s of the trio thread's time, 0.8 s of it in nine full passes that freed
#: 2,700 objects in all; at these, 0.3 s and one full pass. Young collections are
#: rarer and larger, their total work about the same. Reference counting still
#: frees at once all that is not in a cycle.
GC_THRESHOLDS = (20_000, 10, 10)

#: Staged transitions that nobody awaits (placed, running) are flushed at least this
#: often, so a crash loses at most this much timeline detail and never a job.
FLUSH_INTERVAL_S = 0.05
#: Info log lines are flushed at least this often when no job activity flushes them.
LOG_FLUSH_IDLE_S = 1.0
#: While the job store cannot be written (disk full, I/O errors), a flush is tried
#: again this often, and refused clients are told to retry after it.
STORE_RETRY_S = 1.0
#: How often a changed resource vector is handed to membership while the agent holds
#: jobs. Gossip runs every 200 ms, so publishing faster would only be coalesced away.
PUBLISH_INTERVAL_S = 0.1
#: With no job here the vector changes only when work arrives (which wakes the
#: publisher) or with the load average, which the kernel recomputes every 5 s.
IDLE_PUBLISH_S = 5.0
#: A process job's output past this size is hashed and signed off the event loop.
SIGN_IN_THREAD_BYTES = 1 << 20
#: Re-placement of jobs whose executor vanished from membership while we were not
#: looking. The grace lets membership converge after our own restart first.
ORPHAN_CHECK_S = 2.0
#: Why a queued job waits before the dispatcher has looked at it: the jobs ahead of
#: it in the queue's order (--dispatch-policy) go first.
IN_TURN = "waiting its turn behind the jobs ahead of it in this agent's queue"
#: NVML is asked for GPU utilisation and memory at most this often (on a scrape of /metrics).
GPU_SAMPLE_S = 5.0
#: How often the tenants and topology files are checked for changes (a stat each);
#: SIGHUP re-reads them at once.
FILE_POLL_S = 2.0
ORPHAN_GRACE_S = 15.0
#: How long a cancel waits for a stopped job to end before it answers with the record
#: as it stands (a guest stops within an epoch tick, a process sandbox within its
#: kill grace); and how many jobs at other agents one request follows at once.
CANCEL_WAIT_S = 30.0
CANCEL_CONCURRENCY = 32
#: A job of another origin that this agent can never run is given back to its origin;
#: while the origin does not answer, it is tried again this often.
GIVE_BACK_RETRY_S = 10.0


@dataclass(slots=True)
class Running:
    record: JobRecord
    started: float
    cancel_reason: str | None = None
    # Made with the run, not when the sandbox starts: a cancel that arrives while the
    # first process job waits for the sandbox pool must still stop it.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gpu_grant: Any = None
    live: Any = None  # LiveOutput: a process job's output so far, for readers while it runs


def _raise_nofile() -> None:
    """Each running process job holds about 5 descriptors here: use the whole hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _reap_stale_sandboxes() -> None:
    """Kill and remove what a kill -9'd agent left of its process jobs (cgroups, mounts).

    The process sandbox (~3 MB resident) is loaded only when something is left; an
    agent that runs no process job never loads it, and the first process job probes
    the host instead."""
    _raise_nofile()
    from p2psched.sandbox.leftovers import any_left

    if not any_left():
        return
    try:
        from p2psched.sandbox.process import reap_stale
    except ImportError:  # the sandbox's system tools are missing: doctor says so
        return
    try:
        n = reap_stale()
    except OSError as e:
        log.warning("could not clean up stale process sandboxes: %s", e)
        return
    if n:
        log.info("removed %d stale process sandboxes left by an earlier run", n)


def _trim_heap() -> None:
    """Give the C heap that start-up freed (import-time garbage: ~2-3 MB) back to the OS.

    glibc keeps freed memory at the top of the heap and in its arenas; malloc_trim
    returns what whole pages of it can be. Elsewhere (musl) there is nothing to call."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _primary_ip() -> str:
    """The address other hosts most likely reach us on (no packet is sent)."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def new_job_id(node_id: str) -> str:
    """``<origin>:<time><random>``: sortable by time, and any agent can tell the origin."""
    return f"{node_id}:{time.time_ns() // 1000:x}{secrets.token_hex(4)}"


@contextlib.contextmanager
def listening(flag: str, address: str) -> Iterator[None]:
    """Start a listener on ``address``; an address it cannot take becomes a StartupError
    naming ``flag`` and what to do (the listener may bind inside a nursery of its own)."""
    try:
        yield
    except (OSError, BaseExceptionGroup) as error:
        e = first_of(error, OSError)
        if e is None:
            raise
        fix = {
            errno.EADDRINUSE: "another program listens there (`p2psched doctor` names it); stop it, or choose "
                              "another port",
            errno.EADDRNOTAVAIL: "this host has no such address; give one of its own addresses, or 0.0.0.0 for all",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a port above 1024",
        }.get(e.errno or 0, "check the address")
        raise StartupError(f"{flag} {address}: cannot listen there ({e.strerror or e}); {fix}") from None


def origin_of(job_id: str) -> str | None:
    head, sep, _ = job_id.rpartition(":")
    return head if sep else None


class Agent(RemoteJobs, JobOutputs, HostFailures):
    def __init__(self, settings: AgentSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.gate = Gate(settings, self.metrics.admission_rejections)
        self.data_dir = settings.resolved_data_dir
        try:
            self.store = Store(self.data_dir)
        except StoreError as e:
            raise StartupError(str(e)) from None
        #: Client-chosen ids handed to their home agent without an answer (it may hold
        #: the job): id -> that home. Until the home answers, the id goes to it alone.
        self._in_doubt: dict[str, tuple[str, float]] = self.load_doubts()  # id -> (home, since)
        self.queue = DispatchQueue(settings.dispatch_policy)
        self._drain = DrainRate()  # jobs ended per second lately, for Retry-After
        self.active: dict[str, JobRecord] = {}
        #: Status reports that arrived before the offer's acceptance (see _on_status).
        self.early_status: dict[str, dict[str, Any]] = {}
        # job id -> (node, its "running" status): a run a restarted executor began before
        # membership took it back in; taken as the job's attempt once it does.
        self.restarted_runs: dict[str, tuple[str, dict[str, Any]]] = {}
        #: node -> ids of the jobs whose cancel did not reach it (an ordered set): sent
        #: again when membership sees it alive (``resend_cancels``).
        self._cancels_owed: dict[str, dict[str, None]] = {}
        #: Module hashes each peer accepted an offer with: later offers leave the bytes out.
        self.peer_modules: dict[str, set[str]] = {}
        self.running: dict[str, Running] = {}
        self.cpu_total = settings.detected_cpus()
        self.mem_total_mb = settings.detected_mem_mb()
        self.cpu_used = 0.0
        self.mem_used_mb = 0
        self.accepting = True
        self.started_at = time.time()
        self._wake = trio.Event()
        self._vector_changed = trio.Event()  # slots taken or given back, or a job queued
        self._waiters: dict[str, trio.Event] = {}
        self._output_waiters: dict[str, trio.Event] = {}  # readers of a running job's output, until more comes
        self._awaiting_durable: set[trio.Event] = set()  # waiters whose job ended, until it is on disk
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._wasm: WasmWorkers | None = None
        self._wasm_ended: list[tuple[Running, SandboxResult, float]] = []  # freed, not yet recorded
        self._prefetched: dict[str, Running] = {}  # placed in a wasm worker behind a running job
        self._turn_given: str | None = None  # the last queued job jobs were taken back for (_tenant_skipped)
        #: Queued jobs out of the queue for a while: offered to a peer, or waiting to be
        #: queued again after a refusal. They wait here all the same (``waiting``).
        self._aside: set[str] = set()
        self._peer_room_looked = 0.0  # monotonic time of the last look for a peer with room for them
        self._dispatching = False
        self._host_failures: dict[str, int] = {}  # job id -> tries this host could not run it
        self._handing_back: set[str] = set()  # jobs of other origins, being given back to them
        self._avoid: dict[str, str] = {}  # job id -> the executor that gave it back, passed over when placing
        # job id -> the scope of a cancel the origin is following to the job's executor: the
        # job ends there and then if that executor is lost or gives it back (RemoteJobs.cancel_remote)
        self._cancelling: dict[str, trio.CancelScope] = {}
        self.health = HostHealth(cooldown_s=self.settings.host_cooldown_s,
                                 cooldown_max_s=max(self.settings.host_cooldown_s, COOLDOWN_MAX_S))
        self._health_changed: trio.Event = trio.Event()  # a breaker opened: its half-open time is new
        self._probes = 0
        # Read when /metrics is scraped, not set at each job: always exact, and free per job.
        self.metrics.queue_length.set_function(self.waiting)
        self.metrics.child(self.metrics.slots_in_use, "cpu").set_function(lambda: self.cpu_used)
        self.metrics.child(self.metrics.slots_in_use, "mem_mb").set_function(lambda: self.mem_used_mb)
        self.metrics.running.set_function(lambda: len(self.running))
        self._processes: Any = None  # ProcessSandbox, made on the first process job
        self.gpus: Any = None  # SlotAllocator, once started
        from p2psched.placement.core import DEFAULT_SETTINGS, PlacementState
        from p2psched.placement.metrics import PlacementMetrics

        self.placement_metrics = PlacementMetrics(self.registry)
        self.placement_state = PlacementState()
        self.placement_settings = replace(DEFAULT_SETTINGS, gpu_first=settings.gpu_placement == "fit-first")
        self.rng = random.Random()
        self.cluster: Any = None  # ClusterView over membership, once started
        self.membership: Any = None  # MembershipService, once started
        self.transfer: Any = None  # TransferService, once started
        self.topology: Any = None
        self._topology_error: str | None = None
        if settings.topology is not None:
            from p2psched.topology import Topology, TopologyError

            try:
                self.topology = Topology.load(settings.topology)
            except (TopologyError, OSError) as e:
                raise StartupError(f"--topology {settings.topology}: {e}") from None
            where = self.topology.locate(self.node_id)
            if not where.known:
                log.warning("node %s is not a host in %s: %s", self.node_id, settings.topology, where)
        self.gpu_inventory: Any = None
        self.gpu_metrics: Any = None
        self._gpu_usage: dict[str, Any] = {}  # NVML's last sample by GPU UUID, for the metrics
        self._gpu_sampled_at = -math.inf

    # ---------------------------------------------------------------- lifecycle

    async def _start_gpus(self) -> None:
        from p2psched.gpu.discovery import load_inventory
        from p2psched.gpu.metrics import GpuMetrics
        from p2psched.gpu.slots import SlotAllocator

        try:
            inv = await trio.to_thread.run_sync(
                functools.partial(load_inventory, self.settings.gpus, profile=self.settings.gpu_profile))
        except ValueError as e:
            raise StartupError(f"--gpus / --gpu-profile: {e}") from None
        self.gpu_inventory = inv
        # After a restart no job holds a slot: running jobs were queued again and
        # queued jobs reserve only when they start, so every slot is free.
        self.gpus = SlotAllocator(inv)
        # Read at scrape time, as cpu and mem_mb are: present (0) before the first grant too.
        self.metrics.child(self.metrics.slots_in_use, "gpu").set_function(
            lambda: sum(self.gpus.in_use_by_job().values()))
        self.gpu_metrics = GpuMetrics(self.registry)
        self.gpu_metrics.update(self.gpus, inv, usage=self._gpu_usage)
        if inv.gpus:
            log.info("GPUs (%s): %s slots, %s", inv.source, self.gpus.total_by_type(), inv.reason)
        elif self.settings.gpus:
            log.warning("no GPU slots offered: %s", inv.reason)

    async def refresh_gpu_usage(self) -> None:
        """Sample NVML's utilisation and memory of each GPU for the metrics, at most
        every GPU_SAMPLE_S (a scrape asks; a sample blocks, so it runs off the trio
        thread). Declared GPUs and hosts without NVML have nothing to sample."""
        inv = self.gpu_inventory
        if inv is None or inv.source != "nvml" or not inv.gpus or self.gpus is None:
            return
        now = trio.current_time()
        if now - self._gpu_sampled_at < GPU_SAMPLE_S:
            return
        self._gpu_sampled_at = now
        from p2psched.gpu.discovery import sample_usage

        self._gpu_usage = await trio.to_thread.run_sync(sample_usage, inv)
        self.gpu_metrics.update(self.gpus, inv, usage=self._gpu_usage)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from p2psched.api.server import serve_api

        lock = DataDirLock.acquire(self.data_dir, self.node_id)  # before recovery touches a job
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_gpus()
                await trio.to_thread.run_sync(_reap_stale_sandboxes)
                self.recover()
                nursery.start_soon(self._dispatch_loop)
                nursery.start_soon(self._replace_loop)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._health_loop)
                if self.settings.job_retention_h > 0:
                    nursery.start_soon(self._prune_loop)
                if self.gate.holder is not None:
                    from p2psched.security.reloader import watch_registry

                    # SIGHUP is the agent's own (reload below); the watcher polls the file.
                    await nursery.start(functools.partial(
                        watch_registry, self.gate.holder, self.gate.on_reload, poll_interval=FILE_POLL_S,
                        handle_sighup=False))
                if self.topology is not None:
                    nursery.start_soon(self._watch_topology)
                await self._start_cluster(nursery)
                with listening("--api", self.settings.api):
                    await nursery.start(serve_api, self)
                log.info("agent %s listening", self.node_id, extra={"api": self.settings.api, "version": __version__})
                # What start-up built (imported modules, settings, compiled patterns: ~75,000
                # objects) lives as long as the agent: keep it out of the collector's full
                # passes, which with 1,000 jobs running stalled the event loop for 0.2-0.8 s.
                gc.collect()
                gc.freeze()
                gc.set_threshold(*GC_THRESHOLDS)
                _trim_heap()
                task_status.started()
                await self._stop.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
            self.store.close()
        finally:
            lock.release()
        self.stopped.set()

    _grace_ends: float | None = None  # when a drain began the stop's grace (trio time)

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read files that may change while running (tenants, topology).
        Both are also re-read within FILE_POLL_S of a change."""
        self.gate.reload()
        self._reload_topology()

    async def _watch_topology(self) -> None:
        while True:
            await trio.sleep(FILE_POLL_S)
            self._reload_topology()

    def _reload_topology(self) -> None:
        """Re-read the topology file if it changed. A file that does not load leaves
        the topology as it was (placement keeps working) and says why."""
        from p2psched.topology import TopologyError

        if self.topology is None:
            return
        try:
            changed = self.topology.reload_if_changed()
        except TopologyError as e:
            if str(e) != self._topology_error:  # once per bad edit, not every poll
                log.error("topology not reloaded: %s", e)
            self._topology_error = str(e)
            return
        self._topology_error = None
        if not changed:
            return
        where = self.topology.locate(self.node_id)
        log.info("topology reloaded from %s: %d hosts; this agent is on leaf %s", self.settings.topology,
                 len(self.topology.hosts), where.leaf)
        if not where.known:
            log.warning("node %s is not a host in %s: %s", self.node_id, self.settings.topology, where.note)
        self._vector_changed.set()  # its position may have moved: gossip it

    async def _shutdown(self) -> None:
        self.accepting = False
        self._take_back_prefetched("the agent is stopping")
        now = trio.current_time()
        deadline = self._grace_ends if self._grace_ends is not None else now + self.settings.grace_s
        log.info("stopping: no new jobs; %d running may finish within %.1fs", len(self.running),
                 max(0.0, deadline - now))
        with trio.move_on_at(deadline):
            while self.running:
                await trio.sleep(0.02)
        for run in list(self.running.values()):
            self._cancel_running(run, "shutdown")
        with trio.move_on_after(5):
            while self.running:
                await trio.sleep(0.01)
        try:
            await self.store.sync()
        except StoreError as e:
            log.error("stopping with job states not written (%s): after a restart, their jobs run again", e)
        if self.membership is not None:
            # Peers mark us `left` at once rather than suspecting and killing us.
            with trio.move_on_after(3):
                await self.membership.leave()
        log.info("stopped; state flushed to %s", self.store.path)

    def recover(self) -> None:
        """Bring back unfinished jobs after a restart (or a kill -9)."""
        now = time.time()
        n = 0
        for rec in self.store.unfinished():
            n += 1
            self._seq_seen(rec.seq)
            if rec.state in (JobState.RUNNING, JobState.PLACED) and rec.executor not in (None, self.node_id):
                self.active[rec.id] = rec  # it runs elsewhere; its executor delivers the result
                continue
            if rec.state in (JobState.RUNNING, JobState.PLACED):
                self._advance(rec, JobState.QUEUED, now, "agent restarted while the job was in flight; running it again")
            elif rec.state == JobState.SUBMITTED:
                self._advance(rec, JobState.QUEUED, now, "recovered after restart")
            self.active[rec.id] = rec
            self.queue.push(rec)
        if n:
            log.info("recovered %d unfinished jobs from %s", n, self.store.path)
            self._wake.set()
        assert self._nursery is not None
        for job_id in self.store.owed_deliveries():
            self._nursery.start_soon(self._deliver, job_id)

    _seq = 0
    _store_error_logged = -1e9

    def _seq_seen(self, seq: int) -> None:
        self._seq = max(self._seq, seq, self.store.last_seq)

    def _next_seq(self) -> int:
        self._seq = max(self._seq, self.store.last_seq) + 1
        return self._seq

    # ---------------------------------------------------------------- state changes

    def _advance(self, rec: JobRecord, state: JobState, at: float, detail: str = "") -> None:
        rec.advance(state, at, self.node_id, detail)
        if self._aside:
            self._aside.discard(rec.id)
        self.metrics.job_state(state.value, rec.runtime).inc()
        # One structured line per transition, with the job id (a job is created
        # submitted and its first line is submitted -> queued); --log-level warning
        # turns them off.
        job_log(rec.id, state.value, detail, at)
        self.store.stage(rec)
        if state.final:
            self._drain.add(at)
            self.active.pop(rec.id, None)
            self.early_status.pop(rec.id, None)
            if self._host_failures:
                self._host_failures.pop(rec.id, None)
            if self._avoid:
                self._avoid.pop(rec.id, None)
            if self._output_waiters:  # readers of its output read the stored whole now
                out_ev = self._output_waiters.pop(rec.id, None)
                if out_ev is not None:
                    out_ev.set()
            ev = self._waiters.pop(rec.id, None)
            if ev is not None:
                # Waiters learn of the ending only once it is durable.
                if self._nursery is not None:
                    self._nursery.start_soon(self._notify_when_durable, ev)
                else:
                    ev.set()

    async def _notify_when_durable(self, ev: trio.Event) -> None:
        self._awaiting_durable.add(ev)
        try:
            await self._sync_retrying()
        finally:
            self._awaiting_durable.discard(ev)
        ev.set()

    # ---------------------------------------------------------------- submission

    def waiting(self) -> int:
        """Jobs waiting to run here or to be placed: queued, being offered to a peer or
        backing off before another offer, or placed in a wasm worker behind another job."""
        return len(self.queue) + len(self._aside) + len(self._prefetched)

    def _admit_check(self, extra: int = 1) -> None:
        if not self.accepting:
            self.metrics.admission_rejections.labels("shutting_down").inc()
            raise Unavailable(
                f"agent {self.node_id} is shutting down and accepts no new jobs; submit to another agent",
                reason="shutting_down",
            )
        if self.store.write_error is not None:
            raise self._store_unwritable()
        held = self.waiting() + extra - 1  # with the jobs of its batch accepted before it
        if held + 1 > self.settings.queue_limit:
            self.metrics.admission_rejections.labels("queue_full").inc()
            raise QueueFull(
                f"the queue at {self.node_id} holds {held} jobs (limit {self.settings.queue_limit}); "
                "retry after the time in Retry-After or submit to another agent",
                retry_after=self._retry_after(held),
            )

    def _store_unwritable(self) -> Unavailable:
        self.metrics.admission_rejections.labels("store_unwritable").inc()
        return Unavailable(
            f"agent {self.node_id} accepts no jobs while it cannot write its job store ({self.store.write_error}); "
            "free space in its data dir (or fix what the error names) and retry, or submit to another agent",
            reason="store_unwritable", retry_after=STORE_RETRY_S,
        )

    def _keep_if_durable(self, created: list[JobRecord]) -> set[str]:
        """After a failed write, forget the new jobs that did not reach the disk, so that
        none is written later as if accepted. Returns their ids."""
        lost = {rec.id for rec in created if self.store.discard(rec.id)}
        for job_id in lost:
            self.active.pop(job_id, None)
        return lost

    async def _sync_retrying(self) -> None:
        """``store.sync()`` for background work: wait out a store that cannot be written
        (the flush loop reports it), instead of failing the task."""
        while True:
            try:
                await self.store.sync()
                return
            except StoreError:
                await trio.sleep(STORE_RETRY_S)

    def _retry_after(self, held: int) -> float:
        """When a queue holding ``held`` jobs will have room: their number over the rate
        jobs have ended at lately, 1 to 60 s.

        With no recent ending to go by, the jobs running say how slowly it drains: none
        has ended in the time the oldest has run, so at most that many end in that time.
        Until there is a second of either to go by (a burst into an idle agent: a few
        endings a moment apart, a worker still starting) the answer is 1 s, and by then
        there is: a fixed guess at a rate would be off a thousandfold for jobs of
        microseconds or of hours."""
        now = time.time()
        ran = now - min((run.started for run in self.running.values()), default=now)
        if max(ran, self._drain.measured_s(now)) < 1.0:
            return 1.0
        rate = self._drain.per_second(now)
        if rate > 0:
            return float(min(60, max(1, math.ceil(held / rate))))
        return float(min(60, max(1, math.ceil(held * ran / max(1, len(self.running))))))

    def tenant_usage(self, tenant: str) -> TenantUsage:
        """The tenant's unfinished jobs held here, plus what peers gossip for it."""
        jobs = queued = 0
        cpu = 0.0
        mem = gpu = 0
        for rec in self.active.values():
            if rec.tenant != tenant or rec.origin != self.node_id:
                continue
            jobs += 1
            queued += rec.state is JobState.QUEUED
            r = rec.spec.resources
            cpu += r.cpu
            mem += r.mem_mb
            gpu += r.gpu
        local = TenantUsage(jobs, queued, cpu, mem, gpu)
        return TenantUsage.sum([local, *self.peer_tenant_usage(tenant)])

    def peer_tenant_usage(self, tenant: str) -> list[TenantUsage]:
        if self.cluster is None:
            return []
        return [TenantUsage(int(u[0]), int(u[1]), float(u[2]), int(u[3]), int(u[4]))
                for u in self.cluster.tenant_usage(tenant)]

    def _accept(self, spec: JobSpec, now: float, auth: Any = None) -> tuple[JobRecord, bool]:
        """Admit ``spec`` and create its record (or find the existing one); stage it."""
        job_id = spec.id or new_job_id(self.node_id)
        # Usage is summed only where quotas exist: open mode has none to enforce.
        usage = self.tenant_usage(spec.tenant) if self.gate.registry is not None else None
        admitted = self.gate.admit(spec, auth, job_id=job_id, usage=usage, now=now, module=spec.module)
        if spec.id is not None or admitted.duplicate:
            existing = self.active.get(job_id) or self.store.get(job_id)
            if existing is not None and not admitted.open and existing.tenant != admitted.tenant:
                # Another tenant's job: neither its record nor the id is theirs to have.
                self.metrics.admission_rejections.labels("id_taken").inc()
                raise Conflict(f"job id {job_id!r} is taken; choose another id", reason="id_taken")
            if existing is not None:
                return existing, False
        # spec.id stays as the client sent it (None when the agent chose the id): a
        # signed spec is forwarded as signed, and each hop verifies that signature.
        if not admitted.open and spec.tenant != admitted.tenant:
            spec.tenant = admitted.tenant
        if spec.runtime == "wasm":
            assert spec.module_sha256 is not None
            if spec.module is not None:
                self.store.put_module(spec.module_sha256, spec.module)
                spec.module = None
            elif not self.store.has_module(spec.module_sha256):
                self.metrics.admission_rejections.labels("unknown_module").inc()
                raise AgentError(
                    f"module_sha256 {spec.module_sha256} names no module this agent holds; send 'module' with its bytes",
                    reason="unknown_module",
                )
        rec = JobRecord(id=job_id, spec=spec, origin=self.node_id, created_at=now, seq=self._next_seq(),
                        auth=admitted.auth.to_json() if admitted.auth is not None else None)
        rec.timeline.append({"state": JobState.SUBMITTED.value, "at": now, "node": self.node_id, "detail": ""})
        self.store.stage(rec, new=True)
        self.metrics.job_state("submitted", rec.runtime).inc()
        self._advance(rec, JobState.QUEUED, now, "accepted")
        never = self._never_runs(rec)
        if never is not None:
            # Ended now, in the same durable write: at the queue's head it ended the same
            # way, but only after the jobs ahead of it had started (hours, behind long ones).
            rec.result = JobResult(exit_code=None, reason=f"rejected: {never}")
            self._advance(rec, JobState.REJECTED, now, never)
            return rec, True
        self.active[rec.id] = rec
        return rec, True

    def _never_runs(self, rec: JobRecord) -> str | None:
        """Why no node this agent knows of could run ``rec`` even idle, or None. Most jobs
        fit this agent idle, which is looked at first and costs nothing."""
        from p2psched.placement.core import NODE_LABEL_PREFIX, JobRequest, never_fits

        spec = rec.spec
        r = spec.resources
        if r.gpu <= 0 and self.cpu_total >= r.cpu and self.mem_total_mb >= r.mem_mb and not (
                spec.labels and any(k.startswith(NODE_LABEL_PREFIX) for k in spec.labels)):
            return None  # only node.* labels ask something of a node
        peers = self.cluster.alive_states() if self.cluster is not None else []
        return never_fits(JobRequest.from_spec(rec.id, spec, hops=rec.hops),
                          [self.local_state(with_tenants=False), *peers])

    def _known(self, spec: JobSpec) -> bool:
        """Whether ``spec`` names a job this agent holds: submitting it again returns
        that job (once admission has checked who asks), full queue or not."""
        return spec.id is not None and (spec.id in self.active or self.store.get(spec.id) is not None)

    async def submit(self, spec: JobSpec, auth: Any = None) -> tuple[dict[str, Any], bool]:
        """Accept one job durably. Returns (record as JSON data, created)."""
        # A job this agent holds is answered here, wherever its id hashes now: the
        # home moves when members come and go, and asking the new one made it accept
        # the id anew, a second origin that ran the job again.
        # A job another agent is home to is that agent's to admit: this one's full queue
        # (or its drain) must not refuse it, nor a retry of it that the home holds.
        known = self._known(spec)
        home = None if known else self.home_of(spec.id)
        if home is not None:
            proxied = await self.submit_at_home(home, spec, auth)
            if proxied is not None:
                return proxied
        if not known:
            self._admit_check()
        rec, created = self._accept(spec, time.time(), auth)
        try:
            await self.store.sync()
        except StoreError:
            if self._keep_if_durable([rec] if created else []):
                raise self._store_unwritable() from None
        if created:
            self._enqueue(rec)
        return rec.as_dict(), created

    async def submit_many(
        self, specs: Iterable[JobSpec | AgentError | tuple[JobSpec, Any]],
    ) -> list[tuple[dict[str, Any], bool] | AgentError]:
        """Accept many jobs with one durable write; each gets its own record or error."""
        out: list[tuple[dict[str, Any], bool] | AgentError] = []
        created: list[JobRecord] = []
        now = time.time()
        for spec in specs:
            if isinstance(spec, AgentError):
                out.append(spec)
                continue
            spec, auth = spec if isinstance(spec, tuple) else (spec, None)
            try:
                # The jobs accepted so far in this batch are queued only once the batch is
                # durable: they count against the queue's bound all the same.
                known = self._known(spec)
                home = None if known else self.home_of(spec.id)  # as in submit
                proxied = await self.submit_at_home(home, spec, auth) if home is not None else None
                if proxied is not None:
                    out.append(proxied)
                    continue
                if not known:
                    self._admit_check(extra=1 + len(created))
                rec, new = self._accept(spec, now, auth)
            except AgentError as e:
                out.append(e)
                continue
            except StoreError as e:  # its module could not be written: this job only is refused
                out.append(Unavailable(f"{e}; the job was not accepted", reason="store_unwritable",
                                       retry_after=STORE_RETRY_S))
                continue
            except Exception as e:  # a bug, met by this job only: the jobs accepted before it still queue
                log.error("job %s not accepted", spec.id or "(no id given)", exc_info=e)
                out.append(AgentError(f"the agent failed to accept this job ({type(e).__name__}); this is a bug, "
                                      "and its log holds the traceback", reason="internal_error", status=500))
                continue
            if new:
                created.append(rec)
            out.append((rec.as_dict(), new))
        try:
            await self.store.sync()
        except StoreError:
            lost = self._keep_if_durable(created)
            error = self._store_unwritable()
            out = [error if isinstance(item, tuple) and item[1] and item[0]["id"] in lost else item for item in out]
            created = [rec for rec in created if rec.id not in lost]
        for rec in created:
            self._enqueue(rec)
        return out

    def _enqueue(self, rec: JobRecord) -> None:
        if rec.state.final:
            return  # rejected as it was accepted (_accept)
        if rec.wait_reason is None:  # the dispatcher says more once the job reaches the queue's head
            rec.wait_reason = IN_TURN
        self._aside.discard(rec.id)
        self.queue.push(rec)
        self._wake.set()
        self._vector_changed.set()

    # ---------------------------------------------------------------- queries

    def get(self, job_id: str, who: Principal | None = None) -> JobRecord:
        """``job_id``'s record. With ``who``, a job it may not see is answered as one that
        does not exist: another tenant learns nothing of it, not even that it exists (so
        no counter on the unsigned /metrics counts it either)."""
        rec = self.active.get(job_id) or self.store.get(job_id)
        if rec is not None and who is not None and not who.may_access(rec.tenant):
            rec = None
        if rec is None:
            origin = origin_of(job_id)
            hint = ""
            if origin and origin != self.node_id:
                hint = f"; its id says it was submitted to {origin}" + self._api_hint(origin)
            if self.settings.job_retention_h > 0:
                hint += f" (finished jobs are kept for {self.settings.job_retention_h:g} h after submission)"
            raise NotFound(f"no job {job_id!r} at agent {self.node_id}{hint}", reason="unknown_job")
        return rec

    def _api_hint(self, node_id: str) -> str:
        """Where to ask about a job of ``node_id``: its API address, as it gossips it."""
        state = self.cluster.state_of(node_id) if self.cluster is not None else None
        if state is None or not state.api:
            return ""
        return f"; ask that agent: --agent http://{state.api}"

    async def read(self, job_id: str) -> JobRecord:
        """``job_id``'s record once its state is on disk: no state is reported before it
        is durable, so a crash never takes back what a client was told."""
        rec = self.get(job_id)
        while not self.store.durable(rec.id):
            await self.store.sync()
            rec = self.get(job_id)
        return rec

    async def wait_final(self, job_id: str, timeout: float) -> JobRecord:
        rec = self.get(job_id)
        if rec.state.final or timeout <= 0:
            return await self.read(job_id)
        ev = self._waiters.setdefault(job_id, trio.Event())
        with trio.move_on_after(timeout):
            await ev.wait()
        return await self.read(job_id)

    def output(self, job_id: str) -> bytes:
        self._ended(job_id, "its output")
        data = self.store.output(job_id)
        return data if data is not None else b""

    def _ended(self, job_id: str, what: str) -> JobRecord:
        rec = self.get(job_id)
        if not rec.state.final:
            raise Conflict(
                f"job {job_id} is {rec.state.value}; {what} exists once it ends (?wait=SECONDS, or "
                f"`p2psched result --wait SECONDS`, waits for it)",
                reason="not_finished",
            )
        return rec

    async def artifact(self, job_id: str, name: str) -> tuple[bytes, str]:
        """The bytes of the artifact ``name`` of an ended job, and their sha256."""
        rec = self._ended(job_id, f"its artifact {name!r}")
        found = rec.result.artifacts if rec.result is not None else {}
        entry = found.get(name)
        if entry is None:
            if found:
                held = "its artifacts are " + ", ".join(repr(n) for n in sorted(found))
            elif rec.runtime == "wasm":
                held = "it has none: a wasm job can write no files (it has no preopened directory)"
            elif rec.spec.artifacts:
                held = ("it has none: none of the files its spec names in 'artifacts' was collected (the "
                        "record's result.warnings says why)")
            else:
                held = "it has none: list the files to keep in the spec's 'artifacts' (paths in its scratch dir)"
            raise NotFound(f"job {job_id} has no artifact {name!r}; {held}", reason="unknown_artifact")
        sha256 = str(entry.get("sha256", ""))
        data = await trio.to_thread.run_sync(self.store.artifact, job_id, sha256)
        if data is None:
            raise NotFound(f"job {job_id}'s artifact {name!r} is missing from {self.store.artifacts_dir(job_id)} "
                           f"at agent {self.node_id} (deleted by hand, or the data dir was restored without it); "
                           "run the job again to produce it", reason="artifact_missing")
        return data, sha256

    async def list_jobs(self, *, state: str | None, tenant: str | None, limit: int, cursor: int,
                        newest_first: bool = False, labels: Sequence[tuple[str, str]] = ()) -> list[JobRecord]:
        await self.store.sync()
        listing = functools.partial(self.store.list, state=state, tenant=tenant, limit=limit, after_seq=cursor,
                                    newest_first=newest_first, labels=labels)
        return await trio.to_thread.run_sync(listing) if labels else listing()

    async def job_counts(self, tenant: str | None, labels: Sequence[tuple[str, str]] = ()) -> dict[str, int]:
        """Stored jobs by state, every state present (0 where none)."""
        await self.store.sync()
        found = await trio.to_thread.run_sync(self.store.count_by_state, tenant, labels)
        return {s.value: int(found.get(s.value, 0)) for s in JobState}

    # ---------------------------------------------------------------- cancel

    async def cancel(self, job_id: str) -> JobRecord:
        (outcome,) = await self.cancel_many([job_id])
        if isinstance(outcome, AgentError):
            raise outcome
        return outcome

    async def cancel_many(self, job_ids: Sequence[str]) -> list[JobRecord | AgentError]:
        """Cancel each job; one record (once it has ended) or error per id, in order.

        Every job that has not started is cancelled before the first await, so none of
        them starts in a slot that a stopped job frees, and their endings share one
        store write. Running jobs are stopped here, and jobs running at other agents
        are followed there, at most CANCEL_CONCURRENCY at a time; each answer waits
        up to CANCEL_WAIT_S for its job to end."""
        out: list[JobRecord | AgentError | None] = [None] * len(job_ids)
        stopping: list[int] = []  # running here: stopped, then waited for
        elsewhere: list[int] = []  # running at another agent: followed there
        now = time.time()
        for i, job_id in enumerate(job_ids):
            try:
                rec = self.get(job_id)
            except AgentError as e:
                out[i] = e
                continue
            if rec.state.final:
                out[i] = Conflict(f"job {job_id} already ended ({rec.state.value}); there is nothing to cancel",
                                  reason="already_final")
            elif job_id in self.running or job_id in self._prefetched:
                stopping.append(i)
            elif rec.state in (JobState.PLACED, JobState.RUNNING) and rec.executor not in (None, self.node_id):
                elsewhere.append(i)
            else:
                self.queue.remove(job_id)
                rec.result = JobResult(exit_code=None, reason="cancelled")
                self._advance(rec, JobState.CANCELLED, now, "cancelled before it ran")
                if rec.origin != self.node_id:
                    self._owe_result(rec)
                out[i] = rec
        # Those waiting in a wasm worker behind another job end before the job ahead of them does.
        for i in sorted(stopping, key=lambda i: job_ids[i] not in self._prefetched):
            run = self._prefetched.get(job_ids[i]) or self.running.get(job_ids[i])
            if run is not None:  # a job may be named twice
                self._cancel_running(run, "cancelled")
        await self.store.sync()
        deadline = trio.current_time() + CANCEL_WAIT_S
        limiter = trio.CapacityLimiter(CANCEL_CONCURRENCY)
        unwritable: list[StoreError] = []

        async def settle(i: int, remote: bool) -> None:
            async with limiter:
                try:
                    if remote:
                        out[i] = await self.cancel_remote(self.get(job_ids[i]))
                    else:
                        out[i] = await self.wait_final(job_ids[i], max(0.0, deadline - trio.current_time()))
                except AgentError as e:
                    out[i] = e
                except StoreError as e:  # the ending cannot be made durable: the caller is told, as for one job
                    unwritable.append(e)

        async with trio.open_nursery() as nursery:
            for i in stopping:
                nursery.start_soon(settle, i, False)
            for i in elsewhere:
                nursery.start_soon(settle, i, True)
        if unwritable:
            raise unwritable[0]
        return cast("list[JobRecord | AgentError]", out)

    def unfinished_labelled(self, labels: Sequence[tuple[str, str]], tenant: str | None,
                            limit: int) -> tuple[list[str], int]:
        """Up to ``limit`` ids of this agent's unfinished jobs that carry every label
        (of ``tenant``, or of any tenant with None), those that have not started first
        (queued, or waiting in a wasm worker here) and each group oldest first; and
        how many match in all."""
        found = [rec for rec in self.active.values()
                 if not rec.state.final and (tenant is None or rec.tenant == tenant)
                 and all(rec.spec.labels.get(k) == v for k, v in labels)]
        found.sort(key=lambda rec: (rec.state is JobState.RUNNING or (
            rec.state is JobState.PLACED and rec.executor not in (None, self.node_id)), rec.seq))
        return [rec.id for rec in found[:limit]], len(found)

    def _cancel_running(self, run: Running, why: str) -> None:
        if run.cancel_reason is None:
            run.cancel_reason = why
        if run.record.runtime == "wasm" and self._wasm is not None:
            self._wasm.cancel(run.record.id)
        else:
            run.scope.cancel()

    # ---------------------------------------------------------------- resources

    def _load(self) -> float:
        # The 1-minute load average moves slowly; reading it once a second is plenty.
        now = time.monotonic()
        if now - self._load_at > 1.0:
            self._load_at = now
            try:
                self._load_value = os.getloadavg()[0] / max(self.cpu_total, 1.0)
            except OSError:
                self._load_value = 0.0
        return self._load_value

    _load_at = 0.0
    _load_value = 0.0

    def vector(self) -> ResourceVector:
        load = self._load()
        return ResourceVector(
            cpu_total=self.cpu_total, cpu_free=max(0.0, self.cpu_total - self.cpu_used),
            mem_total_mb=self.mem_total_mb, mem_free_mb=max(0, self.mem_total_mb - self.mem_used_mb),
            queue_len=self.waiting(), running=len(self.running), load=load,
            draining=not self.accepting or self.store.write_error is not None,  # peers offer it nothing
            impaired=self.health.impaired,
            gpu_free=self.gpus.free_by_type() if self.gpus is not None else {},
            gpu_total=self.gpus.total_by_type() if self.gpus is not None else {},
        )

    def _fits_now(self, spec: JobSpec) -> bool:
        r = spec.resources
        if r.gpu > 0 and (self.gpus is None or not self.gpus.can_fit(r.gpu, r.gpu_type)):
            return False
        return self.cpu_used + r.cpu <= self.cpu_total + 1e-9 and self.mem_used_mb + r.mem_mb <= self.mem_total_mb

    # ---------------------------------------------------------------- cluster

    async def _start_cluster(self, nursery: trio.Nursery) -> None:
        """Start the transfer service, then membership (which gossips our transfer address)."""
        tls = None
        if self.settings.tls_dir is not None:
            from p2psched.security.tls import NodeTLS, TLSSetupError

            try:
                tls = NodeTLS.from_dir(self.settings.tls_dir, self.node_id)
            except (TLSSetupError, OSError) as e:
                raise StartupError(f"--tls-dir {self.settings.tls_dir}: {e}") from None
        if tls is None and not self.settings.insecure:
            log.warning("no --tls-dir: this agent neither forwards jobs nor accepts forwarded ones. Create a "
                        "cluster CA (p2psched ca init) and node certificates (p2psched cert issue), or pass "
                        "--insecure on a trusted network")
        else:
            if tls is None:
                log.warning("INSECURE: jobs travel between agents over plain TCP without authentication "
                            "(--insecure); use --tls-dir outside a trusted test network")
            from p2psched.transfer.service import TransferService

            self.transfer = TransferService(parse_hostport(self.settings.transfer), self.handle_transfer,
                                            node_id=self.node_id, tls=tls)
            with listening("--transfer", self.settings.transfer):
                await nursery.start(self.transfer.serve)
        await self._start_membership(nursery)

    async def _start_membership(self, nursery: trio.Nursery) -> None:
        from p2psched.agent.cluster import ClusterView
        from p2psched.membership.keyring import KeyringError
        from p2psched.membership.service import MembershipService
        from p2psched.membership.settings import MembershipSettings

        st = self.settings
        if st.gossip_key is None and not st.insecure:
            log.warning("no --gossip-key: running standalone, outside any cluster. To form one, create a key with "
                        "`p2psched keygen --gossip -o gossip.key` and pass --gossip-key gossip.key to every agent "
                        "(or --insecure on a trusted test network)")
            return
        gossip_host, gossip_port = parse_hostport(st.gossip)
        try:
            defaults: dict[str, Any] = {}
            if self.topology is not None:
                # Half of each gossip round stays on our leaf: cross-spine gossip halves
                # for ~0.3 extra rounds of dissemination (docs/scheduling.md measures it).
                defaults["gossip_same_group_fraction"] = 0.5
            ms = MembershipSettings(**{
                **defaults, **st.membership, "cluster_name": st.cluster_name, "join": list(st.join),
                "dns_names": list(st.join_dns), "mdns": not st.no_mdns,
                "advertise": f"{st.advertise}:{gossip_port}" if st.advertise else None,
                "key_file": st.gossip_key, "insecure": st.insecure,
            })
        except ValueError as e:
            raise StartupError(f"membership settings: {e}") from None
        topo = self.topology
        group_of = (lambda node_id: topo.locate(node_id).leaf) if topo is not None else None
        try:
            self.membership = MembershipService(ms, self.node_id, (gossip_host, gossip_port), self.local_state(),
                                                self.registry, group_of=group_of)
        except KeyringError as e:
            raise StartupError(f"--gossip-key: {e}") from None
        with listening("--gossip", st.gossip):
            await nursery.start(self.membership.run)
        self.cluster = ClusterView(self.membership, self.node_id, time.monotonic)
        events = self.membership.subscribe()
        nursery.start_soon(self._membership_events, events)
        nursery.start_soon(self._publish_loop)
        nursery.start_soon(self._orphan_loop)

    async def _membership_events(self, events: Any) -> None:
        async for ev in events:
            if ev.kind in ("dead", "left"):
                self.on_member_down(ev.node_id, "was declared dead" if ev.kind == "dead" else "left the cluster")
            if ev.kind == "left":
                if self._in_doubt:
                    self.forget_doubts(ev.node_id)
                self._cancels_owed.pop(ev.node_id, None)  # it stopped its jobs as it left
            if ev.kind in ("joined", "alive") and self._cancels_owed.get(ev.node_id):
                self.resend_cancels(ev.node_id)
            if ev.kind in ("joined", "alive") and self.restarted_runs:
                for job_id, (node, entry) in list(self.restarted_runs.items()):
                    if node == ev.node_id:  # taken as the attempt, or stopped if placed again meanwhile
                        del self.restarted_runs[job_id]
                        self._stop_stale_attempt(self.active.get(job_id) or self.store.get(job_id), entry)
            if ev.kind in ("joined", "alive", "updated") and (len(self.queue) or self._prefetched):
                self._wake.set()

    async def _publish_loop(self) -> None:
        """Gossip our vector when it changed; the membership core coalesces and rate-limits.

        While jobs are here the vector is sampled every PUBLISH_INTERVAL_S; an agent
        without jobs sleeps until a job is queued or starts (``_vector_changed``), or
        for IDLE_PUBLISH_S to pass on a new load average."""
        last = None
        while True:
            if not (self.active or self.running or len(self.queue)):
                with trio.move_on_after(IDLE_PUBLISH_S):
                    await self._vector_changed.wait()
            self._vector_changed = trio.Event()
            await trio.sleep(PUBLISH_INTERVAL_S)
            state = self.local_state()
            key = (state.vector.to_wire(), state.tenants, state.position, state.labels)
            if key != last and self.membership is not None:
                last = key
                self.membership.update_local_state(state)

    async def _orphan_loop(self) -> None:
        """Jobs placed on a peer that membership no longer knows (it died while we were
        down, say) would wait forever for a result: place them again."""
        started = trio.current_time()
        while True:
            if not self.active:
                await self._wake.wait()  # set, with the dispatcher's, whenever a job is queued
            await trio.sleep(ORPHAN_CHECK_S)
            if trio.current_time() - started < ORPHAN_GRACE_S or self.cluster is None:
                continue
            for rec in list(self.active.values()):
                if (rec.origin == self.node_id and rec.executor not in (None, self.node_id)
                        and rec.state in (JobState.PLACED, JobState.RUNNING)
                        and not self.cluster.is_member(rec.executor)):
                    self.on_member_down(rec.executor, "is not in the cluster")

    # ---------------------------------------------------------------- dispatch

    async def _flush_loop(self) -> None:
        # Woken by staging, not by a timer: an idle agent then wakes once a second
        # (for buffered log lines) instead of twenty times.
        while True:
            with trio.move_on_after(LOG_FLUSH_IDLE_S):
                await self.store.wait_dirty()
                await trio.sleep(FLUSH_INTERVAL_S)  # let a group commit's worth gather
            logs.flush()
            if self.store.dirty:
                await self._flush_once()
            if self.store.files_removed:
                await self._rewrite_store()

    async def _prune_loop(self) -> None:
        """Delete finished jobs older than the retention time, and modules no job used
        for as long, a few times per period (at most every minute), so that the store,
        outputs and modules do not grow for good."""
        retention_s = self.settings.job_retention_h * 3600
        while True:
            cutoff = time.time() - retention_s
            try:
                pruned = await self.store.prune(cutoff)
            except StoreError as e:
                log.warning("%s; trying again later", e)
            else:
                if pruned:
                    self.metrics.jobs_pruned.inc(pruned)
                    log.info("deleted %d finished jobs submitted more than %g h ago", pruned,
                             self.settings.job_retention_h)
            # Modules (and their compiled copies) that no job used for as long.
            candidates = await trio.to_thread.run_sync(self.store.unused_modules, cutoff, self.data_dir / "compiled")
            in_use = {rec.spec.module_sha256 for rec in self.active.values() if rec.spec.module_sha256}
            if modules := self.store.prune_modules(candidates, in_use, cutoff):
                log.info("deleted %d modules no job used for %g h", modules, self.settings.job_retention_h)
            await trio.sleep(min(60.0, max(0.5, retention_s / 4)))

    async def _flush_once(self) -> None:
        """One flush; while the store cannot be written, say so (every minute) and try
        again each STORE_RETRY_S. Peers see this agent as draining meanwhile."""
        failing = self.store.write_error is not None
        try:
            await self.store.sync()
        except StoreError as e:
            now = trio.current_time()
            if not failing or now - self._store_error_logged >= 60:
                log.error("%s; jobs are refused, and job states wait in memory, until a write succeeds", e)
                self._store_error_logged = now
            if not failing:
                self._vector_changed.set()
            for ev in self._awaiting_durable:
                ev.set()  # their clients learn now that the end cannot be written, not after their wait
            await trio.sleep(STORE_RETRY_S)
            return
        if failing:
            log.warning("the job store %s is writable again; accepting jobs", self.store.path)
            self._vector_changed.set()

    async def _rewrite_store(self) -> None:
        """jobs.db was removed (a tmp cleaner, an operator) while this agent held it open:
        write it again from what the agent holds, or a restart would find no job."""
        try:
            await self.store.rewrite_files()
        except StoreError as e:
            now = trio.current_time()
            if now - self._store_error_logged >= 60:
                log.error("%s; jobs are refused until it is written", e)
                self._store_error_logged = now
            await trio.sleep(STORE_RETRY_S)
            return
        log.error("the job store %s was removed while the agent ran; written again from the agent's open copy, "
                  "with every job. Keep the data dir out of tmp cleaners, and stop the agent before moving its "
                  "files", self.store.path)

    def local_state(self, *, with_tenants: bool = True) -> NodeState:
        """This agent as peers see it. Placement skips the per-tenant usage: it is O(jobs)."""
        return NodeState(
            node_id=self.node_id, vector=self.vector(), agent_version=__version__, api=self.advertised_api(),
            transfer=self.advertised_transfer(), labels=self.node_labels(), position=self.position(),
            node_pubkey=self.gate.node_pubkey, measurement=self.gate.measurement,
            # Only quotas read tenant usage, and only a tenant registry has quotas.
            tenants=self._tenant_usage_wire() if with_tenants and self.gate.registry is not None else {},
        )

    def _tenant_usage_wire(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for rec in self.active.values():
            if rec.origin != self.node_id:
                continue
            u = out.setdefault(rec.tenant, [0, 0, 0.0, 0, 0])
            r = rec.spec.resources
            u[0] += 1
            u[1] += rec.state is JobState.QUEUED
            u[2] += r.cpu
            u[3] += r.mem_mb
            u[4] += r.gpu
        return out

    def node_labels(self) -> dict[str, str]:
        labels = dict(self.gpu_inventory.labels()) if self.gpu_inventory is not None else {}
        return {**self.settings.labels, **labels}  # the operator's --label ones; gpu.* are the inventory's

    def position(self) -> str:
        if self.topology is None:
            return ""
        return self.topology.locate(self.node_id).host or ""

    def _advertise_host(self, bind: str) -> str:
        host, port = parse_hostport(bind)
        if self.settings.advertise:
            host = self.settings.advertise
        elif host in ("0.0.0.0", "::", ""):
            host = _primary_ip()
        return f"{host}:{port}"

    @functools.cached_property
    def _advertised(self) -> tuple[str, str]:
        return self._advertise_host(self.settings.api), self._advertise_host(self.settings.transfer)

    def advertised_api(self) -> str:
        return self._advertised[0]

    def advertised_transfer(self) -> str:
        return self._advertised[1]

    def _place(self, rec: JobRecord) -> Any:
        from p2psched.placement.core import Forward, JobRequest, Reject, RunHere, fits_now, place

        t0 = time.perf_counter()
        failed_here = bool(self._host_failures) and rec.id in self._host_failures
        decision = None if failed_here else self._plain_decision(rec)
        if decision is not None:
            self.placement_metrics.observe(decision, time.perf_counter() - t0)
            return decision
        req = JobRequest.from_spec(rec.id, rec.spec, hops=rec.hops)
        peers = self.cluster.alive_states() if self.cluster is not None else []
        local = self.local_state(with_tenants=False)
        if local.vector.impaired and rec.origin != self.node_id:
            # Only the origin forwards: a job taken for another origin tries here again.
            local = replace(local, vector=replace(local.vector, impaired=()))

        def decide(here: NodeState) -> Any:
            made, self.placement_state = place(req, here, peers, self.topology, rng=self.rng,
                                               policy=self.settings.placement_policy, state=self.placement_state,
                                               settings=self.placement_settings)
            return made

        if failed_here and rec.origin == self.node_id and peers:
            # This host could not run it: a peer that fits now takes it; with none, it
            # runs here again.
            decision = self._place_elsewhere(rec, req, local, peers)
        avoid = self._avoid.get(rec.id) if self._avoid else None
        if decision is None and avoid is not None:
            # A peer gave it back (its host could not run it): pass that one over,
            # unless nobody else could ever run the job.
            without = [p for p in peers if p.node_id != avoid]
            made, self.placement_state = place(req, local, without, self.topology, rng=self.rng,
                                               policy=self.settings.placement_policy, state=self.placement_state,
                                               settings=self.placement_settings)
            decision = None if isinstance(made, Reject) else made
        if decision is None:
            decision = decide(local)
            if (isinstance(decision, Forward) and (rec.origin != self.node_id or self.transfer is None)
                    and not local.vector.draining and fits_now(req, local)):
                # A GPU job may find a tighter fit on a peer, but only origins forward,
                # and only with forwarding on: otherwise it runs here when it fits.
                decision = RunHere()
        self.placement_metrics.observe(decision, time.perf_counter() - t0)
        return decision

    def _place_elsewhere(self, rec: JobRecord, req: Any = None, local: NodeState | None = None,
                         peers: list[NodeState] | None = None) -> Any:
        """The peer that would take ``rec`` now were this agent draining (a Forward),
        or None when no peer has room for it."""
        from p2psched.placement.core import Forward, JobRequest, place

        if peers is None:
            peers = self.cluster.alive_states() if self.cluster is not None else []
        if not peers:
            return None
        req = req or JobRequest.from_spec(rec.id, rec.spec, hops=rec.hops)
        local = local or self.local_state(with_tenants=False)
        made, self.placement_state = place(req, replace(local, vector=replace(local.vector, draining=True)), peers,
                                           self.topology, rng=self.rng, policy=self.settings.placement_policy,
                                           state=self.placement_state, settings=self.placement_settings)
        return made if isinstance(made, Forward) else None

    def _plain_decision(self, rec: JobRecord) -> Any:
        """The decision ``place()`` would make, when it is plain without the cluster's view.

        A CPU job (no GPU, no node labels) that fits here now runs here under ``p2p``
        and ``local-first`` whatever the peers say; one that would fit this agent idle
        but not now, with no peer known, waits here. Both are the common cases under
        load, and building the node and peer states for them cost more than a noop job.
        None: ask ``place()``.
        """
        from p2psched.placement.core import DEFAULT_TTL, NODE_LABEL_PREFIX, NO_PEERS_FULL, QueueHere, RunHere

        spec = rec.spec
        r = spec.resources
        if r.gpu > 0 or any(k.startswith(NODE_LABEL_PREFIX) for k in spec.labels):
            return None
        if self.health.impaired and spec.runtime in self.health.impaired:
            return None  # a peer should run it, if one can
        fits_now = (max(0.0, self.cpu_total - self.cpu_used) >= r.cpu
                    and max(0, self.mem_total_mb - self.mem_used_mb) >= r.mem_mb)
        if fits_now:
            if self.accepting and self.settings.placement_policy in ("p2p", "local-first"):
                return RunHere()
            return None
        fits_idle = self.cpu_total >= r.cpu and self.mem_total_mb >= r.mem_mb
        if fits_idle and rec.hops < DEFAULT_TTL and (self.cluster is None or not self.cluster.has_alive_peer()):
            return QueueHere(NO_PEERS_FULL)
        return None

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._dispatch()

    def _dispatch(self) -> None:
        """Start, forward or hold queued jobs while the queue's head can go somewhere.

        The dispatch loop calls it when woken; the wasm workers call it after each
        batch of results, so a freed slot takes its next job without a task switch."""
        if self._dispatching:
            return  # called back from within a pass (a wasm job taken back); that pass goes on
        self._dispatching = True
        try:
            # The pass's wasm jobs go to each worker in one write when it ends.
            with self._wasm.holding() if self._wasm is not None else contextlib.nullcontext():
                self._dispatch_pass()
        finally:
            self._dispatching = False

    def _dispatch_pass(self) -> None:
        if self._wake.is_set():  # this pass serves the wake-up
            self._wake = trio.Event()
        if self._prefetched:
            self._review_prefetched()
        # Jobs of a runtime impaired here that no peer can take now wait, but not in
        # front of the jobs of other runtimes behind them: those are looked at too
        # (up to IMPAIRED_LOOKAHEAD of the waiting ones are set aside, then put back
        # where they stood, so that they still go first once a peer has room).
        # Likewise a job of another origin that waits for room here holds this
        # agent's capacity, but not the jobs behind it that peers can take.
        blocked: set[str] = set()
        set_aside: list[JobRecord] = []
        try:
            self._dispatch_queue(blocked, set_aside)
        finally:
            for rec in reversed(set_aside):
                self.queue.push_front(rec)

    def _dispatch_queue(self, blocked: set[str], set_aside: list[JobRecord]) -> None:
        from p2psched.placement.core import Forward, Reject, RunHere

        assert self._nursery is not None
        held: JobRecord | None = None  # a job of another origin that has first claim on room here

        def set_aside_now(rec: JobRecord) -> bool:
            if len(set_aside) >= IMPAIRED_LOOKAHEAD:
                return False
            self.queue.pop()
            set_aside.append(rec)
            return True

        while True:
            rec = self.queue.peek()
            if rec is None:
                break
            if rec.runtime in blocked:
                if not set_aside_now(rec):
                    break
                continue
            decision = self._place(rec)
            if isinstance(decision, RunHere) and held is not None:
                # It fits here, but the room it would take is the held job's first:
                # a peer with room takes it, or it waits.
                decision = self._place_elsewhere(rec) if rec.origin == self.node_id else None
                if decision is None:
                    rec.wait_reason = f"waiting for capacity here, behind {held.id} of origin {held.origin}"
                    if not set_aside_now(rec):
                        break
                    continue
            if isinstance(decision, RunHere):
                self.queue.pop()
                rec.wait_reason = None
                self._reserve_and_start(rec)
            elif isinstance(decision, Reject) and rec.origin != self.node_id and self.transfer is not None:
                # A job this agent accepted for another origin that it can never run now
                # (it restarted with less): only the origin may end it or place it again,
                # and it waits on this agent for the result. Give it back.
                self.queue.pop()
                why = f"this agent can never run it now: {decision.reason}"
                rec.wait_reason = f"{why}; giving it back to its origin {rec.origin}"
                self._handing_back.add(rec.id)
                self._nursery.start_soon(self._hand_back, rec, why, GIVE_BACK_RETRY_S)
            elif isinstance(decision, Reject):
                self.queue.pop()
                rec.result = JobResult(exit_code=None, reason=f"rejected: {decision.reason}")
                self._advance(rec, JobState.REJECTED, time.time(), decision.reason)
            elif rec.origin != self.node_id:
                # Only the origin forwards: a job taken for another origin runs here
                # (or goes back to its origin's control if this agent is lost). It
                # keeps first claim on room here; jobs behind it that a peer can
                # take are forwarded meanwhile.
                if isinstance(decision, Forward):
                    rec.wait_reason = f"waiting for capacity here; it was accepted for its origin {rec.origin}"
                elif held is None and self._prefetch_wasm(rec):
                    self.queue.pop()
                    continue
                else:
                    rec.wait_reason = decision.reason
                held = held or rec
                if not set_aside_now(rec):
                    break
            elif isinstance(decision, Forward):
                if self.transfer is None:
                    rec.wait_reason = ("a peer could run it but forwarding is off: give --tls-dir with cluster "
                                       "certificates, or --insecure")
                    break
                self.queue.pop()
                self._aside.add(rec.id)
                rec.wait_reason = f"offering to {decision.node_id}"
                if self.cluster is not None:  # so that the next job of this pass sees the peer as taken
                    self._hold_on(decision.node_id, rec)
                self._nursery.start_soon(self._forward, rec, decision)
            elif held is None and self._prefetch_wasm(rec):
                self.queue.pop()
            else:
                rec.wait_reason = decision.reason
                if rec.runtime in self.health.impaired and set_aside_now(rec):
                    blocked.add(rec.runtime)
                    continue
                break

    async def _replace_loop(self) -> None:
        """Look at the queue, and the jobs waiting in workers, again now and then:
        gossip may show free peers."""
        while True:
            if not (len(self.queue) or self._prefetched):
                await self._wake.wait()  # set, with the dispatcher's, whenever a job is queued
            await trio.sleep(0.5)
            if len(self.queue) or self._prefetched:
                self._wake.set()

    def _reserve_and_start(self, rec: JobRecord, *, already_placed: bool = False) -> None:
        assert self._nursery is not None
        now = time.time()
        if not already_placed:
            self._place_here(rec, now, "runs here")
        run = Running(rec, now)
        self._take_slot(run)
        if rec.runtime == "wasm":
            self._start_wasm(run)
        else:
            self._nursery.start_soon(self._run_job, run)

    def _place_here(self, rec: JobRecord, now: float, detail: str) -> None:
        rec.executor = self.node_id
        rec.route = [self.node_id]
        rec.cost = 0.0
        rec.attempts += 1
        self._advance(rec, JobState.PLACED, now, detail)

    def _take_slot(self, run: Running) -> None:
        """Reserve what ``run``'s job asks for; ``_release`` gives it back."""
        r = run.record.spec.resources
        self.cpu_used += r.cpu
        self.mem_used_mb += r.mem_mb
        if r.gpu > 0 and self.gpus is not None:
            run.gpu_grant = self.gpus.reserve(run.record.id, r.gpu, r.gpu_type)
        self.running[run.record.id] = run
        self._slots_changed()

    def _slots_changed(self) -> None:
        """Slots were taken or given back: the vector is published again, and the GPU
        inventory's gauges are set (slots_in_use and the running gauge are read at scrape time)."""
        self._vector_changed.set()
        if self.gpus is not None and self.gpu_inventory.gpus:
            self.gpu_metrics.update(self.gpus, self.gpu_inventory, usage=self._gpu_usage)

    def _sandbox_request(self, rec: JobRecord, grant: Any = None) -> SandboxRequest:
        from p2psched.gpu.devices import no_gpu_env

        s = rec.spec
        return SandboxRequest.for_job(
            rec.id, s, self.store.module_path(s.module_sha256) if s.module_sha256 else None,
            # A job without granted slots sees no GPU at all, whatever the host has.
            gpu_env=dict(grant.env) if grant is not None else no_gpu_env(),
            gpu_devices=list(grant.devices) if grant is not None else [],
        )

    def _wasm_workers(self) -> WasmWorkers:
        if self._wasm is None:
            from p2psched.sandbox.wasm_workers import WasmWorkers

            assert self._nursery is not None and self.gate.node_key is not None
            self._wasm = WasmWorkers(
                self._nursery, max(1, int(self.cpu_total)), cache_dir=self.data_dir / "compiled",
                key_dir=self.gate.node_key.data_dir, node_pubkey=self.gate.node_pubkey, node_id=self.node_id,
                measurement=self.gate.measurement, after_results=self._after_wasm_results,
                on_start=self._on_wasm_start, on_output=self._on_wasm_output,
            )
        return self._wasm

    def _start_wasm(self, run: Running, *, behind: str | None = None) -> None:
        """Hand a wasm job to a worker process; it ends in ``_end_run`` on the trio thread.

        ``behind``: the job goes next on the worker running that job (see
        ``_prefetch_wasm``) and starts, in ``_on_wasm_start``, when that one ends.
        No task per job: a task, its cancel scope and an Event cost more than a noop
        job. The workers are served in the agent's nursery; shutdown waits for
        ``self.running`` to empty before it stops them.
        """
        workers = self._wasm_workers()
        rec = run.record
        if behind is None:
            run.started = self._begin_run(run)
        sha = rec.spec.module_sha256

        def done(result: SandboxResult | None, error: str | None) -> None:
            never_started = self._prefetched.pop(rec.id, None) is not None
            if never_started:
                # Its worker ended first, the agent took it back, or it was cancelled: the
                # attempt its placement counted is undone, since attempts are runs, and a
                # job taken back a few times must not use up its budget.
                rec.attempts -= 1
            if never_started and run.cancel_reason != "cancelled":
                # The placement is undone too: it runs again.
                self._advance(rec, JobState.QUEUED, time.time(),
                              f"taken back before it started ({error or run.cancel_reason}); it will run again")
                rec.wait_reason = IN_TURN  # it waits in the queue again, not in a worker
                self.queue.push_front(rec)
                self._wake.set()
                return
            if result is None:
                self._host_fault(rec.runtime, error or "unknown error")
                if self._retry_later(run, error or "unknown error"):
                    return
                log.error("job %s: sandbox error: %s", rec.id, error)
                result = SandboxResult(exit_code=None, reason=f"sandbox_error: {error}")
            elif workers.signing_pubkey not in (None, self.gate.node_pubkey):
                self.gate.node_pubkey = workers.signing_pubkey  # node.pub did not match the key
            self._release(run)
            self._wasm_ended.append((run, result, run.started))

        # A wasm job sees no GPU (wasm has no way to reach one), so the worker makes
        # its request from the spec, which it needs for the report anyway.
        workers.submit(rec.id, rec.spec, self.store.module_path(sha) if sha else None, done, behind=behind)

    def _prefetch_wasm(self, rec: JobRecord) -> bool:
        """Give a wasm job that must wait for a slot to a worker, to run next there.

        Between a job's end in a worker and the next job's arrival there, the agent
        records the result and dispatches: for short jobs the workers would wait on
        that most of the time. So a job that would wait here anyway, and asks for no
        more than the last job given to a worker whose running job started less than
        PREFETCH_PATIENCE_S ago (it may be short), is placed behind that job: it
        starts, taking the slot of the job before it, when the jobs before it end,
        without a round trip. With peers, only a job that placement would hold here
        anyway (no peer has room for it now) waits in a worker, and it is taken back
        as soon as one has.
        At most WAITING_PER_WORKER wait in a worker. They are taken back to where they
        stood in the queue when they should not wait there (``_review_prefetched``),
        so priority, fair share and arrival order hold. False: no worker can take it.
        """
        if self._wasm is None or rec.runtime != "wasm" or not self.accepting:
            return False
        r = rec.spec.resources
        if r.gpu > 0:
            return False
        now = time.time()
        for head, job_id in self._wasm.tails(WAITING_PER_WORKER):
            runs = self.running.get(head)
            if runs is None or now - runs.started >= PREFETCH_PATIENCE_S:
                continue  # the job that worker runs may be long: behind it, this one could wait long
            ahead = self.running.get(job_id) or self._prefetched.get(job_id)
            if ahead is None:
                continue
            a = ahead.record.spec.resources
            if a.gpu == 0 and a.cpu >= r.cpu and a.mem_mb >= r.mem_mb:
                break
        else:
            return False
        self._place_here(rec, now, f"runs here next, after {job_id}")
        rec.wait_reason = f"{PREFETCHED_WAIT} {job_id} ends"
        run = Running(rec, now)
        self._prefetched[rec.id] = run
        self._start_wasm(run, behind=job_id)
        return True

    def _on_wasm_start(self, job_id: str) -> None:
        """A worker started a job given to it behind another: it takes its slot now."""
        run = self._prefetched.pop(job_id, None)
        if run is None:
            return  # it was running already (jobs under one CPU share a worker)
        run.record.wait_reason = None
        self._take_slot(run)
        run.started = self._begin_run(run)

    def _peer_with_room(self, records: Iterable[JobRecord]) -> str | None:
        """A peer that could start one of ``records`` now (as this agent sees it), or None."""
        from p2psched.placement.core import DEFAULT_TTL, JobRequest, fits_now

        assert self.cluster is not None
        peers = [p for p in self.cluster.alive_states() if self._peer_trusted(p)]
        for rec in records:
            if rec.origin != self.node_id or rec.hops >= DEFAULT_TTL:
                continue  # only its origin forwards a job, and only within its TTL
            req = JobRequest.from_spec(rec.id, rec.spec, hops=rec.hops)
            for peer in peers:
                if rec.runtime not in peer.vector.impaired and fits_now(req, peer):
                    return peer.node_id
        return None

    def _take_back_prefetched(self, why: str) -> None:
        """Jobs waiting in workers go back to the queue, in the order they had there.

        Each is cancelled in its worker, which skips it; its ``done`` puts it back at
        the queue's head. Taken back last first, they stand as they stood before."""
        for run in reversed(list(self._prefetched.values())):
            self._cancel_running(run, f"taken back: {why}")

    def _review_prefetched(self) -> None:
        """Take back the jobs waiting in workers that should not wait there any more.

        - A job of higher priority than one waiting has arrived: it goes first.
        - Under ``fair``, a tenant with a job queued at a waiting job's priority has two
          fewer jobs waiting at that priority than another tenant: taking turns, the
          queue would have given it one of those places. (Jobs of one tenant that
          arrived alone fill the workers; another tenant's job then waits behind all
          of them, however long they run.) One fewer is fair: that tenant's turn came.
          See _tenant_skipped for when this is worth it.
        - A peer has room for it now (one freed a slot, or joined): placement may send
          it there.
        - A slot is free that a waiting job fits, and nothing queued would take it, or
          the job has waited PREFETCH_PATIENCE_S (the job ahead of it may run long).
          Under a stream of short jobs a slot that frees is refilled from the queue
          in the same pass, and the waiting job starts within a job's length anyway.
        Either way the queue decides again.
        """
        if self.cluster is not None and time.monotonic() - self._peer_room_looked >= PEER_ROOM_LOOK_S:
            self._peer_room_looked = time.monotonic()
            roomy = self._peer_with_room(run.record for run in self._prefetched.values())
            if roomy is not None:
                self._take_back_prefetched(f"{roomy} has room for it")
                return
        free_cpu, free_mem = self.cpu_total - self.cpu_used, self.mem_total_mb - self.mem_used_mb
        head = self.queue.peek()
        now = time.time()
        for run in self._prefetched.values():
            spec = run.record.spec
            if head is not None and head.spec.priority > spec.priority:
                self._take_back_prefetched(f"job {head.id} comes first")
                return
            if (free_cpu >= spec.resources.cpu and free_mem >= spec.resources.mem_mb
                    and (head is None or now - run.started >= PREFETCH_PATIENCE_S)):
                self._take_back_prefetched("a slot is free")
                return
        if head is not None and self.queue.policy == "fair":
            skipped = self._tenant_skipped(now)
            if skipped is not None:
                self._turn_given = skipped.id
                self._take_back_prefetched(f"tenant {skipped.tenant!r} takes its turn first")

    def _tenant_skipped(self, now: float) -> JobRecord | None:
        """The queued job of a tenant whose turn the jobs waiting in workers took (see
        _review_prefetched), if taking them back lets it take a worker's place: a wasm
        job, on a host whose wasm is not impaired, not taken back for before (so one
        that cannot follow them in a worker takes nothing back twice). Only once those
        jobs have waited PREFETCH_PATIENCE_S: behind short jobs the turn comes anyway,
        sooner than taking them back costs."""
        if "wasm" in self.health.impaired:
            return None
        waiting: dict[int, dict[str, int]] = {}
        since: dict[int, float] = {}
        for run in self._prefetched.values():
            spec = run.record.spec
            by_tenant = waiting.setdefault(spec.priority, {})
            by_tenant[spec.tenant] = by_tenant.get(spec.tenant, 0) + 1
            since[spec.priority] = min(since.get(spec.priority, now), run.started)
        for priority, by_tenant in waiting.items():
            most = max(by_tenant.values())
            if most < 2 or now - since[priority] < PREFETCH_PATIENCE_S:
                continue
            for first in self.queue.firsts_at(priority):
                if (by_tenant.get(first.tenant, 0) + 2 <= most and first.runtime == "wasm"
                        and first.id != self._turn_given):
                    return first
        return None

    def _after_wasm_results(self) -> None:
        """After a batch of wasm results: start the next jobs, then record the ended ones.

        In this order a worker runs its next job while the agent does the ended
        jobs' bookkeeping (result, transitions, log lines, store), instead of
        waiting for it."""
        try:
            self._dispatch()
        finally:
            ended, self._wasm_ended = self._wasm_ended, []
            for run, result, started in ended:
                try:
                    self._end_run(run, result, started)
                except Exception:  # a bug recording one job must not lose the others
                    log.exception("job %s: recording its end failed", run.record.id)

    async def _process_sandbox(self) -> Any:
        if self._processes is None:
            from p2psched.sandbox.process import ProcessSandbox

            # Made on the first process job, so agents that only run wasm pay nothing;
            # from then on a small pool of pre-built sandboxes serves jobs warm.
            assert self._nursery is not None
            self._processes = ProcessSandbox(warm=self.settings.process_warm_pool)
            await self._nursery.start(self._processes.serve)
        return self._processes

    async def _execute_process(self, run: Running, req: SandboxRequest) -> SandboxResult:
        sandbox = await self._process_sandbox()
        work = self.data_dir / "work" / req.job_id.replace(":", "_")
        try:
            with run.scope:
                return cast(SandboxResult, await sandbox.run(req, work))
            return SandboxResult(exit_code=None, reason="cancelled")
        finally:
            with contextlib.suppress(OSError):
                work.rmdir()  # empty once its sandbox is gone: one a job piled up in the data dir

    async def _run_job(self, run: Running) -> None:
        """A process job, from start to its end in ``_end_run``."""
        rec = run.record
        started = self._begin_run(run)
        try:
            # A process job can act on the world (files, network), so its attempt is
            # durable before it starts: after a crash the record says it may have run.
            # A wasm job has no effect outside its result, so it starts at once and
            # its running state reaches disk with the next flush, before its result.
            await self._sync_retrying()
            req = self._sandbox_request(rec, run.gpu_grant)
            req.live = run.live = self._live_output(run)
            result = await self._execute_process(run, req)
        except Exception as e:  # the host, or a sandbox bug: it must not take the agent down
            # (SandboxUnfit says no later try can help: a missing tool, a job without a command)
            transient = getattr(e, "transient", True)
            error = str(e) or type(e).__name__
            self._host_fault(rec.runtime, error, certain=not transient)
            # What no wait mends here, a peer may not lack: with one that could run
            # it (or an origin to give it back to), the job goes there now; else it
            # fails now, with the fix.
            elsewhere = rec.origin != self.node_id or self._peer_could_run(rec)
            if (transient or elsewhere) and self._retry_later(run, error, wait=transient):
                return
            log.exception("job %s: sandbox error", rec.id)
            result = SandboxResult(exit_code=None, reason=f"sandbox_error: {e}")
        except BaseException:  # the agent's nursery is closing: give back what the job held
            self._release(run)
            raise
        ended = time.time()
        digest = None
        if len(result.stdout) + len(result.stderr) > SIGN_IN_THREAD_BYTES:
            # The report hashes the output: 128 MiB of it held the event loop for a
            # third of a second, so a big one is signed in a thread (its record then
            # takes output_sha256 from the report, not from hashing it again).
            report = await trio.to_thread.run_sync(functools.partial(
                self.gate.attest, node_id=self.node_id, job_id=rec.id, spec=rec.spec, result=result,
                started_at=started, ended_at=ended))
            result.sandbox["attestation"] = report
            digest = report["output_sha256"]
        self._end_run(run, result, started, ended, output_sha256=digest)

    def _begin_run(self, run: Running) -> float:
        rec = run.record
        started = time.time()
        self.metrics.child(self.metrics.queue_seconds, rec.runtime).observe(max(0.0, started - rec.created_at))
        self._advance(rec, JobState.RUNNING, started, f"attempt {rec.attempts}")
        self._report_status(rec, rec.timeline[-1])
        return started

    def _release(self, run: Running) -> None:
        """Give back what ``_reserve_and_start`` took for ``run`` (once)."""
        rec = run.record
        if self.running.pop(rec.id, None) is None:
            return
        r = rec.spec.resources
        self.cpu_used -= r.cpu
        self.mem_used_mb -= r.mem_mb
        if self.gpus is not None:
            self.gpus.release(rec.id)
        self._slots_changed()
        self._wake.set()

    def _end_run(self, run: Running, result: SandboxResult, started: float, ended: float | None = None,
                 output_sha256: str | None = None) -> None:
        """``output_sha256``: the result's stdout's, where the agent has hashed it already."""
        rec = run.record
        self._release(run)
        if self.health.failing and not result.reason.startswith("sandbox_error"):
            self._host_ran(rec.runtime)
        ended = time.time() if ended is None else ended
        self.metrics.child(self.metrics.run_seconds, rec.runtime).observe(ended - started)
        if rec.state.final:
            # An earlier attempt's result arrived while this one ran: the first final
            # result stands, this one is recorded as a duplicate attempt.
            rec.duplicates.append({"executor": self.node_id, "attempt": rec.attempts, "reason": result.reason,
                                   "at": ended})
            self.store.stage(rec)
            return
        if run.cancel_reason == "shutdown":
            self._advance(rec, JobState.QUEUED, ended, "agent stopping: run interrupted; it will run again")
            return
        if run.cancel_reason == "cancelled":
            result.reason = "cancelled"
        # Its ending reaches disk with the next flush (FLUSH_INTERVAL_S), shared with the
        # endings around it; whoever asks first (a waiter, a read, a delivery) syncs.
        self._finish(rec, result, started, ended, output_sha256)

    def _finish(self, rec: JobRecord, res: SandboxResult, started: float, ended: float,
                output_sha256: str | None = None) -> None:
        out = res.stdout
        report = cast("dict[str, Any] | None", res.sandbox.pop("attestation", None))
        if report is None:
            report = self.gate.attest(node_id=self.node_id, job_id=rec.id, spec=rec.spec, result=res,
                                      started_at=started, ended_at=ended)
        # The report signed each artifact's sha256 already: the record names the same.
        digests = report.get("artifacts_sha256") or {}
        if digests.keys() != res.artifacts.keys():
            digests = {name: hashlib.sha256(data).hexdigest() for name, data in res.artifacts.items()}
        stdout, stdout_cut = record_text(out)
        stderr, stderr_cut = record_text(res.stderr)
        rec.result = JobResult(
            exit_code=res.exit_code, reason=res.reason, stdout=stdout, stderr=stderr,
            stdout_truncated=res.stdout_truncated, stdout_in_record_truncated=stdout_cut,
            # either cut, as before stderr_in_record_truncated said which (see JobResult)
            stderr_truncated=res.stderr_truncated or stderr_cut, stderr_in_record_truncated=stderr_cut,
            cpu_ms=res.cpu_ms, peak_mem_bytes=res.peak_mem_bytes,
            output_sha256=output_sha256 or hashlib.sha256(out).hexdigest(), output_bytes=len(out),
            limit_hit=res.limit_hit,
            signal=res.signal, warnings=list(res.warnings),
            artifacts={name: {"size": len(data), "sha256": digests[name]} for name, data in res.artifacts.items()},
            attestation=report,
        )
        state = state_for_reason(res.reason, res.exit_code)
        # stderr longer than the record holds is kept whole beside it (/output serves it)
        self.store.stage(rec, output=out, stderr=res.stderr if stderr_cut else None,
                         artifacts={digests[name]: data for name, data in res.artifacts.items()})
        self._advance(rec, state, ended, res.reason)
        if rec.origin != self.node_id:
            self._owe_result(rec)

    # ---------------------------------------------------------------- cluster views

    def self_view(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "address": self._advertise_host(self.settings.gossip),
            "api": self.advertised_api(), "transfer": self.advertised_transfer(),
            "state": "draining" if not self.accepting else "alive", "incarnation": 0, "age_s": 0.0,
            "vector": self.vector().as_dict(), "position": self.position(), "labels": self.node_labels(),
            "self": True,
            "node_pubkey": self.gate.node_pubkey, "measurement": self.gate.measurement,
            "agent_version": __version__, "runtimes": self.health.describe(trio.current_time()),
        }

    def peers_view(self) -> list[dict[str, Any]]:
        if self.cluster is None:
            return [self.self_view()]
        return self.cluster.members_view(self.self_view())

    def cluster_view(self) -> dict[str, Any]:
        members = self.peers_view()
        by_state: dict[str, int] = {}
        # GPU slots by type: slots of different types share hardware (a MIG-carved
        # GPU offers 1g and 3g slots from the same memory), so one sum would overcount.
        # gpu_declared counts those of them on GPUs declared with --gpus (the node's
        # gpu.declared label), which no hardware backs.
        total: dict[str, Any] = {"cpu": 0.0, "mem_mb": 0, "gpu": {}, "gpu_declared": {}}
        free: dict[str, Any] = {"cpu": 0.0, "mem_mb": 0, "gpu": {}, "gpu_declared": {}}
        for m in members:
            by_state[m["state"]] = by_state.get(m["state"], 0) + 1
            if m["state"] in ("alive", "draining"):
                v = m["vector"]
                total["cpu"] += v["cpu_total"]
                free["cpu"] += v["cpu_free"]
                total["mem_mb"] += v["mem_total_mb"]
                free["mem_mb"] += v["mem_free_mb"]
                sums = ["gpu", "gpu_declared"] if m.get("labels", {}).get("gpu.declared") == "true" else ["gpu"]
                for kind, n in v["gpu_total"].items():
                    for key in sums:
                        total[key][kind] = total[key].get(kind, 0) + n
                        free[key][kind] = free[key].get(kind, 0) + v["gpu_free"].get(kind, 0)
        return {"members": len(members), "by_state": by_state, "total": total, "free": free}

    async def drain(self, *, stop: bool = True) -> dict[str, Any]:
        """Stop admissions, hand queued jobs to peers, let running ones finish, then leave.

        Peers see the node as draining at once (the flag rides in the gossiped
        vector), so nobody places work here. Placement never runs a job on a
        draining agent, so the dispatcher offers every queued job to peers. Once
        nothing runs and nothing can be handed off, or after ``grace_s``, the agent
        leaves the cluster and stops. Queued jobs that no peer could take stay
        durably queued here and run when the agent comes back.
        """
        first = self.accepting
        self.accepting = False
        self._take_back_prefetched("the agent is draining")
        if first:
            log.warning("draining: no new admissions; handing %d queued jobs to peers", len(self.queue))
            self._wake.set()
            self._vector_changed.set()  # peers must see the draining flag at once
            if stop and self._nursery is not None:
                self._nursery.start_soon(self._finish_drain)
        return {"node_id": self.node_id, "draining": True, "queued": len(self.queue), "running": len(self.running)}

    async def _finish_drain(self) -> None:
        def waiting() -> int:  # queued, being offered, or backing off before another offer
            return sum(rec.state is JobState.QUEUED for rec in self.active.values())

        # One grace for the whole stop: the jobs still running when the drain ends have had
        # theirs (the stop waited it again, so a drain took twice --grace-s).
        self._grace_ends = trio.current_time() + self.settings.grace_s
        with trio.move_on_at(self._grace_ends):
            while self.running or (waiting() and self.cluster is not None and self.cluster.alive_states()):
                await trio.sleep(0.1)
        log.info("drained: %d running, %d still queued here; leaving the cluster", len(self.running), waiting())
        self.request_stop()
