"""Signed job requests: the canonical encoding, and every way a request fails to verify."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from p2psched.jobs.spec import JobSpec
from p2psched.security.admission import Admission, TenantUsage
from p2psched.security.errors import AdmissionError
from p2psched.security.keys import canonical_json, generate
from p2psched.security.signing import (
    FORWARD_WINDOW_S,
    Auth,
    SignedEnvelope,
    parse_submission,
    sign_spec,
    signing_payload,
    verify_request,
)
from security_helpers import NOW, WASM, TenantKeys, registry, wasm_spec


@pytest.fixture
def keys() -> TenantKeys:
    return TenantKeys()


def over_the_wire(env: SignedEnvelope) -> dict[str, Any]:
    """What an agent receives: the envelope as JSON text, parsed back."""
    return json.loads(json.dumps(env.to_json()))


def reason_of(fn: Callable[[], object]) -> tuple[int, str, str]:
    with pytest.raises(AdmissionError) as info:
        fn()
    return info.value.status, info.value.reason, info.value.message


def test_a_signed_spec_verifies_after_a_json_round_trip(keys: TenantKeys) -> None:
    env = sign_spec(wasm_spec(labels={"team": "ml"}, priority=7), "alice", keys.key("alice"), NOW)
    spec, auth = parse_submission(over_the_wire(env))
    assert auth is not None
    verified = verify_request(spec, auth, registry(keys), NOW + 1)
    assert verified.tenant.name == "alice" and verified.auth.nonce == env.auth.nonce
    assert auth.module_sha256 == hashlib.sha256(WASM).hexdigest()
    assert auth.input_sha256 == hashlib.sha256(b"hello").hexdigest()
    assert auth.expires_at - auth.issued_at == 300


def test_the_encoding_is_canonical(keys: TenantKeys) -> None:
    env = sign_spec(wasm_spec(env={"B": "2", "A": "1"}), "alice", keys.key("alice"), NOW, nonce="n" * 32)
    reordered = json.loads(json.dumps(env.to_json()["spec"]), object_pairs_hook=lambda kv: dict(reversed(kv)))
    spec2 = JobSpec.model_validate(reordered)
    assert signing_payload(spec2, env.auth) == signing_payload(env.spec, env.auth)
    payload = signing_payload(env.spec, env.auth)
    body = json.loads(payload.split(b"\n", 1)[1])
    assert canonical_json(body) == payload.split(b"\n", 1)[1]  # sorted keys, no whitespace
    assert "module" not in body["job"] and "input" not in body["job"]  # bytes are covered by their hashes
    # Spelling a default out does not change what is signed, so versions that add a defaulted field agree.
    explicit = env.spec.model_copy(update={"priority": 0})
    assert signing_payload(explicit, env.auth) == payload


def test_an_unsigned_spec_is_refused_when_a_registry_is_loaded(keys: TenantKeys) -> None:
    spec, auth = parse_submission({"spec": wasm_spec().model_dump(mode="json")})
    assert auth is None
    status, reason, msg = reason_of(lambda: verify_request(spec, auth, registry(keys), NOW))
    assert (status, reason) == (401, "unsigned") and "p2psched submit --tenant" in msg
    bare, auth = parse_submission(wasm_spec().model_dump(mode="json"))
    assert auth is None and bare.module == WASM


TAMPERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "priority": lambda s: s.update(priority=40),
    "cpu": lambda s: s.setdefault("resources", {}).update(cpu=64.0),
    "gpu": lambda s: s.setdefault("resources", {}).update(gpu=1),
    "wall_ms": lambda s: s.setdefault("limits", {}).update(wall_ms=10**8),
    "fuel": lambda s: s.setdefault("limits", {}).update(fuel=10**12),
    "args": lambda s: s.update(args=["--evil"]),
    "env": lambda s: s.update(env={"LD_PRELOAD": "/tmp/x.so"}),
    "labels": lambda s: s.update(labels={"team": "vision"}),
    "capabilities": lambda s: s.update(capabilities=["network"]),
    "entry": lambda s: s.update(entry="other"),
    "id": lambda s: s.update(id="someone-elses-id"),
    "artifacts": lambda s: s.update(artifacts=["/etc/shadow"]),
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_any_change_to_the_spec_breaks_the_signature(keys: TenantKeys, field: str) -> None:
    body = over_the_wire(sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW))
    TAMPERS[field](body["spec"])
    spec, auth = parse_submission(body)
    status, reason, _ = reason_of(lambda: verify_request(spec, auth, registry(keys), NOW))
    assert (status, reason) == (401, "bad_signature")


@pytest.mark.parametrize("field", ["nonce", "issued_at", "expires_at", "key_id", "tenant"])
def test_any_change_to_the_auth_block_is_refused(keys: TenantKeys, field: str) -> None:
    body = over_the_wire(sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW))
    body["auth"][field] = {"nonce": "0" * 32, "issued_at": int(NOW) - 10, "expires_at": int(NOW) + 200,
                           "key_id": "0" * 16, "tenant": "bob"}[field]
    spec, auth = parse_submission(body)
    status, reason, _ = reason_of(lambda: verify_request(spec, auth, registry(keys), NOW))
    expected = {"key_id": "unknown_key", "tenant": "unknown_key"}.get(field, "bad_signature")
    assert (status, reason) == (401, expected)


def test_a_tampered_module_is_refused(keys: TenantKeys) -> None:
    reg = registry(keys)
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    evil = WASM + b"\0"

    # 1. Bytes swapped but the declared hash kept: the spec itself refuses to parse (422).
    body = over_the_wire(env)
    body["spec"]["module"] = __import__("base64").b64encode(evil).decode()
    with pytest.raises(ValidationError, match="send the module that was declared"):
        parse_submission(body)

    # 2. Bytes and the spec's hash swapped together: the signed hash no longer matches.
    body["spec"]["module_sha256"] = hashlib.sha256(evil).hexdigest()
    spec, auth = parse_submission(body)
    status, reason, msg = reason_of(lambda: verify_request(spec, auth, reg, NOW))
    assert (status, reason) == (401, "module_hash_mismatch")
    assert env.auth.module_sha256 in msg and "submit the module that was signed" in msg

    # 3. ...and the auth block's hash too: now the signature fails.
    body["auth"]["module_sha256"] = hashlib.sha256(evil).hexdigest()
    spec, auth = parse_submission(body)
    assert reason_of(lambda: verify_request(spec, auth, reg, NOW))[1] == "bad_signature"

    # 4. Module bytes that arrive separately (fetched by hash) are checked as well.
    by_hash = JobSpec(tenant="alice", module_sha256=hashlib.sha256(WASM).hexdigest(), input=b"hello")
    env2 = sign_spec(by_hash, "alice", keys.key("alice"), NOW)
    verify_request(env2.spec, env2.auth, reg, NOW, module=WASM)
    status, reason, msg = reason_of(lambda: verify_request(env2.spec, env2.auth, reg, NOW, module=evil))
    assert (status, reason) == (401, "module_hash_mismatch") and "altered" in msg

    # 5. Bytes altered after parsing (e.g. a bug or a bit flip in a store) are caught too.
    spec5 = env.spec.model_copy()
    spec5.module = evil
    assert reason_of(lambda: verify_request(spec5, env.auth, reg, NOW))[1] == "module_hash_mismatch"


def test_a_tampered_input_is_refused(keys: TenantKeys) -> None:
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    spec = env.spec.model_copy(update={"input": b"goodbye"})
    status, reason, _ = reason_of(lambda: verify_request(spec, env.auth, registry(keys), NOW))
    assert (status, reason) == (401, "input_hash_mismatch")


def test_time_window(keys: TenantKeys) -> None:
    reg = registry(keys)
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW, ttl=60)
    verify_request(env.spec, env.auth, reg, NOW + 60)
    status, reason, msg = reason_of(lambda: verify_request(env.spec, env.auth, reg, NOW + 61))
    assert (status, reason) == (401, "expired") and "sign and submit it again" in msg
    status, reason, msg = reason_of(lambda: verify_request(env.spec, env.auth, reg, NOW - 120))
    assert (status, reason) == (401, "not_yet_valid") and "clock" in msg
    long = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW, ttl=3600)
    status, reason, _ = reason_of(lambda: verify_request(long.spec, long.auth, reg, NOW, max_ttl_s=600))
    assert (status, reason) == (401, "ttl_too_long")
    with pytest.raises(ValueError, match="ttl"):
        sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW, ttl=86400)


def test_unknown_tenant_and_rotated_key(keys: TenantKeys) -> None:
    env = sign_spec(wasm_spec(tenant="zoe"), "zoe", generate(), NOW)
    status, reason, msg = reason_of(lambda: verify_request(env.spec, env.auth, registry(keys), NOW))
    assert (status, reason) == (401, "unknown_tenant") and "p2psched tenant add zoe" in msg
    old = sign_spec(wasm_spec(), "alice", generate(), NOW)  # a key alice no longer holds
    status, reason, msg = reason_of(lambda: verify_request(old.spec, old.auth, registry(keys), NOW))
    assert (status, reason) == (401, "unknown_key") and "rotated" in msg


def test_a_spec_naming_another_tenant(keys: TenantKeys) -> None:
    with pytest.raises(ValueError, match="signed as"):
        sign_spec(wasm_spec(tenant="bob"), "alice", keys.key("alice"), NOW)
    # A client that signs such a spec anyway (not through sign_spec) is refused by name.
    spec = wasm_spec(tenant="bob")
    base = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    fields = {k: v for k, v in base.auth.to_json().items() if k != "v"}
    fields["signature"] = ""
    auth = Auth(**fields)
    auth = Auth(**{**fields, "signature": keys.key("alice").sign(signing_payload(spec, auth)).hex()})
    status, reason, _ = reason_of(lambda: verify_request(spec, auth, registry(keys), NOW))
    assert (status, reason) == (403, "tenant_mismatch")


@pytest.mark.parametrize(
    "auth",
    [[1, 2], "text", {"tenant": "alice"}, {"v": 2}, "bad-hash"],
    ids=["not-an-object", "string", "missing-fields", "version", "bad-hash"],
)
def test_malformed_auth_blocks(keys: TenantKeys, auth: Any) -> None:
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    if auth == "bad-hash":
        auth = {**env.auth.to_json(), "input_sha256": "XYZ"}
    status, reason, _ = reason_of(lambda: verify_request(env.spec, auth, registry(keys), NOW))
    assert (status, reason) == (401, "malformed_auth")


def forward_frame(spec: JobSpec, auth: Auth, job_id: str) -> bytes:
    """A transfer frame as an agent would send it: msgpack, module bytes raw."""
    return msgpack.packb({"job_id": job_id, "spec": spec.model_dump(mode="python"), "auth": auth.to_json()})


def receive_frame(frame: bytes) -> tuple[JobSpec, dict[str, Any], str]:
    d = msgpack.unpackb(frame, raw=False)
    return JobSpec.model_validate(d["spec"]), d["auth"], d["job_id"]


def test_a_forwarded_job_is_verified_again_at_each_hop(keys: TenantKeys) -> None:
    reg = registry(keys)
    origin, hop1, hop2 = Admission(), Admission(), Admission()  # three agents, three nonce caches
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    origin.admit(env.spec, env.auth, registry=reg, job_id="a1:j1", usage=TenantUsage(), now=NOW)

    # The job waited at its origin past the request's expiry, then was forwarded twice.
    later = NOW + 300 + 600
    spec, auth, job_id = receive_frame(forward_frame(env.spec, env.auth, "a1:j1"))
    ok = hop1.admit(spec, auth, registry=reg, job_id=job_id, usage=None, now=later, forwarded=True)
    assert ok.tenant == "alice" and not ok.duplicate
    ok = hop2.admit(spec, auth, registry=reg, job_id=job_id, usage=None, now=later, forwarded=True)
    assert not ok.duplicate
    # The same transfer delivered twice (a retry) is a duplicate, not a new job.
    assert hop1.admit(spec, auth, registry=reg, job_id=job_id, usage=None, now=later, forwarded=True).duplicate
    # The same envelope under a new job id is a replay, on any hop that saw it.
    status, reason, _ = reason_of(lambda: hop1.admit(spec, auth, registry=reg, job_id="a1:j2", usage=None,
                                                     now=later, forwarded=True))
    assert (status, reason) == (409, "replayed_nonce")
    # Past the forward window the envelope is no longer accepted by a next hop.
    status, reason, msg = reason_of(lambda: Admission().admit(
        spec, auth, registry=reg, job_id=job_id, usage=None, now=NOW + 300 + FORWARD_WINDOW_S + 1, forwarded=True))
    assert (status, reason) == (401, "expired") and "forwardable" in msg
    # A fresh submission of that expired request at an API is refused.
    assert reason_of(lambda: Admission().admit(spec, auth, registry=reg, job_id="x", usage=TenantUsage(),
                                               now=later))[1] == "expired"


@pytest.mark.parametrize("what", ["args", "limits", "module", "module-and-signed-hash"])
def test_a_forwarded_job_tampered_in_transit_is_refused_by_the_next_hop(keys: TenantKeys, what: str) -> None:
    reg = registry(keys)
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    frame = msgpack.unpackb(forward_frame(env.spec, env.auth, "a1:j1"), raw=False)
    evil = WASM + b"\x00\x01"
    if what == "args":
        frame["spec"]["args"] = ["--exfiltrate"]
    elif what == "limits":
        frame["spec"]["limits"]["wall_ms"] = 7 * 24 * 3600 * 1000
    else:
        frame["spec"]["module"] = evil
        frame["spec"]["module_sha256"] = hashlib.sha256(evil).hexdigest()
        if what == "module-and-signed-hash":
            frame["auth"]["module_sha256"] = hashlib.sha256(evil).hexdigest()
    spec, auth, job_id = receive_frame(msgpack.packb(frame))
    hop = Admission()
    status, reason, _ = reason_of(lambda: hop.admit(spec, auth, registry=reg, job_id=job_id, usage=None,
                                                    now=NOW + 5, forwarded=True))
    assert (status, reason) == (401, "module_hash_mismatch" if what == "module" else "bad_signature")
    # The untouched frame still verifies at that hop: the refusal is about the tampering.
    spec, auth, job_id = receive_frame(forward_frame(env.spec, env.auth, "a1:j1"))
    assert hop.admit(spec, auth, registry=reg, job_id=job_id, usage=None, now=NOW + 5, forwarded=True).tenant == "alice"


# Any text a program argument or environment entry can carry: no NUL, no lone
# surrogate, and no '=' in a variable's name (the spec refuses each).
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
_env_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00="), min_size=1,
                    max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cpu=st.floats(min_value=0.001, max_value=1024, allow_nan=False),
    mem=st.integers(1, 4 * 1024 * 1024),
    priority=st.integers(0, 50),
    env=st.dictionaries(_env_name, _text, max_size=4),
    args=st.lists(_text, max_size=4),
    data=st.binary(max_size=64),
    wire=st.sampled_from(["json", "msgpack"]),
)
def test_any_spec_verifies_after_travelling(keys: TenantKeys, cpu: float, mem: int, priority: int,
                                            env: dict[str, str], args: list[str], data: bytes, wire: str) -> None:
    """Floats, unicode and binary input survive JSON (API) and msgpack (transfer) unchanged in meaning."""
    spec = JobSpec(tenant="alice", module=WASM, input=data, args=args, env=env, priority=priority,
                   resources={"cpu": cpu, "mem_mb": mem})  # type: ignore[arg-type]
    env_ = sign_spec(spec, "alice", keys.key("alice"), NOW)
    if wire == "json":
        got, auth = parse_submission(json.loads(json.dumps(env_.to_json())))
    else:
        got, auth, _ = receive_frame(forward_frame(env_.spec, env_.auth, "j"))
    assert verify_request(got, auth, registry(keys), NOW).tenant.name == "alice"


@pytest.mark.parametrize(("drop", "change", "says"), [
    ("key_id", {}, "auth.key_id is missing"),
    (None, {"nonce": 7}, "auth.nonce must be a string of 1 to 64 characters"),
    (None, {"issued_at": "now"}, "auth.issued_at must be an integer number of Unix seconds"),
])
def test_a_malformed_auth_block_names_the_field(keys: TenantKeys, drop: str | None, change: dict[str, Any],
                                                says: str) -> None:
    env = sign_spec(wasm_spec(), "alice", keys.key("alice"), NOW)
    auth = {k: v for k, v in env.auth.to_json().items() if k != drop} | change
    status, reason, message = reason_of(lambda: verify_request(env.spec, auth, registry(keys), NOW))
    assert (status, reason) == (401, "malformed_auth")
    assert f"the auth block is malformed: {says}; sign with" in message
