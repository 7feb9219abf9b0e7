#!/usr/bin/env bash
# A Jepsen-style chaos run: start agents (each in its own network namespace), break
# them on a seeded plan while clients submit and cancel jobs, heal, then check that
# no acknowledged job was lost and each has exactly one final result.
#
# Usage: scripts/chaos.sh --agents N --duration S --seed K [--jobs M] [--compose] [--no-netns] [-- more options]
#   --compose   break the compose cluster's containers (docker kill/pause/network
#               disconnect) instead of local processes; starts it with
#               scripts/cluster.sh up N when no agent container is running.
#   --no-netns  agents on loopback (no root needed; partitions impossible).
# Any other option goes to `python -m p2psched.chaos run` (see its --help).
# Prints the verdict with the counts and figures behind it; exit 0 iff it passed.
# The run's history, final records, verdict and agent logs stay in the run
# directory it names (re-check with: .venv/bin/python -m p2psched.chaos check DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

agents=4 duration=40 seed=1 jobs="" compose=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --agents) agents="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --compose) compose=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
# By default about 8 jobs a second: enough to keep every agent busy under faults
# on a small machine.
[ -n "$jobs" ] || jobs=$(python3 -c "print(max(50, int(8 * float('$duration'))))")

./scripts/setup.sh >/dev/null

if [ "$compose" = 1 ]; then
  if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    echo "chaos: --compose needs a running Docker engine; run without --compose for network-namespace chaos" >&2
    exit 2
  fi
  project=${P2PSCHED_PROJECT:-p2psched}  # as scripts/cluster.sh names it
  if [ -z "$(docker ps -q --filter label=p2psched.role=agent --filter "label=com.docker.compose.project=$project")" ]; then
    echo "chaos: no agent containers running; starting $agents with scripts/cluster.sh up $agents"
    ./scripts/cluster.sh up "$agents"
  fi
  args+=(--compose)
fi

run=(.venv/bin/python -m p2psched.chaos run --agents "$agents" --duration "$duration" --seed "$seed" --jobs "$jobs")
if [ "$(id -u)" != 0 ] && [ "$compose" = 0 ] && [[ " ${args[*]:-} " != *" --no-netns "* ]]; then
  if command -v sudo >/dev/null; then
    exec sudo -E "${run[@]}" "${args[@]}"
  fi
  echo "chaos: network namespaces need root; run as root, or pass --no-netns (loopback, no partitions)" >&2
  exit 2
fi
exec "${run[@]}" "${args[@]}"
