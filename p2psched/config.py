"""Agent configuration: one typed, validated model.

Every field is a flag (``--data-dir``), an environment variable (``P2PSCHED_DATA_DIR``)
and a key in the TOML config file (``data_dir = "..."``) that ``--config`` or
``$P2PSCHED_CONFIG`` names. Precedence: flags over
environment over file over defaults. Each default says why it is what it is.

The merge is done here rather than by pydantic-settings: that library and what it
imports (asyncio, dotenv, its source providers) cost an idle agent ~8 MB, and the
agent only needs three sources.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from p2psched.membership.messages import NODE_ID_CHARS

ENV_PREFIX = "P2PSCHED_"
#: The config file when --config is not given; not a setting itself (a file cannot name a file).
CONFIG_ENV = ENV_PREFIX + "CONFIG"
#: Settings given in the environment as JSON (P2PSCHED_MEMBERSHIP='{"probe_interval": 2}').
#: Lists are comma-separated instead (P2PSCHED_JOIN=10.0.0.1:7701,10.0.0.2:7701).
_JSON_FROM_ENV = {"membership"}


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


HOSTPORT_PATTERN = r"^[^\s]*:\d{1,5}$"
NODE_ID_PATTERN = rf"^{NODE_ID_CHARS}$"  # what gossip accepts from a peer too
#: The patterns in words, for error messages: a user should not have to read a regex.
_PATTERN_WORDS = {
    HOSTPORT_PATTERN: "HOST:PORT, e.g. 127.0.0.1:7700",
    NODE_ID_PATTERN: "letters, digits, '.', '_' and '-', starting with a letter or digit",
}

HostPort = Annotated[str, Field(pattern=HOSTPORT_PATTERN)]

#: Node label keys and values: Kubernetes' rule for a label value (63 characters of
#: letters, digits, '.', '_' and '-', beginning and ending alphanumeric), so labels
#: copied from a Kubernetes node fit, and commas and '=' stay free to separate them.
LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
#: Labels travel in the gossiped node state. A typical state is ~320 bytes of a
#: 1,200-byte datagram; 16 short labels fit beside it. A longer set still works, but
#: then the state rides push-pull (every few seconds) instead of every datagram.
MAX_LABELS = 16
#: Keys the agent sets itself: the GPU inventory's (p2psched.gpu.discovery).
RESERVED_LABEL_PREFIX = "gpu."
LABELS_ALLOWED = (f"at most {MAX_LABELS} KEY=VALUE pairs; each key and value 1 to 63 letters, digits, '.', '_' "
                  f"and '-', starting and ending with a letter or digit; no key starting with "
                  f"{RESERVED_LABEL_PREFIX} or node.")


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    node_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64, pattern=NODE_ID_PATTERN,
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
    job_retention_h: float = Field(
        168.0, ge=0, le=1_000_000,
        description="Finished jobs, their records and outputs, are deleted this many hours after they were "
        "submitted (one week by default), so the store does not grow for good; 0 keeps them all.",
    )
    host_retries: int = Field(
        3, ge=0, le=20,
        description="Times a job this host could not run (its sandbox failed to build, its wasm worker "
        "died, a host limit such as open files) is queued again, after 1, 4, 16... s (at most 60), before it "
        "fails with sandbox_error; 0 fails it at once.",
    )
    host_cooldown_s: float = Field(
        5.0, ge=0.1, le=3600,
        description="After 3 jobs of a runtime in a row could not run on this host (or one that no wait can "
        "mend, such as a missing bubblewrap), the runtime is impaired: peers send this agent no such jobs and its "
        "own go to peers, for this many seconds; then the next job tries it again. Each time it fails again "
        "right away the pause doubles, up to 10 minutes; a job that runs ends it.",
    )
    grace_s: float = Field(
        10.0, ge=0, le=3600, description="On SIGINT/SIGTERM, how long running jobs may finish before they are stopped."
    )
    drain_on_sigterm: bool = Field(False, description="SIGTERM drains (hand queued jobs to peers) before exit.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text for a terminal, or as one JSON object per line for a log collector.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        description="Least severe log level written. info writes one line per job transition, with the job id; "
        "warning leaves those out (four or more a job); debug adds why placements and retries "
        "went as they did.",
    )
    max_request_bytes: int = Field(
        96 * 1024 * 1024, ge=1024, le=1 << 31,
        description="Largest HTTP request body; a 64 MiB module is 86 MiB in base64.",
    )
    request_body_timeout_s: float = Field(
        30.0, ge=1, le=600,
        description="An HTTP request body must keep arriving: the agent answers 408 and closes the connection "
        "when none of it comes for this many seconds, or when after these first seconds it has come slower than "
        "16 KiB/s on average (a 96 MiB body may take up to 1.7 hours), so a client that stalls or trickles "
        "holds no connection open for long. 30 s without a byte is a stalled connection, not a slow one; raise "
        "it for a link that stalls longer.",
    )
    join: list[str] = Field(default_factory=list, description="Seed peers HOST:PORT (gossip).")
    join_dns: list[str] = Field(
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
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="This agent's node labels, e.g. zone=a: a job labelled node.zone=a runs only on agents "
        "labelled zone=a (docs/scheduling.md). --label KEY=VALUE (repeatable), P2PSCHED_LABELS=zone=a,rack=r1 or a "
        "[labels] table in the config file; a higher source replaces the lower one's labels as a whole. Peers "
        "learn them through gossip. gpu.* labels are the GPU inventory's and cannot be set here.",
    )
    placement_policy: Literal["p2p", "local-first", "random", "round-robin"] = Field(
        "p2p",
        description="Where a job submitted here runs: p2p weighs network cost, then load, then GPU fit "
        "(docs/scheduling.md); local-first, random and round-robin are there to compare against it.",
    )
    gpu_placement: Literal["fit-first", "fit-last"] = Field(
        "fit-first",
        description="How p2p ranks the agents that can hold a GPU job. fit-first: the tightest GPU fit of this "
        "agent and 4 fitting peers drawn at random, then network cost and load; it keeps hosts "
        "whole for big jobs (in the simulator, from 128 to 1,024 hosts, 8-GPU jobs wait 0-154 ms on average "
        "where fit-last's wait 28 ms-1.9 s), and the sample keeps origins off the same few tightest hosts. "
        "fit-last: here when it fits, then network cost and load, the tightest fit among near-ties; it "
        "forwards fewer GPU jobs. docs/scheduling.md.",
    )
    process_warm_pool: int = Field(
        2, ge=0, le=64,
        description="Process sandboxes kept pre-built once the first process job arrives: a warm start costs "
        "~10 ms less than a cold one. Each idle one is a sleeping process of ~1 MiB.",
    )
    gpus: str | None = Field(None, description="Declared GPUs for hosts without NVML (see docs/gpu.md).")
    gpu_profile: str = Field(
        "whole", description="How each GPU is offered: whole, shared:N (time-sliced shares), or mig profiles.",
    )
    allow_measurements: list[str] = Field(
        default_factory=list, description="Only forward to peers whose measurement is listed (empty: any)."
    )

    @field_validator("join", "join_dns", "allow_measurements", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_pairs(cls, v: Any) -> Any:
        """zone=a,rack=r1 (the environment) or ["zone=a", "rack=r1"] (--label) to a dict;
        a table (the config file) is taken as it is."""
        if isinstance(v, str):
            v = _split_list(v)
        if not isinstance(v, (list, tuple)):
            return v
        out: dict[str, str] = {}
        for item in v:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise ValueError(f"label {item!r} must be KEY=VALUE, e.g. zone=a")
            if key in out:
                raise ValueError(f"label {key!r} is given twice ({out[key]!r} and {value!r}); give each key once")
            out[key] = value
        return out

    @field_validator("labels")
    @classmethod
    def _label_rules(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_LABELS:
            raise ValueError(f"{len(v)} labels given; keep the ones placement needs")
        for key, value in v.items():
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise ValueError(f"label key {key!r}: {RESERVED_LABEL_PREFIX}* labels are set by the GPU inventory "
                                 "(docs/gpu.md); choose another key")
            if key.startswith("node."):
                raise ValueError(f"label key {key!r}: give it without 'node.' ({key[5:]}={value}); a job asks for "
                                 f"it as node.{key[5:]}={value}")
            if not LABEL_RE.match(key):
                raise ValueError(f"label key {key!r} has a character or length that is not allowed")
            if not LABEL_RE.match(value):
                raise ValueError(f"label {key}={value!r}: the value has a character or length that is not allowed")
        return v

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


#: The allowed values of settings whose rules are checked by a validator, not declared as bounds.
_ALLOWED_WORDS = {"labels": LABELS_ALLOWED}


def _number(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def allowed_values(name: str) -> str | None:
    """The whole allowed range of setting ``name`` in words ("1 to 10000000", "'fair' or
    'fifo'"), read from its declared bounds; None for a setting without any. Every error
    about the setting shows it, whichever check failed, so one message is enough to fix it."""
    if name in _ALLOWED_WORDS:
        return _ALLOWED_WORDS[name]
    field = AgentSettings.model_fields.get(name)
    if field is None:
        return None
    types = [field.annotation]
    if get_origin(field.annotation) in (Union, type(int | None)):
        types = [t for t in get_args(field.annotation) if t is not type(None)]
    if len(types) == 1 and get_origin(types[0]) is Literal:
        choices = [repr(c) for c in get_args(types[0])]
        return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
    if types == [bool]:
        return "true or false"
    keys = ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")
    bound = {k: getattr(m, k) for m in field.metadata for k in keys if getattr(m, k, None) is not None}
    parts = []
    if "ge" in bound and "le" in bound:
        parts.append(f"{_number(bound['ge'])} to {_number(bound['le'])}")
    else:
        low = [f"{w} {_number(bound[k])}" for k, w in (("ge", "at least"), ("gt", "more than")) if k in bound]
        high = [f"{w} {_number(bound[k])}" for k, w in (("le", "at most"), ("lt", "less than")) if k in bound]
        if low or high:
            parts.append(" and ".join(low + high))
    if "min_length" in bound or "max_length" in bound:
        lo, hi = bound.get("min_length", 0), bound.get("max_length")
        parts.append(f"{lo} to {hi} characters" if hi is not None else f"at least {lo} characters")
    if "pattern" in bound:
        parts.append(_PATTERN_WORDS.get(bound["pattern"], f"matching {bound['pattern']}"))
    return ": ".join(parts) or None


def format_validation_error(e: ValidationError, *, source: str = "configuration",
                            origins: dict[str, str] | None = None) -> str:
    """One line per bad value; ``origins``: where a top-level key came from when not
    from a flag (the environment variable, the config file), to name it."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["loc"] and origins and str(err["loc"][0]) in origins:
            key += f" (from {origins[str(err['loc'][0])]})"
        msg = err["msg"].removeprefix("Value error, ")
        allowed = allowed_values(str(err["loc"][0])) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            msg, allowed = _unknown_key(str(err["loc"][-1]) if err["loc"] else ""), None
        if allowed and allowed not in msg:  # a Literal's message lists its choices already
            msg += f" (allowed: {allowed})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def close_names(name: str, names: Iterable[str], *, n: int = 1, cutoff: float = 0.8) -> list[str]:
    """The names in ``names`` that ``name`` is a likely misspelling of, closest first."""
    import difflib  # only then: an idle agent does not keep it

    return difflib.get_close_matches(name, list(names), n=n, cutoff=cutoff)


def _unknown_key(name: str) -> str:
    # Every key, not `p2psched agent --help`: some settings (max_request_bytes, membership,
    # allow_measurements...) have no flag, and no page lists them all.
    keys = sorted(AgentSettings.model_fields)
    close = close_names(name, keys, cutoff=0.6)
    every = ", ".join(keys)
    if close:
        return f"unknown key; did you mean {close[0]!r}? The settings are: {every}"
    return f"unknown key; check its spelling. The settings are: {every}"


def _deep_update(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; tables (the [membership] one) merge key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    """The settings named P2PSCHED_<NAME> (in any case, as pydantic-settings matched them)."""
    by_lower = {k.lower(): v for k, v in environ.items()}
    out: dict[str, Any] = {}
    for name in AgentSettings.model_fields:
        value = by_lower.get((ENV_PREFIX + name).lower())
        if value is None:
            continue
        if name in _JSON_FROM_ENV:
            try:
                out[name] = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()}: not JSON ({e}); give a JSON object, e.g. "
                                  f"{ENV_PREFIX}{name.upper()}='{{\"probe_interval\": 2}}'") from None
        else:
            out[name] = value
    return out


