"""The tenant registry: who may submit, with which keys, capabilities, quotas and rate.

Public interface (what the agent calls):

* ``RegistryHolder(path)`` at start-up, when ``--tenants FILE`` is given. It raises
  :class:`RegistryError` (its message names the file, the line and the fix) if the
  file is bad: refuse to start. Without ``--tenants`` there is no holder and the agent
  runs in open single-tenant mode (see ``admission.py``).
* ``holder.reload()`` on SIGHUP, and ``holder.reload_if_changed()`` every few seconds
  (it only stats the file). Both return a :class:`Reload`; log ``reload.error`` when
  set: the old registry stays active. A bad file is reported once, not on every poll.
* ``holder.registry`` is the current :class:`TenantRegistry`; pass it to admission and
  to request verification on every request (read the attribute each time, since a
  reload swaps it).

The file (TOML) has one table per tenant; every field but ``keys`` has a default::

    [tenants.alice]
    keys = ["<64 hex digits, from alice.pub>"]   # Ed25519 public keys; several for rotation
    capabilities = ["wasm", "process"]           # of wasm, process, gpu, network
    max_priority = 100
    labels = { team = ["ml", "vision"], zone = "*" }   # omit: any labels
    admin = false                                # true: sees and cancels every tenant's jobs

    [tenants.alice.quota]                        # omitted fields: no limit
    concurrent_jobs = 8      # jobs accepted and not finished (queued or running), cluster-wide
    queued_jobs = 100        # of those, jobs not yet running
    cpu = 16.0               # sum of resources.cpu over the tenant's unfinished jobs
    mem_mb = 65536
    gpu_slots = 4

    [tenants.alice.rate]     # token bucket over submissions
    per_second = 10.0
    burst = 20
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from p2psched.jobs.spec import CAPABILITIES
from p2psched.security.keys import KeyFormatError, key_id, parse_public_key

Capability = Literal["wasm", "process", "gpu", "network"]
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # the same shape JobSpec.tenant accepts


class RegistryError(ValueError):
    """A tenants file that cannot be used; the message names the line and the fix."""


class _Strict(BaseModel):
    # Scalars are strict (Field(strict=True)): TOML has real types, so admin = "yes" or
    # cpu = "8" is a mistake to report, not to guess at.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quota(_Strict):
    """Limits over a tenant's unfinished jobs, summed cluster-wide. ``None``: no limit.

    No defaults: the right numbers depend on the cluster's size, and an operator who
    wants a quota writes it down (``tenant add --max-jobs ...``).
    """

    concurrent_jobs: int | None = Field(None, ge=0, strict=True)
    queued_jobs: int | None = Field(None, ge=0, strict=True)
    cpu: float | None = Field(None, ge=0, strict=True)
    mem_mb: int | None = Field(None, ge=0, strict=True)
    gpu_slots: int | None = Field(None, ge=0, strict=True)


class RateLimit(_Strict):
    """Token bucket over job submissions.

    10/s sustained with a burst of 20: far above a person or a sweep script that waits
    for its submissions, low enough that a runaway loop is throttled before it fills
    queues and the nonce cache. (GitHub's API allows ~1.4/s per user; Nomad has no
    per-namespace submit limit by default.)
    """

    per_second: float = Field(10.0, gt=0, le=1_000_000, strict=True)
    burst: int = Field(20, ge=1, le=1_000_000, strict=True)


class Tenant(_Strict):
    name: str
    keys: tuple[str, ...] = Field(min_length=1)
    #: Only ``wasm`` by default: the WebAssembly sandbox is the one with no ambient
    #: authority, so a newly added tenant can do nothing that needs trust.
    capabilities: frozenset[Capability] = frozenset({"wasm"})
    #: 100 of the 0..1000 range: leaves the top of the range for tenants the operator
    #: marks as urgent, so ordinary tenants cannot jump every queue.
    max_priority: int = Field(100, ge=0, le=1000, strict=True)
    #: Label key -> allowed values, or "*" for any value. ``None``: any labels; labels only
    #: steer placement, so restricting them matters only where node pools are reserved.
    labels: Mapping[str, tuple[str, ...] | Literal["*"]] | None = None
    admin: bool = Field(False, strict=True)
    quota: Quota = Quota.model_validate({})  # frozen, so one shared default is safe
    rate: RateLimit = RateLimit.model_validate({})

    @field_validator("keys", mode="before")
    @classmethod
    def _keys_hex(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list | tuple):
            return v
        out = []
        for i, k in enumerate(v):
            if not isinstance(k, str):
                raise ValueError(f"key {i} is not a string; write the 64 hex digits from NAME.pub in quotes")
            try:
                out.append(parse_public_key(k))
            except KeyFormatError as e:
                raise ValueError(f"key {i}: {e}") from None
        return out

    def key_ids(self) -> dict[str, str]:
        return {key_id(k): k for k in self.keys}

    def label_allowed(self, key: str, value: str) -> bool:
        if self.labels is None:
            return True
        allowed = self.labels.get(key)
        if allowed is None:
            return False
        return allowed == "*" or value in allowed


class _File(_Strict):
    tenants: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TenantRegistry:
    tenants: Mapping[str, Tenant]
    source: str = "<memory>"

    def get(self, name: str) -> Tenant | None:
        return self.tenants.get(name)

    def __len__(self) -> int:
        return len(self.tenants)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TenantRegistry:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RegistryError(
                f"tenants file {p} does not exist; create it with "
                f"'p2psched tenant add NAME --pubkey NAME.pub --cap wasm --tenants {p}'"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"tenants file {p} cannot be read: {e}") from None
        return cls.from_text(text, source=str(p))

    @classmethod
    def from_text(cls, text: str, source: str = "<memory>") -> TenantRegistry:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            # tomllib says "(at line N, column M)" or "(at end of document)"; keep its
            # words, make sure a line is named, and add what to do.
            where = "" if "line" in str(e) else f" (line {len(text.splitlines())}: something is left open)"
            raise RegistryError(f"tenants file {source}: {e}{where}; fix the TOML syntax there") from None
        lines = _key_lines(text)
        try:
            top = _File.model_validate(data)
        except ValidationError as e:
            raise RegistryError(_explain(e, source, lines, prefix=())) from None
        tenants: dict[str, Tenant] = {}
        for name, table in top.tenants.items():
            if not TENANT_NAME_RE.match(name):
                line = _line_for(lines, ("tenants", name))
                raise RegistryError(
                    f"tenants file {source}: line {line}: tenant name {name!r} must be 1-64 letters, digits, "
                    "'.', '_' or '-' (the shape job specs accept); rename the table"
                )
            if not isinstance(table, dict):
                line = _line_for(lines, ("tenants", name))
                raise RegistryError(
                    f"tenants file {source}: line {line}: 'tenants.{name}' must be a table; write it as [tenants.{name}]"
                )
            try:
                tenants[name] = Tenant.model_validate({**table, "name": name})
            except ValidationError as e:
                raise RegistryError(_explain(e, source, lines, prefix=("tenants", name))) from None
        seen: dict[str, str] = {}
        for name, t in tenants.items():
            for k in t.keys:
                if k in seen and seen[k] != name:
                    line = _line_for(lines, ("tenants", name, "keys"))
                    raise RegistryError(
                        f"tenants file {source}: line {line}: tenant {name!r} lists the public key {k[:16]}... that "
                        f"tenant {seen[k]!r} also holds; a key belongs to one tenant, so generate a new one"
                    )
                seen[k] = name
        return cls(tenants=tenants, source=source)


_HINTS = {
    "capabilities": f"allowed capabilities are {', '.join(CAPABILITIES)}",
    "keys": "write the 64 hex digits from NAME.pub, e.g. keys = [\"3b6a...\"]",
    "labels": 'write labels = { key = ["value", ...] } or { key = "*" }',
    "admin": "write admin = true or admin = false",
}


def _explain(e: ValidationError, source: str, lines: dict[tuple[str, ...], int], prefix: tuple[str, ...]) -> str:
    err = e.errors()[0]
    loc = tuple(str(x) for x in err["loc"])
    path = prefix + loc
    line = _line_for(lines, path)
    where = ".".join(x for x in path)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        field = loc[-1] if loc else "?"
        known = {
            (): "tenants",
            ("quota",): ", ".join(Quota.model_fields),
            ("rate",): ", ".join(RateLimit.model_fields),
        }.get(loc[:-1], ", ".join(f for f in Tenant.model_fields if f != "name"))
        msg = f"unknown field {field!r}; known fields here are {known}"
    elif err["type"] == "missing":
        msg = f"missing field {loc[-1]!r}"
    hint = next((_HINTS[p] for p in loc if p in _HINTS), "")
    more = f" ({len(e.errors()) - 1} more error(s) after this one)" if len(e.errors()) > 1 else ""
    return f"tenants file {source}: line {line}: {where}: {msg}" + (f"; {hint}" if hint else "") + more


def _line_for(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int:
    """The line of the longest prefix of ``path`` that the file defines (1 if none)."""
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return 1


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(s: str) -> tuple[tuple[str, ...], str] | None:
    """Parse a dotted TOML key at the start of ``s``: (parts, rest) or None."""
    parts: list[str] = []
    i = 0
    while True:
        while i < len(s) and s[i] in " \t":
            i += 1
        if i < len(s) and s[i] in "\"'":
            q = s[i]
            j = s.find(q, i + 1)
            if j < 0:
                return None
            parts.append(s[i + 1 : j])
            i = j + 1
        else:
            m = _BARE.match(s, i)
            if not m:
                return None
            parts.append(m.group())
            i = m.end()
        while i < len(s) and s[i] in " \t":
            i += 1
        if i < len(s) and s[i] == ".":
            i += 1
            continue
        return tuple(parts), s[i:]


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table and key path the file defines to its first line, for error messages.

    Only used after tomllib accepted the file, so a line-by-line scan is enough: it
    cannot be fooled into a wrong answer by anything worse than a multi-line string
    that looks like a key, and then the message points near the right place.
    """
    out: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for no, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("["):
            inner = s.lstrip("[")
            parsed = _split_key(inner)
            if parsed and parsed[1].lstrip().startswith("]"):
                table = parsed[0]
                for n in range(1, len(table) + 1):
                    out.setdefault(table[:n], no)
            continue
        parsed = _split_key(s)
        if parsed and parsed[1].lstrip().startswith("="):
            full = table + parsed[0]
            for n in range(len(table) + 1, len(full) + 1):
                out.setdefault(full[:n], no)
    return out


@dataclass(frozen=True, slots=True)
class Reload:
    reloaded: bool  # a new registry is active
    error: str | None = None  # the file changed but was refused; the old registry stays
    tenants: int = 0  # tenants in the active registry


class RegistryHolder:
    """Holds the active registry; swaps it only for a file that loads cleanly."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.registry = TenantRegistry.load(self.path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> Reload:
        """Load the file again (SIGHUP). On error keep the old registry and say why."""
        self._stamp = self._stat()
        try:
            new = TenantRegistry.load(self.path)
        except RegistryError as e:
            return Reload(False, f"{e}; still using the previous registry ({len(self.registry)} tenants)",
                          len(self.registry))
        self.registry = new
        return Reload(True, None, len(new))

    def reload_if_changed(self) -> Reload:
        """Reload when the file's mtime, size or inode changed since the last look."""
        stamp = self._stat()
        if stamp == self._stamp:
            return Reload(False, None, len(self.registry))
        return self.reload()
