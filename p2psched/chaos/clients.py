"""Clients: concurrent tasks that submit and cancel jobs against random agents.

Each client owns a share of the run's jobs and submits them at a steady pace to an
agent picked at random (seeded). A submission that gets no answer (connection
refused, reset, timed out: the agent is killed, paused or cut off) is logged as
``info`` and retried with the same job id, so that idempotency, not luck, keeps one
job per id. A retry goes to the same agent first; with ``switch_after`` set, a
client that still has no answer after that many tries asks another agent, which
tests that the same id sent to two agents is still one job.

Some jobs are cancelled a moment after they were acknowledged, at their origin
(only the origin knows the job). A cancel that gets 409 found the job already ended.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from p2psched.chaos.history import History
from p2psched.chaos.workload import Modules, make_job

log = logging.getLogger("p2psched.chaos")

#: Per-request limits. A paused agent accepts connections (the kernel does) but never
#: answers, so the read timeout is what turns a pause into an ``info``; 8 s is far
#: above a healthy agent's answer time even on a loaded two-core machine.
TIMEOUT = httpx.Timeout(connect=2.0, read=8.0, write=5.0, pool=30.0)
#: Backoff between retries of one submission, doubling from the first to the last.
RETRY_BACKOFF_S = (0.2, 2.0)
#: Share of acknowledged jobs a client then cancels.
CANCEL_SHARE = 0.1
#: Delay before such a cancel: 0-1.5 s catches jobs queued, placed and running.
CANCEL_DELAY_S = (0.0, 1.5)


@dataclass
class ClientConfig:
    clients: int
    jobs: int
    #: Seconds over which submissions are spread; retries may run past it.
    duration: float
    seed: int
    run_tag: str
    cancel_share: float = CANCEL_SHARE
    #: Ask another agent after this many unanswered tries of one submission (None: never).
    switch_after: int | None = None
    #: After this (trio clock), an unanswered submission is given up (logged, not retried).
    give_up_at: float = float("inf")


@dataclass
class Clients:
    config: ClientConfig
    history: History
    urls: dict[str, str]  # node id -> API base URL
    http: httpx.AsyncClient
    modules: Modules
    acked: dict[str, str] = field(default_factory=dict)  # job id -> origin node id
    pending: set[str] = field(default_factory=set)

    def job_id(self, client: int, k: int) -> str:
        return f"{self.config.run_tag}-c{client}-{k}"

    async def run(self, start: float) -> None:
        """Submit every job (and cancel some); returns when each submission is settled."""
        c = self.config
        rate = c.jobs / max(1.0, c.duration * 0.9)
        async with trio.open_nursery() as nursery:
            for i in range(c.clients):
                share = [g for g in range(c.jobs) if g % c.clients == i]
                nursery.start_soon(self._client, i, share, start, rate, nursery)

    async def _client(self, i: int, share: list[int], start: float, rate: float, nursery: trio.Nursery) -> None:
        rng = random.Random(f"{self.config.seed}/client/{i}")
        nodes = sorted(self.urls)
        for k, g in enumerate(share):
            await trio.sleep_until(start + g / rate)
            job_id = self.job_id(i, k)
            spec, expect = make_job(rng, job_id, self.modules)
            node = rng.choice(nodes)
            origin = await self.submit(f"client-{i}", node, spec, expect.as_dict(), rng)
            if origin is not None and rng.random() < self.config.cancel_share:
                nursery.start_soon(self._cancel_later, f"client-{i}", job_id, origin,
                                   rng.uniform(*CANCEL_DELAY_S))

    async def submit(self, process: str, node: str, spec: dict[str, Any], expect: dict[str, Any],
                     rng: random.Random) -> str | None:
        """Submit until an agent answers; returns the origin that acknowledged it, or None."""
        job_id = spec["id"]
        backoff = RETRY_BACKOFF_S[0]
        tries = 0
        nodes = sorted(self.urls)
        self.pending.add(job_id)
        try:
            while True:
                tries += 1
                value: dict[str, Any] = {"try": tries}
                if tries == 1:
                    value["expect"] = expect
                self.history.log("invoke", "submit", process, agent=node, job=job_id, value=value)
                try:
                    r = await self.http.post(self.urls[node] + "/v1/jobs", json=spec, timeout=TIMEOUT)
                except httpx.TransportError as e:
                    self.history.log("info", "submit", process, agent=node, job=job_id,
                                     value={"error": f"{type(e).__name__}: {e}"[:200]})
                else:
                    if r.status_code in (200, 202):
                        rec = r.json()
                        origin = str(rec.get("origin") or node)
                        self.history.log("ok", "submit", process, agent=node, job=job_id,
                                         value={"status": r.status_code, "origin": origin, "state": rec.get("state")})
                        self.acked[job_id] = origin
                        return origin
                    definite = r.status_code < 500
                    self.history.log("fail" if definite else "info", "submit", process, agent=node, job=job_id,
                                     value={"status": r.status_code, "body": r.text[:300]})
                    if definite and r.status_code not in (429, 503):
                        log.error("submission of %s refused with %d: %s", job_id, r.status_code, r.text[:300])
                        return None
                if trio.current_time() >= self.config.give_up_at:
                    self.history.log("info", "submit", process, agent=node, job=job_id,
                                     value={"gave_up": True, "tries": tries})
                    return None
                await trio.sleep(backoff * rng.uniform(0.5, 1.5))
                backoff = min(RETRY_BACKOFF_S[1], backoff * 2)
                if self.config.switch_after and tries % self.config.switch_after == 0:
                    node = rng.choice([n for n in nodes if n != node] or nodes)
        finally:
            self.pending.discard(job_id)

    async def _cancel_later(self, process: str, job_id: str, origin: str, delay: float) -> None:
        await trio.sleep(delay)
        await self.cancel(process, job_id, origin)

    async def cancel(self, process: str, job_id: str, origin: str) -> None:
        url = self.urls.get(origin)
        if url is None:
            return
        self.history.log("invoke", "cancel", process, agent=origin, job=job_id)
        try:
            # The agent waits up to 30 s for the executor to confirm; allow for it.
            r = await self.http.delete(f"{url}/v1/jobs/{job_id}", timeout=httpx.Timeout(45.0, connect=2.0))
        except httpx.TransportError as e:
            self.history.log("info", "cancel", process, agent=origin, job=job_id,
                             value={"error": f"{type(e).__name__}: {e}"[:200]})
            return
        if r.status_code == 200:
            rec = r.json()
            self.history.log("ok", "cancel", process, agent=origin, job=job_id,
                             value={"state": rec.get("state"), "executor": rec.get("executor")})
        else:
            self.history.log("fail" if r.status_code < 500 else "info", "cancel", process, agent=origin, job=job_id,
                             value={"status": r.status_code, "body": r.text[:300]})
