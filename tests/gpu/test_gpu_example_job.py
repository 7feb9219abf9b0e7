"""The example GPU job as a real subprocess: it sees exactly the environment a grant
gives it, and a job without the gpu capability is told there is no GPU.

On this host there is no driver, so CUDA reports nothing either way; the gpu-marked
tests in test_gpu_real.py repeat this where a GPU exists and CUDA itself answers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2psched.gpu.devices import no_gpu_env
from p2psched.gpu.discovery import load_inventory
from p2psched.gpu.slots import SlotAllocator

RunExample = Callable[..., tuple[int, dict[str, Any], str]]  # the run_example fixture (conftest.py)


def test_the_job_sees_the_slot_it_was_granted(run_example: RunExample) -> None:
    alloc = SlotAllocator(load_inventory("1xH100-80GB/mig, 1xL4-24GB/shared:4"))
    alloc.reserve("other", 1, "4g.40gb")
    g = alloc.reserve("job", 1, "share-1/4")
    rc, report, out = run_example(g.env)
    assert rc == 0, out
    assert report["granted"]["CUDA_VISIBLE_DEVICES"] == "GPU-declared-1"
    assert report["granted"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-declared-1"
    assert report["granted"]["P2PSCHED_GPU_SLOT_TYPE"] == "share-1/4"
    assert report["granted"]["P2PSCHED_GPU_MEMORY_LIMIT_BYTES"] == str((24 << 30) // 4)
    assert report["checksum"] == report["expected"]  # the multiply ran and agrees with the CPU result


def test_a_mig_slot_is_what_the_job_is_told_to_use(run_example: RunExample) -> None:
    g = SlotAllocator(load_inventory("1xH100-80GB/mig")).reserve("job", 1, "1g.10gb")
    rc, report, _ = run_example(g.env)
    assert rc == 0
    assert report["granted"]["CUDA_VISIBLE_DEVICES"] == g.slots[0].device_uuid
    assert report["granted"]["CUDA_VISIBLE_DEVICES"].startswith("MIG-")


def test_a_job_without_the_capability_sees_no_gpu(run_example: RunExample) -> None:
    rc, report, out = run_example(no_gpu_env(), "--require-gpu")
    assert report["granted"]["CUDA_VISIBLE_DEVICES"] == ""
    assert report["granted"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert report["cuda"]["devices"] == []
    assert report["backend"] == "python" and "no GPU visible" in report["device"]
    assert rc == 3, out  # --require-gpu: no GPU is a failure the job reports itself


async def test_in_the_process_sandbox_the_job_gets_its_grant_and_no_more(tmp_path: Path,
                                                                       run_in_sandbox: Any) -> None:
    g = SlotAllocator(load_inventory("1xL4-24GB/shared:4")).reserve("job", 1, "share-1/4")
    rc, report, out = await run_in_sandbox(tmp_path / "a", g.env, list(g.devices))
    assert rc == 0, out
    assert report["granted"]["CUDA_VISIBLE_DEVICES"] == "GPU-declared-0"
    assert report["granted"]["P2PSCHED_GPU_MEMORY_LIMIT_BYTES"] == str((24 << 30) // 4)
    rc, report, out = await run_in_sandbox(tmp_path / "b", no_gpu_env(), [], "--require-gpu")
    assert report["granted"]["CUDA_VISIBLE_DEVICES"] == "" and report["cuda"]["devices"] == []
    assert rc == 3, out
