"""The nemesis: a seeded plan of faults, and the backends that apply them.

The plan is a pure function of the seed (:func:`plan_faults`): the same seed, agents
and duration give the same faults at the same offsets, whatever the machine. Running
it (:class:`Nemesis`) logs every fault and every heal to the history, and
:meth:`Nemesis.heal_all` leaves no agent killed, paused or cut off, even when the run
is cancelled midway.

Fault kinds:

* ``kill``: SIGKILL, then start the agent again after the hold (same data dir);
* ``pause``: SIGSTOP for the hold, then SIGCONT (a hung host: sockets stay open);
* ``restart``: a graceful stop (SIGTERM) and an immediate start;
* ``partition``: cut the agent's link for the hold, then restore it;
* ``sandbox``: the host's sandbox breaks for the hold: every wasm worker process the
  agent starts is killed at once, so each job it runs fails for the host's fault
  (a host that keeps advertising free slots it cannot use); then it works again.
  Not in the default plan, so that the recorded seeds keep their faults.

A backend (:class:`FaultBackend`) applies them to real agents: :class:`LocalFaults`
to the harness's own processes and namespaces, :class:`DockerFaults` to the compose
cluster's containers through :mod:`p2psched.chaos.docker_faults`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2psched.chaos.history import History
from p2psched.chaos.hosts import API_PORT, AgentProcesses, Network
from p2psched.sandbox.wasm_workers import worker_pids

log = logging.getLogger("p2psched.chaos")

KINDS = ("kill", "pause", "restart", "partition", "sandbox")
#: What a run applies unless told otherwise.
DEFAULT_KINDS = ("kill", "pause", "restart", "partition")
#: Relative frequency of each kind. Kills and partitions are what lose jobs in real
#: fleets, so they come most often; graceful restarts are rarer and quick.
WEIGHTS = {"kill": 3, "pause": 2, "restart": 1, "partition": 3, "sandbox": 2}
#: How long each fault holds, seconds. Long enough that membership declares the
#: agent dead (SWIM with Lifeguard takes a few seconds), short enough that a 40 s
#: run sees several faults.
HOLD_S = {"kill": (1.0, 5.0), "pause": (1.0, 6.0), "restart": (0.0, 0.0), "partition": (2.0, 8.0),
          "sandbox": (3.0, 8.0)}
#: How often a broken sandbox's new wasm workers are looked for and killed.
SANDBOX_KILL_EVERY_S = 0.05
#: Quiet time between the starts of two faults.
GAP_S = (1.0, 4.0)
#: No fault in the first seconds: the cluster forms and clients start first.
WARMUP_S = 3.0
#: Seconds a graceful stop may take before it becomes a kill.
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Fault:
    at: float  # seconds from the start of the run
    kind: str
    node: str
    hold: float

    @property
    def end(self) -> float:
        return self.at + self.hold


def plan_faults(seed: int, nodes: list[str], duration: float, kinds: tuple[str, ...] = DEFAULT_KINDS, *,
                max_concurrent: int | None = None) -> list[Fault]:
    """The faults of a run, in start order. Pure: a function of its arguments only.

    At most ``max_concurrent`` agents are faulty at once (default: a minority,
    ``(n - 1) // 2``, at least 1), never the same agent twice at once, and every
    fault is over by ``duration``.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if not nodes or not kinds:
        return []
    limit = max_concurrent if max_concurrent is not None else max(1, (len(nodes) - 1) // 2)
    rng = random.Random(seed)
    weights = [WEIGHTS[k] for k in kinds]
    plan: list[Fault] = []
    t = WARMUP_S
    while True:
        t += rng.uniform(*GAP_S)
        kind = rng.choices(kinds, weights)[0]
        hold = round(rng.uniform(*HOLD_S[kind]), 3)
        if t + hold >= duration:
            break
        busy = {f.node for f in plan if f.at <= t < f.end + 0.5}
        if len(busy) >= limit:
            continue
        free = [n for n in nodes if n not in busy]
        node = rng.choice(free)
        plan.append(Fault(round(t, 3), kind, node, hold))
    return plan


class FaultBackend(Protocol):
    """What the nemesis needs from the agents it breaks. Every method is idempotent
    where it can be (healing a healthy agent does nothing)."""

    kinds: tuple[str, ...]

    async def kill(self, node: str) -> None: ...
    async def revive(self, node: str) -> None: ...
    async def pause(self, node: str) -> None: ...
    async def resume(self, node: str) -> None: ...
    async def restart(self, node: str) -> None: ...
    async def partition(self, node: str) -> None: ...
    async def heal(self, node: str) -> None: ...
    async def break_sandbox(self, node: str) -> int: ...


class LocalFaults:
    """Faults on the harness's own agent processes (and namespaces, for partitions)."""

    def __init__(self, agents: AgentProcesses, network: Network) -> None:
        self.agents = agents
        self.network = network
        self.kinds = KINDS if network.partitions else tuple(k for k in KINDS if k != "partition")

    async def kill(self, node: str) -> None:
        await trio.to_thread.run_sync(self.agents.kill, node)

    async def revive(self, node: str) -> None:
        self.agents.start(node)

    async def pause(self, node: str) -> None:
        self.agents.signal(node, signal.SIGSTOP)

    async def resume(self, node: str) -> None:
        self.agents.signal(node, signal.SIGCONT)

    async def restart(self, node: str) -> None:
        await trio.to_thread.run_sync(self.agents.stop, node, STOP_TIMEOUT_S)
        self.agents.start(node)

    async def partition(self, node: str) -> None:
        await trio.to_thread.run_sync(self.network.cut, self.agents.hosts[node])

    async def heal(self, node: str) -> None:
        await trio.to_thread.run_sync(self.network.restore, self.agents.hosts[node])

    async def break_sandbox(self, node: str) -> int:
        """SIGKILL the agent's wasm workers; returns how many there were."""
        proc = self.agents.procs.get(node)
        if proc is None or proc.poll() is not None:
            return 0
        killed = 0
        for pid in worker_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        return killed


class DockerFaults:
    """Container faults for the compose cluster; ``node`` is a container name."""

    def __init__(self) -> None:
        from p2psched.chaos import docker_faults

        self.docker = docker_faults
        self.kinds: tuple[str, ...] = KINDS

    async def kill(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.kill, node)

    async def revive(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.start, node)

    async def pause(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.pause, node)

    async def resume(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.unpause, node)

    async def restart(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.restart, node, STOP_TIMEOUT_S)

    async def partition(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.partition, node)

    async def heal(self, node: str) -> None:
        await trio.to_thread.run_sync(self.docker.heal, node)

    async def break_sandbox(self, node: str) -> int:
        """SIGKILL the container's wasm workers (through this host's /proc); how many."""
        return await trio.to_thread.run_sync(self.docker.break_sandbox, node)

    def url_of(self, node: str) -> str:
        """The container's API URL now: a container started again may get another address."""
        return f"http://{self.docker.address(node)}:{API_PORT}"


class Nemesis:
    """Runs a plan against a backend, logging each fault and heal to the history."""

    def __init__(self, backend: FaultBackend, history: History, plan: list[Fault],
                 on_heal: Callable[[], Awaitable[None]] | None = None) -> None:
        self.backend = backend
        #: Called after each heal (the harness looks up addresses that may have moved).
        self.on_heal = on_heal
        self.history = history
        self.plan = plan
        #: Faults applied and not yet healed: node -> kind.
        self.active: dict[str, str] = {}
        self.last_heal: float | None = None

    async def run(self, start: float) -> None:
        """Apply the plan; ``start`` is trio.current_time() at offset 0."""
        async with trio.open_nursery() as nursery:
            for fault in self.plan:
                await trio.sleep_until(start + fault.at)
                nursery.start_soon(self._one, fault)

    async def _one(self, fault: Fault) -> None:
        value = {"kind": fault.kind, "hold_s": fault.hold}
        self.history.log("invoke", "fault", "nemesis", agent=fault.node, value=value)
        # Known to heal_all before it is applied: a run cancelled mid-fault still heals it.
        self.active[fault.node] = fault.kind
        try:
            await self._apply(fault.kind, fault.node)
        except Exception as e:
            self.history.log("fail", "fault", "nemesis", agent=fault.node, value={**value, "error": str(e)})
            log.warning("fault %s on %s failed: %s", fault.kind, fault.node, e)
            return
        self.history.log("ok", "fault", "nemesis", agent=fault.node, value=value)
        if fault.kind == "restart":
            self.active.pop(fault.node, None)
            self.last_heal = trio.current_time()
            if self.on_heal is not None:
                await self.on_heal()
            return
        if fault.kind == "sandbox":
            # Broken for the whole hold: each worker the agent starts meanwhile dies too.
            with trio.move_on_after(fault.hold):
                while True:
                    await trio.sleep(SANDBOX_KILL_EVERY_S)
                    await self.backend.break_sandbox(fault.node)
        else:
            await trio.sleep(fault.hold)
        try:
            await self.heal(fault.node)
        except Exception as e:  # logged; heal_all tries again at the end
            log.warning("heal of %s on %s failed: %s", fault.kind, fault.node, e)

    async def _apply(self, kind: str, node: str) -> None:
        if kind == "kill":
            await self.backend.kill(node)
        elif kind == "pause":
            await self.backend.pause(node)
        elif kind == "restart":
            await self.backend.restart(node)
        elif kind == "partition":
            await self.backend.partition(node)
        elif kind == "sandbox":
            await self.backend.break_sandbox(node)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def heal(self, node: str) -> None:
        kind = self.active.get(node)
        if kind is None:
            return
        self.history.log("invoke", "heal", "nemesis", agent=node, value={"kind": kind})
        try:
            if kind == "kill":
                await self.backend.revive(node)
            elif kind == "pause":
                await self.backend.resume(node)
            elif kind == "partition":
                await self.backend.heal(node)
            elif kind == "restart":
                await self.backend.revive(node)
            # "sandbox" needs no undoing: its workers are no longer killed
        except Exception as e:
            self.history.log("fail", "heal", "nemesis", agent=node, value={"kind": kind, "error": str(e)})
            raise
        self.active.pop(node, None)
        self.last_heal = trio.current_time()
        self.history.log("ok", "heal", "nemesis", agent=node, value={"kind": kind})
        if self.on_heal is not None:
            await self.on_heal()

    async def heal_all(self) -> None:
        """Undo every fault still in force (cancellation-proof: it shields itself).

        A heal that fails is logged and the others still run; the agent it left
        broken then shows in the checker's membership verdict.
        """
        with trio.CancelScope(shield=True):
            for node in list(self.active):
                try:
                    await self.heal(node)
                except Exception as e:
                    log.error("could not heal %s on %s: %s", self.active.get(node), node, e)
