"""One chaos run from start to verdict.

1. Build the hosts (network namespaces on a bridge, or loopback with ``netns=False``)
   and start one agent per host; wait until each is healthy and, for up to
   ``form_timeout_s``, until they see each other.
2. At once: clients submit and cancel jobs, the nemesis runs its seeded plan, and a
   monitor polls every agent's ``/v1/peers`` (to time convergence after each heal).
3. Heal everything; wait until the agents converge and every acknowledged job is
   final at its origin (or ``settle_s`` passes).
4. Fetch every agent's records and peers, and hand them with the history to the
   checker. Files in the run directory: ``history.jsonl``, ``final.json``,
   ``verdict.json``, ``hosts.json``, one log per agent.

Teardown (agents, namespaces, bridge, firewall rule) happens in ``finally`` blocks
outside trio, so it runs on failure, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from p2psched.chaos.checker import Verdict, check
from p2psched.chaos.clients import ClientConfig, Clients
from p2psched.chaos.history import History
from p2psched.chaos.hosts import AgentProcesses, LoopbackNetwork, NetnsNetwork, describe
from p2psched.chaos.nemesis import DEFAULT_KINDS, FaultBackend, LocalFaults, Nemesis, plan_faults
from p2psched.chaos.workload import Modules

log = logging.getLogger("p2psched.chaos")

#: How often the monitor asks every agent for its peers: fine enough to time
#: convergence to half a second, cheap enough for a small machine.
MONITOR_INTERVAL_S = 0.5
MONITOR_TIMEOUT = httpx.Timeout(1.0)


@dataclass
class RunConfig:
    agents: int = 4
    duration: float = 40.0
    seed: int = 1
    jobs: int = 300
    #: Concurrent clients. A client waiting out a dead agent stops submitting, so
    #: there are several per agent to keep the load up through faults.
    clients: int = 12
    #: Network namespaces (partitions possible) or loopback (``--no-netns``).
    netns: bool = True
    #: ``local``: agents this harness starts; ``docker``: the compose cluster's containers.
    backend: str = "local"
    out: Path | None = None
    #: CPU slots each agent advertises. Two slots fill up with sleep jobs now and
    #: then, so agents also forward jobs to peers, and faults hit executors that are
    #: not the origin; a sleep costs no CPU, so slots may exceed the machine's cores.
    cpus: float = 2.0
    kinds: tuple[str, ...] = DEFAULT_KINDS
    switch_after: int | None = None
    cancel_share: float = 0.1
    #: Seconds to wait after healing for every acknowledged job to end.
    settle_s: float = 120.0
    #: Seconds to wait for membership to converge after the last heal.
    converge_timeout_s: float = 60.0
    #: Seconds to wait at start for the agents to see each other.
    form_timeout_s: float = 30.0
    extra_agent_args: list[str] = field(default_factory=list)
    max_attempts: int | None = None


@dataclass
class Run:
    config: RunConfig
    run_dir: Path
    history: History
    urls: dict[str, str]  # node id -> API URL
    backend: FaultBackend
    nodes: list[str]  # backend names (== node ids locally)
    node_ids: dict[str, str] = field(default_factory=dict)  # backend name -> node id
    agents: AgentProcesses | None = None
    #: Unique per run: job ids start with it, so runs never share an id.
    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    #: node id -> API URL, the dict clients use; refreshed in place.
    urls_by_id: dict[str, str] = field(default_factory=dict)

    async def refresh_urls(self) -> None:
        """Containers may come back from a kill on another address: look them up again
        (a backend without ``url_of`` has fixed addresses)."""
        url_of = getattr(self.backend, "url_of", None)
        if url_of is None:
            return
        for name in self.nodes:
            try:
                url = await trio.to_thread.run_sync(url_of, name)
            except Exception as e:  # partitioned or stopped: keep the last address
                log.info("no address for %s yet: %s", name, e)
                continue
            self.urls[name] = url
            if name in self.node_ids:
                self.urls_by_id[self.node_ids[name]] = url


def _max_attempts() -> int:
    from p2psched.agent.remote import MAX_ATTEMPTS

    return MAX_ATTEMPTS


async def _get_json(http: httpx.AsyncClient, url: str, timeout: httpx.Timeout | float = 5.0) -> Any:
    try:
        r = await http.get(url, timeout=timeout)
    except httpx.TransportError:
        return None
    if r.status_code != 200:
        return None
    return r.json()


async def wait_healthy(http: httpx.AsyncClient, urls: dict[str, str], timeout: float,
                       agents: AgentProcesses | None = None) -> dict[str, str]:
    """Wait until every agent answers /healthz; returns backend name -> node id."""
    ids: dict[str, str] = {}
    with trio.move_on_after(timeout):
        while len(ids) < len(urls):
            for name, url in urls.items():
                if name in ids:
                    continue
                if agents is not None and name in agents.procs and not agents.running(name):
                    raise RuntimeError(f"agent {name} exited while starting:\n{agents.log_tail(name)}")
                body = await _get_json(http, url + "/healthz", 2.0)
                if body is not None:
                    ids[name] = str(body.get("node_id", name))
            if len(ids) < len(urls):
                await trio.sleep(0.2)
    missing = sorted(set(urls) - set(ids))
    if missing:
        tails = "".join(f"\n--- {m} ---\n{agents.log_tail(m)}" for m in missing) if agents else ""
        raise RuntimeError(f"agents {', '.join(missing)} not healthy within {timeout:.0f}s{tails}")
    return ids


async def membership(http: httpx.AsyncClient, urls: dict[str, str], node_ids: list[str]) -> tuple[bool, dict[str, Any]]:
    """Whether every agent sees every agent alive, and what each one that does not sees."""
    views: dict[str, Any] = {}

    async def one(name: str, url: str) -> None:
        views[name] = await _get_json(http, url + "/v1/peers", MONITOR_TIMEOUT)

    async with trio.open_nursery() as nursery:
        for name, url in urls.items():
            nursery.start_soon(one, name, url)
    wrong: dict[str, Any] = {}
    for name, body in views.items():
        if body is None:
            wrong[name] = "no answer"
            continue
        seen = {m.get("node_id"): m.get("state") for m in body.get("peers", [])}
        off = {n: seen.get(n, "absent") for n in node_ids if seen.get(n) != "alive"}
        if off:
            wrong[name] = off
    return not wrong, wrong


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")


def crash_cause(log_tail: str) -> str:
    """The innermost exception an agent's log ends with (``Module.Error: message``),
    skipping the exception groups trio wraps it in; else the log's last line."""
    lines = [ln.strip().lstrip("|+- ").strip() for ln in log_tail.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("===")]
    for ln in reversed(lines):
        m = _EXC_LINE.match(ln)
        if m and not m.group(1).endswith("ExceptionGroup") and not m.group(1).startswith("File"):
            return ln
    return lines[-1] if lines else ""


