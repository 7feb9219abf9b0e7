"""Agent configuration: one typed, validated model.

Every field is a flag (``--data-dir``), an environment variable (``P2PSCHED_DATA_DIR``)
and a key in the TOML config file (``data_dir = "..."``). Precedence: flags over
environment over file over defaults. Each default says why it is what it is.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, TomlConfigSettingsSource


def parse_hostport(value: str, *, what: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} must be HOST:PORT with a port 0-65535, e.g. 127.0.0.1:7700")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _split_list(v: Any) -> Any:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    return v


HostPort = Annotated[str, Field(pattern=r"^[^\s]*:\d{1,5}$")]


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="P2PSCHED_", extra="forbid", validate_default=True)

    node_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="This agent's id in the cluster; defaults to the hostname. Put it in job ids and the topology.",
    )
    api: HostPort = Field("0.0.0.0:7700", description="HTTP API address.")
    gossip: HostPort = Field("0.0.0.0:7701", description="Gossip address (UDP, and TCP for push-pull).")
    transfer: HostPort = Field("0.0.0.0:7702", description="Job transfer address between agents (TCP).")
    advertise: str | None = Field(
        None, description="Host to tell peers when binding 0.0.0.0; defaults to the address peers see us on."
    )
    data_dir: Path | None = Field(None, description="Where jobs.db, modules and outputs live; default ./data/<node-id>.")
    cpus: float | None = Field(None, gt=0, le=4096, description="Advertised CPU slots; default: the CPUs this process may use.")
    mem_mb: int | None = Field(None, ge=16, le=1 << 30, description="Advertised memory, MiB; default: physical memory.")
    queue_limit: int = Field(
        10_000, ge=1, le=10_000_000,
        description="Jobs waiting here at most; past it submissions get 429. Bounded so a flood cannot exhaust memory.",
    )
    dispatch_policy: Literal["fair", "fifo"] = Field("fair", description="Order of local dispatch.")
    grace_s: float = Field(
        10.0, ge=0, le=3600, description="On SIGINT/SIGTERM, how long running jobs may finish before they are stopped."
    )
    drain_on_sigterm: bool = Field(False, description="SIGTERM drains (hand queued jobs to peers) before exit.")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_request_bytes: int = Field(
        96 * 1024 * 1024, ge=1024, le=1 << 31,
        description="Largest HTTP request body; a 64 MiB module is 86 MiB in base64.",
    )
    join: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Seed peers HOST:PORT (gossip).")
    join_dns: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="DNS NAME:PORT resolving to peers; re-resolved periodically."
    )
    no_mdns: bool = Field(False, description="Turn off mDNS discovery.")
    topology: Path | None = Field(None, description="Leaf-spine topology YAML.")
    tenants: Path | None = Field(None, description="Tenant registry TOML; without it the agent is open single-tenant.")
    insecure: bool = Field(False, description="No gossip encryption and no TLS between agents.")
    gossip_key: Path | None = Field(None, description="Gossip keyring file from `p2psched keygen --gossip`.")
    tls_dir: Path | None = Field(None, description="Directory with ca.pem, <node-id>.pem and <node-id>.key.")
    cluster_name: str = Field("p2psched", min_length=1, max_length=64, description="Bound into gossip encryption.")
    membership: dict[str, Any] = Field(
        default_factory=dict,
        description="Membership tuning, e.g. probe_interval (see docs/membership.md); a [membership] table in "
        "the config file, or JSON in P2PSCHED_MEMBERSHIP.",
    )
    placement_policy: Literal["p2p", "local-first", "random", "round-robin"] = "p2p"
    process_warm_pool: int = Field(
        2, ge=0, le=64,
        description="Process sandboxes kept pre-built once the first process job arrives: a warm start costs "
        "~10 ms less than a cold one. Each idle one is a sleeping process of ~1 MiB.",
    )
    gpus: str | None = Field(None, description="Declared GPUs for hosts without NVML (see docs/gpu.md).")
    gpu_profile: str = Field(
        "whole", description="How each GPU is offered: whole, shared:N (time-sliced shares), or mig profiles.",
    )
    allow_measurements: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Only forward to peers whose measurement is listed (empty: any)."
    )

    @field_validator("join", "join_dns", "allow_measurements", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("api", "gossip", "transfer")
    @classmethod
    def _hostport(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("join")
    @classmethod
    def _joins(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_hostport(item, what="join address")
        return v

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else Path("data") / self.node_id

    def detected_cpus(self) -> float:
        if self.cpus is not None:
            return self.cpus
        try:
            return float(len(os.sched_getaffinity(0)))
        except AttributeError:
            return float(os.cpu_count() or 1)

    def detected_mem_mb(self) -> int:
        if self.mem_mb is not None:
            return self.mem_mb
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))
        except (ValueError, OSError):
            return 1024


class ConfigError(ValueError):
    pass


def format_validation_error(e: ValidationError, *, source: str = "configuration") -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        bounds = ", ".join(f"{k} {v}" for k, v in ctx.items() if k in ("ge", "gt", "le", "lt", "pattern", "expected"))
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling (`p2psched agent --help` lists every setting)"
        lines.append(f"{source}: {key}: {msg}" + (f" (allowed: {bounds})" if bounds else ""))
    return "\n".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build settings from flags (``overrides``), environment, then the TOML file."""
    if config_file is not None and not config_file.exists():
        raise ConfigError(f"config file {config_file} does not exist; pass an existing TOML file to --config")

    class _Settings(AgentSettings):
        model_config = SettingsConfigDict(**{**AgentSettings.model_config, "toml_file": config_file})

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):  # type: ignore[no-untyped-def,override]
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls))
            return tuple(sources)

    try:
        s = _Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except Exception as e:  # tomllib.TOMLDecodeError names the line
        raise ConfigError(f"config file {config_file}: {e}") from None
    return AgentSettings.model_construct(**s.model_dump())
