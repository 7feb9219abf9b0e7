"""Topology-aware choice of gossip targets (issue 4, requirement 7).

Each pick goes, with probability ``same_leaf_fraction``, to a peer under the same
leaf, and otherwise to a peer drawn uniformly from all members. Same-leaf traffic
never crosses a spine, so the fraction cuts cross-spine gossip per node by about
that fraction; the uniform picks keep the long-range links that make epidemic
dissemination take O(log n) rounds. ``p2psched sim placement --gossip`` measures
both effects (docs/scheduling.md has the figures).

A pure function: the caller passes its random source, so membership's protocol core
stays deterministic under test.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

#: Half the picks stay under the leaf: the simulator shows cross-spine gossip per node
#: roughly halved while rounds-to-all-nodes grows by at most one at 1,024 hosts.
DEFAULT_SAME_LEAF_FRACTION = 0.5


def pick_gossip_peers(
    rng: random.Random,
    same_leaf: Sequence[str],
    everyone: Sequence[str],
    k: int,
    same_leaf_fraction: float = DEFAULT_SAME_LEAF_FRACTION,
) -> list[str]:
    """Up to ``k`` distinct peers. ``everyone`` includes ``same_leaf``; neither includes self."""
    if not 0.0 <= same_leaf_fraction <= 1.0:
        raise ValueError(f"same_leaf_fraction is {same_leaf_fraction}; it must lie between 0.0 and 1.0")
    k = min(k, len(everyone))
    chosen: list[str] = []
    seen: set[str] = set()
    attempts = 0
    # Rejection sampling keeps each pick O(1); the attempt cap ends the loop when the
    # same-leaf pool is small and mostly chosen already.
    while len(chosen) < k and attempts < 8 * k + 8:
        attempts += 1
        pool = same_leaf if same_leaf and rng.random() < same_leaf_fraction else everyone
        peer = pool[rng.randrange(len(pool))]
        if peer not in seen:
            seen.add(peer)
            chosen.append(peer)
    if len(chosen) < k:
        for peer in rng.sample(list(everyone), len(everyone)):
            if peer not in seen:
                seen.add(peer)
                chosen.append(peer)
                if len(chosen) == k:
                    break
    return chosen
