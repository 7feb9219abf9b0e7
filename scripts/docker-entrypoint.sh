#!/bin/sh
# Entrypoint of the p2psched image (runs under tini, which forwards SIGTERM).
#
#   agent [FLAGS...]   run `p2psched agent` (the default). Configuration comes from
#                      P2PSCHED_<NAME> environment variables, flags override them.
#                      With P2PSCHED_CLUSTER set (compose.yaml sets it), this waits
#                      for the cluster material `init` writes, takes the replica's
#                      topology host as its node id and points the agent at the
#                      gossip key, TLS files and topology.
#   init               generate the cluster material once into $P2PSCHED_SHARED_DIR:
#                      gossip key, CA and node certificates, leaf-spine topology.
#   healthcheck        exit 0 iff the local agent answers GET /healthz
#   anything else      exec'd as is (e.g. `p2psched submit ...`, `sh`)
#
# Environment read here (besides the agent's own P2PSCHED_* settings, which ignore
# these names):
#   P2PSCHED_CLUSTER           non-empty: run as a member of the compose cluster
#   P2PSCHED_SHARED_DIR        the shared volume (default /shared)
#   P2PSCHED_CA_DIR            where init keeps the CA key (default /ca, a volume that
#                              only the init service mounts, so agents never hold it)
#   P2PSCHED_REPLICA_INDEX     force this replica's topology position (entry uses 0)
#   P2PSCHED_TOPOLOGY_HOSTS    hosts the generated topology must have (default 32)
#   P2PSCHED_TOPOLOGY_LEAVES   leaves in it (default 4); P2PSCHED_TOPOLOGY_SPINES (2)
#   P2PSCHED_WAIT_SHARED_S     seconds an agent waits for init's material (default 120)
set -eu

SHARED="${P2PSCHED_SHARED_DIR:-/shared}"
CA_DIR="${P2PSCHED_CA_DIR:-/ca}"
HELPER=/usr/local/lib/p2psched/helper.py

log() { echo "docker-entrypoint: $*" >&2; }
die() { log "$*"; exit 1; }

hosts_in() { python3 -c 'import sys, yaml; print(len((yaml.safe_load(open(sys.argv[1])) or {}).get("hosts") or []))' "$1"; }

init_material() {
  umask 022
  mkdir -p "$SHARED" "$SHARED/tls"
  rm -f "$SHARED/ready"

  # Gossip key: one symmetric key for the whole cluster (AES-GCM keyring).
  if [ ! -s "$SHARED/gossip.key" ]; then
    p2psched keygen --gossip -o "$SHARED/gossip.key"
    log "wrote the gossip key"
  fi

  # Topology: sized for the largest scale asked for; regenerated (agents reload it)
  # only when a larger scale needs more host positions than the file has.
  want="${P2PSCHED_TOPOLOGY_HOSTS:-32}"
  leaves="${P2PSCHED_TOPOLOGY_LEAVES:-4}"
  spines="${P2PSCHED_TOPOLOGY_SPINES:-2}"
  topo="$SHARED/topology.yaml"
  if [ ! -s "$topo" ] || [ "$(hosts_in "$topo")" -lt "$want" ]; then
    per_leaf=$(( (want + leaves - 1) / leaves ))
    p2psched topology generate --spines "$spines" --leaves "$leaves" --hosts-per-leaf "$per_leaf" \
      --name "compose-${spines}x${leaves}x${per_leaf}" -o "$topo.tmp"
    mv "$topo.tmp" "$topo"   # rename, so an agent never reads a half-written file
    log "wrote a ${spines}x${leaves}x${per_leaf} leaf-spine topology ($(hosts_in "$topo") hosts)"
  fi

  # TLS: a cluster CA whose key stays in $CA_DIR (a volume only init mounts), and one
  # certificate per topology host, issued up front so that agents never hold the CA key.
  python3 "$HELPER" tls "$CA_DIR" "$SHARED/tls" "$topo"
  chmod 0700 "$SHARED/tls"

  touch "$SHARED/ready"
  log "cluster material ready in $SHARED"
}

wait_for_material() {
  limit="${P2PSCHED_WAIT_SHARED_S:-120}"
  waited=0
  while [ ! -e "$SHARED/ready" ]; do
    [ "$waited" -lt "$limit" ] || die "no cluster material in $SHARED after ${limit}s; the init service writes it (docker compose logs init), or unset P2PSCHED_CLUSTER to run a standalone agent"
    sleep 1
    waited=$((waited + 1))
  done
}

run_agent() {
  if [ -n "${P2PSCHED_CLUSTER:-}" ]; then  # compose.yaml sets it; a plain `docker run` skips this
    wait_for_material
    index=$(python3 "$HELPER" index --shared "$SHARED")
    topo="$SHARED/topology.yaml"
    if [ -z "${P2PSCHED_NODE_ID:-}" ]; then
      P2PSCHED_NODE_ID=$(python3 "$HELPER" host "$index" "$topo")
      export P2PSCHED_NODE_ID
    fi
    export P2PSCHED_TOPOLOGY="${P2PSCHED_TOPOLOGY:-$topo}"
    export P2PSCHED_GOSSIP_KEY="${P2PSCHED_GOSSIP_KEY:-$SHARED/gossip.key}"
    if [ -s "$SHARED/tls/$P2PSCHED_NODE_ID.pem" ]; then
      export P2PSCHED_TLS_DIR="${P2PSCHED_TLS_DIR:-$SHARED/tls}"
    fi
    # Each replica keeps its own data dir inside its container (or a volume mounted
    # at P2PSCHED_DATA_DIR); the node id keeps it apart if a volume is shared.
    export P2PSCHED_DATA_DIR="${P2PSCHED_DATA_DIR:-/var/lib/p2psched}/$P2PSCHED_NODE_ID"
    log "replica $index is $P2PSCHED_NODE_ID of $(basename "$topo")"
  fi
  exec p2psched agent "$@"
}

healthcheck() {
  # -I -S: no site-packages scan and no user site, so the check starts in a few tens of
  # milliseconds even with the agent's large virtualenv; a raw socket instead of urllib
  # for the same reason.
  exec python3 -I -S - <<'EOF'
import os, socket, sys
addr = os.environ.get("P2PSCHED_API", "0.0.0.0:7700")
host, _, port = addr.rpartition(":")
host = host.strip("[]")
host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
try:
    with socket.create_connection((host, int(port)), timeout=8) as s:
        s.sendall(f"GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        status_line = s.recv(256).split(b"\r\n", 1)[0]
    ok = status_line.split(b" ")[1:2] == [b"200"]
    print("healthz:", status_line.decode(errors="replace"))
    sys.exit(0 if ok else 1)
except OSError as e:
    print(f"healthz: {e}", file=sys.stderr)
    sys.exit(1)
EOF
}

cmd="${1:-agent}"
[ $# -eq 0 ] || shift
case "$cmd" in
  agent) run_agent "$@" ;;
  init) init_material ;;
  healthcheck) healthcheck ;;
  -*) run_agent "$cmd" "$@" ;;  # `docker run IMAGE --node-id x` passes agent flags
  *) exec "$cmd" "$@" ;;
esac
