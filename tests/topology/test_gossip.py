"""Topology-aware gossip target choice."""

from __future__ import annotations

import random

import pytest

from p2psched.topology import pick_gossip_peers

SAME = [f"h0-{i}" for i in range(1, 16)]
EVERYONE = SAME + [f"h{l}-{i}" for l in range(1, 64) for i in range(16)]


def _same_share(fraction: float, rounds: int = 400) -> float:
    rng = random.Random(7)
    picks = [p for _ in range(rounds) for p in pick_gossip_peers(rng, SAME, EVERYONE, 3, fraction)]
    return sum(p in SAME for p in picks) / len(picks)


def test_fraction_sets_the_share_of_same_leaf_targets() -> None:
    assert _same_share(0.0) < 0.05  # uniform: 15 of 1,023 peers share the leaf
    assert 0.4 < _same_share(0.5) < 0.6
    assert _same_share(1.0) == 1.0


def test_targets_are_distinct_and_never_more_than_exist() -> None:
    rng = random.Random(1)
    for _ in range(100):
        picks = pick_gossip_peers(rng, SAME[:1], SAME[:1] + ["x", "y"], 5, 0.9)
        assert sorted(picks) == sorted(SAME[:1] + ["x", "y"])
    picks = pick_gossip_peers(rng, SAME, EVERYONE, 3, 1.0)
    assert len(set(picks)) == 3


def test_fraction_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="same_leaf_fraction is 1.5; it must lie between 0.0 and 1.0"):
        pick_gossip_peers(random.Random(), SAME, EVERYONE, 3, 1.5)
