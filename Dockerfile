# The p2psched agent image.
#
# Build (scripts/cluster.sh does all of this when the image is missing or stale):
#   .venv/bin/pip wheel . -w build/wheels          # on the host: the project and every dependency
#   docker build -t p2psched:dev .                  # ordinary machine: BASE comes from a registry
#   scripts/base-image.sh && docker build --build-arg BASE=p2psched-base:bookworm -t p2psched:dev .
#                                                   # no registry: a debootstrapped local base
# Nothing inside the build reaches the network when BASE already carries the run-time
# packages (the local base does); wheels come from build/wheels only.
#
# The wheels are built on the host with the host's Python, so the host's Python minor
# version must match BASE's (3.11 for both defaults); cluster.sh checks this.

ARG BASE=python:3.11-slim-bookworm

# --- build stage: a virtualenv holding the agent and its dependencies -----------------
FROM ${BASE} AS build
# cluster.sh removes this stage's leftover image by this label after a build
LABEL p2psched.stage=build
# python:3.11-slim has venv built in; the Debian base gets it from python3-venv.
COPY build/wheels /wheels
RUN python3 -m venv /opt/p2psched \
 && /opt/p2psched/bin/pip install --no-cache-dir --no-index --find-links /wheels p2psched \
 # pip and setuptools are needed to build the image, not to run the agent
 && /opt/p2psched/bin/pip uninstall -y -q pip setuptools \
 # test suites shipped inside packages (networkx's alone is ~10 MB) never run here
 && find /opt/p2psched/lib -type d \( -name tests -o -name _tests \) -prune -exec rm -rf {} + \
 && find /opt/p2psched -name '__pycache__' -prune -exec rm -rf {} + \
 # precompile once here, so that every container does not write .pyc files at start
 && /opt/p2psched/bin/python -m compileall -q -j 0 /opt/p2psched/lib >/dev/null

# --- run stage -------------------------------------------------------------------------
FROM ${BASE}
# The run-time tools (see scripts/base-image.sh for why each is needed). The local base
# already has them, so this step does nothing and needs no network there; on
# python:3.11-slim it installs them from Debian.
RUN set -e; missing=""; \
    for t in tini:tini bwrap:bubblewrap tc:iproute2 iptables:iptables prlimit:util-linux; do \
      command -v "${t%%:*}" >/dev/null 2>&1 || missing="$missing ${t#*:}"; \
    done; \
    [ -e /usr/lib/x86_64-linux-gnu/libseccomp.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libseccomp.so.2 ] \
      || missing="$missing libseccomp2"; \
    if [ -n "$missing" ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/p2psched /opt/p2psched
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
COPY deploy/docker/helper.py /usr/local/lib/p2psched/helper.py
ENV PATH=/opt/p2psched/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    P2PSCHED_DATA_DIR=/var/lib/p2psched \
    P2PSCHED_SHARED_DIR=/shared \
    P2PSCHED_DRAIN_ON_SIGTERM=true
RUN mkdir -p /var/lib/p2psched /shared
VOLUME ["/var/lib/p2psched"]
# API (HTTP), gossip (UDP), transfer (TCP)
EXPOSE 7700/tcp 7701/udp 7702/tcp
# The agent answers /healthz once its API is serving. start-period and timeout are
# generous because a loaded 2-core host can take tens of seconds to start N agents.
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/docker-entrypoint.sh", "healthcheck"]
# tini is PID 1: it forwards SIGTERM to the agent (which then drains: P2PSCHED_DRAIN_ON_SIGTERM above,
# as `docker stop` expects of a node leaving) and reaps zombies
# left by process-sandbox jobs. The entrypoint execs the agent, so there is no shell in
# between to swallow the signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "/usr/local/bin/docker-entrypoint.sh"]
CMD ["agent"]
