"""Helpers for the image's entrypoint: which topology host a replica is, and TLS material.

Each compose replica must take a distinct host position in the generated leaf-spine
topology, and keep it across restarts (its data dir, and its peers' view of it, are
tied to its node id). Compose gives a replica no index in its environment, but Docker's
embedded DNS answers reverse (PTR) queries with the container's name, which ends in the
replica number: ``p2psched-agent-3`` (compose v2) or ``p2psched_agent_3`` (compose v1).
That number is stable across restarts and unique within the service, so it is the
index. Where the PTR query gets no answer (a network without Docker's DNS, or a
renamed container), a replica claims the lowest free slot under the shared volume by
creating a file exclusively, and keeps it by writing its hostname (the container id)
into it.

Usage (run with the agent's virtualenv python, which PATH puts first):
    helper.py index [--shared DIR]             prints the replica index
    helper.py host INDEX TOPOLOGY_FILE         prints the INDEX-th host of the file
    helper.py tls CA_DIR OUT_DIR TOPOLOGY_FILE creates the CA in CA_DIR once, and a
                                               certificate in OUT_DIR for every host of
                                               the topology that has none yet
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import sys
import time
from pathlib import Path

#: Docker's embedded resolver; /etc/resolv.conf names it on user-defined networks.
DOCKER_DNS = "127.0.0.11"
NAME_NUMBER = re.compile(r"[-_](\d+)$")
#: Seconds (one query each) to wait for Docker's DNS before claiming a slot instead.
DNS_TRIES = 15


def _resolver() -> str:
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return DOCKER_DNS


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    """A DNS name at ``pos`` (following compression pointers); returns (name, next pos)."""
    labels: list[str] = []
    end = -1
    for _ in range(64):  # a bound on pointer chains, so a malformed reply cannot loop
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = pos + 2
            pos = ((length & 0x3F) << 8) | data[pos + 1]
            continue
        labels.append(data[pos + 1:pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    else:
        raise ValueError("DNS name too long or looping")
    return ".".join(labels), (end if end >= 0 else pos)


def ptr_name(ip: str, server: str, timeout: float = 2.0) -> str | None:
    """The name a PTR query for ``ip`` returns, or None."""
    qname = ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
    qid = random.randrange(1 << 16)
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0"
    query += struct.pack("!HH", 12, 1)  # PTR, IN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(query, (server, 53))
            data, _ = s.recvfrom(4096)
        except OSError:
            return None
    try:
        rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
        if rid != qid or flags & 0x000F or an == 0:
            return None
        pos = 12
        for _ in range(qd):
            _, pos = _read_name(data, pos)
            pos += 4
        for _ in range(an):
            _, pos = _read_name(data, pos)
            rtype, _, _, rdlen = struct.unpack("!HHIH", data[pos:pos + 10])
            pos += 10
            if rtype == 12:
                return _read_name(data, pos)[0]
            pos += rdlen
    except (ValueError, IndexError, struct.error):
        return None
    return None


def own_ipv4() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return []
    return sorted({str(i[4][0]) for i in infos if not str(i[4][0]).startswith("127.")})


def index_from_dns() -> int | None:
    server = _resolver()
    for ip in own_ipv4():
        name = ptr_name(ip, server)
        if name:
            m = NAME_NUMBER.search(name.split(".")[0])
            if m:
                return int(m.group(1))
    return None


def record_claim(shared: Path, index: int) -> None:
    """Mark ``index`` as held by this container, so that no replica falling back to
    claims takes it too."""
    slots = shared / "replicas"
    try:
        slots.mkdir(parents=True, exist_ok=True)
        (slots / str(index)).write_text(socket.gethostname() + "\n")
    except OSError:
        pass  # a read-only shared volume: claims are then not used by anyone


def index_from_claim(shared: Path) -> int:
    """Claim the lowest free slot under ``shared``/replicas, or the one this container holds."""
    me = socket.gethostname()
    slots = shared / "replicas"
    slots.mkdir(parents=True, exist_ok=True)
    for path in slots.iterdir():
        try:
            if path.read_text().strip() == me:
                return int(path.name)
        except (OSError, ValueError):
            continue
    for i in range(1, 100_000):
        try:
            fd = os.open(slots / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        return i
    raise RuntimeError(f"no free replica slot under {slots}; remove stale files there")


def host_at(index: int, topology_file: str) -> str:
    import yaml  # the agent's virtualenv has it; only this subcommand needs it

    with open(topology_file) as f:
        hosts = (yaml.safe_load(f) or {}).get("hosts") or []
    if not 0 <= index < len(hosts):
        raise SystemExit(
            f"replica index {index} has no host in {topology_file}, which lists {len(hosts)} hosts "
            f"(positions 0..{len(hosts) - 1}); start the cluster with a larger topology "
            "(scripts/cluster.sh sizes it for the requested scale, or set P2PSCHED_TOPOLOGY_HOSTS)"
        )
    entry = hosts[index]
    return str(entry if not isinstance(entry, dict) else entry.get("id") or entry.get("name"))


def tls(ca_dir: Path, out: Path, topology_file: str) -> None:
    """One process for every certificate: a CLI call each would pay the import time each."""
    import yaml
    from p2psched.security.tls import CA_CERT, init_ca, issue_node_cert

    if not (ca_dir / CA_CERT).exists():
        init_ca(ca_dir)
        print("docker-entrypoint: created the cluster CA", file=sys.stderr)
    with open(topology_file) as f:
        hosts = [str(h) for h in (yaml.safe_load(f) or {}).get("hosts") or []]
    issued = 0
    for host in hosts:
        if not (out / f"{host}.pem").exists():
            # "peers" is the compose alias every agent answers to, so it goes in the SAN too
            issue_node_cert(host, ca_dir, out, hosts=("peers",))
            issued += 1
    if issued:
        print(f"docker-entrypoint: issued {issued} node certificates into {out}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if argv[:1] == ["index"]:
        shared = Path(argv[2]) if argv[1:2] == ["--shared"] and len(argv) > 2 else Path("/shared")
        explicit = os.environ.get("P2PSCHED_REPLICA_INDEX", "").strip()
        if explicit:
            print(int(explicit))
            return 0
        # Docker's resolver can lag a container's start by a moment; a replica that
        # gave up at once would take a claimed slot, and might duplicate a DNS index.
        found = None
        for _ in range(DNS_TRIES):
            found = index_from_dns()
            if found is not None:
                break
            time.sleep(1)
        if found is not None:
            record_claim(shared, found)
            print(found)
        else:
            print(index_from_claim(shared))
        return 0
    if argv[:1] == ["host"] and len(argv) == 3:
        print(host_at(int(argv[1]), argv[2]))
        return 0
    if argv[:1] == ["tls"] and len(argv) == 4:
        tls(Path(argv[1]), Path(argv[2]), argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
