"""``python -m p2psched.chaos run|check``: a chaos run from the command line."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def cli() -> None:
    """Jepsen-style chaos runs for p2psched (see docs/chaos.md)."""


@cli.command()
@click.option("--agents", type=click.IntRange(2, 200), default=4, help="Agents to start.")
@click.option("--duration", type=click.FloatRange(5), default=40.0, help="Seconds of faults and submissions.")
@click.option("--seed", type=int, default=1, help="Seed of the fault plan and the workload.")
@click.option("--jobs", type=click.IntRange(1), default=300, help="Jobs to submit over the duration.")
@click.option("--clients", type=click.IntRange(1, 256), default=12, help="Concurrent client tasks.")
@click.option("--cpus", type=click.FloatRange(0.5), default=2.0, help="CPU slots each agent advertises.")
@click.option("--faults", default="kill,pause,restart,partition",
              help="Fault kinds, comma-separated: kill, pause, restart, partition, sandbox (a host whose sandbox breaks).")
@click.option("--no-netns", is_flag=True, help="Loopback instead of network namespaces (no partitions).")
@click.option("--compose", is_flag=True, help="Break the compose cluster's containers instead (scripts/cluster.sh).")
@click.option("--switch-after", type=int, default=None, help="Retry an unanswered submit at another agent after N tries.")
@click.option("--settle", type=float, default=120.0, help="Seconds to wait for jobs to end after healing.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory [a new temp dir].")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def run(agents: int, duration: float, seed: int, jobs: int, clients: int, cpus: float, faults: str, no_netns: bool,
        compose: bool, switch_after: int | None, settle: float, out: Path | None, as_json: bool) -> None:
    """Start agents, break them on a seeded plan while clients work, then check."""
    from p2psched.chaos.harness import Interrupted, RunConfig, run_chaos
    from p2psched.chaos.hosts import HostSetupError
    from p2psched.chaos.nemesis import KINDS

    kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise click.BadParameter(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(KINDS)}",
                                 param_hint="--faults")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s chaos %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the faults

    def on_term(sig: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {sig}")  # unwinds through the teardown in run_chaos

    signal.signal(signal.SIGTERM, on_term)
    cfg = RunConfig(agents=agents, duration=duration, seed=seed, jobs=jobs, clients=clients, netns=not no_netns,
                    backend="docker" if compose else "local", out=out, cpus=cpus, kinds=kinds,
                    switch_after=switch_after, settle_s=settle)
    try:
        verdict, run_dir = run_chaos(cfg)
    except HostSetupError as e:
        click.echo(f"chaos: {e}", err=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as e:
        click.echo(f"chaos: {e or 'interrupted'}; agents, namespaces and the bridge are removed", err=True)
        sys.exit(130)
    click.echo(json.dumps(verdict.as_dict(), indent=1) if as_json else verdict.render())
    click.echo(f"run directory: {run_dir}")
    sys.exit(0 if verdict.ok else 1)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def check(run_dir: Path, as_json: bool) -> None:
    """Judge a recorded run again from its history.jsonl and final.json."""
    from p2psched.chaos.checker import check as run_check
    from p2psched.chaos.history import load_history

    final_path = run_dir / "final.json"
    if not final_path.exists():
        raise click.UsageError(f"{final_path} is missing; the run ended before it fetched the final records")
    try:
        from p2psched.agent.remote import MAX_ATTEMPTS
    except ImportError:
        MAX_ATTEMPTS = 5
    verdict = run_check(load_history(run_dir / "history.jsonl"), json.loads(final_path.read_text()),
                        max_attempts=MAX_ATTEMPTS)
    click.echo(json.dumps(verdict.as_dict(), indent=1) if as_json else verdict.render())
    sys.exit(0 if verdict.ok else 1)


if __name__ == "__main__":
    cli()
