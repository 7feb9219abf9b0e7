"""Test helpers that start real agents: in-process on trio, or as subprocesses.

Every cluster test reads as a scenario on top of these; nothing here fakes an agent.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import trio

from p2psched.sandbox.wasm_workers import worker_pids as wasm_worker_pids  # noqa: F401 - the tests' name

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "examples" / "wasm"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()
_ports = random.Random()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP (the gossip port uses both), never handed out
    before in this process.

    Drawn below the kernel's ephemeral range: a port from bind(0) comes from that
    range, so an outgoing connection of another agent could take it between this
    call and its own agent's bind (seen once in the suite as "Address already in
    use" at start-up).
    """
    low = _ephemeral_low()
    for _ in range(10_000):
        port = _ports.randrange(10_000, low) if low > 11_000 else _ports.randrange(1024, 65536)
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port for both TCP and UDP below the ephemeral range")


def cli(*args: str, agent: AgentProcess | None = None, input_bytes: bytes | None = None,
        check: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run ``p2psched ARGS`` as a user would, against ``agent`` (through $P2PSCHED_URL)."""
    env = {**os.environ}
    if agent is not None:
        env["P2PSCHED_URL"] = agent.url
    p = subprocess.run([sys.executable, "-m", "p2psched", *map(str, args)], capture_output=True, env=env,
                       input=input_bytes, cwd=ROOT, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"p2psched {' '.join(map(str, args))} exited {p.returncode}: {p.stderr.decode()}")
    return p


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "it") -> Any:
    """Poll ``check`` until it returns something true, and return that. An exception
    counts as not yet (a page mid-redraw, an agent still starting)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001 - look again
            last = e
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s; last: {last!r}")


def wasm_spec(name: str, **extra: Any) -> dict[str, Any]:
    spec = {"runtime": "wasm", "module": base64.b64encode((WASM / name).read_bytes()).decode()}
    spec.update(extra)
    return spec


@asynccontextmanager
async def running_agent(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """An agent inside this trio run, with a real HTTP server on a free port."""
    from p2psched.agent.agent import Agent
    from p2psched.config import load_settings

    port = free_port()
    settings = load_settings(
        node_id=overrides.pop("node_id", "t1"), api=f"127.0.0.1:{port}", gossip=f"127.0.0.1:{free_port()}",
        transfer=f"127.0.0.1:{free_port()}", data_dir=tmp_path / "agent", insecure=True, no_mdns=True,
        **overrides,
    )
    agent = Agent(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield agent, client
        agent.request_stop()
        await agent.stopped.wait()


async def await_peers(agent: Any, *node_ids: str, timeout: float = 30) -> None:
    """Wait until in-process ``agent`` knows each of ``node_ids`` through membership."""
    with trio.fail_after(timeout):
        while agent.cluster is None or any(agent.cluster.state_of(n) is None for n in node_ids):
            await trio.sleep(0.05)


async def start_running(http: httpx.AsyncClient, spec: dict[str, Any], timeout: float = 30) -> str:
    """Submit ``spec`` and wait until its job runs; its id."""
    job_id = (await http.post("/v1/jobs", json=spec)).json()["id"]
    with trio.fail_after(timeout):
        while (await http.get(f"/v1/jobs/{job_id}")).json()["state"] != "running":
            await trio.sleep(0.05)
    return str(job_id)


@dataclass
class AgentProcess:
    node_id: str
    data_dir: Path
    api_port: int
    gossip_port: int
    transfer_port: int
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def gossip(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "p2psched", "agent", "--node-id", self.node_id,
                "--api", f"127.0.0.1:{self.api_port}", "--gossip", self.gossip,
                "--transfer", f"127.0.0.1:{self.transfer_port}", "--data-dir", str(self.data_dir), *self.extra]

    def start(self, wait: bool = True) -> AgentProcess:
        self.log_path = self.data_dir.parent / f"{self.node_id}.log"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.node_id} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent {self.node_id} not healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                self.proc.wait(60)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else 0

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def new_agent(tmp_path: Path, node_id: str, *extra: str) -> AgentProcess:
    return AgentProcess(node_id, tmp_path / "agents" / node_id, free_port(), free_port(), free_port(),
                        ["--insecure", "--no-mdns", *extra])


#: Compressed membership timings for tests (memberlist's tests do the same): a
#: crashed agent is known dead within a couple of seconds instead of ~10.
FAST_MEMBERSHIP = {"probe_interval": 0.2, "probe_timeout": 0.1, "gossip_interval": 0.05,
                   "push_pull_interval": 2.0, "suspicion_mult": 3}


def start_cluster(tmp_path: Path, node_ids: list[str], *extra: str, wait_alive: bool = True,
                  timeout: float = 60, auth: Any = None,
                  per_agent: dict[str, list[str]] | None = None,
                  per_agent_env: dict[str, dict[str, str]] | None = None) -> list[AgentProcess]:
    """Start real agents that join the first one, and wait until each sees all alive.

    ``extra`` flags go to every agent, ``per_agent[node_id]`` to that one only
    (e.g. ``--gpus`` for the agents that have GPUs), ``per_agent_env[node_id]`` to
    that one's environment.
    """
    import json

    agents: list[AgentProcess] = []
    try:
        for node_id in node_ids:
            a = new_agent(tmp_path, node_id, *extra, *(per_agent or {}).get(node_id, []))
            a.env["P2PSCHED_MEMBERSHIP"] = json.dumps(FAST_MEMBERSHIP)
            a.env.update((per_agent_env or {}).get(node_id, {}))
            if agents:
                a.extra += ["--join", agents[0].gossip]
            agents.append(a.start(wait=False))
        for a in agents:
            a.wait_healthy(timeout)
        if wait_alive:
            wait_converged(agents, timeout, auth=auth)
    except BaseException:
        for a in agents:  # the caller gets no handle to stop them: a failed start must not leak agents
            a.kill()
        raise
    return agents


def alive_view(agent: AgentProcess, auth: Any = None) -> dict[str, str]:
    try:
        peers = httpx.get(agent.url + "/v1/peers", timeout=5, auth=auth).json()["peers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {p["node_id"]: p["state"] for p in peers}


def wait_converged(agents: list[AgentProcess], timeout: float = 60, expect: dict[str, str] | None = None,
                   auth: Any = None) -> None:
    want = expect or {a.node_id: "alive" for a in agents}
    deadline = time.monotonic() + timeout
    while True:
        views = {a.node_id: alive_view(a, auth) for a in agents if a.proc and a.proc.poll() is None}
        if all(all(v.get(k) == s for k, s in want.items()) for v in views.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"membership did not converge to {want} in {timeout}s: {views}")
        time.sleep(0.2)


def stop_all(agents: list[AgentProcess]) -> None:
    for a in agents:
        try:
            a.stop()
        except Exception:  # keep stopping the others
            a.kill()
