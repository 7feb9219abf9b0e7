"""What every sandbox takes and returns.

The executor turns a stored job into a :class:`SandboxRequest`, hands it to the
sandbox for its runtime, and stores the :class:`SandboxResult` it gets back. Both
sandboxes (``wasm`` and ``process``) speak only these two types, so the executor
never needs to know which one ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2psched.jobs.spec import JobSpec, Limits, Resources

#: Reasons a job can end with. ``exit N`` and ``trap: MSG`` and ``signal N`` carry detail.
LIMIT_REASONS = (
    "out_of_fuel",  # wasm fuel exhausted
    "cpu_limit",  # process CPU time (cgroup quota accounting or RLIMIT_CPU)
    "wall_timeout",  # wall-clock deadline
    "memory_limit",  # wasm store limit or cgroup OOM kill
    "stack_overflow",  # wasm call stack exhausted
    "pids_limit",  # fork bomb contained by the pids controller
    "output_limit",  # a file over RLIMIT_FSIZE
)


@dataclass(slots=True)
class LiveOutput:
    """A running job's output so far, for readers while it runs (``GET
    /v1/jobs/{id}/output``). The sandbox appends what the job writes, up to the
    job's output limits, and calls ``changed`` after each piece; the result's
    ``stdout`` and ``stderr`` are these same bytes."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    changed: Callable[[], None] | None = None


@dataclass(slots=True)
class SandboxRequest:
    job_id: str
    runtime: str  # "wasm" | "process"
    limits: Limits
    resources: Resources
    # wasm
    module_sha256: str | None = None
    module_path: Path | None = None  # the module's bytes, stored by the agent
    entry: str = "_start"
    # process
    command: list[str] = field(default_factory=list)
    # both
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""
    network: bool = False  # the tenant holds the ``network`` capability
    mask_patterns: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    gpu_env: dict[str, str] = field(default_factory=dict)  # CUDA_VISIBLE_DEVICES etc. of granted slots
    gpu_devices: list[str] = field(default_factory=list)  # /dev/nvidia* nodes the job may open
    live: LiveOutput | None = None  # where the output goes as it is written, for readers while it runs

    @classmethod
    def for_job(cls, job_id: str, spec: JobSpec, module_path: Path | None, *, gpu_env: dict[str, str] | None = None,
                gpu_devices: list[str] | None = None) -> SandboxRequest:
        """What the sandbox runs for job ``job_id`` of ``spec``, its module stored at ``module_path``."""
        return cls(
            job_id=job_id, runtime=spec.runtime, limits=spec.limits, resources=spec.resources,
            module_sha256=spec.module_sha256, module_path=module_path, entry=spec.entry, command=list(spec.command),
            args=list(spec.args), env=dict(spec.env), stdin=spec.input, network="network" in spec.capabilities,
            mask_patterns=list(spec.mask_patterns), artifacts=list(spec.artifacts), gpu_env=gpu_env or {},
            gpu_devices=gpu_devices or [],
        )


@dataclass(slots=True)
class SandboxResult:
    exit_code: int | None
    reason: str  # "exit 0", "exit 3", "trap: ...", "signal 9", or one of LIMIT_REASONS, or "cancelled"
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_ms: float = 0.0
    peak_mem_bytes: int = 0
    limit_hit: str | None = None
    signal: int | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. "cgroups unavailable: rlimits only"
    sandbox: dict[str, object] = field(default_factory=dict)  # what isolation was applied, for attestation

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.limit_hit is None and self.reason == "exit 0"


def cap_output(data: bytes, limit: int) -> tuple[bytes, bool]:
    """Keep at most ``limit`` bytes; say whether anything was cut."""
    if len(data) <= limit:
        return data, False
    return data[:limit], True
