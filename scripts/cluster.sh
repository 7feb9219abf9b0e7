#!/usr/bin/env bash
# A p2psched cluster in Docker containers, one command each way.
#
#   scripts/cluster.sh up N       start N agents (the entry + N-1 replicas); returns when
#                                 all N are alive in the entry agent's view
#   scripts/cluster.sh scale N    grow or shrink a running cluster to N agents, and wait;
#                                 running agents are left as they are (not rebuilt, not
#                                 recreated). Shrinking removes the highest-numbered
#                                 replicas and, with them, the records of the jobs they
#                                 hold: it refuses while those replicas hold unfinished
#                                 jobs (P2PSCHED_SCALE_FORCE=1 overrides)
#   scripts/cluster.sh status     containers, and the members the entry agent sees
#   scripts/cluster.sh stop       stop the agents (each drains), keeping their data;
#                                 `up N` starts them again with the same job stores
#   scripts/cluster.sh down       stop and remove the containers, network and volumes
#                                 (every agent's job store with them)
#   scripts/cluster.sh build      (re)build the image now
#
# The image is built when it is missing or older than the source: wheels on the host
# (from .venv), then `docker build` on the local Debian base where no registry can be
# reached (scripts/base-image.sh). `up` on a running cluster whose image was rebuilt
# recreates its agents with the new image (each drains first; its data is kept).
# The entry agent's API and dashboard are at http://127.0.0.1:7700.
#
# Environment:
#   P2PSCHED_IMAGE          image tag                 (default p2psched:dev)
#   P2PSCHED_BASE           Dockerfile BASE           (default: python:3.11-slim-bookworm
#                           if present or pullable, else the local p2psched-base:bookworm)
#   P2PSCHED_PROJECT        compose project name      (default p2psched)
#   P2PSCHED_UP_TIMEOUT     seconds `up`/`scale` wait for the agents (default 180)
#   P2PSCHED_ENTRY_PORT     host port of the entry API (default 7700)
#   P2PSCHED_SUBNET         the cluster network (default 172.30.77.0/24)
#   P2PSCHED_PROCESS_SANDBOX=1  also apply deploy/compose.process-sandbox.yaml, so
#                           process jobs run in containers (docs/operations.md)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export P2PSCHED_IMAGE="${P2PSCHED_IMAGE:-p2psched:dev}"
export P2PSCHED_ENTRY_PORT="${P2PSCHED_ENTRY_PORT:-7700}"
PROJECT="${P2PSCHED_PROJECT:-p2psched}"
TIMEOUT="${P2PSCHED_UP_TIMEOUT:-180}"
ENTRY_URL="http://127.0.0.1:${P2PSCHED_ENTRY_PORT}"
LOCAL_BASE=p2psched-base:bookworm
REGISTRY_BASE=python:3.11-slim-bookworm

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

need_docker() {
  command -v docker >/dev/null 2>&1 \
    || die "docker is not installed; install Docker Engine and compose (Debian: apt-get install docker.io docker-compose) and retry"
  docker info >/dev/null 2>&1 \
    || die "cannot reach the Docker engine: is dockerd running, and may this user use /var/run/docker.sock? ('docker info' says why)"
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
  else
    die "neither 'docker compose' nor 'docker-compose' is installed; install the compose plugin (Debian: apt-get install docker-compose)"
  fi
  COMPOSE+=(-p "$PROJECT" -f "$ROOT/compose.yaml")
  if [[ ${P2PSCHED_PROCESS_SANDBOX:-0} == 1 ]]; then
    COMPOSE+=(-f "$ROOT/deploy/compose.process-sandbox.yaml")
  fi
}

