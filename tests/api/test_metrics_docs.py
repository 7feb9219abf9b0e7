"""docs/operations.md's metrics list against what an agent's /metrics serves."""

from __future__ import annotations

import re
from pathlib import Path

from agents import running_agent

DOCS = Path(__file__).resolve().parents[2] / "docs"


def served(text: str) -> set[str]:
    """Metric families in a /metrics text (less prometheus_client's _created twins and its process_/python_)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE p2psched_"):
            name = line.split()[2]
            if not name.endswith("_created"):
                names.add(name)
    return names


async def test_operations_md_lists_every_metric_and_every_documented_one_exists(tmp_path):
    async with running_agent(tmp_path) as (agent, http):
        names = served((await http.get("/metrics")).text)
    ops = (DOCS / "operations.md").read_text()
    # The membership service's are listed in docs/membership.md; operations.md points there.
    missing = [n for n in names if n not in ops and not (n.startswith("p2psched_membership_")
                                                       and "p2psched_membership_*" in ops)]
    assert not sorted(missing), "metrics missing from docs/operations.md"
    documented = set()
    for doc in DOCS.glob("*.md"):
        documented |= set(re.findall(r"\bp2psched_[a-z_]+[a-z]", doc.read_text()))
    # A histogram is documented by its family name; its series add _bucket, _count and _sum.
    unknown = {n for n in documented if n not in names and re.sub(r"_(bucket|count|sum)$", "", n) not in names}
    # container names in operations.md, and the p2psched_membership_* wildcard, not metrics
    unknown -= {"p2psched_agent", "p2psched_default", "p2psched_membership"}
    assert not sorted(unknown), "docs name metrics no agent serves"
