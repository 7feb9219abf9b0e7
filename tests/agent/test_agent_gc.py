"""The agent keeps what start-up built out of the garbage collector's full passes."""

import gc

from agents import running_agent


async def test_start_up_objects_are_frozen_out_of_full_collections(tmp_path):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    async with running_agent(tmp_path) as (agent, _http):
        # Everything start-up left alive (modules, the agent, its store and API) is
        # frozen: a full collection no longer walks it.
        assert gc.get_freeze_count() > 10_000
        assert not any(o is agent for o in gc.get_objects())
    gc.unfreeze()