# A hash of everything that goes into the image, stored as a label, so that a changed
# source tree rebuilds it and an unchanged one does not.
source_hash() {
  cd "$ROOT"
  {
    git ls-files -co --exclude-standard -- p2psched pyproject.toml Dockerfile .dockerignore \
      scripts/docker-entrypoint.sh deploy/docker 2>/dev/null \
      || find p2psched pyproject.toml Dockerfile .dockerignore scripts/docker-entrypoint.sh deploy/docker -type f
  } | grep -v -e '__pycache__' -e '\.pyc$' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

pick_base() {
  if [[ -n ${P2PSCHED_BASE:-} ]]; then echo "$P2PSCHED_BASE"; return; fi
  if docker image inspect "$REGISTRY_BASE" >/dev/null 2>&1; then echo "$REGISTRY_BASE"; return; fi
  if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    if timeout 120 docker pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then echo "$REGISTRY_BASE"; return; fi
    say "no registry reachable for $REGISTRY_BASE; building the local Debian base instead"
  fi
  # a no-op when the local base is up to date with the package list base-image.sh wants
  "$ROOT/scripts/base-image.sh" >&2 || die "could not build the local base image (see above)"
  echo "$LOCAL_BASE"
}

build_image() {
  local force=${1:-0} hash current base pip py start
  hash=$(source_hash)
  current=$(docker image inspect -f '{{index .Config.Labels "p2psched.source-hash"}}' "$P2PSCHED_IMAGE" 2>/dev/null || true)
  if [[ $force -eq 0 && $current == "$hash" ]]; then
    return 0
  fi
  start=$(date +%s)
  base=$(pick_base)
  pip="$ROOT/.venv/bin/pip"
  [[ -x $pip ]] || die "no virtualenv at $ROOT/.venv to build wheels with; run ./scripts/test.sh (or python3.11 -m venv .venv) first"
  py=$("$ROOT/.venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  [[ $py == 3.11 ]] || die ".venv runs Python $py, but the image runs 3.11 (Debian bookworm); wheels with compiled parts would not load there. Build .venv with python3.11"
  say "building wheels into build/wheels"
  rm -f "$ROOT"/build/wheels/p2psched-*.whl
  # Build from a copy of the sources: an in-tree build writes setuptools' build/lib in
  # the checkout, where another build or editable install may be running at the time.
  local src
  src=$(mktemp -d /tmp/p2psched-src.XXXXXX)
  (cd "$ROOT" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml p2psched \
     $(ls README.md LICENSE 2>/dev/null)) | tar -C "$src" -xf -
  "$pip" wheel -q "$src" -w "$ROOT/build/wheels" \
    || { rm -rf "$src"; die "pip wheel failed (see above); the host needs PyPI or a pip cache for the dependencies"; }
  rm -rf "$src"
  say "building $P2PSCHED_IMAGE on $base"
  DOCKER_BUILDKIT=0 docker build -q --build-arg BASE="$base" --label p2psched.source-hash="$hash" \
    -t "$P2PSCHED_IMAGE" "$ROOT" >/dev/null || die "docker build failed (see above)"
  docker image prune -f --filter "label=p2psched.stage=build" >/dev/null 2>&1 || true
  local size
  size=$(docker image inspect -f '{{.Size}}' "$P2PSCHED_IMAGE")
  say "built $P2PSCHED_IMAGE ($((size / 1024 / 1024)) MiB) in $(( $(date +%s) - start ))s"
}

# The entry agent's view: prints "ALIVE TOTAL" (members with state "alive", all listed).
peer_counts() {
  python3 - "$ENTRY_URL" <<'EOF'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/v1/peers", timeout=3) as r:
        body = json.load(r)
except Exception:
    print("0 0"); sys.exit(0)
peers = body.get("peers", body.get("members", [])) if isinstance(body, dict) else body
alive = sum(1 for p in peers if isinstance(p, dict) and p.get("state") == "alive")
print(alive, len(peers))
EOF
}

wait_alive() {
  local want=$1 start=$SECONDS alive total
  say "waiting for $want agents to be alive in the entry agent's view ($ENTRY_URL/v1/peers)"
  while :; do
    read -r alive total < <(peer_counts)
    if [[ $alive -eq $want && $total -ge $want ]]; then
      say "$alive agents alive after $((SECONDS - start))s; entry API at $ENTRY_URL, dashboard at $ENTRY_URL/ui/"
      return 0
    fi
    if (( SECONDS - start >= TIMEOUT )); then
      "${COMPOSE[@]}" ps >&2 || true
      die "only $alive of $want agents alive after ${TIMEOUT}s; look at '${COMPOSE[*]} logs entry agent' (set P2PSCHED_UP_TIMEOUT to wait longer)"
    fi
    sleep 1
  done
}

check_n() {
  [[ ${1:-} =~ ^[0-9]+$ && $1 -ge 1 ]] || die "'${1:-}' is not a number of agents; give a whole number >= 1, e.g. 'cluster.sh up 3'"
}

compose_up() {
  local n=$1
  shift
  # Size the topology for this scale (never below 32 hosts, so small clusters share a file).
  export P2PSCHED_TOPOLOGY_HOSTS=$(( n > 32 ? n : 32 ))
  "${COMPOSE[@]}" up -d "$@" --scale agent=$((n - 1)) >&2 \
    || die "'${COMPOSE[*]} up' failed (see above)"
}

# The replicas (service `agent`) a scale to N agents removes: compose removes the
# highest container numbers. Prints "NUMBER NAME" per replica numbered N or more.
replicas_beyond() {
  local n=$1
  docker ps -a --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=agent" \
    --format '{{.Label "com.docker.compose.container-number"}} {{.Names}}' \
    | awk -v n="$n" '$1 + 0 >= n + 0' | sort -n
}

# Shrinking removes replicas, and a replica's job store lives in its container: the
# jobs it accepted (also those the entry sent it, a client-chosen id's home) cannot be
# looked up once it is gone, and results owed to it are never recorded. Refuse while
# a replica to be removed holds unfinished jobs.
check_shrink() {
  local n=$1 num name counts busy=()
  while read -r num name; do
    [[ -n $name ]] || continue
    counts=$(docker exec "$name" python3 -c '
import json, urllib.request
c = json.load(urllib.request.urlopen("http://127.0.0.1:7700/v1/jobs:counts", timeout=5))
c = c.get("counts", c)
print(sum(int(c.get(s, 0)) for s in ("submitted", "queued", "placed", "running")))' 2>/dev/null) || {
      say "could not ask $name for its unfinished jobs (is it running?); removing it anyway"
      continue
    }
    if [[ $counts -gt 0 ]]; then
      busy+=("$name ($counts unfinished; p2psched jobs --counts --agent http://$(docker inspect -f \
        '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$name"):7700)")
    fi
  done < <(replicas_beyond "$n")
  if [[ ${#busy[@]} -gt 0 && ${P2PSCHED_SCALE_FORCE:-0} != 1 ]]; then
    die "not shrinking to $n: removing ${busy[*]} would take the records of those jobs with it;" \
      "wait until none is unfinished there, or set P2PSCHED_SCALE_FORCE=1"
  fi
}

cmd=${1:-}
case "$cmd" in
  up)
    check_n "${2:-}"; need_docker
    t0=$SECONDS
    build_image 0
    t1=$SECONDS
    compose_up "$2"
    wait_alive "$2"
    say "cluster of $2 up in $((SECONDS - t0))s ($((SECONDS - t1))s after the image was ready)"
    ;;
  scale)
    check_n "${2:-}"; need_docker
    # Only a missing image is built: a rebuild (the sources changed) would make compose
    # recreate every running agent, interrupting their jobs. `up N` applies a new image.
    docker image inspect "$P2PSCHED_IMAGE" >/dev/null 2>&1 || build_image 0
    check_shrink "$2"
    # A removed replica's data volume (anonymous: the image's VOLUME) would outlive it,
    # out of reach of `down -v`; a later replica with that number starts empty anyway.
    gone_volumes=$(replicas_beyond "$2" | while read -r _ name; do
      docker inspect -f '{{range .Mounts}}{{if eq .Destination "/var/lib/p2psched"}}{{.Name}} {{end}}{{end}}' "$name"
    done)
    compose_up "$2" --no-recreate
    if [[ -n ${gone_volumes// /} && ${P2PSCHED_SCALE_FORCE:-0} != 1 ]]; then
      docker volume rm $gone_volumes >/dev/null || say "could not remove the data volumes $gone_volumes"
    elif [[ -n ${gone_volumes// /} ]]; then
      say "kept the removed replicas' data volumes (their job stores): $gone_volumes"
    fi
    wait_alive "$2"
    ;;
  stop)
    need_docker
    "${COMPOSE[@]}" stop >&2 || die "'${COMPOSE[*]} stop' failed (see above)"
    say "agents stopped, their data kept; 'cluster.sh up N' starts them again, 'cluster.sh down' removes them"
    ;;
  status)
    need_docker
    "${COMPOSE[@]}" ps
    python3 - "$ENTRY_URL" <<'EOF'
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/v1/peers", timeout=3) as r:
        body = json.load(r)
except Exception as e:
    sys.exit(f"entry agent at {sys.argv[1]} does not answer ({e}); is the cluster up?")
peers = body.get("peers", body.get("members", [])) if isinstance(body, dict) else body
print(f"\nmembers as the entry agent sees them ({len(peers)}):")
for p in peers:
    print(f"  {p.get('node_id', p.get('id', '?')):<12} {p.get('state', '?'):<8} {p.get('address', p.get('addr', ''))}")
EOF
    ;;
  down)
    need_docker
    "${COMPOSE[@]}" --profile monitoring down -v --remove-orphans 2>/dev/null \
      || "${COMPOSE[@]}" down -v --remove-orphans
    ;;
  build)
    need_docker
    build_image 1
    ;;
  -h|--help|help) usage ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$cmd'; use one of: up N, scale N, status, stop, down, build" ;;
esac
