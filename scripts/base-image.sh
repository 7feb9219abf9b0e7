#!/usr/bin/env bash
# Build the local Debian base image `p2psched-base:bookworm` from Debian packages.
#
# Why: the Dockerfile normally starts FROM python:3.11-slim-bookworm, pulled from a
# registry. Where no registry can be reached (an air-gapped host, a CI runner with an
# empty engine), this script builds an equivalent base with debootstrap from the
# host's Debian mirror and `docker import`s it, so that
#     docker build --build-arg BASE=p2psched-base:bookworm .
# needs no network at all.
#
# Usage: scripts/base-image.sh [--force]
#   --force   rebuild even if the image already exists
# Environment:
#   P2PSCHED_BASE_IMAGE     image name to create   (default p2psched-base:bookworm)
#   P2PSCHED_DEBIAN_MIRROR  Debian mirror URL      (default: the host's apt sources,
#                                                   else http://deb.debian.org/debian)
#   P2PSCHED_DEBIAN_SUITE   Debian suite           (default bookworm: Python 3.11,
#                                                   the same as python:3.11-slim-bookworm)
set -euo pipefail

IMAGE="${P2PSCHED_BASE_IMAGE:-p2psched-base:bookworm}"
SUITE="${P2PSCHED_DEBIAN_SUITE:-bookworm}"
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "base-image.sh: unknown argument '$arg'; the only option is --force" >&2; exit 2 ;;
  esac
done

die() { echo "base-image.sh: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 \
  || die "docker is not installed; install Docker Engine (Debian: apt-get install docker.io) and retry"
docker info >/dev/null 2>&1 \
  || die "cannot reach the Docker engine (is dockerd running, and may this user use /var/run/docker.sock?)"

# What the agent needs at run time, and why:
#   python3, python3-venv  the agent itself (bookworm ships 3.11) and its virtualenv
#   libseccomp2            the process sandbox's seccomp filter (pyseccomp loads it)
#   iproute2               `tc netem` for loss/delay faults in chaos runs, `ip` for debugging
#   iptables               partition faults that drop traffic from chosen peers
#   bubblewrap             the process sandbox's namespace launcher (bwrap)
#   util-linux             prlimit, which sets a process job's rlimits before bwrap
#   ca-certificates        TLS to anything outside the cluster
#   tini                   PID 1 that forwards SIGTERM so the agent drains, and reaps zombies
PACKAGES=python3,python3-venv,libseccomp2,bubblewrap,iproute2,iptables,util-linux,ca-certificates,tini

# The package list is stored as a label: an image built from an older list is rebuilt.
have=$(docker image inspect -f '{{index .Config.Labels "p2psched.base-packages"}}' "$IMAGE" 2>/dev/null || true)
if [[ $FORCE -eq 0 && $have == "$SUITE:$PACKAGES" ]]; then
  echo "base-image.sh: $IMAGE is up to date (pass --force to rebuild)"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "debootstrap needs root (it creates device nodes and chroots); run with sudo"

if ! command -v debootstrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "base-image.sh: installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null; } \
      || die "could not install debootstrap; install it with 'apt-get install debootstrap'"
  else
    die "debootstrap is missing and this host has no apt-get; build on a Debian/Ubuntu host, or pull python:3.11-slim-bookworm and skip this script"
  fi
fi

# The mirror apt already uses is the one known to be reachable from here.
mirror_from_apt() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
    if [[ $uri == */debian ]]; then echo "$uri"; return; fi
  done
  if [[ -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" && $3 ~ /^[a-z]+$/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list)
    if [[ -n $uri ]]; then echo "$uri"; return; fi
  fi
  echo "http://deb.debian.org/debian"
}
MIRROR="${P2PSCHED_DEBIAN_MIRROR:-$(mirror_from_apt)}"

ROOTFS=$(mktemp -d /tmp/p2psched-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$ROOTFS"; }
trap cleanup EXIT

echo "base-image.sh: debootstrap $SUITE from $MIRROR into $ROOTFS (a few minutes)"
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
  > "$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; die "debootstrap failed; full log in $ROOTFS.log"; }
rm -f "$ROOTFS.log"

# Slim the tree: nothing here is needed to run the agent, and it halves the image.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/debconf/*-old \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* \
       "$ROOTFS"/usr/share/lintian "$ROOTFS"/usr/share/common-licenses
find "$ROOTFS"/usr/lib/python3* -name '__pycache__' -prune -exec rm -rf {} + 2>/dev/null || true
# Point apt at the same mirror so that derived images can still apt-get install.
echo "deb $MIRROR $SUITE main" > "$ROOTFS/etc/apt/sources.list"

tar --numeric-owner -C "$ROOTFS" -c . \
  | docker import \
      --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' \
      --change "LABEL p2psched.base-packages=$SUITE:$PACKAGES" \
      --message "p2psched base: debootstrap $SUITE minbase + $PACKAGES" \
      - "$IMAGE" >/dev/null

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "base-image.sh: built $IMAGE ($((size / 1024 / 1024)) MiB) in $(( $(date +%s) - start ))s"
