"""``p2psched agent``: run the agent in the foreground."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from p2psched.config import ConfigError, load_settings, misspelt_env

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


def process_registry() -> CollectorRegistry:
    """A metrics registry with this process's own figures (``process_*``: CPU,
    resident memory, open files; ``python_gc_*``; ``python_info``) beside the
    agent's. Only where one agent is the whole process: tests run several in one."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML config file; P2PSCHED_CONFIG names one when this flag is not given.")
@click.option("--node-id", help="This agent's id (default: hostname).")
@click.option("--api", help="HTTP API HOST:PORT [0.0.0.0:7700].")
@click.option("--gossip", help="Gossip HOST:PORT, UDP [0.0.0.0:7701].")
@click.option("--transfer", help="Transfer HOST:PORT, TCP [0.0.0.0:7702].")
@click.option("--advertise", help="Host peers should use to reach this agent.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Data directory [./data/<node-id>].")
@click.option("--cpus", metavar="N", help="Advertised CPU slots [detected].")
@click.option("--mem-mb", metavar="N", help="Advertised memory in MiB [detected].")
@click.option("--queue-limit", metavar="N", help="Queued jobs at most before 429 [10000].")
@click.option("--job-retention-h", metavar="HOURS",
              help="Hours a finished job is kept, then deleted; 0: forever [168].")
@click.option("--host-retries", metavar="N", help="Times a job the host failed to run is queued again [3].")
@click.option("--host-cooldown-s", metavar="SECONDS",
              help="Seconds a runtime whose jobs keep failing on this host is left to peers, at first [5].")
@click.option("--dispatch-policy", type=click.Choice(["fair", "fifo"]), help="Local dispatch order [fair].")
@click.option("--grace-s", metavar="SECONDS", help="Seconds running jobs may finish on shutdown [10].")
@click.option("--drain-on-sigterm/--no-drain-on-sigterm", default=None, help="SIGTERM drains first.")
@click.option("--join", multiple=True, help="Seed peer HOST:PORT (repeatable).")
@click.option("--join-dns", multiple=True, help="DNS NAME:PORT resolving to peers (repeatable).")
@click.option("--no-mdns", is_flag=True, default=None, help="Turn off mDNS discovery.")
@click.option("--topology", type=click.Path(path_type=Path), help="Leaf-spine topology YAML.")
@click.option("--tenants", type=click.Path(path_type=Path), help="Tenant registry TOML.")
@click.option("--insecure", is_flag=True, default=None, help="No gossip encryption or TLS (says so loudly).")
@click.option("--gossip-key", type=click.Path(path_type=Path), help="Gossip keyring file.")
@click.option("--tls-dir", type=click.Path(path_type=Path), help="Directory with ca.pem and this node's cert.")
@click.option("--cluster-name", help="Cluster name bound into gossip encryption [p2psched].")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Node label, e.g. zone=a: jobs labelled node.zone=a run only on agents so labelled (repeatable).")
@click.option("--placement-policy", type=click.Choice(["p2p", "local-first", "random", "round-robin"]),
              help="Where jobs submitted here run; the others are baselines to compare p2p against [p2p].")
@click.option("--gpu-placement", type=click.Choice(["fit-first", "fit-last"]),
              help="GPU jobs: fit-first keeps hosts whole for big jobs; fit-last runs here when it fits [fit-first].")
@click.option("--process-warm-pool", metavar="N", help="Process sandboxes kept pre-built [2].")
@click.option("--gpus", help="Declared GPUs (see docs/gpu.md).")
@click.option("--gpu-profile", help="How GPUs are offered: whole, shared:N, mig [whole].")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text, or JSON per line [text].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least severe level logged; info logs each job transition, warning does not [info].")
def agent(config_file: Path | None, **flags: object) -> None:
    """Run the agent on this host. Every flag is also P2PSCHED_<NAME> and a config key."""
    overrides = {k: v for k, v in flags.items() if v is not None and v != ()}
    for key in ("join", "join_dns", "labels"):
        if key in overrides:
            overrides[key] = list(overrides[key])  # type: ignore[call-overload]
    try:
        settings = load_settings(config_file, **overrides)
    except ConfigError as e:
        click.echo(f"p2psched agent: {e}", err=True)
        sys.exit(2)

    import trio

    from p2psched import logs
    from p2psched.agent.agent import Agent

    logs.configure(settings.log_format, settings.log_level)
    for warning in misspelt_env(dict(os.environ)):
        logging.getLogger("p2psched.config").warning("%s", warning)

    unwritten: list[str] = []

    async def main() -> None:
        agent = Agent(settings, registry=process_registry())
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)

                async def on_signals() -> None:
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            agent.reload()
                            continue
                        if sig == signal.SIGTERM and settings.drain_on_sigterm and agent.accepting:
                            await agent.drain()  # it stops the agent once drained; a second signal stops now
                            continue
                        agent.request_stop()

                nursery.start_soon(on_signals)
                await agent.stopped.wait()
                nursery.cancel_scope.cancel()
        if agent.store.write_error is not None:
            unwritten.append(agent.store.write_error)

    from p2psched.agent.errors import StartupError

    try:
        trio.run(main)
    except* StartupError as group:
        for failure in _leaves(group):
            click.echo(f"p2psched agent: {failure}", err=True)
        sys.exit(2)
    except* OSError as group:
        for failure in _leaves(group):
            click.echo(f"p2psched agent: {failure}; `p2psched doctor` checks what this host needs", err=True)
        sys.exit(1)
    if unwritten:
        sys.exit(1)  # stopped without writing its last job states (logged): not a clean stop