def restart_crashed(run: Run, nemesis: Nemesis | None) -> list[str]:
    """Agents that exited although no fault stopped them: log each as a crash (an
    agent bug; the checker reports it) and start it again, as a supervisor would."""
    if run.agents is None:
        return []
    crashed = []
    for name in run.nodes:
        if name not in run.agents.procs or run.agents.running(name):
            continue
        if nemesis is not None and nemesis.active.get(name) in ("kill", "restart"):
            continue
        proc = run.agents.procs[name]
        tail = run.agents.log_tail(name, 4000)
        cause = crash_cause(tail)
        run.history.log("info", "crash", "harness", agent=name,
                        value={"exit_code": proc.returncode, "cause": cause[-400:]})
        log.error("agent %s exited with %s without a fault: %s; starting it again", name, proc.returncode, cause)
        run.agents.start(name)
        crashed.append(name)
    return crashed


async def monitor(run: Run, http: httpx.AsyncClient, nemesis: Nemesis | None = None) -> None:
    ids = sorted(run.node_ids.values())
    while True:
        restart_crashed(run, nemesis)
        converged, wrong = await membership(http, run.urls, ids)
        run.history.log("ok", "membership", "monitor", value={"converged": converged, "off": wrong} if wrong
                        else {"converged": converged})
        await trio.sleep(MONITOR_INTERVAL_S)


async def _wait_converged(run: Run, http: httpx.AsyncClient, timeout: float, since: float) -> float | None:
    ids = sorted(run.node_ids.values())
    wrong: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            converged, wrong = await membership(http, run.urls, ids)
            if converged:
                seconds = time.time() - since
                run.history.log("ok", "converge", "harness", value={"seconds": round(seconds, 3)})
                return seconds
            await trio.sleep(0.25)
    run.history.log("fail", "converge", "harness", value={"timeout_s": timeout, "off": wrong})
    return None


