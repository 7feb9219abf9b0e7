"""The agent's view of the cluster, over the membership service.

Placement wants the gossiped states of alive, non-draining peers; forwarding wants a
peer's transfer address; the API wants a member table. This adapter gives each of
those from ``MembershipService.members()``, plus a short-lived override: when a
peer refuses an offer it sends its fresh vector, which beats the gossiped one until
gossip catches up (late binding would otherwise keep choosing the same full peer).
Replies and results can cross on the wire (an offer's acceptance, computed while the
job ran, may arrive after the job's result), so each fresh vector carries the
sender's stamp and an older one never replaces a newer one.

While an offer is in flight its job's resources are held against the peer
(``hold``/``release``): the peer's reply, with its vector counting the job, takes
about a millisecond, and a dispatch pass places every queued job in that time. Without
the hold each of them would be offered to the same peer that gossip last showed free,
and all but one refused and put back for a while.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from p2psched.resources import NodeState, ResourceVector

#: A refusal's fresh vector is trusted this long; gossip (every 200 ms) replaces it.
FRESH_VECTOR_S = 2.0


class ClusterView:
    def __init__(self, service: Any, self_id: str, clock: Any) -> None:
        self.service = service
        self.self_id = self_id
        self._clock = clock
        self._fresh: dict[str, tuple[float, ResourceVector, int | None]] = {}
        # job id -> (peer, (cpu, mem_mb, gpu, gpu_type)) of each offer in flight
        self._held: dict[str, tuple[str, tuple[float, int, int, str | None]]] = {}

    def _states(self, *, include_suspect: bool) -> dict[str, tuple[str, NodeState]]:
        out = {}
        for m in self.service.members():
            if m.node_id == self.self_id or m.node_state is None:
                continue
            if m.state == "alive" or (include_suspect and m.state == "suspect"):
                out[m.node_id] = (m.state, m.node_state)
        return out

    def alive_states(self) -> list[NodeState]:
        """Alive, non-draining peers with their latest known vectors (for placement)."""
        now = self._clock()
        out = []
        for node_id, (_, state) in self._states(include_suspect=False).items():
            fresh = self._fresh.get(node_id)
            if fresh is not None:
                if now - fresh[0] < FRESH_VECTOR_S:
                    state = replace(state, vector=fresh[1])
                else:
                    del self._fresh[node_id]
            if self._held:
                held = [res for peer, res in self._held.values() if peer == node_id]
                if held:
                    state = replace(state, vector=_minus(state.vector, held))
            if not state.vector.draining:
                out.append(state)
        return out

    def hold(self, node_id: str, job_id: str, cpu: float, mem_mb: int, gpu: int = 0,
             gpu_type: str | None = None) -> None:
        """Count what ``job_id`` asks for as taken on ``node_id`` until ``release``
        (an offer of it is in flight there). A job is held on one peer at a time."""
        self._held[job_id] = (node_id, (cpu, mem_mb, gpu, gpu_type))

    def release(self, job_id: str) -> None:
        """The offer of ``job_id`` was answered (the reply's vector counts it, or it was
        refused) or failed."""
        self._held.pop(job_id, None)

    def holding(self) -> int:
        return len(self._held)

    def has_alive_peer(self) -> bool:
        """``bool(alive_states())``, at no cost while this agent knows no one else
        (the dispatcher asks for each job it holds back)."""
        return self.service.member_count() > 1 and bool(self.alive_states())

    def state_of(self, node_id: str) -> NodeState | None:
        """A reachable peer's state (alive or suspect), else None."""
        entry = self._states(include_suspect=True).get(node_id)
        return entry[1] if entry else None

    def known_ids(self) -> list[str]:
        """Every member not known to have left: alive, suspect or dead. Views agree on this
        set far sooner than on who is alive, so it is what client-chosen ids hash over."""
        return [m.node_id for m in self.service.members() if m.state != "left"]

    def synced(self) -> bool:
        """Whether this agent has exchanged full member lists with a peer yet."""
        return bool(self.service.synced)

    def is_member(self, node_id: str) -> bool:
        return any(m.node_id == node_id and m.state in ("alive", "suspect") for m in self.service.members())

    def note_fresh_vector(self, node_id: str, vector: ResourceVector, stamp: int | None = None) -> None:
        """Use ``vector`` for ``node_id`` unless a newer one (by the sender's ``stamp``) is held."""
        now = self._clock()
        held = self._fresh.get(node_id)
        if (held is not None and stamp is not None and held[2] is not None and stamp <= held[2]
                and now - held[0] < FRESH_VECTOR_S):
            return
        self._fresh[node_id] = (now, vector, stamp)

    def members_view(self, self_view: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for m in self.service.members():
            if m.node_id == self.self_id:
                rows.append({**self_view, "incarnation": m.incarnation})
                continue
            ns = m.node_state
            vector = ns.vector if ns else ResourceVector()
            state = m.state
            if state == "alive" and vector.draining:
                state = "draining"
            rows.append({
                "node_id": m.node_id, "address": f"{m.addr[0]}:{m.addr[1]}", "api": ns.api if ns else "",
                "transfer": ns.transfer if ns else "", "state": state, "incarnation": m.incarnation,
                "age_s": round(m.age_s, 3), "vector": vector.as_dict(), "position": ns.position if ns else "",
                "labels": dict(ns.labels) if ns else {}, "node_pubkey": ns.node_pubkey if ns else "",
                "measurement": ns.measurement if ns else "", "agent_version": ns.agent_version if ns else "",
                "self": False,
            })
        return sorted(rows, key=lambda r: r["node_id"])

    def tenant_usage(self, tenant: str) -> list[list[float]]:
        """What alive peers gossip for ``tenant``: [jobs, queued, cpu, mem_mb, gpu] each."""
        out = []
        for _, state in self._states(include_suspect=True).values():
            usage = state.tenants.get(tenant)
            if usage:
                out.append(usage)
        return out


def _minus(v: ResourceVector, held: list[tuple[float, int, int, str | None]]) -> ResourceVector:
    """``v`` with the ``held`` jobs' resources taken: GPU slots from the named type, or
    from the type that fits best, as the peer would take them."""
    gpu_free = dict(v.gpu_free)
    for _, _, gpu, gpu_type in held:
        if gpu <= 0:
            continue
        kind = gpu_type
        if kind is None:
            fitting = [(n - gpu, t) for t, n in gpu_free.items() if n >= gpu]
            kind = min(fitting)[1] if fitting else None
        if kind in gpu_free:
            gpu_free[kind] = max(0, gpu_free[kind] - gpu)
    return replace(v, cpu_free=max(0.0, v.cpu_free - sum(h[0] for h in held)),
                   mem_free_mb=max(0, v.mem_free_mb - sum(h[1] for h in held)),
                   gpu_free=gpu_free, running=v.running + len(held))
