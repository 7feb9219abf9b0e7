"""GPUs: discovery, typed virtual slots, and what a GPU job is allowed to see.

The agent's calls, in order (details at the top of each module)::

    from p2psched.gpu.discovery import load_inventory, sample_usage, doctor_checks
    from p2psched.gpu.slots import SlotAllocator, Grant, best_fit_score, describe_slots
    from p2psched.gpu.devices import no_gpu_env, cgroup_rules
    from p2psched.gpu.metrics import GpuMetrics

    inv = load_inventory(settings.gpus)        # start (blocking: run in a thread)
    alloc = SlotAllocator(inv); alloc.restore(stored grants of queued/running jobs)
    labels |= inv.labels()                     # gossip where the slots came from
    vector.gpu_free/gpu_total = alloc.free_by_type()/total_by_type()
    grant = alloc.reserve(job, n, type)        # job start; store grant.to_wire() with the job
    alloc.release(job)                         # job end, crash or cancel; idempotent

Nothing here imports ``pynvml`` at module load; hosts without GPUs pay nothing.
"""
