"""The tenants file: what it accepts, how it explains what it refuses, and live reloads."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from p2psched.security.reloader import watch_registry
from p2psched.security.tenants import RegistryError, RegistryHolder, Reload, TenantRegistry
from security_helpers import TenantKeys, registry, tenants_toml, write_registry


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_full_file_loads_with_every_field() -> None:
    keys = TenantKeys()
    reg = registry(keys)
    alice = reg.get("alice")
    assert alice is not None
    assert alice.keys == (keys.pub("alice"),)
    assert alice.capabilities == {"wasm", "process", "gpu"}
    assert alice.max_priority == 50
    assert alice.label_allowed("team", "ml") and not alice.label_allowed("team", "web")
    assert alice.label_allowed("zone", "anything") and not alice.label_allowed("owner", "x")
    assert (alice.quota.concurrent_jobs, alice.quota.queued_jobs, alice.quota.cpu) == (4, 2, 8.0)
    assert (alice.quota.mem_mb, alice.quota.gpu_slots) == (4096, 2)
    assert (alice.rate.per_second, alice.rate.burst) == (1.0, 3)
    assert not alice.admin and reg.get("root") is not None and reg.get("root").admin  # type: ignore[union-attr]


def test_defaults_are_least_privilege() -> None:
    bob = registry(TenantKeys()).get("bob")
    assert bob is not None
    assert bob.capabilities == {"wasm"}
    assert bob.max_priority == 100
    assert bob.labels is None and bob.label_allowed("any", "thing")
    assert bob.quota.concurrent_jobs is None and bob.rate.per_second == 10.0 and bob.rate.burst == 20
    assert not bob.admin


def test_pem_public_key_is_accepted_and_stored_as_hex() -> None:
    from cryptography.hazmat.primitives import serialization

    keys = TenantKeys()
    pem = keys.key("carol").public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    text = f'[tenants.carol]\nkeys = ["""{pem}"""]\n'
    carol = TenantRegistry.from_text(text).get("carol")
    assert carol is not None and carol.keys == (keys.pub("carol"),)


@pytest.mark.parametrize(
    ("mutate", "needle", "words"),
    [
        (lambda t: t.replace('capabilities = ["wasm", "process", "gpu"]', 'capabilities = ["wasm", "fly"]'),
         'capabilities = ["wasm", "fly"]', ["capabilities", "wasm, process, gpu, network"]),
        (lambda t: t.replace("cpu = 8.0", "cpus = 8.0"), "cpus = 8.0", ["unknown field 'cpus'", "concurrent_jobs"]),
        (lambda t: t.replace("cpu = 8.0", "cpu = -1"), "cpu = -1", ["quota.cpu", "greater than or equal to 0"]),
        (lambda t: t.replace("max_priority = 50", "max_priority = 5000"), "max_priority = 5000", ["max_priority", "1000"]),
        (lambda t: t.replace("admin = true", 'admin = "yes"'), 'admin = "yes"', ["admin", "admin = true"]),
        (lambda t: t.replace("burst = 3", "burst = 0"), "burst = 0", ["rate.burst"]),
        (lambda t: t + "\n[tenants.dave]\ncapabilities = []\n", "[tenants.dave]", ["missing field 'keys'"]),
        (lambda t: t + '\n[tenants.eve]\nkeys = ["abc"]\n', 'keys = ["abc"]', ["64 hex digits"]),
        (lambda t: t + "\nowner = 'x'\n[tenants.zed]\nkeys=[]\n", "owner = 'x'", ["unknown field 'owner'"]),
    ],
    ids=["capability", "unknown-field", "negative-quota", "priority-range", "admin-type", "burst", "no-keys",
         "bad-key", "top-level-field"],
)
def test_schema_errors_name_the_line_and_the_fix(mutate, needle: str, words: list[str]) -> None:  # type: ignore[no-untyped-def]
    text = mutate(tenants_toml(TenantKeys()))
    with pytest.raises(RegistryError) as info:
        TenantRegistry.from_text(text, source="t.toml")
    msg = str(info.value)
    assert f"t.toml: line {line_of(text, needle)}:" in msg, msg
    for w in words:
        assert w in msg, msg


def test_syntax_error_names_the_line() -> None:
    text = tenants_toml(TenantKeys()).replace("max_priority = 50", "max_priority = ")
    with pytest.raises(RegistryError) as info:
        TenantRegistry.from_text(text, source="t.toml")
    assert f"line {line_of(text, 'max_priority = ')}" in str(info.value)
    assert "fix the TOML syntax" in str(info.value)


def test_a_key_shared_by_two_tenants_is_refused() -> None:
    keys = TenantKeys()
    text = tenants_toml(keys) + f'\n[tenants.mallory]\nkeys = ["{keys.pub("alice")}"]\n'
    with pytest.raises(RegistryError) as info:
        TenantRegistry.from_text(text, source="t.toml")
    assert f"line {line_of(text, 'mallory') + 1}" in str(info.value)
    assert "'alice' also holds" in str(info.value)


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="p2psched tenant add"):
        TenantRegistry.load(tmp_path / "nope.toml")


def test_holder_reload_good_then_bad_keeps_the_old_registry(tmp_path: Path) -> None:
    keys = TenantKeys()
    path = write_registry(tmp_path / "tenants.toml", keys)
    holder = RegistryHolder(path)
    assert holder.registry.get("carol") is None

    path.write_text(tenants_toml(keys) + f'\n[tenants.carol]\nkeys = ["{keys.pub("carol")}"]\n')
    r = holder.reload()
    assert r.reloaded and r.error is None and r.tenants == 4
    assert holder.registry.get("carol") is not None

    bad = tenants_toml(keys).replace("burst = 3", "burst = three")
    path.write_text(bad)
    r = holder.reload()
    assert not r.reloaded
    assert r.error is not None and f"line {line_of(bad, 'burst = three')}" in r.error
    assert "still using the previous registry (4 tenants)" in r.error
    assert holder.registry.get("carol") is not None  # the old registry is still active


def test_reload_if_changed_reports_a_bad_file_once(tmp_path: Path) -> None:
    keys = TenantKeys()
    path = write_registry(tmp_path / "tenants.toml", keys)
    holder = RegistryHolder(path)
    assert holder.reload_if_changed() == Reload(False, None, 3)
    path.write_text("[tenants.alice\n")
    os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse-grained filesystems
    first = holder.reload_if_changed()
    assert first.error is not None and "line 1" in first.error
    assert holder.reload_if_changed().error is None  # unchanged since: not reported again
    write_registry(path, keys)
    assert holder.reload_if_changed().reloaded


def test_bad_file_at_start_up_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text('[tenants.alice]\nkeys = ["00"]\n')
    with pytest.raises(RegistryError, match="line 2"):
        RegistryHolder(path)


async def test_sighup_reloads_a_good_file_and_keeps_the_old_one_for_a_bad_file(tmp_path: Path) -> None:
    keys = TenantKeys()
    path = write_registry(tmp_path / "tenants.toml", keys)
    holder = RegistryHolder(path)
    seen: list[Reload] = []
    got_one = trio.Event()

    def on_reload(r: Reload) -> None:
        nonlocal got_one
        seen.append(r)
        got_one.set()

    async with trio.open_nursery() as nursery:
        # A long poll interval, so that only the signal can cause these reloads.
        await nursery.start(lambda task_status: watch_registry(holder, on_reload, poll_interval=3600,
                                                               task_status=task_status))
        path.write_text(tenants_toml(keys) + f'\n[tenants.carol]\nkeys = ["{keys.pub("carol")}"]\n')
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(10):
            await got_one.wait()
        assert seen[-1].reloaded and holder.registry.get("carol") is not None

        got_one = trio.Event()
        path.write_text("[tenants.carol]\nkeys = [\n")
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(10):
            await got_one.wait()
        assert not seen[-1].reloaded and seen[-1].error is not None and "line" in seen[-1].error
        assert holder.registry.get("carol") is not None
        nursery.cancel_scope.cancel()


async def test_watcher_notices_a_changed_file_without_a_signal(tmp_path: Path) -> None:
    keys = TenantKeys()
    path = write_registry(tmp_path / "tenants.toml", keys)
    holder = RegistryHolder(path)
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: watch_registry(holder, lambda r: done.set(), poll_interval=0.01,
                                                               handle_sighup=False, task_status=task_status))
        path.write_text(tenants_toml(keys) + f'\n[tenants.carol]\nkeys = ["{keys.pub("carol")}"]\n')
        os.utime(path, ns=(2, 2))
        with trio.fail_after(10):
            await done.wait()
        assert holder.registry.get("carol") is not None
        nursery.cancel_scope.cancel()
