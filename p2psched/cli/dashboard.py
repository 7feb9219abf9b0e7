"""``p2psched dashboard``: serve an agent's dashboard from this machine, its requests
signed as a tenant (dashboard/proxy.py). An agent without a tenant registry serves
its dashboard itself, at ``http://AGENT/ui/``."""

from __future__ import annotations

import errno
import webbrowser
from pathlib import Path

import click
import httpx
import trio

from p2psched.agent.errors import first_of
from p2psched.cli.client import agent_option, fail, tenant_auth
from p2psched.config import parse_hostport


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@agent_option
@click.option("--tenant", "identity_tenant", help="Tenant name the page reads and cancels as (with --key).")
@click.option("--key", "identity_key", type=click.Path(path_type=Path), help="That tenant's private key file.")
@click.option("--listen", default="127.0.0.1:7780", show_default=True,
              help="Where the page is served. Whoever reaches it acts as the tenant: keep it on loopback.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def dashboard(agent_url: str, identity_tenant: str | None, identity_key: Path | None, listen: str,
              open_browser: bool) -> None:
    """Serve AGENT's dashboard at http://LISTEN/ui/ until Ctrl-C."""
    from p2psched.dashboard.proxy import create_proxy, hosts_for, serve_proxy

    auth = tenant_auth(identity_tenant, identity_key)
    try:
        host, port = parse_hostport(listen, what="--listen")
    except ValueError as e:
        fail(str(e), 2)
    if port == 0 or host in ("0.0.0.0", "::"):
        fail(f"--listen {listen}: give one address and a port (the page is opened by that name, "
             "and it answers only to it), e.g. 127.0.0.1:7780", 2)
    agent_url = agent_url.rstrip("/")
    try:
        health = httpx.get(f"{agent_url}/healthz", timeout=10).json()
        probe = httpx.get(f"{agent_url}/v1/cluster", timeout=10, auth=auth)
    except (httpx.HTTPError, ValueError) as e:
        fail(f"cannot reach the agent at {agent_url}: {e}; is `p2psched agent` running there? "
             "(set --agent or $P2PSCHED_URL)")
    if probe.status_code in (401, 403):
        hint = "give --tenant NAME --key FILE" if auth is None else "check --tenant and --key"
        fail(f"agent {health.get('node_id')} refused the dashboard's reads ({probe.status_code}: "
             f"{probe.json().get('error', {}).get('message', probe.text[:200])}); {hint}")
    app = create_proxy(agent_url, auth=auth, allowed_hosts=hosts_for(host, port))
    url = f"http://{host}:{port}/ui/"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_proxy, app, listen)
            click.echo(f"dashboard of agent {health.get('node_id')} ({agent_url}"
                       f"{', as tenant ' + identity_tenant if identity_tenant else ''}): {url}  (Ctrl-C stops it)")
            if open_browser:
                webbrowser.open(url)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    except (OSError, BaseExceptionGroup) as e:  # trio's nursery wraps the server's bind error in a group
        bind_error = first_of(e, OSError)
        if bind_error is None:
            if first_of(e, KeyboardInterrupt) is not None:
                return
            raise
        if bind_error.errno == errno.EADDRNOTAVAIL:
            fix = f"pass --listen with an address of this host, e.g. 127.0.0.1:{port}"
        elif bind_error.errno == errno.EACCES:
            fix = f"ports below 1024 need root; pass --listen {host}:OTHERPORT with a port of 1024 or above"
        else:
            fix = f"pass --listen {host}:OTHERPORT with a port free on this host"
        fail(f"cannot listen on {listen}: {bind_error.strerror or bind_error}; {fix}", 2)

