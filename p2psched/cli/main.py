"""The ``p2psched`` command.

Subcommands live in their own modules and are imported only when invoked, so that
``p2psched agent`` does not pay for the client, simulator or topology tools (the
agent's idle RSS budget is 50 MB).
"""

from __future__ import annotations

import importlib

import click

from p2psched import __version__

# name -> "module:attribute" of a click command or group
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("p2psched.cli.agent:agent", "Run the agent on this host."),
    "submit": ("p2psched.cli.client:submit", "Submit a job."),
    "batch": ("p2psched.cli.batch:batch", "Submit the jobs of a spec file; --wait shows how each ended."),
    "status": ("p2psched.cli.client:status", "Show one job's record."),
    "jobs": ("p2psched.cli.client:jobs", "List jobs."),
    "cancel": ("p2psched.cli.client:cancel", "Cancel jobs by id, or every unfinished job with --label."),
    "result": ("p2psched.cli.client:result", "Write a job's raw output to stdout."),
    "logs": ("p2psched.cli.client:logs", "Print a job's output while it runs or after; --follow streams it."),
    "peers": ("p2psched.cli.client:peers", "List cluster members as an agent sees them."),
    "cluster": ("p2psched.cli.client:cluster", "Cluster totals as an agent sees them."),
    "drain": ("p2psched.cli.client:drain", "Drain an agent: no new jobs, hand queued ones to peers, leave."),
    "dashboard": ("p2psched.cli.dashboard:dashboard", "Serve an agent's dashboard here, signed as a tenant."),
    "up": ("p2psched.cli.up:up", "Start a local multi-agent cluster on loopback."),
    "doctor": ("p2psched.cli.doctor:doctor", "Check what works on this host, and how to fix what doesn't."),
    "keygen": ("p2psched.cli.keys:keygen", "Create a gossip encryption key."),
    "sim": ("p2psched.cli.sim:sim", "Simulate membership or placement with virtual time."),
    "topology": ("p2psched.cli.topology:topology", "Generate, show and query leaf-spine topology files."),
    "tenant": ("p2psched.cli.tenant:tenant", "Manage tenants and their keys."),
    "verify": ("p2psched.cli.tenant:verify", "Verify a job's attestation report."),
    "ca": ("p2psched.cli.tls:ca", "Create the cluster certificate authority."),
    "cert": ("p2psched.cli.tls:cert", "Issue node certificates from the cluster CA."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            return None
        cmd = getattr(module, attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2psched")
def cli() -> None:
    """p2psched: a peer-to-peer job scheduler for AI and HPC clusters."""


def main() -> None:
    cli()
