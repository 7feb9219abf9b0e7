#!/usr/bin/env bash
# Create .venv and install p2psched with everything it needs, on a fresh machine.
# Usage: scripts/setup.sh [--dev]    (idempotent; fast when nothing changed)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

# Debian packages: bubblewrap builds the process sandbox's namespaces and private
# root, libseccomp its syscall filter, util-linux its rlimits (prlimit);
# iproute2/iptables give the chaos harness its network namespaces and partitions.
need=()
[ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libseccomp.so.2 ] \
  || ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || need+=(libseccomp2)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v prlimit >/dev/null || need+=(util-linux)
command -v bwrap >/dev/null || need+=(bubblewrap)
# The dashboard's tests drive a real browser: Debian's Chromium and its chromedriver
# (without their desktop recommends).
browser=()
if [ -n "$extras" ]; then
  command -v chromium >/dev/null || browser+=(chromium)
  command -v chromedriver >/dev/null || browser+=(chromium-driver)
fi
if [ ${#need[@]} -gt 0 ] || [ ${#browser[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${need[*]} ${browser[*]}"
    apt-get update -qq
    [ ${#need[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    [ ${#browser[@]} -eq 0 ] \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null
  else
    echo "setup: missing ${need[*]} ${browser[*]}; install them with apt-get (as root): the process sandbox" \
      "needs the first, the dashboard tests the browser" >&2
  fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: p2psched needs Python >= 3.11; $($PY --version 2>&1) found. Set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras}"
  touch "$stamp"
fi
