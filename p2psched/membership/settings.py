"""Membership settings: every knob, its LAN default, and why.

Defaults follow hashicorp/memberlist's ``DefaultLANConfig`` (which Serf and Consul
inherit) unless a field says otherwise; where we differ, the field says how and why.
Tests and the simulator compress time by scaling the probe, gossip and push-pull
intervals together (see ``MembershipSettings.compressed``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class MembershipSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster_name: str = Field(
        default="p2psched",
        min_length=1,
        max_length=64,
        description=(
            "Bound into every packet as associated data (and prefixed to insecure packets), "
            "so two clusters sharing a LAN or a key never merge. Serf calls this the "
            "keyring's label; memberlist has Label."
        ),
    )

    # --- failure detection -------------------------------------------------------
    probe_interval: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Seconds between probes of one peer (shuffled round-robin). memberlist LAN: 1 s, "
            "WAN: 5 s, local: 1 s. Lower detects crashes sooner at the cost of 2 packets per "
            "node per interval; Lifeguard stretches it on a node that is itself slow."
        ),
    )
    probe_timeout: float = Field(
        default=0.5,
        gt=0,
        description=(
            "Seconds to wait for a direct ack before asking k peers to probe indirectly and "
            "trying TCP. memberlist LAN: 500 ms (WAN 3 s, local 200 ms); it should sit above "
            "the 99th percentile round trip of the network."
        ),
    )
    indirect_checks: int = Field(
        default=3,
        ge=0,
        description=(
            "Peers asked to ping a target that missed its direct ack (SWIM's k). memberlist "
            "LAN: 3. More peers make a false suspicion from one lossy link less likely and "
            "cost 4 packets each."
        ),
    )
    tcp_fallback: bool = Field(
        default=True,
        description=(
            "Also try a TCP ping when the direct UDP probe fails, as memberlist does: a peer "
            "reachable over TCP but not UDP (a firewall, a full socket buffer) is not suspected."
        ),
    )
    suspicion_mult: float = Field(
        default=4.0,
        gt=0,
        description=(
            "Suspicion timeout multiplier. memberlist LAN: 4 (WAN 6, local 3). The minimum "
            "timeout is suspicion_mult * max(1, log10(N)) * probe_timeout. memberlist "
            "multiplies by probe_interval instead (8 s at N=100, which is why it takes about "
            "10 s to declare a crash); Lifeguard's confirmations, the local health multiplier "
            "and the TCP fallback are what keep false positives down, so we scale from the "
            "probe timeout and declare crashes in about half the time, with 0 false positives "
            "at 5% loss in the simulator (docs/membership.md)."
        ),
    )
    suspicion_max_timeout_mult: float = Field(
        default=6.0,
        ge=1,
        description=(
            "A fresh suspicion starts at this many times the minimum timeout and shrinks "
            "toward the minimum as independent peers confirm it (Lifeguard). memberlist: 6."
        ),
    )
    awareness_max_multiplier: int = Field(
        default=8,
        ge=1,
        description=(
            "Upper bound of the local health multiplier: a node that misses acks, misses "
            "nacks or reports event-loop lag probes up to this many times less often and "
            "waits this many times longer for acks. memberlist: 8."
        ),
    )
    lag_threshold: float = Field(
        default=0.1,
        gt=0,
        description=(
            "Seconds of event-loop scheduling lag above which the agent counts itself as "
            "slow (one health point per probe interval). 100 ms is a fifth of the probe "
            "timeout: lag that large makes our own acks late."
        ),
    )

    # --- dissemination -----------------------------------------------------------
    gossip_interval: float = Field(
        default=0.2,
        gt=0,
        description=(
            "Seconds between gossip rounds that push queued updates to gossip_nodes random "
            "peers. memberlist LAN: 200 ms (WAN 500 ms, local 100 ms). Rounds with nothing "
            "queued send nothing."
        ),
    )
    gossip_nodes: int = Field(
        default=3,
        ge=1,
        description="Peers per gossip round. memberlist LAN: 3 (WAN 4). Higher spreads faster, costs more.",
    )
    gossip_same_group_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Probability that each gossip peer is drawn from our own topology group (e.g. "
            "the same leaf switch) rather than from everyone, when a group function is "
            "given: gossip then crosses spines less often. 0 means no preference (plain "
            "SWIM); p2psched.topology.gossip explains why 0.5 suits a leaf-spine fabric."
        ),
    )
    retransmit_mult: int = Field(
        default=4,
        ge=1,
        description=(
            "Each update is piggybacked up to retransmit_mult * ceil(log10(N + 1)) times. "
            "memberlist LAN: 4 (local 2). Higher makes loss less likely to stop an update "
            "and costs bytes per update."
        ),
    )
    push_pull_interval: float = Field(
        default=30.0,
        ge=0,
        description=(
            "Seconds between full-state (digest) exchanges with one random peer over TCP, "
            "the anti-entropy that repairs whatever gossip lost. memberlist LAN: 30 s; like "
            "memberlist we stretch it above 32 members (x2 at 64, x3 at 128, ...) so the "
            "per-node cost stays flat. 0 turns it off."
        ),
    )
    state_min_interval: float = Field(
        default=0.5,
        ge=0,
        description=(
            "Minimum seconds between two published versions of our node state: vector "
            "changes in between are coalesced into one update, so a busy agent does not "
            "flood the cluster. 500 ms keeps placement at most one gossip second behind."
        ),
    )
    max_datagram: int = Field(
        default=1200,
        ge=256,
        le=65000,
        description=(
            "Largest UDP datagram we send or accept, encryption included. 1,200 bytes fits "
            "the IPv6 minimum MTU with tunnels (QUIC uses the same figure); memberlist uses "
            "1,400 (UDPBufferSize) for LANs."
        ),
    )
    max_tcp_message: int = Field(
        default=8 * 1024 * 1024,
        ge=65536,
        description="Largest push-pull message accepted over TCP (a full state of 10,000 members fits).",
    )

    # --- dead members and rejoining ------------------------------------------------
    dead_retention: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds a dead or left member stays listed (and is gossiped to, so that it can "
            "refute) before it is forgotten. memberlist: GossipToTheDeadTime 30 s."
        ),
    )
    rejoin_interval: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds between attempts to reach peers we are not connected to: dead members, "
            "recently forgotten ones and seeds that are not live members. This is how a "
            "node cut off longer than dead_retention comes back by itself (memberlist users "
            "must script a re-join)."
        ),
    )
    join_retry_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between join attempts while we know no live peer at all.",
    )

    # --- discovery -----------------------------------------------------------------
    join: list[str] = Field(
        default_factory=list,
        description="Static seeds, HOST:PORT (--join, repeatable).",
    )
    dns_names: list[str] = Field(
        default_factory=list,
        description=(
            "NAME:PORT entries whose name resolves to several addresses (docker compose "
            "replicas); each address becomes a seed."
        ),
    )
    dns_interval: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between re-resolutions of dns_names, so that new replicas are found.",
    )
    mdns: bool = Field(
        default=True,
        description="Advertise and browse _p2psched._udp.local. with zeroconf (--no-mdns turns it off).",
    )
    advertise: str | None = Field(
        default=None,
        description=(
            "HOST:PORT peers should use to reach us, when the bind address is a wildcard or "
            "NATed. Default: the bind address, or this host's primary address for 0.0.0.0."
        ),
    )

    # --- transport security ----------------------------------------------------------
    key_file: Path | None = Field(
        default=None,
        description="Gossip keyring file written by `p2psched keygen --gossip` (see membership/keyring.py).",
    )
    insecure: bool = Field(
        default=False,
        description="Send and accept unencrypted packets. Only for tests and demos: the agent warns at start-up.",
    )
    replay_window: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds of clock difference tolerated between agents; packets older than this, "
            "or seen before within it, are dropped as replays. Agents need clocks within "
            "this bound (NTP keeps them within milliseconds)."
        ),
    )

    def compressed(self, factor: float) -> MembershipSettings:
        """The same settings with every protocol period divided by ``factor`` (for tests)."""
        return self.model_copy(
            update={
                "probe_interval": self.probe_interval / factor,
                "probe_timeout": self.probe_timeout / factor,
                "gossip_interval": self.gossip_interval / factor,
                "push_pull_interval": self.push_pull_interval / factor,
                "state_min_interval": self.state_min_interval / factor,
                "dead_retention": self.dead_retention / factor,
                "rejoin_interval": self.rejoin_interval / factor,
                "join_retry_interval": self.join_retry_interval / factor,
                "lag_threshold": self.lag_threshold / factor,
            }
        )
