# The methods here run on the Agent they are mixed into, and say so (``self: Agent``);
# mypy reports each such self type as not a supertype of RemoteJobs ([misc]).
# mypy: disable-error-code="misc"
"""Jobs that cross agents: forwarding, late binding, results flowing home, cancels.

The origin (the agent a client submitted to) owns each job until its final state
is durable there. It places the job; when placement says "forward", it offers the
job to the chosen peer over the transfer service. The peer checks its real capacity
again (late binding) and accepts, or refuses with its fresh vector, and the origin
tries the next candidate. The executor runs the job and delivers the result to the
origin, keeping it durably and retrying until the origin acknowledges. The first
final result wins at the origin; any later one is recorded as a duplicate attempt.

Loops are impossible: only the origin forwards, each forward counts a hop, and at
the TTL the job stays queued at the origin until it can run there.

A wasm module travels with an offer only while the origin does not know the peer to
hold it: modules are stored by hash, and after a peer accepted a module once, later
offers name it by hash alone. A peer that no longer holds it (its data was wiped)
refuses with ``need_module`` and the origin offers again, bytes included.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import trio

from p2psched.jobs.record import RECORD_TEXT_BYTES, JobRecord, JobResult
from p2psched.jobs.spec import JobSpec
from p2psched.jobs.state import JobState
from p2psched.jobs.store import StoreError
from p2psched.logs import JobLog
from p2psched.resources import NodeState, ResourceVector
from p2psched.transfer import messages as m
from p2psched.transfer.service import TransferError, TransferRefused

if TYPE_CHECKING:
    from p2psched.agent.agent import Agent

log = logging.getLogger("p2psched.remote")
job_log = JobLog()

#: Attempts a job may take (placements that lost their executor) before it fails.
#: Each attempt after the first waits longer (RETRY_BASE_S * 2**n, at most RETRY_MAX_S),
#: so a job that kills every executor it lands on cannot take the cluster down.
MAX_ATTEMPTS = 5
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0
#: Result delivery retries back off to this; an origin that is down for an hour
#: still gets its results within a minute of coming back.
DELIVERY_MAX_BACKOFF_S = 60.0
#: A newly started agent refuses client-chosen ids until it has synced members with
#: a seed, for at most this long (then it goes on with the members it knows, so an
#: agent whose seeds are all down still serves).
JOIN_SYNC_WAIT_S = 15.0
#: Tries to cancel a duplicate attempt, 0.2 s apart doubling to 10 s: about a minute,
#: long enough for a crashed executor to restart and rejoin.
CANCEL_TRIES = 10
#: Cancels kept per node for its return, once CANCEL_TRIES did not reach it (the oldest
#: are dropped past this many).
CANCELS_OWED_PER_NODE = 10_000
#: Module hashes remembered per peer as held there (offers then leave the bytes out).
PEER_MODULES_KNOWN = 4096
#: How long a submission handed to its home waits for the home's answer, and for each
#: SUBMIT_MIN_BYTES_S of module and input it carries, a second more. The client waits on
#: it; a home that has not answered by then is hung or cut off.
SUBMIT_AT_HOME_TIMEOUT_S = 10.0
SUBMIT_MIN_BYTES_S = 1024 * 1024
#: How long an id stays with a home that did not answer (Agent._in_doubt), and how many
#: such ids are kept (the oldest go first): a home back within a day is asked again;
#: an id retried after that, or past the bound, is placed anew.
IN_DOUBT_S = 24 * 3600.0
IN_DOUBT_MAX = 100_000
#: kv key prefix of a client-chosen id handed to its home without an answer (Agent._in_doubt).
IN_DOUBT_KEY = "home_in_doubt:"


#: The reason of an executor's own record of a job it gave back to its origin.
HANDED_BACK = "handed back"


def _handed_back(rec: JobRecord) -> bool:
    return rec.state is JobState.CANCELLED and rec.result is not None and rec.result.reason.startswith(HANDED_BACK)


def _job_wire(rec: JobRecord, origin_transfer: str) -> dict[str, Any]:
    return {
        "id": rec.id, "spec": rec.spec.model_dump(exclude={"module"}), "origin": rec.origin,
        "origin_transfer": origin_transfer, "route": list(rec.route), "cost": rec.cost, "hops": rec.hops,
        "attempts": rec.attempts, "timeline": list(rec.timeline), "auth": rec.auth,
    }


class RemoteJobs:
    """Mixed into Agent: the cross-agent half of the job lifecycle."""

    # -------------------------------------------------------------- origin: forward

    async def _forward(self: Agent, rec: JobRecord, decision: Any) -> None:
        """Offer ``rec`` to each candidate in turn; requeue it if none accepts."""
        assert self.transfer is not None
        sha = rec.spec.module_sha256
        module: bytes | None = None

        def module_bytes() -> bytes | None:  # read once, and only for a peer that needs them
            nonlocal module
            if module is None and sha is not None:
                module = self.store.module_path(sha).read_bytes()
            return module

        try:
            await self._offer_in_turn(rec, decision, sha, module_bytes)
        finally:
            if self.cluster is not None:
                self.cluster.release(rec.id)

    def _hold_on(self: Agent, node_id: str, rec: JobRecord) -> None:
        assert self.cluster is not None
        r = rec.spec.resources
        self.cluster.hold(node_id, rec.id, r.cpu, r.mem_mb, r.gpu, r.gpu_type)

    async def _offer_in_turn(self: Agent, rec: JobRecord, decision: Any, sha: str | None,
                             module_bytes: Any) -> None:
        assert self.transfer is not None
        refusals = []
        for cand in decision.candidates:
            if rec.state.final:  # cancelled while an earlier offer was in flight: offer it to nobody else
                break
            state = self.cluster.state_of(cand.node_id) if self.cluster else None
            if state is None or not state.transfer:
                refusals.append(f"{cand.node_id}: gone from membership")
                continue
            if not self._peer_trusted(state):
                refusals.append(f"{cand.node_id}: measurement not on the allow-list")
                continue
            self._hold_on(cand.node_id, rec)
            rec.attempts += 1
            rec.hops += 1
            rec.executor = cand.node_id
            rec.route = list(cand.route)
            rec.cost = cand.cost
            job = _job_wire(rec, self.advertised_transfer())
            try:
                held = sha is None or sha in self.peer_modules.get(cand.node_id, ())
                offer = {"t": m.OFFER, "id": rec.id, "job": job, "module": None if held else module_bytes()}
                reply = await self.transfer.request(cand.node_id, state.transfer, offer)
                if reply.get("need_module") and sha is not None:
                    self.peer_modules.get(cand.node_id, set()).discard(sha)
                    reply = await self.transfer.request(cand.node_id, state.transfer,
                                                        {**offer, "module": module_bytes()})
            except TransferError as e:
                if rec.state.final:  # the peer may have accepted it before the reply was lost
                    self._send_cancel(cand.node_id, rec)
                refusals.append(f"{cand.node_id}: {e}")
                rec.attempts -= 1
                rec.hops -= 1
                self.placement_metrics.refused()
                continue
            self._note_vector(cand.node_id, reply)
            if self.cluster is not None:
                self.cluster.release(rec.id)  # the reply's vector counts the job, or it was refused
            if reply.get("t") == m.ACCEPT:
                if sha is not None:
                    known = self.peer_modules.setdefault(cand.node_id, set())
                    if len(known) >= PEER_MODULES_KNOWN:
                        known.clear()  # forgetting only costs sending the bytes again
                    known.add(sha)
                if rec.state.final:
                    # Cancelled while the offer was in flight: the peer has it now and
                    # may have started it. Stop it there; its cancelled result is this
                    # same ending, not a duplicate.
                    log.info("job %s: cancelled while offered; %s accepted it, cancelling it there", rec.id,
                             cand.node_id)
                    self._send_cancel(cand.node_id, rec)
                    return
                self._accepted(rec, f"forwarded to {cand.node_id} (hop {rec.hops}, cost {cand.cost:g})")
                await self._sync_retrying()
                return
            rec.attempts -= 1
            rec.hops -= 1
            self.placement_metrics.refused()
            refusals.append(f"{cand.node_id}: {reply.get('reason', 'refused')}")
        self.early_status.pop(rec.id, None)
        if rec.state.final:
            return
        rec.executor = None
        rec.wait_reason = "every candidate refused; waiting for capacity (" + "; ".join(refusals[:4]) + ")"
        log.debug("job %s: no candidate accepted: %s", rec.id, "; ".join(refusals))
        self._requeue_later(rec, RETRY_BASE_S)

    def _accepted(self: Agent, rec: JobRecord, detail: str) -> None:
        """The executor took the job: it is placed, and maybe already running there."""
        rec.wait_reason = None
        self._advance(rec, JobState.PLACED, time.time(), detail)
        self.placement_metrics.started(rec.hops)
        early = self.early_status.pop(rec.id, None)
        if early is not None:
            self._on_status({"id": rec.id, "entry": early})

    def _note_vector(self: Agent, node_id: str, msg: dict[str, Any]) -> None:
        """Replies and results carry the peer's vector: fresher than gossip, so use it."""
        if isinstance(msg.get("vector"), dict) and self.cluster is not None:
            stamp = msg.get("vector_at")
            try:
                self.cluster.note_fresh_vector(node_id, ResourceVector.from_wire(msg["vector"]),
                                               stamp if isinstance(stamp, int) else None)
            except (TypeError, ValueError):
                return
            if len(self.queue):
                self._wake.set()

    def _vector_wire(self: Agent) -> dict[str, Any]:
        """This agent's vector for a reply or result, stamped with when it was taken:
        the receiver keeps the newest when messages cross (see ClusterView)."""
        return {"vector": self.vector().to_wire(), "vector_at": time.monotonic_ns()}

    def _requeue_later(self: Agent, rec: JobRecord, delay: float) -> None:
        assert self._nursery is not None
        self._aside.add(rec.id)  # it counts against the queue's bound meanwhile

        async def later() -> None:
            await trio.sleep(delay)
            self._aside.discard(rec.id)
            # (not if an executor's run was taken as its attempt meanwhile: _adopt_restarted_run)
            if rec.state is JobState.QUEUED and rec.id in self.active and rec.id not in self.queue:
                self._enqueue(rec)

        self._nursery.start_soon(later)

    def _peer_trusted(self: Agent, state: NodeState) -> bool:
        allow = self.settings.allow_measurements
        return not allow or state.measurement in allow

    # -------------------------------------------------------------- client-chosen ids

    def home_of(self: Agent, job_id: str | None) -> str | None:
        """The agent that owns a client-chosen id, when that is not this one.

        Rendezvous hashing over the alive members: every agent computes the same home
        for an id while their views agree, so the same id submitted to two agents
        becomes one job at one origin. Generated ids carry their origin and need none.
        """
        if job_id is None or self.cluster is None:
            return None
        doubt = self._in_doubt.get(job_id) if self._in_doubt else None
        if doubt is not None and time.time() - doubt[1] < IN_DOUBT_S:
            # Handed there before without an answer, it may be held there: it goes there
            # alone, wherever it hashes now (its home is forgotten once it has been dead
            # for dead_retention, and a late submission can still reach it after that).
            return doubt[0]
        if doubt is not None:
            self._resolve_doubt(job_id)
        if (not self.cluster.synced() and (self.settings.join or self.settings.join_dns)
                and time.time() - self.started_at < JOIN_SYNC_WAIT_S):
            # Until it has the cluster's member list, this agent could pick another
            # home for the id than its peers do, and the id would get two origins.
            from p2psched.agent.errors import Unavailable

            raise Unavailable(f"job id {job_id!r} cannot be placed yet: this agent has just started and has not "
                              "learned the cluster's members from its seeds; retry with the same id in a moment",
                              reason="joining", retry_after=1.0)
        # Hash over every member not known to have left, dead ones included: during a
        # partition the two sides disagree on who is alive, but not on who exists, so
        # both compute the same home (and refuse while it is unreachable).
        members = set(self.cluster.known_ids()) | {self.node_id}
        home = max(members, key=lambda n: hashlib.sha256(f"{n}\x00{job_id}".encode()).digest())
        return None if home == self.node_id else home

    async def submit_at_home(self: Agent, home: str, spec: JobSpec, auth: Any) -> tuple[dict[str, Any], bool] | None:
        """Hand a submission to its home agent; None when it cannot be reached (accept here)."""
        from p2psched.agent.errors import Unavailable

        job_id = spec.id
        assert job_id is not None  # only a client-chosen id has a home
        state = self.cluster.state_of(home) if self.cluster else None
        if state is None or not state.transfer or self.transfer is None:
            raise self._home_unreachable(job_id, home, "is not reachable now",
                                         "retry with the same id in a moment (or let the id be generated)")
        msg = {"t": m.SUBMIT, "spec": spec.model_dump(),
               "auth": auth.to_json() if hasattr(auth, "to_json") else auth}
        # The module and input go with it: a link at SUBMIT_MIN_BYTES_S carries them in time.
        size = len(spec.module or b"") + len(spec.input or b"")
        try:
            reply = await self.transfer.request(home, state.transfer, msg,
                                                timeout=SUBMIT_AT_HOME_TIMEOUT_S + size / SUBMIT_MIN_BYTES_S)
        except TransferError as e:
            # Accepting here could make a second origin for the id (the home may have
            # taken it already): refuse, and let the client retry the same id.
            if e.sent and not isinstance(e, TransferRefused):  # it may have acted on it
                await self._doubt(job_id, home)
            raise self._home_unreachable(job_id, home, f"cannot be reached now ({e})",
                                         "retry with the same id in a moment") from None
        try:
            m.check_submit_reply(reply)
        except ValueError as e:
            log.warning("job id %r: its home agent %s answered the submission with a malformed reply: %s",
                        spec.id, home, e)
            await self._doubt(job_id, home)
            raise Unavailable(f"job id {spec.id!r} belongs to agent {home}, whose answer made no sense ({e}); "
                              "retry with the same id in a moment, and tell its operator if this persists",
                              reason="home_unreachable", retry_after=1.0) from None
        self._resolve_doubt(job_id)  # the home answered: it holds the job, or refused it
        if reply["t"] == m.SUBMITTED:
            return dict(reply["job"]), reply["created"]
        from p2psched.agent.errors import AgentError

        raise AgentError(reply["message"], reason=reply["reason"], status=reply["status"],
                         retry_after=reply.get("retry_after"))

    async def _doubt(self: Agent, job_id: str, home: str) -> None:
        """``home`` may hold ``job_id`` (a submission reached it, or may have, and no
        answer came back): until it answers, the id goes to it alone. Kept durably, so
        a restart of this agent does not hash the id to another home."""
        if job_id in self._in_doubt and self._in_doubt[job_id][0] == home:
            return
        at = time.time()
        self._in_doubt[job_id] = (home, at)
        self.store.stage_kv(IN_DOUBT_KEY + job_id, f"{home}\t{at:.0f}")
        while len(self._in_doubt) > IN_DOUBT_MAX:
            self._resolve_doubt(next(iter(self._in_doubt)))
        with contextlib.suppress(StoreError):  # the 503 the client gets says nothing of the store
            await self.store.sync()

    def load_doubts(self: Agent) -> dict[str, tuple[str, float]]:
        """The ids left in doubt by an earlier run (see _doubt), the expired and
        unreadable ones dropped."""
        kept: dict[str, tuple[str, float]] = {}
        now = time.time()
        for key, value in self.store.kv_items(IN_DOUBT_KEY).items():
            home, _, at = value.partition("\t")
            try:
                since = float(at)
            except ValueError:
                since = 0.0
            if home and now - since < IN_DOUBT_S:
                kept[key.removeprefix(IN_DOUBT_KEY)] = (home, since)
            else:
                self.store.stage_kv(key, None)
        return dict(sorted(kept.items(), key=lambda item: item[1][1]))  # oldest first, as _doubt keeps them

    def _resolve_doubt(self: Agent, job_id: str) -> None:
        if self._in_doubt.pop(job_id, None) is not None:
            self.store.stage_kv(IN_DOUBT_KEY + job_id, None)

    def forget_doubts(self: Agent, home: str) -> None:
        """``home`` left the cluster (it said so): the ids only it could answer for are
        this agent's to place again (see docs/architecture.md, Idempotency)."""
        for job_id in [j for j, (h, _) in self._in_doubt.items() if h == home]:
            self._resolve_doubt(job_id)

    def _home_unreachable(self: Agent, job_id: str, home: str, what: str, fix: str) -> Exception:
        """The 503 for ``job_id`` while its ``home`` ``what`` (is not reachable now, did
        not answer); ``fix``: what to do when the home holds nothing of it yet."""
        from p2psched.agent.errors import Unavailable

        if job_id in self._in_doubt:
            message = (f"job id {job_id!r} was handed to agent {home}, which {what}: it may hold the job, so no "
                       f"other agent takes this id until {home} answers. Retry with the same id once {home} is "
                       "reachable again; if it is gone for good, submit the job under a new id")
        else:
            message = f"job id {job_id!r} belongs to agent {home}, which {what}; {fix}"
        return Unavailable(message, reason="home_unreachable", retry_after=1.0)

    async def _on_submit(self: Agent, msg: dict[str, Any]) -> dict[str, Any]:
        from p2psched.agent.errors import AgentError
        from p2psched.security.errors import AdmissionError
        from p2psched.security.signing import Auth

        try:
            spec = JobSpec.model_validate(msg["spec"])
            auth = Auth.from_json(msg["auth"]) if msg.get("auth") else None
        except (ValueError, AdmissionError) as e:
            raise ValueError(f"submit: {e}") from None
        try:
            if not self._known(spec):  # a retry of a job held here is answered, full queue or not
                self._admit_check()
            rec, created = self._accept(spec, time.time(), auth)
            try:
                await self.store.sync()
            except StoreError:
                if self._keep_if_durable([rec] if created else []):
                    raise self._store_unwritable() from None
        except AgentError as e:
            return {"t": m.SUBMITTED_ERROR, "status": e.status, "reason": e.reason, "message": e.message,
                    "retry_after": e.retry_after}
        if created:
            self._enqueue(rec)
        return {"t": m.SUBMITTED, "job": rec.as_dict(), "created": created}

    # -------------------------------------------------------------- executor: handlers

    async def handle_transfer(self: Agent, peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._handle_transfer(peer, msg)
        except StoreError as e:
            # The peer treats it as a refusal (an offer goes elsewhere, a result is sent again).
            return m.error(f"agent {self.node_id} cannot write its job store now: {e}")

    async def _handle_transfer(self: Agent, peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        m.check_request(msg)  # every field, before a handler changes anything
        kind = msg["t"]
        if kind == m.OFFER:
            return await self._on_offer(peer, msg)
        if kind == m.RESULT:
            return await self._on_result(msg)
        if kind == m.STATUS:
            self._on_status(msg)
            return {"t": m.ACK, "id": msg["id"]}
        if kind == m.CANCEL:
            return await self._on_cancel(msg)
        if kind == m.SUBMIT:
            return await self._on_submit(msg)
        if kind == m.OUTPUT:
            return await self._on_output(peer, msg)
        if kind == m.HANDBACK:
            return await self._on_handback(peer, msg)
        raise ValueError(f"unknown transfer message type {kind!r}")  # check_request lets none through

    async def _on_offer(self: Agent, peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        job = msg["job"]
        job_id = msg["id"]
        existing = self.active.get(job_id) or self.store.get(job_id)
        if job_id in self._handing_back:
            return {"t": m.REFUSE, "id": job_id, **self._vector_wire(),
                    "reason": "this agent is giving that job back: its host could not run it"}
        if existing is not None and not (_handed_back(existing) and existing.origin == str(job.get("origin"))):
            if existing.origin == str(job.get("origin")) and existing.origin != self.node_id:
                return {"t": m.ACCEPT, "id": job_id}  # a retried offer: idempotent by job id
            return {"t": m.REFUSE, "id": job_id, **self._vector_wire(),
                    "reason": f"this agent already holds a job {job_id} from origin {existing.origin}"}
        # (a job this agent gave back comes back as a new attempt)
        try:
            spec = JobSpec.model_validate(job["spec"])
        except Exception as e:
            raise ValueError(f"offer for {job_id}: invalid spec: {e}") from None
        module = msg.get("module")
        if spec.runtime == "wasm":
            if module is None and not (spec.module_sha256 and self.store.has_module(spec.module_sha256, check_disk=True)):
                return {"t": m.REFUSE, "id": job_id, "need_module": True, **self._vector_wire(),
                        "reason": f"holds no module {spec.module_sha256}; offer it again with the module's bytes"}
            if module is not None:
                if hashlib.sha256(module).hexdigest() != spec.module_sha256:
                    raise ValueError(f"offer for {job_id}: module bytes do not match module_sha256")
        if not self.accepting:
            return {"t": m.REFUSE, "id": job_id, "reason": "draining", **self._vector_wire()}
        if self.settings.allow_measurements:
            # The allow-list binds both ways: no job goes to, or comes from, a peer
            # running other code or settings. The sender is its certificate's node
            # (with TLS), else the origin the offer names.
            sender = peer or str(job.get("origin"))
            state = self.cluster.state_of(sender) if self.cluster is not None else None
            if state is None or not self._peer_trusted(state):
                log.warning("refused job %s from %s: its measurement is not on this agent's allow-list", job_id,
                            sender)
                return {"t": m.REFUSE, "id": job_id, **self._vector_wire(),
                        "reason": f"measurement of {sender} is not on {self.node_id}'s allow-list"}
        if spec.runtime in self.health.impaired:
            return {"t": m.REFUSE, "id": job_id, **self._vector_wire(),
                    "reason": f"impaired: {spec.runtime} jobs kept failing on this host for the host's fault"}
        if not self._fits_now(spec):
            return {"t": m.REFUSE, "id": job_id, "reason": "full: its capacity was taken since the last gossip",
                    **self._vector_wire()}
        if (claim := self._gpu_claim_here(spec)) is not None:
            return {"t": m.REFUSE, "id": job_id, **self._vector_wire(),
                    "reason": f"full: its free GPU slots are kept for job {claim}, which waits here for more"}
        # Every hop verifies the tenant's original signature on its own.
        from p2psched.agent.errors import AgentError

        try:
            self.gate.admit(spec, job.get("auth"), job_id=job_id, usage=None, now=time.time(), forwarded=True,
                            module=module)
        except AgentError as e:
            log.warning("refused forwarded job %s from %s: %s", job_id, peer or "peer", e.message)
            return {"t": m.REFUSE, "id": job_id, "reason": f"{e.reason}: {e.message}",
                    **self._vector_wire()}
        if module is not None and spec.module_sha256:
            self.store.put_module(spec.module_sha256, module)
        now = time.time()
        rec = JobRecord(
            id=job_id, spec=spec, origin=str(job["origin"]), created_at=now, seq=self._next_seq(),
            route=list(job.get("route", [])), cost=float(job.get("cost", 0.0)), hops=int(job.get("hops", 0)),
            attempts=int(job.get("attempts", 1)), origin_transfer=str(job.get("origin_transfer", "")),
            auth=job.get("auth"),
        )
        rec.timeline = list(job.get("timeline", []))
        self._advance(rec, JobState.QUEUED, now, f"accepted from {rec.origin}")
        self.store.stage(rec, new=True)  # its first row here, with the spec
        self.active[rec.id] = rec
        # Reserve now, before awaiting the store, so that two offers cannot both take
        # the last slot that late binding just checked.
        rec.executor = self.node_id
        self._advance(rec, JobState.PLACED, now, f"runs here for {rec.origin}")
        self._reserve_and_start(rec, already_placed=True)
        await self.store.sync()
        return {"t": m.ACCEPT, "id": job_id, **self._vector_wire()}

    def _gpu_claim_here(self: Agent, spec: JobSpec) -> str | None:
        """The queued job that has first claim on the GPU slots an offered ``spec`` would
        take: the queue's head, when it waits for GPU slots this agent has but not yet
        free and is not of lower priority. Without it, a stream of small offered jobs
        would take each slot as it frees and a big job here would wait forever."""
        if spec.resources.gpu <= 0 or self.gpus is None:
            return None
        head = self.queue.peek()
        if head is None or head.spec.priority < spec.priority:
            return None
        from p2psched.gpu.slots import UnknownSlotType

        r = head.spec.resources
        try:
            kind = self.gpus.resolve_type(r.gpu, r.gpu_type) if r.gpu > 0 else None
        except UnknownSlotType:
            return None
        if kind is None or self.gpus.total_by_type().get(kind, 0) < r.gpu or self.gpus.can_fit(r.gpu, r.gpu_type):
            return None  # it needs no GPU, can never run here, or dispatch starts it now
        return head.id

    # -------------------------------------------------------------- given back

    async def _hand_back(self: Agent, rec: JobRecord, error: str, delay: float) -> None:
        """Executor side: this host could not run ``rec``, a job of another origin.
        Only its origin may place it elsewhere, so it goes back there now rather
        than wait out a pause here. An origin that does not answer leaves it here,
        to try again after ``delay`` as before."""
        assert self.transfer is not None
        state = self.cluster.state_of(rec.origin) if self.cluster is not None else None
        address = state.transfer if state is not None and state.transfer else rec.origin_transfer
        msg = {"t": m.HANDBACK, "id": rec.id, "executor": self.node_id, "attempt": rec.attempts, "error": error}
        reply = None
        if address:
            try:
                reply = await self.transfer.request(rec.origin, address, msg, timeout=10)
            except TransferError as e:
                log.info("job %s: could not give it back to %s: %s", rec.id, rec.origin, e)
        self._handing_back.discard(rec.id)
        if rec.state.final:
            return  # cancelled meanwhile
        if reply is not None and reply.get("t") == m.ACK:
            if reply.get("taken"):
                detail = f"given back to its origin {rec.origin}, which places it again"
            else:
                detail = f"its origin {rec.origin} no longer has it run here (it is {reply.get('state')} there)"
            rec.result = JobResult(exit_code=None, reason=f"{HANDED_BACK}: this host could not run it: {error}")
            self._advance(rec, JobState.CANCELLED, time.time(), detail)
            await self._sync_retrying()
            return
        rec.wait_reason = (f"this host could not run it ({error}); its origin {rec.origin} did not take it back; "
                           f"trying again here in {delay:g} s")
        self._requeue_later(rec, delay)

    async def _on_handback(self: Agent, peer: str | None, msg: dict[str, Any]) -> dict[str, Any]:
        """Origin side: the executor of one of our jobs could not run it: place it again."""
        job_id, executor = msg["id"], str(msg["executor"])
        rec = self.active.get(job_id)
        if peer is not None and peer != executor:
            return m.error(f"{peer} cannot give back a job on behalf of {executor}")
        if rec is None or rec.origin != self.node_id or rec.executor != executor or rec.state not in (
                JobState.PLACED, JobState.RUNNING):
            found = rec.state.value if rec is not None else "unknown"
            return {"t": m.ACK, "id": job_id, "taken": False, "state": found}
        error = str(msg.get("error", ""))[:300]
        now = time.time()
        if job_id in self._cancelling:  # a cancel waits on it: place it nowhere else
            self._end_cancelled(rec, f"cancelled; executor {executor} gave it back unrun ({error})")
        elif rec.attempts >= MAX_ATTEMPTS:
            rec.result = JobResult(exit_code=None, reason=f"retry budget spent: {rec.attempts} attempts; the last "
                                                          f"executor {executor} could not run it: {error}")
            self._advance(rec, JobState.FAILED, now, rec.result.reason)
        else:
            self._queue_for_placement(rec, now, f"executor {executor} could not run it ({error}); placing it again")
            self._avoid[rec.id] = executor
            self._enqueue(rec)
        await self.store.sync()
        return {"t": m.ACK, "id": job_id, "taken": True, "state": rec.state.value}

    def _report_status(self: Agent, rec: JobRecord, entry: dict[str, Any]) -> None:
        """Tell the origin how its job is doing (best effort: the result is what counts)."""
        if rec.origin == self.node_id or not rec.origin_transfer or self.transfer is None:
            return
        assert self._nursery is not None
        transfer = self.transfer

        async def send() -> None:
            # A few tries: a busy origin may miss one, and its status page should
            # not say "placed" for the whole run. The result still settles it.
            for delay in (0.0, 0.5, 2.0):
                await trio.sleep(delay)
                try:
                    await transfer.request(rec.origin, rec.origin_transfer,
                                           {"t": m.STATUS, "id": rec.id, "entry": entry}, timeout=5)
                    return
                except TransferError:
                    continue

        self._nursery.start_soon(send)

    def _on_status(self: Agent, msg: dict[str, Any]) -> None:
        rec = self.active.get(msg["id"])
        entry = msg["entry"]
        if not isinstance(entry, dict):
            return
        if rec is None or rec.state.final or rec.executor != entry.get("node"):
            self._stop_stale_attempt(rec or self.store.get(msg["id"]), entry)
            return
        if rec.state is not JobState.PLACED and rec.state is not JobState.RUNNING:
            # The executor starts the job before its acceptance reaches us, so its
            # "running" can overtake the reply to the offer: keep it for then.
            if len(self.early_status) < 10_000:
                self.early_status[rec.id] = entry
            return
        if entry.get("state") == "running" and rec.state is JobState.PLACED:
            self._record_elsewhere(rec, JobState.RUNNING, float(entry.get("at", time.time())),
                                   str(entry.get("node")), str(entry.get("detail", "")))

    def _record_elsewhere(self: Agent, rec: JobRecord, state: JobState, at: float, node: str, detail: str) -> None:
        """A transition the executor ``node`` made, as the origin learns of it: in the
        timeline under that node, counted, logged and staged as the origin's own are."""
        rec.advance(state, at, node, detail)
        self.metrics.job_state(state.value, rec.runtime).inc()
        job_log(rec.id, state.value, f"on {node}: {detail}" if detail else f"on {node}", at)
        self.store.stage(rec)

    def _stop_stale_attempt(self: Agent, rec: JobRecord | None, entry: dict[str, Any]) -> None:
        """Cancel an attempt that runs where this origin no longer placed the job.

        An executor that restarts runs the jobs it held again; if this origin already
        declared it dead and placed the job elsewhere, or the job has ended, that run
        is a duplicate holding CPUs and GPU slots for nothing. A job still waiting here
        to be placed again takes that run as its attempt instead.
        """
        node = entry.get("node")
        if (rec is None or rec.origin != self.node_id or entry.get("state") != "running"
                or not isinstance(node, str) or node in (self.node_id, rec.executor)):
            return
        if not rec.state.final and rec.executor is None:
            self._adopt_restarted_run(rec, node, entry)
            return
        where = f"it ended {rec.state.value}" if rec.state.final else f"it was placed again on {rec.executor}"
        log.info("job %s: cancelling the stale attempt on %s: %s", rec.id, node, where)
        self._send_cancel(node, rec)

    def _adopt_restarted_run(self: Agent, rec: JobRecord, node: str, entry: dict[str, Any]) -> None:
        """``node`` came back and runs ``rec`` again (it recovers what it held) while the
        job waits here to be placed anew, after ``node`` was declared dead: that run is
        the job's attempt now, placed and running there. Without this the job stayed
        queued here, and ran a second time at once when a slot freed (found with a
        compose cluster: docker kill, then docker start, of a busy replica)."""
        if rec.state is not JobState.QUEUED or self.cluster is None:
            return
        if not self.cluster.is_member(node):
            # It is up (it just sent this) but not back in membership yet, which would
            # place the job again at once: adopt the run when it is (Agent._membership_events).
            if len(self.restarted_runs) < 10_000:
                self.restarted_runs[rec.id] = (node, entry)
            return
        self.restarted_runs.pop(rec.id, None)
        self.queue.remove(rec.id)
        rec.executor = node
        rec.wait_reason = None
        rec.attempts += 1
        rec.hops = 1  # the forward it had there (its route is kept)
        # When it started there, but not before this job's last step here (clocks differ).
        at = entry.get("at")
        at = max(float(at), rec.timeline[-1]["at"]) if isinstance(at, (int, float)) else time.time()
        self._advance(rec, JobState.PLACED, at, f"{node} came back and runs it again; that run is this attempt")
        self._record_elsewhere(rec, JobState.RUNNING, at, node, str(entry.get("detail", ""))[:200])

    # -------------------------------------------------------------- results home

    def _owe_result(self: Agent, rec: JobRecord) -> None:
        """Executor side: the result must reach the origin; keep it until acknowledged."""
        self.store.stage_delivery(rec.id, True)
        assert self._nursery is not None
        self._nursery.start_soon(self._deliver, rec.id)

    async def _deliver(self: Agent, job_id: str) -> None:
        backoff = 0.2
        while True:
            await self._sync_retrying()
            rec = self.store.get(job_id)
            if rec is None or rec.result is None:
                self.store.stage_delivery(job_id, False)
                return
            output = self.store.output(job_id) or b""
            artifacts = await self._artifacts_to_deliver(rec)
            msg = {"t": m.RESULT, "id": job_id, "executor": self.node_id, "attempt": rec.attempts,
                   **self._vector_wire(),
                   "state": rec.state.value, "result": rec.result.as_dict(), "output": output,
                   **({"stderr": stderr} if (stderr := self.store.stderr(job_id)) is not None else {}),
                   **({"artifacts": artifacts} if artifacts else {}),
                   "timeline": [t for t in rec.timeline if t["node"] == self.node_id]}
            address = rec.origin_transfer
            state = self.cluster.state_of(rec.origin) if self.cluster else None
            if state is not None and state.transfer:
                address = state.transfer  # the origin may have moved (restart on a new address)
            try:
                assert self.transfer is not None
                reply = await self.transfer.request(rec.origin, address, msg)
                if reply.get("t") == m.ACK:
                    self.store.stage_delivery(job_id, False)
                    await self._sync_retrying()
                    return
            except TransferRefused as e:
                # Not the network: the origin read the result and said no (another version
                # of the agent, a bug). Sent again it will likely say no again; say so loudly.
                log.warning("result of %s refused by its origin %s: %s; sending it again in %.1fs", job_id,
                            rec.origin, e, backoff)
            except TransferError as e:
                log.info("result of %s not delivered to %s yet: %s; retrying in %.1fs", job_id, rec.origin, e,
                         backoff)
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = min(DELIVERY_MAX_BACKOFF_S, backoff * 2)

    async def _artifacts_to_deliver(self: Agent, rec: JobRecord) -> dict[str, bytes]:
        """The bytes of each artifact ``rec``'s result names, as stored here (by sha256)."""
        assert rec.result is not None
        wanted = {name: str(a.get("sha256", "")) for name, a in rec.result.artifacts.items()}

        def read() -> dict[str, bytes]:
            found = {name: self.store.artifact(rec.id, sha) for name, sha in wanted.items()}
            return {name: data for name, data in found.items() if data is not None}

        return await trio.to_thread.run_sync(read) if wanted else {}

    @staticmethod
    async def _artifact_hashes(msg: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
        """The artifacts a result carried, name -> (bytes, their sha256): tens of MiB
        at most (the sandbox's caps), hashed off the trio thread."""
        sent = msg.get("artifacts")
        if not isinstance(sent, dict) or not sent:
            return {}
        return await trio.to_thread.run_sync(lambda: {
            k: (v, hashlib.sha256(v).hexdigest()) for k, v in sent.items() if isinstance(v, bytes)})

    @staticmethod
    def _arrived_artifacts(res: JobResult, sent: dict[str, tuple[bytes, str]], executor: str) -> dict[str, bytes]:
        """Origin side: the artifacts of ``res`` whose bytes arrived and hash to what it
        says, by sha256; one that did not arrive intact is dropped from the result,
        with a warning, so the record never names bytes this agent does not hold."""
        kept: dict[str, bytes] = {}
        for name, entry in list(res.artifacts.items()):
            data, sha256 = sent.get(name, (b"", ""))
            if isinstance(entry, dict) and sha256 and sha256 == entry.get("sha256"):
                kept[sha256] = data
                continue
            del res.artifacts[name]
            res.warnings.append(f"artifact {name!r} did not arrive intact from executor {executor}; "
                                "run the job again to produce it")
        return kept

    async def _on_result(self: Agent, msg: dict[str, Any]) -> dict[str, Any]:
        job_id = msg["id"]
        # The one wait, first: what follows checks the job's state and changes it at one moment.
        sent = await self._artifact_hashes(msg)
        rec = self.active.get(job_id) or self.store.get(job_id)
        if rec is None:
            return {"t": m.ACK, "id": job_id, "duplicate": True, "unknown": True}
        executor = str(msg["executor"])
        self._note_vector(executor, msg)
        stale = msg.get("state") == JobState.CANCELLED.value and executor != rec.executor
        if rec.state.final or stale:
            # A stale attempt cancelled by _stop_stale_attempt does not end the job.
            if not (rec.result is not None and rec.executor == executor and rec.result.reason == msg["result"].get("reason")
                    and rec.result.exit_code == msg["result"].get("exit_code")) or rec.duplicates:
                rec.duplicates.append({"executor": executor, "attempt": msg.get("attempt"),
                                       "reason": msg["result"].get("reason"), "at": time.time()})
                self.store.stage(rec)
                await self.store.sync()
            return {"t": m.ACK, "id": job_id, "duplicate": True}
        res = JobResult.from_dict(msg["result"])
        output = bytes(msg.get("output") or b"")
        stderr = msg.get("stderr")
        if res.output_bytes is None:  # an executor from before output_bytes: measure what it sent
            res.output_bytes = len(output)
            res.stdout_in_record_truncated = len(output) > RECORD_TEXT_BYTES
            res.stderr_in_record_truncated = isinstance(stderr, bytes)  # it sent stderr only when the record cut it
        ran: dict[str, Any] | None = None  # the executor's own "running" entry, new here
        for entry in msg.get("timeline", []):
            if isinstance(entry, dict) and entry not in rec.timeline and entry.get("state") not in (
                    "succeeded", "failed", "cancelled", "timed_out"):
                rec.timeline.append(entry)
                if entry.get("state") == "running" and entry.get("node") == executor:
                    ran = entry
        rec.timeline.sort(key=lambda t: t["at"])
        self.queue.remove(job_id)
        previous = rec.executor
        rec.executor = executor
        rec.result = res
        state = JobState(msg.get("state") or "failed")
        if rec.state is JobState.QUEUED and previous != executor:
            detail = f"result from an earlier attempt on {executor}"
        else:
            detail = res.reason
        self.store.stage(rec, output=output,
                         stderr=stderr if isinstance(stderr, bytes) and len(stderr) <= rec.spec.limits.stderr_bytes
                         else None, artifacts=self._arrived_artifacts(res, sent, executor))
        if rec.state is JobState.PLACED and state is not JobState.CANCELLED:
            # The job's running, learned only now. The executor's own entry for it came
            # with the result: it is that entry, not a second one beside it.
            at, detail = time.time(), "(learned from the result)"
            if ran is not None and isinstance(ran.get("at"), (int, float)):
                rec.timeline.remove(ran)
                at, detail = ran["at"], str(ran.get("detail", ""))
            self._record_elsewhere(rec, JobState.RUNNING, at, executor, detail)
        self._advance(rec, state, time.time(), detail)
        await self.store.sync()
        if previous and previous != executor:
            self._send_cancel(previous, rec)  # a newer attempt is still out there: stop it
        return {"t": m.ACK, "id": job_id, "duplicate": False}

    # -------------------------------------------------------------- cancel

    async def _on_cancel(self: Agent, msg: dict[str, Any]) -> dict[str, Any]:
        rec = self.active.get(msg["id"]) or self.store.get(msg["id"])
        if rec is None:
            return {"t": m.CANCEL_ACK, "id": msg["id"], "state": "unknown"}
        if rec.state.final:
            return {"t": m.CANCEL_ACK, "id": rec.id, "state": rec.state.value}
        run = self.running.get(rec.id) or self._prefetched.get(rec.id)
        if run is not None:
            self._cancel_running(run, "cancelled")
        elif rec.id in self.queue or rec.state is JobState.QUEUED:
            # Queued, or out of the queue for a while (backing off after its host failed
            # it): either way it has not started, and must not once the pause is over.
            self.queue.remove(rec.id)
            rec.result = JobResult(exit_code=None, reason="cancelled")
            self._advance(rec, JobState.CANCELLED, time.time(), "cancelled before it ran")
            if rec.origin != self.node_id:
                self._owe_result(rec)
        return {"t": m.CANCEL_ACK, "id": rec.id, "state": "cancelling"}

    def _send_cancel(self: Agent, node_id: str, rec: JobRecord) -> None:
        """Stop a duplicate attempt on ``node_id``, retrying for about a minute, then once
        more when membership sees the node alive again (``resend_cancels``).

        The node may be restarting, and so not yet back in this agent's view, when
        its duplicate is noticed; a cancel that reaches nobody leaves it running.
        """
        if self.transfer is None or self.cluster is None:
            return
        assert self._nursery is not None
        transfer, cluster = self.transfer, self.cluster

        # Owed until it gets through: should the tries below all fail (the node cut off
        # or hung for longer), it is sent again when membership sees the node alive, or
        # the attempt runs on there to its wall limit (days, for some jobs).
        owed = self._cancels_owed.setdefault(node_id, {})
        owed[rec.id] = None
        while len(owed) > CANCELS_OWED_PER_NODE:
            del owed[next(iter(owed))]

        async def send() -> None:
            delay = 0.2
            for _ in range(CANCEL_TRIES):
                state = cluster.state_of(node_id)
                if state is not None and state.transfer:
                    try:
                        await transfer.request(node_id, state.transfer, {"t": m.CANCEL, "id": rec.id}, timeout=10)
                    except TransferError:
                        pass
                    else:
                        self._cancels_owed.get(node_id, {}).pop(rec.id, None)
                        return
                await trio.sleep(delay)
                delay = min(10.0, delay * 2)

        self._nursery.start_soon(send)

    def resend_cancels(self: Agent, node_id: str) -> None:
        """``node_id`` is alive again: send it the cancels it has not confirmed, of the
        jobs that have ended (a job queued again may be placed there anew meanwhile, and
        that attempt is the job's)."""
        for job_id in list(self._cancels_owed.get(node_id, {})):
            rec = self.active.get(job_id) or self.store.get(job_id)
            if rec is not None and rec.state.final:
                self._send_cancel(node_id, rec)
            else:
                self._cancels_owed[node_id].pop(job_id, None)

    async def cancel_remote(self: Agent, rec: JobRecord) -> JobRecord:
        """Origin side: follow the job to its executor and stop it there.

        While this waits on the executor the job is placed nowhere else: should
        membership lose that executor, or the executor give the job back, the job
        ends cancelled there and then (``_end_cancelled``) and the wait stops. Placed
        again instead, a cancelled job ran to its end on another peer."""
        executor = rec.executor
        state = self.cluster.state_of(executor) if (self.cluster and executor) else None
        reply = None
        scope = self._cancelling[rec.id] = trio.CancelScope()
        try:
            with scope:
                if executor is not None and state is not None and state.transfer and self.transfer is not None:
                    try:
                        reply = await self.transfer.request(executor, state.transfer, {"t": m.CANCEL, "id": rec.id},
                                                            timeout=10)
                    except TransferError as e:
                        log.info("cancel of %s could not reach %s: %s; cancelling at the origin, and retrying the "
                                 "cancel there", rec.id, executor, e)
                        self._send_cancel(executor, rec)  # a paused or cut-off executor would run it to the end
                if reply is not None and reply.get("state") in (
                        "cancelling", "succeeded", "failed", "timed_out", "cancelled"):
                    done = await self.wait_final(rec.id, 30)
                    if done.state.final:
                        return done
        finally:
            if self._cancelling.get(rec.id) is scope:
                del self._cancelling[rec.id]
        if scope.cancelled_caught and reply is None and executor is not None:
            self._send_cancel(executor, rec)  # should it come back and run it still
        if not rec.state.final:
            # Unreachable executor (or it never heard of the job): the origin decides.
            # If the executor's result still arrives it is recorded as a duplicate.
            self._end_cancelled(rec, f"cancelled at the origin; executor {executor} did not confirm")
        await self.store.sync()
        return rec

    def _end_cancelled(self: Agent, rec: JobRecord, detail: str) -> None:
        """Origin side: end ``rec`` cancelled, and stop a cancel that waits on its executor."""
        rec.result = JobResult(exit_code=None, reason="cancelled")
        self._advance(rec, JobState.CANCELLED, time.time(), detail)
        scope = self._cancelling.pop(rec.id, None)
        if scope is not None:
            scope.cancel()

    # -------------------------------------------------------------- executor lost

    def _queue_for_placement(self: Agent, rec: JobRecord, now: float, detail: str) -> None:
        """Origin side: its executor will not run ``rec`` (lost, or gave it back): queued
        for a new placement. Hops count the forwards of one placement (the hop limit bounds
        a route; MAX_ATTEMPTS bounds the retries): kept across placements, four executor
        deaths left a job only peers can run stuck at its origin with a retry to spare."""
        self._advance(rec, JobState.QUEUED, now, detail)
        rec.executor = None
        rec.hops = 0

    def on_member_down(self: Agent, node_id: str, why: str) -> None:
        """Membership says ``node_id`` is dead or left: place its jobs again."""
        now = time.time()
        for rec in list(self.active.values()):
            if rec.origin != self.node_id or rec.executor != node_id:
                continue
            if rec.state not in (JobState.PLACED, JobState.RUNNING):
                continue
            if rec.id in self._cancelling:  # a cancel waits on it: place it nowhere else
                self._end_cancelled(rec, f"cancelled at the origin; executor {node_id} {why} before it confirmed")
                continue
            if rec.attempts >= MAX_ATTEMPTS:
                rec.result = JobResult(exit_code=None, reason=f"retry budget spent: {rec.attempts} attempts; "
                                                              f"the last executor {node_id} {why}")
                self._advance(rec, JobState.FAILED, now, rec.result.reason)
                continue
            self._queue_for_placement(rec, now, f"executor {node_id} {why}; placing it again")
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, rec.attempts - 1))
            rec.wait_reason = f"executor {node_id} {why}; placing again in {delay:.1f}s (attempt {rec.attempts + 1})"
            self._requeue_later(rec, delay)

