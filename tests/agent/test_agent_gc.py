"""The agent keeps what start-up built out of the garbage collector's full passes,
and collects its young objects in larger, rarer batches."""

import gc
import weakref

from p2psched.agent.agent import GC_THRESHOLDS

from agents import running_agent


async def test_start_up_objects_are_frozen_out_of_full_collections(tmp_path):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    try:
        async with running_agent(tmp_path) as (agent, _http):
            # Everything start-up left alive (modules, the agent, its store and API) is
            # frozen: a full collection no longer walks it.
            assert gc.get_freeze_count() > 10_000
            assert not any(o is agent for o in gc.get_objects())
            assert gc.get_threshold() == GC_THRESHOLDS

            # A cycle made after start-up is still found and freed.
            class Node:
                pass

            a, b = Node(), Node()
            a.other, b.other = b, a
            gone = weakref.ref(a)
            del a, b
            assert gone() is not None  # a cycle: reference counting alone cannot free it
            gc.collect()
            assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
