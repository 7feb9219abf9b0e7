"""The job a client submits: its spec, resources and limits.

One pydantic model per concept; every field carries its default and its bounds, so
a bad value is refused with a message naming the field and the allowed range.
Bytes travel as base64 in JSON (pydantic's ``base64`` mode) and raw in msgpack.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from p2psched.jobs.ids import JOB_ID_RE, JOB_ID_RULE

Base64Bytes = Annotated[bytes, Field(json_schema_extra={"contentEncoding": "base64"})]

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

#: 64 MiB: large enough for an MLP guest with its weights, small enough that one
#: request cannot exhaust the agent's memory. Nomad's artifact default is similar.
MAX_MODULE_BYTES = 64 * 1024 * 1024
MAX_INPUT_BYTES = 64 * 1024 * 1024
#: The most stdout, and the most stderr, a job may keep. The agent holds what a job
#: keeps in memory until it ends (and hashes and stores it then): it was 1 GiB each,
#: and one job flooding both grew the agent by 4 GB. Bigger results belong in files.
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: stdout and stderr kept by default: allowed whatever the job's reservation.
DEFAULT_KEPT_OUTPUT = 1024 * 1024 + 256 * 1024
MIB = 1024 * 1024
CAPABILITIES = ("wasm", "process", "gpu", "network")
#: One program argument or environment variable, at most: Linux's MAX_ARG_STRLEN
#: (execve refuses a longer one). A 20 MB PATH was accepted, and looking a program
#: up in it held the agent for 5.5 s.
MAX_ARG_BYTES = 128 * 1024
#: command, args and env together, at most: within Linux's usual ARG_MAX.
MAX_ARGV_ENV_BYTES = 2 * 1024 * 1024
#: A job label's key and value, at most (characters). Labels are for finding jobs
#: (label= filters, cancel by labels), stored in every record and rewritten with it
#: on each state change: unbounded, 8 MiB labels stalled the agent for seconds and
#: grew its store 7x their size. Kubernetes allows 63 for a key's name, 63 for a value.
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
#: Validation context of a spec the agent accepted before: ``model_validate_json(raw, context=ACCEPTED)``.
ACCEPTED = {"accepted": True}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class Resources(Strict):
    """What the job occupies on its executor while it runs."""

    cpu: float = Field(1.0, gt=0, le=1024, description="CPU cores (slots) reserved.")
    mem_mb: int = Field(
        256, ge=1, le=4 * 1024 * 1024,
        description="Memory reserved, MiB. Given without limits.mem_bytes, it is the memory limit too; without it, "
        "limits.mem_bytes rounded up to MiB is reserved.",
    )
    gpu: int = Field(0, ge=0, le=64, description="Virtual GPU slots.")
    gpu_type: str | None = Field(None, max_length=64, description="Slot type, e.g. 'whole' or '1g.10gb'.")


class Limits(Strict):
    """Hard limits the sandbox enforces; crossing one ends the job with a named reason."""

    wall_ms: int = Field(60_000, ge=1, le=7 * 24 * 3600 * 1000, description="Wall-clock limit.")
    cpu_ms: int | None = Field(None, ge=1, le=7 * 24 * 3600 * 1000, description="CPU-time limit.")
    fuel: int | None = Field(None, ge=1, le=10**15, description="WebAssembly instruction fuel.")
    mem_bytes: int = Field(
        256 * 1024 * 1024, ge=64 * 1024, le=1 << 42,
        description="Memory limit. Given without resources.mem_mb, it sets the reservation too; without it, "
        "resources.mem_mb is the limit. Both given, the job may use up to this beyond what it reserved.",
    )
    stack_bytes: int = Field(1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024, description="Guest stack limit.")
    stdout_bytes: int = Field(
        1024 * 1024, ge=0, le=MAX_OUTPUT_BYTES,
        description="stdout kept; the rest is cut and flagged. With stderr_bytes, at most resources.mem_mb (or the "
        "defaults' 1.25 MiB): the agent holds it in memory while the job runs.",
    )
    stderr_bytes: int = Field(
        256 * 1024, ge=0, le=MAX_OUTPUT_BYTES,
        description="stderr kept (readable at /output, while the job runs and after); the rest is cut and "
        "flagged. The record's text holds its first 64 KiB.",
    )
    pids: int = Field(64, ge=1, le=65536, description="Processes a process job may hold at once.")
    nofile: int = Field(64, ge=4, le=65536, description="Open files a process job may hold.")
    fsize_bytes: int = Field(64 * 1024 * 1024, ge=0, le=1 << 40, description="Largest file a process job may write.")
    scratch_mb: int = Field(64, ge=1, le=1 << 20, description="Size of the tmpfs scratch directory.")
    violation: Literal["graceful", "kill"] = Field("kill", description="graceful: SIGTERM, grace, SIGKILL.")
    grace_ms: int = Field(2_000, ge=0, le=600_000, description="Grace period for the graceful policy.")


class JobSpec(Strict):
    """A job as submitted. ``id`` makes submission idempotent."""

    id: str | None = Field(None, description="Client-chosen id; the same id never runs twice.")
    tenant: str = Field("default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    runtime: Literal["wasm", "process"] = "wasm"
    module: Base64Bytes | None = Field(None, description="The WebAssembly module's bytes.")
    module_sha256: str | None = Field(None, description="sha256 of the module; alone, names one the agent holds.")
    command: list[str] = Field(default_factory=list, max_length=4096, description="argv of a process job.")
    entry: str = Field("_start", min_length=1, max_length=256, description="Exported function to call.")
    args: list[str] = Field(default_factory=list, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict, max_length=1024)
    input: Base64Bytes = Field(b"", description="The guest's stdin.")
    resources: Resources = Field(default_factory=Resources)
    limits: Limits = Field(default_factory=Limits)
    priority: int = Field(0, ge=0, le=1000, description="Higher runs first.")
    capabilities: list[Literal["wasm", "process", "gpu", "network"]] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    mask_patterns: list[str] = Field(
        default_factory=list, max_length=64,
        description="Scrubbed from stdout and stderr before they are stored: each pattern's literal text, and, "
        "where it compiles as a Python regex, its matches, become [masked]. A secret as it is (s3cr3t$1, a+b) "
        "and a regex (token=\\w+) both work. Output is withheld while a job with patterns runs.",
    )
    artifacts: list[str] = Field(
        default_factory=list, max_length=64,
        description="Files a process job writes in its scratch dir, kept with the result (at most 8 MiB each, "
        "32 MiB in all): result.artifacts gives each one's size and sha256, "
        "GET /v1/jobs/{id}/result?artifact=NAME its bytes.",
    )

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str | None) -> str | None:
        if v is not None and not JOB_ID_RE.match(v):
            raise ValueError(f"must be {JOB_ID_RULE}")
        return v

    # The NUL and env-name checks came after jobs were first stored: a spec read back as
    # ACCEPTED (its store, its wasm worker) is not refused for them, it fails as it did.
    @field_validator("command", "args")
    @classmethod
    def _argv_items(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if info.context == ACCEPTED:
            return v
        for i, item in enumerate(v):
            if "\0" in item:
                raise ValueError(f"item {i} holds a NUL character, which no program argument can carry")
            size = len(item.encode())
            if size > MAX_ARG_BYTES:
                raise ValueError(f"item {i} is {size:,} bytes; an argument may be {MAX_ARG_BYTES:,} "
                                 "at most (pass big data as the job's input)")
        return v

    @field_validator("command")
    @classmethod
    def _program_path(cls, v: list[str], info: ValidationInfo) -> list[str]:
        """A relative path names a directory of the client's that no executor shares (an
        executor would look in its own working directory)."""
        if v and info.context != ACCEPTED and "/" in v[0] and not v[0].startswith("/"):
            raise ValueError(f"the program {v[0]!r} is a relative path; give its absolute path on the executor "
                             "(e.g. /opt/jobs/train.sh), or a name its PATH finds (e.g. python3)")
        return v

    @field_validator("env")
    @classmethod
    def _env_pairs(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if info.context == ACCEPTED:
            return v
        for name, value in v.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"variable name {name!r} must be non-empty, without '=' or a NUL character")
            if "\0" in value:
                raise ValueError(f"the value of {name} holds a NUL character, which no environment can carry")
            if len(name.encode()) + len(value.encode()) + 1 > MAX_ARG_BYTES:
                raise ValueError(f"{name}= is over {MAX_ARG_BYTES:,} bytes, the most one variable may be (pass big "
                                 "data as the job's input)")
        return v

    @model_validator(mode="after")
    def _argv_and_env_fit(self, info: ValidationInfo) -> JobSpec:
        if info.context == ACCEPTED:
            return self
        total = sum(len(x.encode()) + 1 for x in (*self.command, *self.args))
        total += sum(len(k.encode()) + len(v.encode()) + 2 for k, v in self.env.items())
        if total > MAX_ARGV_ENV_BYTES:
            raise ValueError(f"command, args and env come to {total:,} bytes; together they may be "
                             f"{MAX_ARGV_ENV_BYTES:,} at most (pass big data as the job's input)")
        return self

    @field_validator("labels")
    @classmethod
    def _label_pairs(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if info.context == ACCEPTED:
            return v
        for key, value in v.items():
            if not key or len(key) > MAX_LABEL_KEY or "=" in key or not key.isprintable():
                raise ValueError(f"label key {key[:80]!r} must be 1 to {MAX_LABEL_KEY} printable characters without "
                                 "'=' (a filter is label=KEY=VALUE), e.g. sweep")
            if len(value) > MAX_LABEL_VALUE or not value.isprintable():
                raise ValueError(f"label {key}: its value must be at most {MAX_LABEL_VALUE} printable characters "
                                 f"(this one is {len(value):,}); put data in the job's input, not its labels")
        return v

    @field_validator("module_sha256")
    @classmethod
    def _sha_shape(cls, v: str | None) -> str | None:
        if v is not None and not SHA256_RE.match(v):
            raise ValueError("must be 64 lowercase hex digits (a sha256)")
        return v

    @field_validator("module")
    @classmethod
    def _module_size(cls, v: bytes | None) -> bytes | None:
        if v is not None and len(v) > MAX_MODULE_BYTES:
            raise ValueError(f"is {len(v)} bytes; the limit is {MAX_MODULE_BYTES}")
        return v

    @field_validator("input")
    @classmethod
    def _input_size(cls, v: bytes) -> bytes:
        if len(v) > MAX_INPUT_BYTES:
            raise ValueError(f"is {len(v)} bytes; the limit is {MAX_INPUT_BYTES}")
        return v

    @model_validator(mode="after")
    def _memory_figures_agree(self) -> JobSpec:
        """One memory figure given sets the other: a job that reserves 1 GiB is not
        stopped at the default limit of 256 MiB, and one limited to 4 GiB is not
        counted by the scheduler as 256 MiB. Both given, both stand."""
        reserved = "mem_mb" in self.resources.model_fields_set
        limited = "mem_bytes" in self.limits.model_fields_set
        if reserved and not limited:
            self.limits.mem_bytes = self.resources.mem_mb * MIB  # >= 1 MiB, within the limit's bounds
        elif limited and not reserved:
            self.resources.mem_mb = -(-self.limits.mem_bytes // MIB)
        return self

    @model_validator(mode="after")
    def _output_within_the_reservation(self, info: ValidationInfo) -> JobSpec:
        """The output a job keeps is held in the agent's memory until it ends: counted
        within the job's reservation, the outputs of all running jobs together fit in
        the memory the agent advertises, however small each job says it is."""
        kept = self.limits.stdout_bytes + self.limits.stderr_bytes
        # The default caps fit any job, however small its reservation: a job that asks
        # for 1 MiB has not chosen its caps, and 1.25 MiB a job stays bounded.
        if info.context != ACCEPTED and kept > max(self.resources.mem_mb * MIB, DEFAULT_KEPT_OUTPUT):
            raise ValueError(
                f"limits.stdout_bytes + limits.stderr_bytes come to {kept:,} bytes, more than the job's memory "
                f"reservation resources.mem_mb ({self.resources.mem_mb} MiB, {self.resources.mem_mb * MIB:,} bytes): "
                "the agent holds kept output in memory, so it counts within the reservation; raise mem_mb or "
                "lower the caps")
        return self

    @model_validator(mode="after")
    def _runtime_fields(self) -> JobSpec:
        if self.runtime == "wasm":
            if self.module is None and self.module_sha256 is None:
                raise ValueError("a wasm job needs 'module' (base64 bytes) or 'module_sha256' of a module the agent holds")
            if self.module is not None:
                digest = hashlib.sha256(self.module).hexdigest()
                if self.module_sha256 is None:
                    self.module_sha256 = digest
                elif self.module_sha256 != digest:
                    raise ValueError(
                        f"module_sha256 is {self.module_sha256} but the module's bytes hash to {digest}; "
                        "send the module that was declared"
                    )
            if self.command:
                raise ValueError("'command' is for process jobs; a wasm job takes 'module' and 'args'")
        else:
            if not self.command:
                raise ValueError("a process job needs 'command', e.g. [\"/usr/bin/python3\", \"-c\", \"print(1)\"]")
            if self.module is not None:
                raise ValueError("'module' is for wasm jobs; a process job takes 'command'")
        return self

    def input_sha256(self) -> str:
        return hashlib.sha256(self.input).hexdigest()
