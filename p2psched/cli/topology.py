"""``p2psched topology``: generate, show and query leaf-spine topology files."""

from __future__ import annotations

import math
from pathlib import Path

import click

from p2psched.cli.numbers import POSITIVE
from p2psched.topology import WEIGHTS, FabricShape, Topology, TopologyError, generate


def _load(path: str, weight: str = "latency") -> Topology:
    try:
        return Topology.load(path, weight=weight)  # type: ignore[arg-type]
    except TopologyError as e:
        raise click.ClickException(str(e)) from None


@click.group()
def topology() -> None:
    """Generate, show and query leaf-spine topology files (format: docs/scheduling.md)."""


#: The largest fabric ``generate`` writes. 20,000 hosts is the most ``sim membership``
#: simulates (the checked-in topologies reach 1,024); at these sizes writing and checking
#: the file takes about 5 s and 0.3 GB, and it grows linearly beyond: a typo such as
#: --spines 100000 should be an error, not minutes of work and a file no loader wants.
MAX_HOSTS = 20_000
MAX_SWITCHES = 2_000  # spines + leaves
MAX_LINKS = 60_000  # leaves x spines + hosts


@topology.command("generate", help=(
    "Write a leaf-spine topology with every leaf linked to every spine.\n\n"
    f"At most {MAX_HOSTS:,} hosts, {MAX_SWITCHES:,} switches (spines + leaves) and {MAX_LINKS:,} links "
    "(leaves x spines + hosts)."))
@click.option("--spines", type=int, required=True, help="Spine switches; every leaf links to each.")
@click.option("--leaves", type=int, required=True, help="Leaf (top-of-rack) switches.")
@click.option("--hosts-per-leaf", type=int, required=True, help="Hosts under each leaf, named h<leaf>-<index>.")
@click.option("--oversubscription", type=POSITIVE, default=1.0, show_default=True,
              help="Host bandwidth under a leaf / its uplink bandwidth; sets the leaf-spine link speed.")
@click.option("--host-gbps", type=POSITIVE, default=25.0, show_default=True, help="Host link bandwidth.")
@click.option("--name", default="", help="Name stored in the file (default: leaf-spine-SxLxH).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="File to write; '-' writes to stdout.")
def generate_cmd(spines: int, leaves: int, hosts_per_leaf: int, oversubscription: float, host_gbps: float,
                 name: str, output: str) -> None:
    shape = FabricShape(spines, leaves, hosts_per_leaf, oversubscription, host_gbps=host_gbps)
    try:
        shape.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _check_size(spines, leaves, hosts_per_leaf)
    if not 0 < shape.uplink_gbps < math.inf:
        raise click.UsageError(f"the leaf-spine links come to {shape.uplink_gbps:g} Gb/s (hosts per leaf x "
                               "--host-gbps / (--oversubscription x spines)); choose --host-gbps and "
                               "--oversubscription that give a finite bandwidth above 0")
    try:
        text = generate(shape, name=name)
        Topology.from_text(text)  # the generator's output must pass the loader's own checks
    except (ValueError, TopologyError) as e:
        raise click.UsageError(str(e)) from None
    if output == "-":
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}; pass -o with a file in an existing "
                                   "directory you can write to, or -o - for standard output") from None
    click.echo(f"wrote {output}: {spines} spines, {leaves} leaves, {leaves * hosts_per_leaf} hosts, "
               f"uplinks {shape.uplink_gbps:g} Gb/s")


def _check_size(spines: int, leaves: int, hosts_per_leaf: int) -> None:
    hosts, switches, links = leaves * hosts_per_leaf, spines + leaves, leaves * spines + leaves * hosts_per_leaf
    for what, n, limit in (("hosts", hosts, MAX_HOSTS), ("switches (spines + leaves)", switches, MAX_SWITCHES),
                           ("links (leaves x spines + hosts)", links, MAX_LINKS)):
        if n > limit:
            raise click.UsageError(f"--spines {spines} --leaves {leaves} --hosts-per-leaf {hosts_per_leaf} make "
                                   f"{n:,} {what}; generate writes at most {limit:,}: choose a smaller fabric")


@topology.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
def show(file: str) -> None:
    """Check a topology file and print a summary."""
    topo = _load(file)
    s = topo.summary()
    lo, hi = s["latency_us"]
    click.echo(f"topology {s['name']} ({file})")
    click.echo(f"  spines: {s['spines']}   leaves: {s['leaves']}   hosts: {s['hosts']}   links: {s['links']}")
    click.echo(f"  link latency: {lo:g}..{hi:g} us")
    if topo.hosts:
        first = topo.hosts[0]
        click.echo(f"  hosts: {first} .. {topo.hosts[-1]} (first is under {topo.leaf_of(first)})")
    click.echo(f"  largest host-to-host cost: {topo.max_host_cost():g} us (latency)")


@topology.command("path")
@click.argument("a")
@click.argument("b")
@click.option("--topology", "file", type=click.Path(dir_okay=False), required=True, help="Topology file.")
@click.option("--weight", type=click.Choice(WEIGHTS), default="latency", show_default=True,
              help="latency: sum of latency_us; transfer: latency plus the time to send 1 MB at each link's bandwidth.")
def path(a: str, b: str, file: str, weight: str) -> None:
    """Print the shortest path from A to B and its cost."""
    topo = _load(file, weight)
    for end in (a, b):
        if end not in topo.graph:
            click.echo(f"note: {topo.locate(end).note}", err=True)
    route, cost = topo.route(a, b)
    click.echo(" -> ".join(route))
    click.echo(f"cost: {cost:g} us ({weight}), hops: {len(route) - 1}")
