"""Shared builders for the security tests: tenants, keys and signed jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2psched.jobs.spec import JobSpec
from p2psched.security.keys import generate, public_hex
from p2psched.security.tenants import TenantRegistry

NOW = 1_800_000_000.0  # a fixed "now": admission is sans-IO, so tests pass time in
#: The smallest valid WebAssembly module: magic and version.
WASM = b"\0asm\x01\0\0\0"


@dataclass
class TenantKeys:
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)

    def key(self, name: str) -> Ed25519PrivateKey:
        if name not in self.keys:
            self.keys[name] = generate()
        return self.keys[name]

    def pub(self, name: str) -> str:
        return public_hex(self.key(name))


def tenants_toml(keys: TenantKeys, extra: dict[str, str] | None = None) -> str:
    """A registry with alice (wasm+process+gpu, quotas), bob (wasm only), root (admin, all)."""
    extra = extra or {}
    return f"""# tenants for tests
[tenants.alice]
keys = ["{keys.pub('alice')}"]
capabilities = ["wasm", "process", "gpu"]
max_priority = 50
labels = {{ team = ["ml", "vision"], zone = "*" }}
{extra.get('alice', '')}

[tenants.alice.quota]
concurrent_jobs = 4
queued_jobs = 2
cpu = 8.0
mem_mb = 4096
gpu_slots = 2

[tenants.alice.rate]
per_second = 1.0
burst = 3

[tenants.bob]
keys = ["{keys.pub('bob')}"]
{extra.get('bob', '')}

[tenants.root]
keys = ["{keys.pub('root')}"]
capabilities = ["wasm", "process", "gpu", "network"]
max_priority = 1000
admin = true
"""


def registry(keys: TenantKeys, extra: dict[str, str] | None = None) -> TenantRegistry:
    return TenantRegistry.from_text(tenants_toml(keys, extra), source="tenants.toml")


def write_registry(path: Path, keys: TenantKeys, extra: dict[str, str] | None = None) -> Path:
    path.write_text(tenants_toml(keys, extra))
    return path


def wasm_spec(tenant: str = "alice", **kw: object) -> JobSpec:
    return JobSpec(tenant=tenant, module=WASM, input=b"hello", **kw)  # type: ignore[arg-type]
