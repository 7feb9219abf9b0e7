"""``p2psched sim``: run protocol cores in virtual time on a simulated network.

Subcommands: ``membership`` (here) and ``placement``, which lives in
``p2psched.sim.placement`` as a click command named ``cli`` and is added when that
module exists. Further simulators register the same way in ``_EXTRA``.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Any

import click

from p2psched.cli.numbers import POSITIVE, FiniteFloat

# subcommand name -> "module:attribute" of a click command, loaded only when present
_EXTRA = {"placement": "p2psched.sim.placement:cli"}


class _SimGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names |= {n for n in _EXTRA if self.get_command(ctx, n) is not None}
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in _EXTRA:
            return cmd
        module_name, attr = _EXTRA[cmd_name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            return None
        found = getattr(module, attr, None)
        return found if isinstance(found, click.Command) else None


@click.group(cls=_SimGroup)
def sim() -> None:
    """Simulate membership or placement with virtual time."""


def _partition(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        frac, start, dur = (float(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not FRACTION:START:DURATION, e.g. 0.3:5:20 cuts 30% of the "
                                 "nodes off 5 s after the crash phase, for 20 s") from None
    if not (0 < frac < 1 and 0 <= start < math.inf and 0 < dur < math.inf):  # also false for nan
        raise click.BadParameter("FRACTION must be between 0 and 1, START >= 0 and DURATION > 0 seconds")
    return frac, start, dur


@sim.command()
@click.option("--nodes", "-n", default=100, show_default=True, type=click.IntRange(2, 5000),
              help="Simulated nodes; memory grows with the square (1,000: 0.3 GB and 10 s, 5,000: 6 GB and 2 min).")
@click.option("--loss", default=0.01, show_default=True, type=FiniteFloat(0, 0.9), help="Datagram loss rate.")
@click.option("--crash", default=1, show_default=True, type=click.IntRange(0), help="Nodes to crash.")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--partition", default=None, callback=_partition, metavar="FRACTION:START:DURATION",
              help="Cut FRACTION of the live nodes off START s after the crash phase, for DURATION s.")
@click.option("--duration", default=30.0, show_default=True, type=FiniteFloat(1, 3600),
              help="Seconds of steady state measured for bytes per node per second.")
@click.option("--probe-interval", default=None, type=POSITIVE, help="Override the 1 s probe interval.")
@click.option("--suspicion-mult", default=None, type=POSITIVE, help="Override the suspicion multiplier (4).")
@click.option("--topology", "topology_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Leaf-spine topology file: nodes sit on its hosts and links take its latencies.")
@click.option("--same-leaf", default=None, type=FiniteFloat(0, 1),
              help="With --topology: probability that a gossip peer is drawn from the same leaf.")
def membership(nodes: int, loss: float, crash: int, seed: int, partition: tuple[float, float, float] | None,
               duration: float, probe_interval: float | None, suspicion_mult: float | None,
               topology_file: str | None, same_leaf: float | None) -> None:
    """SWIM + Lifeguard on N simulated nodes (2 +- 1 ms links): failure detection time,
    false positives, update spread, bytes per node, partition healing."""
    from pydantic import ValidationError

    from p2psched.membership.settings import MembershipSettings
    from p2psched.sim.membership import run_experiment

    if crash >= nodes:
        raise click.UsageError(f"--crash {crash} of {nodes} nodes: at least one node must stay up to see the crashes")
    if same_leaf is not None and topology_file is None:
        raise click.UsageError("--same-leaf needs --topology; without leaves the flag would be ignored")
    over: dict[str, Any] = {}
    if probe_interval is not None:
        over["probe_interval"] = probe_interval
    if suspicion_mult is not None:
        over["suspicion_mult"] = suspicion_mult
    if same_leaf is not None:
        over["gossip_same_group_fraction"] = same_leaf
    try:
        settings = MembershipSettings(insecure=True, mdns=False, **over)
    except ValidationError as e:  # the flags' ranges above should keep every value valid
        from p2psched.api.errors import field_errors

        flags = {"probe_interval": "--probe-interval", "suspicion_mult": "--suspicion-mult",
                 "gossip_same_group_fraction": "--same-leaf"}
        raise click.UsageError("; ".join(f"{flags.get(d['field'], d['field'])}: {d['message']}"
                                         for d in field_errors(e))) from None
    topology = None
    if topology_file is not None:
        from p2psched.topology.model import Topology, TopologyError

        try:
            topology = Topology.load(topology_file)
        except TopologyError as e:
            raise click.ClickException(str(e)) from None
        if nodes > len(topology.hosts):
            raise click.ClickException(f"{topology_file} has {len(topology.hosts)} hosts; pass --nodes "
                                       f"{len(topology.hosts)} or fewer")
    t0 = time.process_time()
    report = run_experiment(nodes, loss, crash, seed, settings=settings, steady=duration, partition=partition,
                            topology=topology)
    for line in report.lines():
        click.echo(line)
    click.echo(f"(simulated in {time.process_time() - t0:.1f} s of CPU)")
