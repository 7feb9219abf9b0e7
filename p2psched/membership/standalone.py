"""Run membership alone, without the rest of the agent: for tests and experiments.

    python -m p2psched.membership.standalone --node-id a1 --bind 127.0.0.1:7001 \\
        --join 127.0.0.1:7000 --insecure --no-mdns --status-file /tmp/a1.json

It prints ``READY host:port`` once bound, rewrites ``--status-file`` (atomically, as
JSON) every 100 ms with the member list, counters and drop reasons, and leaves the
cluster gracefully on SIGTERM or SIGINT. SIGUSR1 adds one to the advertised queue
length (a node-state change to watch spread). SIGKILL and SIGSTOP do what they do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from p2psched.membership.discovery import parse_hostport
from p2psched.membership.keyring import KeyringError
from p2psched.membership.service import MembershipService
from p2psched.membership.settings import MembershipSettings
from p2psched.resources import NodeState, ResourceVector


def _status(svc: MembershipService, registry: CollectorRegistry) -> dict[str, Any]:
    core = svc.core
    assert core is not None
    dropped: dict[str, float] = {}
    for metric in registry.collect():
        if metric.name == "p2psched_membership_packets_dropped":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    dropped[s.labels["reason"]] = s.value
    totals = {name: registry.get_sample_value(f"p2psched_membership_{name}_total") or 0.0
              for name in ("bytes_out", "bytes_in", "packets_out", "packets_in")}
    return {
        **totals,
        "node_id": svc.node_id, "addr": list(svc.addr or ()), "incarnation": core.incarnation,
        "health": core.health, "stats": core.stats, "dropped": dropped,
        "members": [m.as_dict() for m in svc.members()],
    }


async def _main(args: argparse.Namespace) -> int:
    overrides = json.loads(args.settings) if args.settings else {}
    settings = MembershipSettings(
        cluster_name=args.cluster, join=args.join, insecure=args.insecure, mdns=not args.no_mdns,
        key_file=args.key_file, **overrides,
    )
    log = logging.getLogger("p2psched.membership")
    registry = CollectorRegistry()
    state = NodeState(node_id=args.node_id, agent_version="standalone",
                      vector=ResourceVector(cpu_total=os.cpu_count() or 1, cpu_free=os.cpu_count() or 1))
    try:
        svc = MembershipService(settings, args.node_id, parse_hostport(args.bind, "--bind", allow_any_port=True), state, registry, log)
    except (KeyringError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status_file = Path(args.status_file) if args.status_file else None

    async def write_status() -> None:
        assert status_file is not None
        tmp = status_file.with_suffix(".tmp")
        while True:
            tmp.write_text(json.dumps(_status(svc, registry)))
            tmp.replace(status_file)
            await trio.sleep(0.1)

    def bump(st: NodeState) -> NodeState:
        return dataclasses.replace(st, vector=dataclasses.replace(st.vector, queue_len=st.vector.queue_len + 1))

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(svc.run)
            print(f"READY {addr[0]}:{addr[1]}", flush=True)
            if status_file is not None:
                nursery.start_soon(write_status)
            async for signum in signals:
                if signum == signal.SIGUSR1:  # a state change to watch spread: queue_len += 1
                    svc.update_local_state(bump)
                    continue
                await svc.leave()
                if status_file is not None:
                    status_file.write_text(json.dumps(_status(svc, registry) | {"left": True}))
                nursery.cancel_scope.cancel()
                break
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p2psched.membership.standalone", description=__doc__.split("\n\n")[0])
    p.add_argument("--node-id", required=True)
    p.add_argument("--bind", required=True, help="HOST:PORT for UDP and TCP")
    p.add_argument("--join", action="append", default=[], help="seed HOST:PORT (repeatable)")
    p.add_argument("--cluster", default="p2psched")
    p.add_argument("--key-file", default=None)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--settings", default="", help="JSON object of MembershipSettings overrides")
    p.add_argument("--status-file", default="")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    return trio.run(_main, args)


if __name__ == "__main__":
    sys.exit(main())
