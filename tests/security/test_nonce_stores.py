"""The replay memory: both stores keep the same promises; the SQLite one keeps them across restarts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2psched.security.admission import Admission, TenantUsage
from p2psched.security.errors import AdmissionError
from p2psched.security.nonces import MemoryNonceStore, SQLiteNonceStore
from p2psched.security.signing import sign_spec
from security_helpers import NOW, TenantKeys, registry, wasm_spec


@pytest.fixture(params=["memory", "sqlite"])
def store(request: Any, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryNonceStore(max_entries=3)
    else:
        s = SQLiteNonceStore(tmp_path / "nonces.db", max_entries=3)
        yield s
        s.close()


def test_bound_until_expiry_then_forgotten(store: Any) -> None:
    store.bind("alice", "n1", "j1", NOW + 10, NOW)
    assert store.bound("alice", "n1", NOW + 10) == "j1"
    assert store.bound("bob", "n1", NOW) is None  # nonces are per tenant
    assert store.bound("alice", "n1", NOW + 10.5) is None
    store.bind("alice", "n2", "j2", NOW + 20, NOW + 11)
    assert len(store) == 1  # the expired entry made room


def test_rebinding_never_shortens_a_lifetime(store: Any) -> None:
    store.bind("alice", "n1", "j1", NOW + 100, NOW)
    store.bind("alice", "n1", "j1", NOW + 10, NOW)  # a hop with a shorter window
    assert store.bound("alice", "n1", NOW + 50) == "j1"
    assert len(store) == 1


def test_full_store_refuses_instead_of_forgetting(store: Any) -> None:
    for i in range(3):
        store.bind("alice", f"n{i}", f"j{i}", NOW + 10 + i, NOW)
    with pytest.raises(AdmissionError) as info:
        store.bind("alice", "n3", "j3", NOW + 10, NOW + 1)
    assert info.value.reason == "nonce_cache_full" and info.value.status == 429
    assert all(store.bound("alice", f"n{i}", NOW + 5) == f"j{i}" for i in range(3))
    store.bind("alice", "n3", "j3", NOW + 30, NOW + 10.5)  # n0 expired at NOW + 10
    assert store.bound("alice", "n3", NOW + 11) == "j3"


def test_a_replay_after_an_agent_restart_is_refused_with_the_sqlite_store(tmp_path: Path) -> None:
    keys = TenantKeys()
    reg = registry(keys)
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    first = SQLiteNonceStore(tmp_path / "nonces.db")
    Admission(nonces=first).admit(env.spec, env.auth, registry=reg, job_id="j1", usage=TenantUsage(), now=NOW)
    first.close()
    restarted = Admission(nonces=SQLiteNonceStore(tmp_path / "nonces.db"))
    with pytest.raises(AdmissionError) as info:
        restarted.admit(env.spec, env.auth, registry=reg, job_id="j2", usage=TenantUsage(), now=NOW + 5)
    assert (info.value.status, info.value.reason) == (409, "replayed_nonce")
    assert len(restarted.nonces) == 1  # type: ignore[arg-type]
