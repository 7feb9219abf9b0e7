"""A running agent follows edits of its topology file, without a restart.

Operators add racks; the file changes under running agents. Within a poll (or at
once on SIGHUP) the agent re-reads it, and its position in the new graph reaches
its peers through gossip. An edit that does not load changes nothing and says why.
"""

import logging

import trio

from agents import FAST_MEMBERSHIP, ROOT, await_peers, running_agent

SMALL = (ROOT / "topologies" / "small.yaml").read_text()
WITH_NEWHOST = SMALL.replace("  - h3-1\n", "  - h3-1\n  - newhost\n") + \
    "  - {a: newhost, b: leaf-2, latency_us: 1.0, bandwidth_gbps: 25.0}\n"


async def test_an_edited_topology_file_is_reloaded_and_the_new_position_gossiped(tmp_path, caplog):
    topo = tmp_path / "topology.yaml"
    topo.write_text(SMALL)
    async with running_agent(tmp_path / "n", node_id="newhost", topology=topo, membership=FAST_MEMBERSHIP) as (
            agent, _):
        async with running_agent(tmp_path / "p", node_id="h0-0", topology=topo, join=[agent.settings.gossip],
                                 membership=FAST_MEMBERSHIP) as (peer, peer_http):
            await await_peers(peer, "newhost")
            assert agent.position() == ""  # not a host of the file: the default rule placed it

            topo.write_text(WITH_NEWHOST)
            with trio.fail_after(20):
                while peer.cluster.state_of("newhost").position != "newhost":
                    await trio.sleep(0.1)
            assert agent.topology.locate("newhost").leaf == "leaf-2"
            listed = (await peer_http.get("/v1/peers")).json()["peers"]
            assert next(p for p in listed if p["node_id"] == "newhost")["position"] == "newhost"

            # A bad edit is refused with its reason; the topology loaded before stays.
            with caplog.at_level(logging.ERROR, logger="p2psched.agent"):
                topo.write_text(WITH_NEWHOST + "  - {a: newhost, b: nowhere, latency_us: 1.0, bandwidth_gbps: 25.0}\n")
                with trio.fail_after(20):
                    while "topology not reloaded" not in caplog.text:
                        await trio.sleep(0.1)
            assert "nowhere" in caplog.text
            assert agent.position() == "newhost"