async def _settle(run: Run, http: httpx.AsyncClient, acked: dict[str, str], timeout: float) -> int:
    """Long-poll each acknowledged job at its origin until final; returns how many are not."""
    from p2psched.chaos.checker import FINAL_STATES

    open_jobs = dict(acked)
    by_id = {v: k for k, v in run.node_ids.items()}
    deadline = trio.current_time() + timeout
    limit = trio.Semaphore(32)

    async def one(job: str, origin: str) -> None:
        url = run.urls.get(by_id.get(origin, origin))
        if url is None:
            return
        async with limit:
            wait = max(1.0, min(20.0, deadline - trio.current_time()))
            body = await _get_json(http, f"{url}/v1/jobs/{job}?wait={wait:.0f}", httpx.Timeout(wait + 10))
        if body is not None and body.get("state") in FINAL_STATES:
            open_jobs.pop(job, None)

    while open_jobs and trio.current_time() < deadline:
        async with trio.open_nursery() as nursery:
            for job, origin in list(open_jobs.items()):
                nursery.start_soon(one, job, origin)
        if open_jobs:
            await trio.sleep(0.5)
    return len(open_jobs)


#: Tries to fetch one agent's records before it counts as unreachable: an agent
#: that crashed and was restarted a moment ago needs a few seconds to answer.
FETCH_TRIES = 20


async def _fetch_records(http: httpx.AsyncClient, url: str) -> list[dict[str, Any]] | None:
    recs: list[dict[str, Any]] = []
    cursor = 0
    while True:
        body = await _get_json(http, f"{url}/v1/jobs?limit=1000&cursor={cursor}", 60.0)
        if body is None:
            return None
        recs.extend(body.get("jobs", []))
        if body.get("next_cursor") is None:
            return recs
        cursor = int(body["next_cursor"])


async def fetch_final(run: Run, http: httpx.AsyncClient) -> dict[str, Any]:
    """Every agent's records and peers. An agent that never answers is listed in
    ``unreachable``: the checker cannot tell its jobs lost from kept, and says so."""
    records: dict[str, list[dict[str, Any]]] = {}
    peers: dict[str, list[dict[str, Any]]] = {}
    unreachable: list[str] = []
    for name in run.nodes:
        recs = None
        node = run.node_ids.get(name, name)
        for _ in range(FETCH_TRIES):
            url = run.urls[name]
            # Ask the agent who it is: an address may have moved to another agent.
            health = await _get_json(http, url + "/healthz", 5.0)
            if health is not None and "node_id" in health:
                node = str(health["node_id"])
                recs = await _fetch_records(http, url)
                if recs is not None:
                    break
            restart_crashed(run, None)
            await trio.sleep(1.0)
            await run.refresh_urls()
        if recs is None:
            unreachable.append(node)
            continue
        records[node] = recs
        view = await _get_json(http, run.urls[name] + "/v1/peers", 5.0)
        if view is not None:
            peers[node] = view.get("peers", [])
    return {"nodes": sorted(run.node_ids.values()), "records": records, "peers": peers, "unreachable": unreachable}


