import functools

import pytest

import agents


@pytest.fixture
def tenants(tmp_path):
    """A tenants file with alice and bob (wasm) and ops (wasm, admin), and their keys."""
    cli = functools.partial(agents.cli, check=True)
    keys = tmp_path / "keys"
    reg = tmp_path / "tenants.toml"
    for name, extra in (("alice", ["--cap", "wasm"]), ("bob", ["--cap", "wasm"]),
                        ("ops", ["--cap", "wasm", "--admin"])):
        cli("tenant", "keygen", name, "--out", str(keys))
        cli("tenant", "add", name, "--pubkey", str(keys / f"{name}.pub"), "--tenants", str(reg), *extra)
    return reg, keys
