"""Node identity, measurement and attestation reports.

Public interface:

* Start-up: ``key = open_node_key(data_dir)`` (``data_dir/node.key``, 0600, and its
  public key in ``node.pub``; an existing key readable by others is refused, as ssh
  does; node_key.py). Gossip ``key.public_hex`` as ``NodeState.node_pubkey`` and ``measure(cfg).value`` as
  ``NodeState.measurement``, where ``cfg`` is the effective configuration as plain
  JSON data (``settings.model_dump(mode="json")``) *without* node-local fields (node id,
  addresses, ports, data dir): otherwise no two agents would share a measurement and an
  allow-list would have to name every node.
* Peers: ``peer_allowed(state.measurement, allow_list)`` before forwarding to (or
  accepting a job from) a peer; ``allow_list=None`` means no allow-list was configured.
  ``load_allow_list(path)`` reads one measurement per line (``#`` comments).
* After a job ends, the executor calls ``report_from_result(key.private(), ...)`` (or the lower-level
  ``issue_report(...)``) and stores the dict as ``result.attestation``.
* Anyone: ``verify_report(report, expected_pubkey=..., module=..., input=..., output=...)``
  raises :class:`AttestationError` naming what does not hold. Without
  ``expected_pubkey`` it proves only that the report is unchanged since the key inside
  it signed it; pass the executor's gossiped ``node_pubkey`` to prove who ran the job.

The measurement stands in for measured boot: sha256 over the installed p2psched
package (sorted relative paths and the sha256 of each file's bytes; bytecode caches
excluded) and over the canonical JSON of the configuration. It detects an agent
running other code or settings than its peers; it does not stop a root user on that
host from lying about it (see docs/security.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2psched.jobs.spec import SHA256_RE, JobSpec
from p2psched.sandbox.base import SandboxResult
from p2psched.security.keys import canonical_json, public_hex, verify_sig
# The node key's files are node_key.py's; these names stay importable from here.
from p2psched.security.node_key import NODE_KEY_FILE, NODE_PUB_FILE, NodeKey, NodeKeyError, open_node_key  # noqa: F401
from p2psched.security.node_key import load_or_create_private_key as load_or_create_node_key  # noqa: F401

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPORT_TYPE = "p2psched.attestation/v1"
REPORT_DOMAIN = b"p2psched/attestation/v1\n"
MEASUREMENT_DOMAIN = b"p2psched/measurement/v1\n"


class AttestationError(ValueError):
    """A report that does not verify; the message says which check failed."""


@functools.cache
def measure_code(package_dir: str | None = None) -> str:
    """sha256 over the installed p2psched package's files (cached: the code does not change under us)."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parent.parent
    h = hashlib.sha256(MEASUREMENT_DOMAIN)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )
    for p in files:
        rel = p.relative_to(root).as_posix().encode()
        h.update(rel + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Measurement:
    code: str  # sha256 of the package files
    config: str  # sha256 of the configuration's canonical JSON
    value: str  # sha256 binding both: what peers gossip and allow-lists name


def measure(config: Mapping[str, Any], *, code: str | None = None) -> Measurement:
    code = code or measure_code()
    cfg = hashlib.sha256(canonical_json(dict(config))).hexdigest()
    value = hashlib.sha256(MEASUREMENT_DOMAIN + code.encode() + b"\n" + cfg.encode()).hexdigest()
    return Measurement(code=code, config=cfg, value=value)


def peer_allowed(measurement: str, allow_list: Collection[str] | None) -> bool:
    """True if no allow-list is configured, or the peer's measurement is on it."""
    return allow_list is None or measurement in allow_list


def load_allow_list(path: str | os.PathLike[str]) -> frozenset[str]:
    out: set[str] = set()
    for no, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not SHA256_RE.match(line):
            raise ValueError(
                f"measurement allow-list {path}: line {no}: {line[:70]!r} is not a measurement (64 lowercase hex "
                "digits, as 'p2psched peers' shows for each agent)"
            )
        out.add(line)
    return frozenset(out)


def spec_sha256(spec: JobSpec) -> str:
    """Digest of the job as signed (signing.py's view: every field, blobs by their hashes)."""
    view = spec.model_dump(mode="json", exclude={"module", "input"}, exclude_defaults=True)
    view["input_sha256"] = hashlib.sha256(spec.input).hexdigest()
    return hashlib.sha256(canonical_json(view)).hexdigest()


def issue_report(
    node_key: Ed25519PrivateKey, *, node_id: str, measurement: str, job_id: str, tenant: str, runtime: str,
    module_sha256: str | None, input_sha256: str, output_sha256: str, stderr_sha256: str | None = None,
    artifacts_sha256: Mapping[str, str] | None = None, spec_digest: str | None = None,
    sandbox: Mapping[str, Any], limits: Mapping[str, Any], started_at: float, ended_at: float,
    exit_code: int | None, reason: str, node_pubkey: str | None = None,
) -> dict[str, Any]:
    """Build and sign a report. All values must be JSON data (str, int, float, bool, None, list, dict).

    ``node_pubkey``: ``public_hex(node_key)``, for callers that keep it (it costs a few
    microseconds to derive, per report)."""
    body: dict[str, Any] = {
        "type": REPORT_TYPE, "job_id": job_id, "tenant": tenant, "runtime": runtime,
        "module_sha256": module_sha256, "input_sha256": input_sha256, "output_sha256": output_sha256,
        "stderr_sha256": stderr_sha256, "artifacts_sha256": dict(artifacts_sha256 or {}),
        "spec_sha256": spec_digest, "node_id": node_id, "node_pubkey": node_pubkey or public_hex(node_key),
        "measurement": measurement, "sandbox": dict(sandbox), "limits": dict(limits),
        # Integer Unix milliseconds: exact in every JSON implementation, so no re-encoding
        # of the report (e.g. 1.0 written back as 1) can break its signature.
        "started_at_ms": round(started_at * 1000), "ended_at_ms": round(ended_at * 1000),
        "exit_code": exit_code, "reason": reason,
    }
    body["signature"] = node_key.sign(REPORT_DOMAIN + canonical_json(body)).hex()
    return body


def report_from_result(
    node_key: Ed25519PrivateKey, *, node_id: str, measurement: str, job_id: str, spec: JobSpec,
    result: SandboxResult, sandbox_kind: str, started_at: float, ended_at: float, node_pubkey: str | None = None,
) -> dict[str, Any]:
    """The executor's one call: a signed report for ``spec`` that ended with ``result``."""
    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    return issue_report(
        node_key, node_id=node_id, measurement=measurement, job_id=job_id, tenant=spec.tenant,
        runtime=spec.runtime, module_sha256=spec.module_sha256, input_sha256=sha(spec.input),
        output_sha256=sha(result.stdout), stderr_sha256=sha(result.stderr),
        artifacts_sha256={k: sha(v) for k, v in sorted(result.artifacts.items())},
        spec_digest=spec_sha256(spec), sandbox={"kind": sandbox_kind, **_jsonable(result.sandbox)},
        limits=spec.limits.model_dump(mode="json"), started_at=started_at, ended_at=ended_at,
        exit_code=result.exit_code, reason=result.reason, node_pubkey=node_pubkey,
    )


_PLAIN = (str, int, float, bool, type(None))


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` as JSON data: values JSON cannot hold become strings, tuples lists."""
    if all(isinstance(v, _PLAIN) for v in d.values()):  # the common case: a copy will do
        return dict(d)
    import json

    return dict(json.loads(json.dumps(dict(d), default=str)))


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "type": str, "job_id": str, "tenant": str, "runtime": str, "input_sha256": str, "output_sha256": str,
    "node_id": str, "node_pubkey": str, "measurement": str, "sandbox": dict, "limits": dict,
    "started_at_ms": int, "ended_at_ms": int, "reason": str, "signature": str,
}


def verify_report(
    report: Any, expected_pubkey: str | None = None, *, module: bytes | None = None, input: bytes | None = None,
    output: bytes | None = None, allowed_measurements: Collection[str] | None = None,
) -> None:
    """Raise AttestationError unless the report is intact and matches what is given."""
    if not isinstance(report, dict):
        raise AttestationError("an attestation report is a JSON object; this is not one")
    if report.get("type") != REPORT_TYPE:
        raise AttestationError(f"report type is {report.get('type')!r}; expected {REPORT_TYPE!r}")
    for name, typ in _REQUIRED.items():
        if name not in report:
            raise AttestationError(f"the report lacks the field {name!r}; it was not written by a p2psched agent or was cut")
        if not isinstance(report[name], typ) or isinstance(report[name], bool):
            raise AttestationError(f"the report's field {name!r} has the wrong type")
    body = {k: v for k, v in report.items() if k != "signature"}
    pub = report["node_pubkey"]
    try:
        ok = verify_sig(pub, report["signature"], REPORT_DOMAIN + canonical_json(body))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AttestationError(
            f"the signature does not verify with the node key in the report: the report was changed after node "
            f"{report['node_id']!r} signed it, or it was never signed by that key"
        )
    if expected_pubkey is not None and pub != expected_pubkey.strip().lower():
        raise AttestationError(
            f"the report is signed by key {pub[:16]}..., not by node {report['node_id']!r}'s key "
            f"{expected_pubkey[:16]}...: it was forged or re-signed by another node"
        )
    if allowed_measurements is not None and report["measurement"] not in allowed_measurements:
        raise AttestationError(
            f"node {report['node_id']!r} ran with measurement {report['measurement'][:16]}..., which is not on the allow-list"
        )
    for what, blob, field_name in (("module", module, "module_sha256"), ("input", input, "input_sha256"),
                                   ("output", output, "output_sha256")):
        if blob is not None:
            got = hashlib.sha256(blob).hexdigest()
            if got != report.get(field_name):
                raise AttestationError(
                    f"the {what} given hashes to {got}, but the report says the job's {what} was "
                    f"{report.get(field_name)}; this is not the {what} of job {report['job_id']!r}"
                )