async def drive(run: Run) -> Verdict:
    cfg = run.config
    modules = Modules()
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as http:
        run.node_ids = await wait_healthy(http, run.urls, 60.0, run.agents)
        # Job records and peers name agents by node id; clients address them by it too.
        run.urls_by_id.update({run.node_ids[n]: u for n, u in run.urls.items()})
        formed = await _wait_converged(run, http, cfg.form_timeout_s, time.time())
        if formed is None:
            log.warning("the agents did not all see each other within %.0fs; running anyway (the checker will "
                        "judge membership after healing)", cfg.form_timeout_s)
        skipped = [k for k in cfg.kinds if k not in run.backend.kinds]
        if skipped:  # partitions on loopback (--no-netns)
            log.warning("this run cannot apply %s faults here (%s); running without them", ", ".join(skipped),
                        "it needs network namespaces: run as root without --no-netns"
                        if skipped == ["partition"] else "the backend lacks them")
        plan = plan_faults(cfg.seed, run.nodes, cfg.duration, tuple(k for k in cfg.kinds if k in run.backend.kinds))
        run.history.log("ok", "plan", "nemesis", value={"faults": [vars_(f) for f in plan], "seed": cfg.seed})
        nemesis = Nemesis(run.backend, run.history, plan, on_heal=run.refresh_urls)
        start = trio.current_time()
        ccfg = ClientConfig(clients=cfg.clients, jobs=cfg.jobs, duration=cfg.duration, seed=cfg.seed,
                            run_tag=f"j{run.tag}", cancel_share=cfg.cancel_share, switch_after=cfg.switch_after,
                            give_up_at=start + cfg.duration + cfg.settle_s)
        clients = Clients(ccfg, run.history, run.urls_by_id, http, modules)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor, run, http, nemesis)
                async with trio.open_nursery() as work:
                    work.start_soon(nemesis.run, start)
                    work.start_soon(clients.run, start)
                    await trio.sleep(cfg.duration)
                    # Faults stop at the duration; submissions still being retried go on.
                nursery.cancel_scope.cancel()
        finally:
            await nemesis.heal_all()
        heal_at = time.time()
        restart_crashed(run, nemesis)
        await run.refresh_urls()
        await wait_healthy(http, run.urls, 60.0, run.agents)
        await _wait_converged(run, http, cfg.converge_timeout_s, heal_at)
        left = await _settle(run, http, clients.acked, cfg.settle_s)
        restart_crashed(run, nemesis)
        await wait_healthy(http, run.urls, 60.0, run.agents)
        if left:
            log.warning("%d acknowledged jobs still not final after %.0fs", left, cfg.settle_s)
        final = await fetch_final(run, http)
    (run.run_dir / "final.json").write_text(json.dumps(final))
    verdict = check(run.history.ops, final, max_attempts=cfg.max_attempts or _max_attempts())
    (run.run_dir / "verdict.json").write_text(json.dumps(verdict.as_dict(), indent=1))
    return verdict


def vars_(f: Any) -> dict[str, Any]:
    return {"at": f.at, "kind": f.kind, "node": f.node, "hold": f.hold}


class Interrupted(Exception):
    """The run was stopped by a signal; everything it built has been torn down."""


async def _until_signalled(run: Run) -> Verdict:
    """drive(run), unless SIGTERM or SIGHUP comes first: then cancel it cleanly (the
    nemesis still heals) and raise Interrupted, so teardown runs as on any exit."""
    got: list[int] = []
    result: list[Verdict] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            async def body() -> None:
                result.append(await drive(run))
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                async for sig in signals:
                    got.append(sig)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(body)
            nursery.start_soon(watch)
    if got or not result:
        raise Interrupted(f"stopped by signal {got[0] if got else '?'}")
    return result[0]


def run_chaos(cfg: RunConfig) -> tuple[Verdict, Path]:
    """Run a chaos test to its verdict (blocking; call outside trio). Cleans up everything."""
    tag = secrets.token_hex(3)[:5]
    run_dir = cfg.out or Path(tempfile.mkdtemp(prefix=f"p2psched-chaos-{tag}-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.out is not None:
        # A fixed --out directory is reused; start from an empty history and fresh data.
        for old in ("history.jsonl", "final.json", "verdict.json"):
            (run_dir / old).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(run_dir / "data", ignore_errors=True)
    history = History(run_dir / "history.jsonl")
    agents: AgentProcesses | None = None
    network: NetnsNetwork | LoopbackNetwork | None = None
    try:
        if cfg.backend == "docker":
            run = _docker_run(cfg, run_dir, history)
            run.tag = tag
        else:
            network = NetnsNetwork(cfg.agents, tag=tag) if cfg.netns else LoopbackNetwork(cfg.agents)
            network.setup()
            (run_dir / "hosts.json").write_text(json.dumps(describe(network), indent=1))
            agents = AgentProcesses(network, run_dir, cpus=cfg.cpus, extra=cfg.extra_agent_args)
            for h in network.hosts:
                agents.start(h.node_id)
            run = Run(cfg, run_dir, history, {h.node_id: h.api_url for h in network.hosts},
                      LocalFaults(agents, network), [h.node_id for h in network.hosts], agents=agents, tag=tag)
        verdict = trio.run(_until_signalled, run)
        return verdict, run_dir
    finally:
        history.close()
        if agents is not None:
            agents.close()
        if network is not None:
            network.close()


def _docker_run(cfg: RunConfig, run_dir: Path, history: History) -> Run:
    from p2psched.chaos import docker_faults
    from p2psched.chaos.nemesis import DockerFaults

    names = docker_faults.list_agents()
    if not names:
        raise RuntimeError("no agent containers found; start the cluster first: scripts/cluster.sh up N")
    urls = {n: f"http://{docker_faults.address(n)}:7700" for n in names}
    return Run(cfg, run_dir, history, urls, DockerFaults(), names)