def misspelt_env(environ: dict[str, str]) -> list[str]:
    """Warnings for P2PSCHED_ variables that name no setting but nearly do
    (P2PSCHED_LABEL for P2PSCHED_LABELS): they are ignored, and a user would not know.
    Other P2PSCHED_ names (the client's P2PSCHED_URL, the scripts' own) pass quietly."""
    names = [*AgentSettings.model_fields, CONFIG_ENV.removeprefix(ENV_PREFIX).lower()]
    prefix = ENV_PREFIX.lower()
    unknown = {var: var.lower().removeprefix(prefix) for var in sorted(environ) if var.lower().startswith(prefix)}
    unknown = {var: name for var, name in unknown.items() if name not in names}
    out = []
    for var, name in unknown.items():
        if close := close_names(name, names):
            out.append(f"{var} is not a setting and is ignored; did you mean {ENV_PREFIX}{close[0].upper()}?")
    return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build settings from flags (``overrides``), environment, then the TOML file:
    ``config_file`` (--config), else the one $P2PSCHED_CONFIG names."""
    fix = "pass an existing TOML file to --config"
    if config_file is None:
        named = {k.lower(): v for k, v in os.environ.items()}.get(CONFIG_ENV.lower())
        if named:
            config_file = Path(named)
            fix = f"set {CONFIG_ENV} to an existing TOML file, or unset it"
    if config_file is not None and not config_file.exists():
        raise ConfigError(f"config file {config_file} does not exist; {fix}")
    merged: dict[str, Any] = {}
    if config_file is not None:
        import tomllib

        try:
            merged = tomllib.loads(config_file.read_text())
        except tomllib.TOMLDecodeError as e:  # it names the line and column
            raise ConfigError(f"config file {config_file}: {e}; fix the TOML there: one key = value a line, "
                              "strings quoted, e.g. cpus = 4 and api = \"0.0.0.0:7700\"") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {config_file}: {e}; give a readable UTF-8 TOML file") from None
    origins = {key: f"config file {config_file}" for key in merged}
    from_env = _from_env(dict(os.environ))
    origins.update({key: f"{ENV_PREFIX}{key.upper()}" for key in from_env})
    merged = _deep_update(merged, from_env)
    flags = {k: v for k, v in overrides.items() if v is not None}
    merged = _deep_update(merged, flags)
    try:
        return AgentSettings(**merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origins={k: v for k, v in origins.items()
                                                               if k not in flags})) from None
